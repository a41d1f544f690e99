"""Run the real ComfyUI in this process and execute API-format prompts with this node pack loaded.

Start-up follows ComfyUI 0.3.75's ``main.py`` without its server:

1. find the ComfyUI tree (``$COMFYUI_PATH``, else ``<repo>/.comfyui`` made by ``make setup``) and put
   it first on ``sys.path`` (its ``nodes.py`` must win over this repo's ``nodes/`` package);
2. import torchvision first (the dev venv makes PyPI's CUDA build importable next to the CPU torch, see
   scripts/torchvision_cpu_shim.py);
3. set ``comfy.cli_args.args.cpu = True`` before ``comfy.model_management`` is imported (argument
   parsing stays off, so pytest's command line is never read as ComfyUI's);
4. import ``utils.extra_config`` before ``nodes``, point every model folder, input, output, temp and
   user directory at a temporary folder (nothing is written into the cached ComfyUI tree);
5. ``nodes.init_extra_nodes`` (the public APIs and the built-in ``comfy_extras`` nodes; no API nodes,
   no other custom nodes), then load this repository as the custom node pack
   ``custom_nodes/ComfyUI-Memento`` with ComfyUI's own ``nodes.load_custom_node``;
6. :meth:`ComfyHost.run` validates a prompt with ``execution.validate_prompt`` and runs it with
   ``execution.PromptExecutor(stub_server).execute_async`` on the host's event loop, like
   ``main.prompt_worker`` does.

Usage (see the ``comfy_host`` fixture in ``conftest.py``)::

    def test_x(comfy_host):
        path = comfy_host.model_dir("diffusion_models") / "tiny.safetensors"
        ...
        result = comfy_host.run({"1": {"class_type": "MementoLoadDiT", "inputs": {...}}, ...})
        assert "kind: i2v" in result.ui_text("2")
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Name of the pack folder under ``custom_nodes/`` (what a user's clone is called).
PACK_DIR_NAME = "ComfyUI-Memento"

#: Top-level module names ComfyUI imports that another copy (this repo's nodes/ package) could shadow.
_SHADOWED_NAMES = ("nodes", "utils")

#: The ComfyUI version CI runs (scripts/bootstrap.sh); example_workflows/ are generated against its
#: ``/object_info``. Other versions (``COMFYUI_PATH``, ``make test-comfy-latest``) load and run them.
CI_COMFYUI_VERSION = "0.3.75"

#: Model folders created up front under :attr:`ComfyHost.models_root`.
_DEFAULT_MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras", "clip_vision", "checkpoints")


class ComfyHostError(RuntimeError):
    """ComfyUI could not be found, started, or could not load the pack."""


class ComfyPromptError(AssertionError):
    """A prompt failed validation or execution; the message is ComfyUI's own error text."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def find_comfyui() -> Path:
    """The ComfyUI tree to use: ``$COMFYUI_PATH``, else ``<repo>/.comfyui``; raise if it is missing."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env).expanduser() if env else REPO_ROOT / ".comfyui"
    markers = ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy")
    if not path.is_dir() or not all((path / m).exists() for m in markers):
        source = "COMFYUI_PATH" if env else "the default location"
        raise ComfyHostError(
            f"No ComfyUI tree at {path} ({source}). Run `make setup` to download ComfyUI 0.3.75 into the "
            "cache and link it as .comfyui, or set COMFYUI_PATH to a ComfyUI checkout."
        )
    return path.resolve()


def comfyui_version(comfy_path: Path) -> str:
    """``__version__`` from a ComfyUI tree's ``comfyui_version.py`` ("unknown" when it has none)."""
    try:
        text = (comfy_path / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else "unknown"


class StubServer:
    """The part of ``server.PromptServer`` that ``execution.PromptExecutor`` uses; records all events."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Record an event that the real server would send to the browser."""
        self.events.append((event, data))

    def queue_updated(self) -> None:
        """No queue here: nothing to announce."""


@dataclass
class RunResult:
    """Outcome of :meth:`ComfyHost.run`.

    Attributes:
        prompt_id: the id the prompt ran under.
        success: True when validation passed and every node ran.
        outputs: ``history["outputs"]``: node id -> the ``ui`` dict that node returned (output nodes).
        history: ``PromptExecutor.history_result`` (``outputs`` and ``meta``), empty if never executed.
        messages: ``(event, data)`` status messages (execution_start, execution_error, ...).
        events: everything sent to the stub server (executing, executed, progress_state, ...).
        validation_error: ``validate_prompt``'s error dict when the prompt was rejected.
        node_errors: ``validate_prompt``'s per-node errors (node id -> {"errors", "class_type", ...}).
        execution_error: the ``execution_error`` message data (node_id, node_type, exception_message,
            exception_type, traceback, ...) when a node raised.
        seconds: wall time of validation plus execution.
    """

    prompt_id: str
    success: bool
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[str, Any]] = field(default_factory=list)
    validation_error: dict[str, Any] | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)
    execution_error: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def error_message(self) -> str | None:
        """ComfyUI's error text (what the UI shows), or None when the prompt succeeded."""
        if self.validation_error is not None:
            lines = [_format_error(self.validation_error)]
            for node_id, info in self.node_errors.items():
                for err in info.get("errors", []):
                    lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {_format_error(err)}")
            return "\n".join(lines)
        if self.execution_error is not None:
            err = self.execution_error
            return (
                f"node {err.get('node_id')} ({err.get('node_type')}) raised {err.get('exception_type')}: "
                f"{str(err.get('exception_message', '')).strip()}"
            )
        for event, data in self.messages:
            if event == "execution_interrupted":
                return f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})"
        return None

    @property
    def traceback(self) -> str:
        """The failing node's traceback as ComfyUI recorded it ('' when none)."""
        if self.execution_error is None:
            return ""
        return "".join(self.execution_error.get("traceback") or [])

    def ui(self, node_id: str) -> dict[str, Any]:
        """The ``ui`` dict output node ``node_id`` returned; a readable KeyError if it returned none."""
        try:
            return self.outputs[str(node_id)]
        except KeyError:
            raise KeyError(
                f"node {node_id} produced no UI output; nodes with UI output: {sorted(self.outputs)}"
            ) from None

    def ui_text(self, node_id: str) -> str:
        """The text an output node shows (``ui={"text": [...]}``), joined with newlines."""
        text = self.ui(node_id).get("text")
        if text is None:
            raise KeyError(f"node {node_id} has no 'text' in its UI output: {self.ui(node_id)}")
        if isinstance(text, str):
            return text
        return "\n".join(str(t) for t in text)

    def raise_for_error(self) -> RunResult:
        """Raise :class:`ComfyPromptError` with ComfyUI's message (and traceback) if the run failed."""
        if not self.success:
            message = self.error_message or "prompt failed without an error message"
            if self.traceback:
                message += "\n\nComfyUI traceback:\n" + self.traceback
            raise ComfyPromptError(message, self)
        return self


