"""ComfyUI's progress bar for sampling steps, with every step reaching the UI.

A node reports progress through ``comfy.utils.PROGRESS_BAR_HOOK``, which the server sets (``main.py``)
to send the websocket ``progress`` message (``value``, ``max``, ``prompt_id`` and ``node``, the running
node taken from the execution context), update the per-node ``progress_state`` and check for
``POST /interrupt``. ``comfy.utils.ProgressBar`` calls that hook, but from ComfyUI 0.33 on it throttles:
an update less than 100 ms or 0.5 % after the last one sent is dropped (the first, the last and those
with a preview always go through). A sampling step is one tick of the bar, and with small sizes or fast
GPUs steps come faster than that, so the bar would jump or stall. :class:`StepProgress` calls the same
hook the way ``ProgressBar`` does, once for every new value, in every ComfyUI version.
"""

from __future__ import annotations

import comfy.utils


class StepProgress:
    """A progress bar of ``total`` steps for the running node; each new value is sent to the UI.

    Like ``comfy.utils.ProgressBar``, it takes the hook at construction (no hook outside a server: then
    nothing is sent) and the hook raises ComfyUI's interrupt exception after ``POST /interrupt``.
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.hook = comfy.utils.PROGRESS_BAR_HOOK
        self.sent: tuple[int, int] | None = None

    def update(self, value: int, total: int | None = None) -> None:
        """Show ``value`` of ``total`` (default: the current total), clamped to the total; the same value
        and total as the last ones sent are not sent again."""
        if total is not None:
            self.total = int(total)
        value = min(int(value), self.total)
        if (value, self.total) == self.sent:
            return
        self.sent = (value, self.total)
        if self.hook is not None:
            self.hook(value, self.total, None, node_id=None)  # node: the running node (execution context)
