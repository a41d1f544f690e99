"""Run a real ComfyUI server (0.3.75, or $COMFYUI_PATH) in a subprocess with this pack, and talk to it.

What :func:`start_comfy_server` does:

1. makes a temporary base folder (``--base-directory``) holding ``models/``, ``input/``, ``output/``,
   ``temp/``, ``user/`` and ``custom_nodes/ComfyUI-Memento`` (a symlink to this repository, the way
   users install the pack), so nothing is written into the user's or the cached ComfyUI tree; the
   database is in memory (``--database-url sqlite:///:memory:``), API nodes are off (no network), the
   frontend is the installed ``comfyui_frontend_package`` (no download);
2. starts ``python -c <bootstrap>`` in the ComfyUI tree, in its own process group: the bootstrap sets
   ``sys.argv`` to ComfyUI's command line (``--cpu --listen 127.0.0.1 --port <free port> ...``), runs the
   *preload* hooks, then ``runpy.run_path("main.py", run_name="__main__")``;
3. waits until ``GET /system_stats`` answers (the server only listens after all nodes loaded), checks the
   log for a failed import of the pack, and opens a websocket (``/ws?clientId=...``, aiohttp's client:
   aiohttp is a ComfyUI requirement) that records every event the server sends to this client.

Preload hooks run inside the server process before ``main.py`` (for example a test-only patch that makes
ComfyUI's Wan text encoder tiny). Each is a string: ``"path/file.py"`` (run as a script),
``"path/file.py::func"`` (run, then call ``func()``), ``"module"`` (import) or ``"module:func"``
(import, then call). Argument parsing is enabled first, so a hook may import ``comfy.*`` modules.
While hooks run, ``tests/`` and the repository root are on ``sys.path`` (appended, ComfyUI's own
modules win); afterwards they are removed again and every module loaded from this repository is dropped
from ``sys.modules``, so the pack is still imported only the way ComfyUI imports it (a hook's functions
keep working, lazy ``import memento_core`` inside them later does not).

The torchvision import hook of the dev venv (``_memento_torchvision_cpu_shim.pth``) applies to any
interpreter of the venv, the subprocess included.

Usage (see the ``comfy_server`` fixture in ``conftest_server.py``)::

    with comfy_server() as server:
        prompt_id = server.queue_prompt(api_prompt)
        entry = server.wait_history(prompt_id, timeout=60)
        assert entry.success, entry.error_message
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_host import PACK_DIR_NAME, REPO_ROOT, find_comfyui

TESTS_DIR = Path(__file__).resolve().parent

#: Model folders created up front under ``<root>/models``.
MODEL_FOLDERS = ("diffusion_models", "vae", "text_encoders", "loras", "clip_vision", "checkpoints")

#: Flags always passed to ``main.py`` besides ``--listen``/``--port``/``--base-directory``.
DEFAULT_FLAGS = (
    "--cpu",
    "--disable-api-nodes",  # no API nodes: nothing talks to the internet
    "--disable-auto-launch",
    "--database-url",
    "sqlite:///:memory:",  # the default is <ComfyUI>/user/comfyui.db, inside the cached tree
    "--preview-method",
    "none",
)


class ComfyServerError(RuntimeError):
    """The server could not start, died, rejected a request, or did not answer in time."""


class ComfyPromptRejected(ComfyServerError):
    """``POST /prompt`` answered 400: the prompt failed validation. ``response`` is ComfyUI's JSON."""

    def __init__(self, message: str, response: dict[str, Any]) -> None:
        super().__init__(message)
        self.response = response


# -- history ---------------------------------------------------------------------------------------