def _format_error(err: dict[str, Any]) -> str:
    """One ComfyUI validation error dict as ``message: details``."""
    message = str(err.get("message", "")).strip()
    details = str(err.get("details", "")).strip()
    return f"{message}: {details}" if details else message


class _LogCapture(logging.Handler):
    """Collects log records (ComfyUI reports custom node import failures only as log warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record."""
        self.records.append(record)

    def text(self) -> str:
        """All captured messages, one per line."""
        return "\n".join(r.getMessage() for r in self.records)


@contextmanager
def _capture_logs() -> Iterator[_LogCapture]:
    handler = _LogCapture()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class ComfyHost:
    """A started in-process ComfyUI with this pack loaded. Create it with :func:`start_comfy_host`.

    Attributes:
        comfy_path: the ComfyUI tree in use.
        version: its version (``comfyui_version.py``), e.g. "0.3.75".
        root: the temporary folder holding ``models/``, ``input/``, ``output/``, ``temp/``, ``user/``
            and ``custom_nodes/``.
        models_root: ``root / "models"``; each ComfyUI model folder name maps to one sub-folder.
        pack_module: the pack's module as ComfyUI imported it.
        pack_node_ids: node ids the pack registered, in registration order.
        startup_seconds: time :func:`start_comfy_host` took.
        builtin_import_failures: ``comfy_extras`` files ComfyUI could not import (missing extras).
    """

    def __init__(self, comfy_path: Path, root: Path) -> None:
        self.comfy_path = comfy_path
        self.version = comfyui_version(comfy_path)
        self.root = root
        self.models_root = root / "models"
        self.pack_module: ModuleType | None = None
        self.pack_node_ids: list[str] = []
        self.startup_seconds = 0.0
        self.builtin_import_failures: list[str] = []
        self.server = StubServer()
        self._loop = asyncio.new_event_loop()

    # -- ComfyUI modules --------------------------------------------------------------------------

    @property
    def nodes(self) -> ModuleType:
        """ComfyUI's ``nodes`` module (``NODE_CLASS_MAPPINGS``, ``NODE_DISPLAY_NAME_MAPPINGS``, ...)."""
        return sys.modules["nodes"]

    @property
    def execution(self) -> ModuleType:
        """ComfyUI's ``execution`` module."""
        return sys.modules["execution"]

    @property
    def folder_paths(self) -> ModuleType:
        """ComfyUI's ``folder_paths`` module."""
        return sys.modules["folder_paths"]

    def node_class(self, node_id: str) -> type:
        """The class registered under ``node_id``; a KeyError listing the pack's ids if it is unknown."""
        try:
            return self.nodes.NODE_CLASS_MAPPINGS[node_id]
        except KeyError:
            known = self.pack_node_ids
            raise KeyError(f"ComfyUI has no node '{node_id}'; this pack registered {known}") from None

    def input_types(self, node_id: str) -> dict[str, Any]:
        """``INPUT_TYPES()`` of a node, as ``/object_info`` reports it (V1 shape, also for V3 nodes)."""
        return self.node_class(node_id).INPUT_TYPES()

    def combo_options(self, node_id: str, input_name: str) -> list[Any]:
        """The options of a combo widget, for V1 (``[...]``) and V3 (``("COMBO", {"options": [...]})``)."""
        inputs = self.input_types(node_id)
        for section in ("required", "optional"):
            if input_name in inputs.get(section, {}):
                spec = inputs[section][input_name]
                if isinstance(spec[0], list):
                    return list(spec[0])
                if spec[0] == "COMBO" and len(spec) > 1:
                    return list(spec[1].get("options", []))
                raise TypeError(f"{node_id}.{input_name} is not a combo: {spec!r}")
        raise KeyError(f"{node_id} has no input '{input_name}'")

    def pack_submodule(self, name: str) -> ModuleType:
        """A submodule of the pack as ComfyUI imported it (e.g. ``"nodes.shot_nodes"``): its classes are
        the ones the nodes check with ``isinstance``."""
        if self.pack_module is None:
            raise ComfyHostError("the pack is not loaded")
        return sys.modules[f"{self.pack_module.__name__}.{name}"]

    # -- files ------------------------------------------------------------------------------------

    def model_dir(self, folder: str = "diffusion_models") -> Path:
        """The (created) folder ComfyUI lists for model folder name ``folder``; drop test files here."""
        if folder not in self.folder_paths.folder_names_and_paths:
            raise KeyError(f"ComfyUI has no model folder '{folder}'")
        path = self.models_root / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def refresh_model_lists(self) -> None:
        """Forget ComfyUI's cached file lists, so files written since show up in combo widgets."""
        self.folder_paths.filename_list_cache.clear()
        self.folder_paths.cache_helper.clear()

    # -- running ----------------------------------------------------------------------------------

    def run_async(self, coro: Any) -> Any:
        """Run a coroutine on the host's event loop (the one the pack was loaded on; new after close)."""
        if self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def run(
        self,
        prompt: dict[str, dict[str, Any]],
        *,
        check: bool = True,
        extra_data: dict[str, Any] | None = None,
    ) -> RunResult:
        """Validate and execute an API-format prompt (``{id: {"class_type", "inputs"}}``).

        Each call uses a fresh ``PromptExecutor`` (no outputs cached from earlier runs).

        Args:
            prompt: the API-format graph, as ``POST /prompt`` takes it.
            check: raise :class:`ComfyPromptError` (ComfyUI's message, plus traceback) when the prompt
                is rejected or a node fails; with False, return the failed :class:`RunResult`.
            extra_data: ``extra_data`` as the server passes it (for example ``{"client_id": ...}``).
        """
        execution = self.execution
        self.refresh_model_lists()
        prompt_id = str(uuid.uuid4())
        start = time.perf_counter()
        self.server = StubServer()
        valid, error, outputs_to_execute, node_errors = self.run_async(
            execution.validate_prompt(prompt_id, prompt, None)
        )
        if not valid:
            result = RunResult(
                prompt_id=prompt_id,
                success=False,
                validation_error=error,
                node_errors=node_errors,
                seconds=time.perf_counter() - start,
            )
            return result.raise_for_error() if check else result
        executor = execution.PromptExecutor(
            self.server,
            cache_type=execution.CacheType.CLASSIC,
            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0},  # ram_inactive: ComfyUI 0.33+
        )
        self.run_async(executor.execute_async(prompt, prompt_id, dict(extra_data or {}), outputs_to_execute))
        messages = list(executor.status_messages)
        execution_error = next((data for event, data in messages if event == "execution_error"), None)
        succeeded = any(event == "execution_success" for event, _ in messages)
        history = dict(getattr(executor, "history_result", {}) or {})
        result = RunResult(
            prompt_id=prompt_id,
            success=succeeded and execution_error is None,
            outputs=dict(history.get("outputs", {})),
            history=history,
            messages=messages,
            events=list(self.server.events),
            node_errors=node_errors,
            execution_error=execution_error,
            seconds=time.perf_counter() - start,
        )
        return result.raise_for_error() if check else result

    def close(self) -> None:
        """Close the host's event loop (ComfyUI's modules stay imported: they cannot be unloaded)."""
        if not self._loop.is_closed():
            self._loop.close()


