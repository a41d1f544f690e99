"""Drive ComfyUI's real frontend in headless Chromium (Debian ``chromium`` + ``chromium-driver``).

:func:`open_frontend` opens a running server's page (``tests/comfy_server.py``) in a 1600x1000 window,
with every host name but 127.0.0.1 unresolvable (the page tries model and API hosts: nothing leaves
the machine), the first-run template browser and the minimap switched off through the server's
settings. :class:`Frontend` loads workflows with the frontend's own ``app.loadGraphData`` and reads
``app.graph`` / ``app.canvas`` back: node boxes as drawn (title bar included), the view, open dialogs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WINDOW = (1600, 1000)
#: What the page would reach besides the server: refused by the resolver.
HOST_RULES = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when Chromium or its WebDriver is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    return (browser, driver) if browser and driver else None


@dataclass(frozen=True)
class Box:
    """A node as drawn, in canvas units: x, y (top of the title bar), w, h (title bar included)."""

    id: int
    type: str
    title: str
    x: float
    y: float
    w: float
    h: float

    def overlaps(self, other: Box) -> bool:
        return (
            self.x < other.x + other.w
            and other.x < self.x + self.w
            and self.y < other.y + other.h
            and other.y < self.y + self.h
        )


class Frontend:
    """One browser page on the ComfyUI server."""

    def __init__(self, driver: Any, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args: Any) -> Any:
        return self.driver.execute_async_script(script, *args)

    def wait(self, script: str, timeout: float = 60.0, what: str = "") -> Any:
        end = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > end:
                raise TimeoutError(f"the page did not reach: {what or script} ({timeout:.0f} s)")
            time.sleep(0.25)

    def load(self, workflow: Mapping[str, Any]) -> None:
        """``app.loadGraphData(workflow)`` (as opening a template does), then let it draw."""
        error = self.js_async(
            "const done = arguments[arguments.length - 1];"
            "app.loadGraphData(arguments[0]).then(() => done(null)).catch((e) => done(String(e)));",
            json.loads(json.dumps(workflow)),
        )
        if error:
            raise AssertionError(f"loadGraphData failed: {error}")
        time.sleep(1.0)

    def dialogs(self) -> list[str]:
        """The text of every open dialog (PrimeVue dialogs and the legacy ComfyUI modal)."""
        return self.js(
            "return [...document.querySelectorAll('.p-dialog, .comfy-modal')]"
            ".filter((d) => d.offsetParent !== null).map((d) => d.innerText);"
        )

    def close_dialogs(self) -> None:
        """Close open dialogs, toasts and the frontend's "what's new" banner."""
        self.js(
            "document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close,"
            " .p-toast-close-button').forEach((b) => b.click());"
            "for (const el of document.querySelectorAll('div[class*=bg-gradient-to-r]')) {"
            "  const buttons = el.querySelectorAll('button');"
            "  if (el.innerText.includes('Nodes 2.0') && buttons.length) buttons[buttons.length - 1].click();"
            "}"
        )
        time.sleep(0.3)

    def missing_node_types(self) -> list[str]:
        return self.js(
            "return app.graph._nodes.map((n) => n.type)"
            ".filter((t) => !(t in LiteGraph.registered_node_types));"
        )

    def boxes(self) -> list[Box]:
        raw = self.js(
            "const t = LiteGraph.NODE_TITLE_HEIGHT;"
            "return app.graph._nodes.map((n) => ({id: Number(n.id), type: n.type, title: n.title,"
            " x: n.pos[0], y: n.pos[1] - t, w: n.size[0], h: n.size[1] + t}));"
        )
        return [Box(**b) for b in raw]

    def view(self) -> dict[str, Any]:
        """The canvas view: scale, offset and the canvas element's size in CSS pixels."""
        return self.js(
            "const c = app.canvas, r = c.canvas.getBoundingClientRect();"
            "return {scale: c.ds.scale, offset: [...c.ds.offset], width: r.width, height: r.height};"
        )

    def on_screen(self, box: Box, view: Mapping[str, Any]) -> tuple[float, float, float, float]:
        """The box's screen rectangle (x0, y0, x1, y1) in the canvas element at ``view``."""
        s, (ox, oy) = view["scale"], view["offset"]
        return ((box.x + ox) * s, (box.y + oy) * s, (box.x + box.w + ox) * s, (box.y + box.h + oy) * s)

    def set_view(self, scale: float, offset: tuple[float, float]) -> None:
        self.js(
            "const c = app.canvas; c.ds.scale = arguments[0]; c.ds.offset = arguments[1];"
            "c.setDirty(true, true);",
            scale,
            list(offset),
        )
        time.sleep(0.8)

    def set_widgets(self, values: Mapping[int, Mapping[str, Any]]) -> None:
        """Set widget values like a user would (node id -> {widget name: value})."""
        missing = self.js(
            "const out = [];"
            "for (const [id, values] of Object.entries(arguments[0])) {"
            "  const node = app.graph.getNodeById(Number(id));"
            "  for (const [name, value] of Object.entries(values)) {"
            "    const w = node?.widgets?.find((w) => w.name === name);"
            "    if (!w) { out.push(`${id}.${name}`); continue; }"
            "    w.value = value; w.callback?.(value);"
            "  }"
            "}"
            "app.graph.setDirtyCanvas(true, true); return out;",
            {str(k): dict(v) for k, v in values.items()},
        )
        if missing:
            raise AssertionError(f"no such widgets: {missing}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


@contextmanager
def open_frontend(server: Any) -> Iterator[Frontend]:
    """A headless Chromium page on ``server`` (a ``tests/comfy_server.ComfyServer``), ready to load."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("Chromium and chromium-driver are not installed (make setup installs them)")
    browser, driver_path = found
    for key, value in {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}.items():
        server.request("POST", f"/settings/{key}", value)
    options = Options()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--host-resolver-rules={HOST_RULES}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.set_script_timeout(120)
        page = Frontend(driver, f"http://127.0.0.1:{server.port}")
        driver.get(page.base_url + "/")
        page.wait("return !!(window.app && app.graph && app.canvas && app.extensionManager)", 90, "app")
        time.sleep(1.5)
        page.close_dialogs()
        yield page
    finally:
        driver.quit()