@dataclass
class HistoryEntry:
    """One finished prompt as ``GET /history/<prompt_id>`` reports it.

    Attributes:
        prompt_id: the prompt's id.
        status_str: ``"success"`` or ``"error"`` (0.3.75 also reports an interrupted prompt as "error").
        completed: True only when every node ran.
        messages: ``(event, data)`` pairs: execution_start, execution_cached, execution_success,
            execution_error, execution_interrupted.
        outputs: node id -> the ``ui`` dict that output node returned.
        raw: the whole history record (``prompt``, ``outputs``, ``status``, ``meta``).
    """

    prompt_id: str
    status_str: str
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]
    outputs: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, prompt_id: str, record: dict[str, Any]) -> HistoryEntry:
        """Build from one value of the ``/history`` JSON."""
        status = record.get("status") or {}
        return cls(
            prompt_id=prompt_id,
            status_str=str(status.get("status_str", "")),
            completed=bool(status.get("completed", False)),
            messages=[(str(m[0]), dict(m[1])) for m in status.get("messages", [])],
            outputs=dict(record.get("outputs") or {}),
            raw=record,
        )

    def message(self, event: str) -> dict[str, Any] | None:
        """The data of the first status message named ``event``, or None."""
        return next((data for name, data in self.messages if name == event), None)

    @property
    def success(self) -> bool:
        """Every node ran (status "success", completed, an ``execution_success`` message)."""
        return (
            self.status_str == "success" and self.completed and self.message("execution_success") is not None
        )

    @property
    def interrupted(self) -> bool:
        """The run was stopped by ``POST /interrupt`` (an ``execution_interrupted`` message)."""
        return self.message("execution_interrupted") is not None

    @property
    def execution_error(self) -> dict[str, Any] | None:
        """The ``execution_error`` data (node_id, node_type, exception_message, traceback, ...) or None."""
        return self.message("execution_error")

    @property
    def error_message(self) -> str | None:
        """A readable reason the prompt did not succeed (node, exception, traceback), None on success."""
        err = self.execution_error
        if err is not None:
            tb = "".join(err.get("traceback") or [])
            return (
                f"node {err.get('node_id')} ({err.get('node_type')}) raised {err.get('exception_type')}: "
                f"{str(err.get('exception_message', '')).strip()}\n{tb}"
            )
        stop = self.message("execution_interrupted")
        if stop is not None:
            return f"execution interrupted at node {stop.get('node_id')} ({stop.get('node_type')})"
        if not self.success:
            return f"status {self.status_str!r}, completed={self.completed}, messages={self.messages}"
        return None

    def ui(self, node_id: str) -> dict[str, Any]:
        """The ``ui`` dict output node ``node_id`` returned; a readable KeyError if none."""
        try:
            return self.outputs[str(node_id)]
        except KeyError:
            raise KeyError(
                f"node {node_id} produced no UI output; nodes with output: {sorted(self.outputs)}"
            ) from None

    def ui_text(self, node_id: str) -> str:
        """The text an output node shows (``ui={"text": [...]}``), joined with newlines."""
        text = self.ui(node_id).get("text")
        if text is None:
            raise KeyError(f"node {node_id} has no 'text' in its UI output: {self.ui(node_id)}")
        return text if isinstance(text, str) else "\n".join(str(t) for t in text)


# -- websocket events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerEvent:
    """One JSON message the server sent on the websocket: ``type`` and ``data``; ``t`` is arrival time."""

    type: str
    data: dict[str, Any]
    t: float