def _put_comfy_first_on_path(comfy_path: Path) -> None:
    """Make ``import nodes`` & co. find ComfyUI's modules, evicting same-named modules from elsewhere."""
    entry = str(comfy_path)
    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    for name in _SHADOWED_NAMES:
        module = sys.modules.get(name)
        if module is None:
            continue
        origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
        if origin and Path(origin).resolve().is_relative_to(comfy_path):
            continue
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def _configure_cli_args() -> None:
    """CPU mode, set before ``comfy.model_management`` reads the arguments at import."""
    import comfy.options  # noqa: F401  # args parsing stays disabled: pytest's argv is not ComfyUI's
    from comfy.cli_args import args

    if "comfy.model_management" in sys.modules and not args.cpu:
        raise ComfyHostError(
            "comfy.model_management was imported before the test host set --cpu; start the host "
            "(the comfy_host fixture) before importing ComfyUI modules."
        )
    args.cpu = True
    args.disable_all_custom_nodes = False


def _configure_folders(folder_paths: ModuleType, root: Path) -> None:
    """Point every model folder and the input/output/temp/user directories at ``root``."""
    models = root / "models"
    for name, (_paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        if name in ("custom_nodes", "configs"):
            continue  # configs: ComfyUI's shipped yaml files (read only)
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], extensions)
    for name in _DEFAULT_MODEL_FOLDERS:
        (models / name).mkdir(parents=True, exist_ok=True)
    for kind in ("input", "output", "temp", "user"):
        path = root / kind
        path.mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{kind}_directory")(str(path))
    custom_nodes = root / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    folder_paths.filename_list_cache.clear()