class _EventListener:
    """Keeps a websocket to ``/ws?clientId=<id>`` open in a thread and records every JSON message."""

    def __init__(self, base_url: str, client_id: str) -> None:
        ws_url = (
            base_url.replace("http://", "ws://", 1) + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        )
        self._url = ws_url
        self.events: list[ServerEvent] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._connected.wait(timeout):
            raise ComfyServerError(f"websocket {self._url} did not connect in {timeout} s: {self.error!r}")
        if self.error is not None:
            raise ComfyServerError(f"websocket {self._url} failed: {self.error!r}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._listen())
        except BaseException as exc:  # reported through .error; the thread must not die silently
            self.error = exc
        finally:
            self._connected.set()
            with self._cond:
                self._cond.notify_all()

    async def _listen(self) -> None:
        import aiohttp

        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self._url, heartbeat=30) as ws:
            self._connected.set()
            receive = asyncio.ensure_future(ws.receive())
            stop = asyncio.ensure_future(self._stop.wait())
            while True:
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    receive.cancel()
                    return
                msg = receive.result()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    payload = json.loads(msg.data)
                    event = ServerEvent(
                        str(payload.get("type")), dict(payload.get("data") or {}), time.time()
                    )
                    with self._cond:
                        self.events.append(event)
                        self._cond.notify_all()
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    stop.cancel()
                    return
                receive = asyncio.ensure_future(ws.receive())  # binary previews are skipped

    def wait_for(self, predicate: Any, timeout: float) -> ServerEvent | None:
        """First recorded event (old or new) for which ``predicate(event)`` is true, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            checked = 0
            while True:
                for event in self.events[checked:]:
                    if predicate(event):
                        return event
                checked = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return None
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()


# -- the server ------------------------------------------------------------------------------------


class ComfyServer:
    """A running ComfyUI server subprocess and a small HTTP client for it.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        port: the port it listens on.
        root: the base folder (``models/``, ``input/``, ``output/``, ``temp/``, ``user/``, ``custom_nodes/``).
        models_root: ``root / "models"``.
        log_path: the server's stdout and stderr.
        client_id: the client id sent with every prompt (websocket events for our prompts come here).
        process: the ``subprocess.Popen`` (leader of its own process group).
        startup_seconds: from spawn to ready.
    """

    def __init__(self, process: subprocess.Popen, port: int, root: Path, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.root = root
        self.models_root = root / "models"
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        self.startup_seconds = 0.0
        self._listener: _EventListener | None = None

    # -- HTTP -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """Send a request; return ``(status, parsed JSON or text)``. HTTP errors return their status too."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ComfyServerError(f"{method} {path} failed: {exc}\n{self.log_tail()}") from exc
        text = raw.decode("utf-8", errors="replace")
        if "json" in ctype:
            return status, json.loads(text) if text else None
        return status, text

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """``GET path`` that must answer 200 with JSON."""
        status, payload = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} answered {status}: {str(payload)[:2000]}")
        return payload

    def object_info(self, node_type: str | None = None) -> dict[str, Any]:
        """``GET /object_info`` (all node definitions), or one node's definition (``/object_info/<type>``)."""
        if node_type is None:
            return self.get_json("/object_info", timeout=60)
        info = self.get_json("/object_info/" + urllib.parse.quote(node_type))
        if node_type not in info:
            raise KeyError(f"the server has no node '{node_type}'")
        return info[node_type]

    def queue_prompt(self, prompt: Mapping[str, Any], *, extra_data: Mapping[str, Any] | None = None) -> str:
        """``POST /prompt`` with this client's id; return the prompt id.

        Raises:
            ComfyPromptRejected: validation failed (the message lists ComfyUI's node errors).
        """
        body = {"prompt": dict(prompt), "client_id": self.client_id, "extra_data": dict(extra_data or {})}
        status, payload = self.request("POST", "/prompt", body)
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise ComfyPromptRejected(
                _format_rejection(status, payload), payload if isinstance(payload, dict) else {}
            )
        return str(payload["prompt_id"])

    def history(self, prompt_id: str) -> HistoryEntry | None:
        """The finished prompt's history entry, or None while it is queued or running."""
        record = self.get_json("/history/" + urllib.parse.quote(prompt_id)).get(prompt_id)
        return None if record is None else HistoryEntry.from_json(prompt_id, record)

    def wait_history(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> HistoryEntry:
        """Poll ``/history/<prompt_id>`` until the prompt finished (any status); raise on timeout or death."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            self._check_alive()
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"prompt {prompt_id} not finished after {timeout} s; queue: {self.queue()}\n"
                    + self.log_tail()
                )
            time.sleep(poll)

    def run(self, prompt: Mapping[str, Any], timeout: float = 120.0, check: bool = True) -> HistoryEntry:
        """Queue a prompt and wait for it; with ``check``, raise :class:`ComfyServerError` on failure."""
        entry = self.wait_history(self.queue_prompt(prompt), timeout)
        if check and not entry.success:
            raise ComfyServerError(f"prompt failed: {entry.error_message}\n{self.log_tail()}")
        return entry

    def queue(self) -> dict[str, list[Any]]:
        """``GET /queue``: ``queue_running``, ``queue_pending``: ``[number, id, prompt, extra, outputs]``."""
        return self.get_json("/queue")

    def running_prompt_ids(self) -> list[str]:
        """Ids of the prompts ``/queue`` reports as running (at most one in 0.3.75)."""
        return [str(item[1]) for item in self.queue().get("queue_running", [])]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only if it is ``prompt_id``, when given).

        ComfyUI sets a flag; a node stops at its next check (the start of the next node, or a
        ``ProgressBar.update`` / ``throw_exception_if_processing_interrupted`` inside a node). The flag is
        cleared when the next prompt starts, so an interrupt sent while nothing runs has no effect.
        """
        status, payload = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyServerError(f"POST /interrupt answered {status}: {payload}")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """``POST /free``: unload models / drop cached outputs after the current prompt."""
        self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def workflow_templates(self) -> dict[str, list[str]]:
        """``GET /workflow_templates``: custom node folder name -> example workflow names (no ``.json``)."""
        return self.get_json("/workflow_templates")

    def workflow_template(self, pack: str, name: str) -> dict[str, Any]:
        """One served example workflow: ``GET /api/workflow_templates/<pack>/<name>.json``."""
        path = f"/api/workflow_templates/{urllib.parse.quote(pack)}/{urllib.parse.quote(name)}.json"
        status, payload = self.request("GET", path)
        if status != 200:
            raise ComfyServerError(f"GET {path} answered {status}")
        return payload if isinstance(payload, dict) else json.loads(payload)

    # -- websocket events -------------------------------------------------------------------------

    def events(self, prompt_id: str | None = None) -> list[ServerEvent]:
        """Websocket events received so far (only those whose data names ``prompt_id``, when given)."""
        events = list(self._listener.events) if self._listener else []
        if prompt_id is None:
            return events
        return [e for e in events if e.data.get("prompt_id") == prompt_id]

    def wait_event(self, event_type: str, timeout: float = 60.0, **match: Any) -> ServerEvent:
        """Wait for a websocket event of ``event_type`` whose data has every ``key=value`` in ``match``.

        Events received before the call count too (a fast node may already have started). Examples:
        ``wait_event("executing", prompt_id=pid, node="3")``, ``wait_event("progress", node="5")``.
        """
        if self._listener is None:
            raise ComfyServerError("no websocket listener (the server was started with listen_events=False)")

        def matches(event: ServerEvent) -> bool:
            return event.type == event_type and all(event.data.get(k) == v for k, v in match.items())

        event = self._listener.wait_for(matches, timeout)
        if event is None:
            self._check_alive()
            seen = [(e.type, e.data.get("node")) for e in self._listener.events[-20:]]
            raise ComfyServerError(
                f"no '{event_type}' event matching {match} within {timeout} s; last events: {seen}"
                + (f"; websocket error: {self._listener.error!r}" if self._listener.error else "")
            )
        return event

    def wait_executing(self, prompt_id: str, node_id: str, timeout: float = 60.0) -> ServerEvent:
        """Block until the server reports that node ``node_id`` of ``prompt_id`` started executing."""
        return self.wait_event("executing", timeout, prompt_id=prompt_id, node=str(node_id))

    def executed_nodes(self, prompt_id: str) -> list[str]:
        """Node ids in the order the server reported them as starting (``executing`` events)."""
        return [
            str(e.data["node"])
            for e in self.events(prompt_id)
            if e.type == "executing" and e.data.get("node") is not None
        ]

    def progress(self, prompt_id: str, node_id: str) -> list[tuple[Any, Any]]:
        """``(value, max)`` of each websocket ``progress`` message about node ``node_id`` of ``prompt_id``,
        in arrival order: what the frontend's progress bar shows. Wait for the prompt's end first (for
        example ``wait_event("execution_success", prompt_id=...)``): the socket delivers in order."""
        return [
            (e.data.get("value"), e.data.get("max"))
            for e in self.events(prompt_id)
            if e.type == "progress" and str(e.data.get("node")) == str(node_id)
        ]

    def progress_state(self, prompt_id: str, node_id: str) -> list[tuple[Any, Any, Any]]:
        """``(value, max, state)`` of node ``node_id`` in each ``progress_state`` message of ``prompt_id``
        that lists it (the per-node progress ComfyUI's executor also sends)."""
        result = []
        for e in self.events(prompt_id):
            node = (e.data.get("nodes") or {}).get(str(node_id)) if e.type == "progress_state" else None
            if node is not None:
                result.append((node.get("value"), node.get("max"), node.get("state")))
        return result

    # -- files and lifecycle ----------------------------------------------------------------------

    def model_dir(self, folder: str = "diffusion_models") -> Path:
        """``<root>/models/<folder>`` (created); files written here are listed by the next request."""
        path = self.models_root / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def custom_nodes_dir(self) -> Path:
        """``<root>/custom_nodes`` (holds the ``ComfyUI-Memento`` symlink)."""
        return self.root / "custom_nodes"

    @property
    def output_dir(self) -> Path:
        """``<root>/output``: where SaveImage & co. write."""
        return self.root / "output"

    def log_text(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server log, framed for error messages."""
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- ComfyUI server log (last {lines} lines, {self.log_path}) ---\n{tail}\n--- end of log ---"

    @property
    def alive(self) -> bool:
        """The server process is still running."""
        return self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.alive:
            raise ComfyServerError(
                f"the ComfyUI server exited with code {self.process.returncode}\n{self.log_tail()}"
            )

    def start_listener(self, timeout: float = 10.0) -> None:
        """Open the websocket that records events (done by :func:`start_comfy_server` by default)."""
        if self._listener is None:
            listener = _EventListener(self.url, self.client_id)
            listener.start(timeout)
            self._listener = listener

    def close(self, timeout: float = 10.0) -> None:
        """Close the websocket and stop the server's whole process group (SIGTERM, then SIGKILL)."""
        if self._listener is not None:
            with suppress(Exception):
                self._listener.close()
            self._listener = None
        _kill_group(self.process, timeout)


def _kill_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group led by ``process``, SIGKILL it if still alive after ``timeout``."""
    if process.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
    else:  # the leader is gone; children of its group might not be
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def _format_rejection(status: int, payload: Any) -> str:
    """ComfyUI's 400 answer to ``POST /prompt`` as readable lines."""
    if not isinstance(payload, dict):
        return f"POST /prompt answered {status}: {str(payload)[:2000]}"
    error = payload.get("error") or {}
    lines = [
        f"POST /prompt answered {status}: {error.get('message', '')} {error.get('details', '')}".rstrip()
    ]
    for node_id, info in (payload.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            lines.append(
                f"  node {node_id} ({info.get('class_type', '?')}): "
                f"{err.get('message', '')}: {err.get('details', '')}"
            )
    return "\n".join(lines)


# -- start-up --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_root(root: Path, pack_source: Path | None = REPO_ROOT) -> Path:
    """Create the base folder layout; link ``pack_source`` as ``custom_nodes/ComfyUI-Memento``."""
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("input", "output", "temp", "user", "custom_nodes"):
        (root / kind).mkdir(exist_ok=True)
    for name in MODEL_FOLDERS:
        (root / "models" / name).mkdir(parents=True, exist_ok=True)
    link = root / "custom_nodes" / PACK_DIR_NAME
    if pack_source is not None and not link.exists():
        link.symlink_to(Path(pack_source).resolve(), target_is_directory=True)
    return root


def pack_layout_copy(dest: Path, example_workflows: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A throwaway copy of this pack's layout: symlinks to the repository's top-level entries, except
    ``example_workflows/``, which is a real folder holding ``example_workflows`` (name -> UI workflow,
    written as ``<name>.json`` with a small ``<name>.jpg`` thumbnail). Pass it as ``pack_source``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in ("example_workflows", "__pycache__"):
            continue
        (dest / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    workflows = dest / "example_workflows"
    workflows.mkdir(exist_ok=True)
    for name, workflow in (example_workflows or {}).items():
        (workflows / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
        _write_thumbnail(workflows / f"{name}.jpg")
    return dest


def _write_thumbnail(path: Path) -> None:
    """A tiny grey JPEG (Pillow comes with ComfyUI)."""
    from PIL import Image

    Image.new("RGB", (64, 64), (96, 96, 96)).save(path, format="JPEG")


def write_extra_model_paths(path: Path, folders: Mapping[str, Sequence[str | os.PathLike[str]]]) -> Path:
    """Write an ``extra_model_paths.yaml`` mapping ComfyUI model folder names to absolute directories."""
    lines = ["memento_tests:"]
    for name, dirs in folders.items():
        lines.append(f"  {name}: |")
        lines.extend(f"    {Path(d).resolve()}" for d in dirs)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _resolve_preload(spec: str) -> str:
    """Make a file preload absolute (relative paths are taken from the repository root)."""
    file_part, sep, func = spec.partition("::")
    if file_part.endswith(".py"):
        path = Path(file_part)
        if not path.is_absolute():
            path = (REPO_ROOT / path) if (REPO_ROOT / path).exists() else path.resolve()
        if not path.is_file():
            raise ComfyServerError(f"preload file {path} does not exist")
        return str(path) + sep + func
    return spec


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process: this process's, plus ``extra``, with ``PYTHONPATH`` kept
    except the entries that would make this repository importable (its root, ``tests/``).

    ``PYTHONPATH`` is how a ComfyUI tree's own extra dependencies reach the server (for example
    ``PYTHONPATH=/path/to/extra-deps`` for a newer ComfyUI whose requirements are not in the dev venv, as
    ``make test-comfy-latest`` passes them). The repository root and ``tests/`` are left out, so the pack
    still imports only the way ComfyUI imports it (as ``custom_nodes/ComfyUI-Memento``), never as
    top-level modules.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(extra or {})}
    hidden = {REPO_ROOT.resolve(), TESTS_DIR.resolve()}  # these would make the pack's modules top-level
    kept = [
        entry
        for entry in env.get("PYTHONPATH", "").split(os.pathsep)
        if entry and Path(entry).expanduser().resolve() not in hidden
    ]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


_BOOTSTRAP = """\
import importlib, os, runpy, sys
sys.argv = ["main.py", *{argv!r}]
import comfy.options
comfy.options.enable_args_parsing()
_extra = [p for p in {extra_paths!r} if p not in sys.path]
sys.path.extend(_extra)
try:
    for _spec in {preloads!r}:
        _file, _sep, _func = _spec.partition("::")
        if _file.endswith(".py"):
            _ns = runpy.run_path(_file, run_name="__memento_preload__")
            if _func:
                _ns[_func]()
        else:
            _mod, _sep, _func = _spec.partition(":")
            _m = importlib.import_module(_mod)
            if _func:
                getattr(_m, _func)()
        print("[memento preload] ran " + _spec, flush=True)
finally:
    for _p in _extra:
        sys.path.remove(_p)
    _repo = {repo!r}
    for _name, _module in list(sys.modules.items()):
        _f = getattr(_module, "__file__", None) or ""
        if _f and os.path.realpath(_f).startswith(_repo + os.sep):
            del sys.modules[_name]
runpy.run_path("main.py", run_name="__main__")
"""


def build_command(
    port: int,
    root: Path,
    *,
    preload: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    extra_model_paths_config: Path | None = None,
    python: str | None = None,
) -> list[str]:
    """The command line that starts the server (run it with the ComfyUI tree as working directory)."""
    argv = ["--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(root), *DEFAULT_FLAGS]
    if extra_model_paths_config is not None:
        argv += ["--extra-model-paths-config", str(extra_model_paths_config)]
    argv += list(extra_args)
    code = _BOOTSTRAP.format(
        argv=argv,
        extra_paths=[str(TESTS_DIR), str(REPO_ROOT)],
        preloads=[_resolve_preload(p) for p in preload],
        repo=str(REPO_ROOT.resolve()),
    )
    return [python or sys.executable, "-u", "-c", code]


def _pack_import_failure(log: str) -> str | None:
    """The log lines about this pack failing to import, or None when it loaded."""
    lines = [line for line in log.splitlines() if f"custom_nodes/{PACK_DIR_NAME}" in line]
    if not any("IMPORT FAILED" in line for line in lines):
        return None
    return "\n".join(lines[-20:])


_DIAGNOSE = """\
import asyncio, importlib.util, os, sys, traceback
sys.argv = ["main.py", "--cpu", "--disable-api-nodes"]
import comfy.options
comfy.options.enable_args_parsing()
import utils.extra_config
import nodes
path = {pack!r}
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
try:
    spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    asyncio.run(extension.get_node_list())
except BaseException:
    traceback.print_exc()
"""


def diagnose_pack_import(pack_dir: Path, timeout: float = 120.0) -> str:
    """Import the pack the way ComfyUI does (``load_custom_node``, then ``comfy_entrypoint``) in a fresh
    interpreter in the ComfyUI tree; return the traceback (ComfyUI itself logs only one line), or ''."""
    env = server_env()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DIAGNOSE.format(pack=str(pack_dir))],
            cwd=str(find_comfyui()),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ""
    text = done.stderr
    return (
        text[text.rindex("Traceback (most recent call last)") :]
        if "Traceback (most recent call last)" in text
        else ""
    )


def start_comfy_server(
    root: Path | None = None,
    *,
    preload: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    extra_model_paths: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    require_pack: bool = True,
    listen_events: bool = True,
    pack_source: Path | None = REPO_ROOT,
) -> ComfyServer:
    """Start ComfyUI (``main.py``) in a subprocess with this pack installed; return when it answers.

    Args:
        root: empty base folder (a new temporary one when None; see :func:`prepare_root`).
        preload: hooks run in the server process before ``main.py`` (see the module docstring).
        extra_args: more ``main.py`` flags (``--verbose DEBUG``, ``--cache-none``, ...).
        extra_model_paths: model folder name -> extra directories (written as an
            ``--extra-model-paths-config`` yaml in ``root``).
        env: extra environment variables for the server.
        timeout: seconds to wait for ``/system_stats``.
        require_pack: raise if ComfyUI logged ``IMPORT FAILED`` for this pack.
        listen_events: open the websocket that records events (needed by :meth:`ComfyServer.wait_event`).
        pack_source: the folder linked as ``custom_nodes/ComfyUI-Memento`` (this repository; a
            :func:`pack_layout_copy`; None for no pack).

    Raises:
        ComfyServerError: no ComfyUI tree, the server died or did not answer in time, or the pack failed
            to import; the message carries the server log.
    """
    comfy_path = find_comfyui()
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="memento-server-"))
    prepare_root(root, pack_source)
    yaml_path = None
    if extra_model_paths:
        yaml_path = write_extra_model_paths(root / "extra_model_paths.yaml", extra_model_paths)
    log_path = root / "server.log"
    child_env = server_env(env)
    start = time.monotonic()
    last_error = ""
    for _attempt in range(3):  # a port taken between free_port() and bind: try another
        port = free_port()
        cmd = build_command(
            port, root, preload=preload, extra_args=extra_args, extra_model_paths_config=yaml_path
        )
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd,
                cwd=str(comfy_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env,
                start_new_session=True,
            )
        server = ComfyServer(process, port, root, log_path)
        try:
            _wait_ready(server, timeout)
        except ComfyServerError as exc:
            server.close()
            last_error = str(exc)
            if "address already in use" in server.log_text().lower():
                continue
            raise
        except BaseException:
            server.close()
            raise
        break
    else:
        raise ComfyServerError(f"could not bind a free port three times:\n{last_error}")
    server.startup_seconds = time.monotonic() - start
    try:
        if require_pack and pack_source is not None:
            failure = _pack_import_failure(server.log_text())
            if failure is not None:
                trace = diagnose_pack_import(root / "custom_nodes" / PACK_DIR_NAME)
                raise ComfyServerError(
                    f"ComfyUI could not import the pack {PACK_DIR_NAME}. Server log:\n{failure}"
                    + (f"\n\nThe same import outside the server:\n{trace}" if trace else "")
                )
        if listen_events:
            server.start_listener()
    except BaseException:
        server.close()
        raise
    return server


def _wait_ready(server: ComfyServer, timeout: float) -> None:
    """Poll ``/system_stats`` until it answers 200; raise with the log if the process dies or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive:
            raise ComfyServerError(
                f"the ComfyUI server exited with code {server.process.returncode} during start-up\n"
                + server.log_tail(80)
            )
        try:
            with urllib.request.urlopen(server.url + "/system_stats", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ComfyServerError(
                f"the ComfyUI server did not answer within {timeout} s\n" + server.log_tail(80)
            )
        time.sleep(0.2)


@contextmanager
def comfy_server(
    root: Path | None = None, *, keep_root: bool = False, **kwargs: Any
) -> Iterator[ComfyServer]:
    """:func:`start_comfy_server` as a context manager: the process group is always killed on exit.

    A temporary ``root`` made here is deleted afterwards unless ``keep_root``; keyword arguments are
    passed on to :func:`start_comfy_server`.
    """
    made_root = root is None
    if made_root:
        root = Path(tempfile.mkdtemp(prefix="memento-server-"))
    server = start_comfy_server(root, **kwargs)
    try:
        yield server
    finally:
        server.close()
        if made_root and not keep_root:
            shutil.rmtree(root, ignore_errors=True)