def _link_pack(root: Path) -> Path:
    """``root/custom_nodes/ComfyUI-Memento`` -> this repository (the repo root is the pack)."""
    link = root / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        try:
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        except OSError:
            return REPO_ROOT  # no symlinks (some Windows set-ups): load from the repository itself
    return link


def _entrypoint_traceback(host: ComfyHost, pack_path: Path) -> str:
    """Call the pack's ``comfy_entrypoint`` again to get the traceback ComfyUI logs only as one line."""
    module = sys.modules.get(str(pack_path).replace(".", "_x_"))
    entrypoint = getattr(module, "comfy_entrypoint", None)
    if entrypoint is None:
        return ""

    async def call() -> None:
        extension = await entrypoint()
        await extension.get_node_list()

    try:
        host.run_async(call())
    except Exception:
        return "\n\ncomfy_entrypoint traceback:\n" + traceback.format_exc()
    return ""


_HOST: ComfyHost | None = None


def start_comfy_host(root: Path | None = None) -> ComfyHost:
    """Start ComfyUI in this process (once per process) and load this pack; return the host.

    Args:
        root: empty folder for models, input, output, temp, user and custom_nodes (a new temporary
            folder when None). Ignored when the host is already started.

    Raises:
        ComfyHostError: no ComfyUI tree, or ComfyUI could not import the pack (with its log messages).
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    start = time.perf_counter()
    comfy_path = find_comfyui()
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="memento-comfy-"))
    root.mkdir(parents=True, exist_ok=True)

    import torchvision  # noqa: F401  (the dev venv makes it importable; see scripts/torchvision_cpu_shim.py)

    _put_comfy_first_on_path(comfy_path)
    _configure_cli_args()

    # main.py imports utils.extra_config before nodes; import_module keeps the order sorters can't undo.
    importlib.import_module("utils.extra_config")
    folder_paths = importlib.import_module("folder_paths")

    _configure_folders(folder_paths, root)

    nodes = importlib.import_module("nodes")  # imports comfy.model_management (CPU mode from here on)
    importlib.import_module("execution")

    host = ComfyHost(comfy_path, root)
    host.builtin_import_failures = list(
        host.run_async(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
    )
    before = set(nodes.NODE_CLASS_MAPPINGS)
    pack_path = _link_pack(root)
    with _capture_logs() as logs:
        loaded = host.run_async(nodes.load_custom_node(str(pack_path), before, module_parent="custom_nodes"))
    if not loaded:
        raise ComfyHostError(
            f"ComfyUI could not load the pack at {pack_path}. ComfyUI logged:\n{logs.text() or '(nothing)'}"
            + _entrypoint_traceback(host, pack_path)
        )
    host.pack_node_ids = [k for k in nodes.NODE_CLASS_MAPPINGS if k not in before]
    host.pack_module = sys.modules.get(str(pack_path).replace(".", "_x_"))
    host.startup_seconds = time.perf_counter() - start
    _HOST = host
    return host
