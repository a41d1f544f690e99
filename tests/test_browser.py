"""The shipped templates in ComfyUI's real frontend, in headless Chromium (tests/browser.py).

Each template is loaded with the frontend's own ``app.loadGraphData`` (what opening it from the
template browser does) on the real server with its pinned frontend package. Checked as an artist
would see it: every node type is known, no error dialog (the missing-models dialog is expected, since
the server has none of the real files, and it must name each file's folder), at the template's saved
zoom every node is on screen, and no two nodes overlap (title bars included). Then the 3-shot story is
queued from the page on the tiny models, with widgets set in the page: it reaches its result preview,
the node summaries show on the canvas, and still no node overlaps another.

Screenshots go to ``docs/screenshots/`` (``MEMENTO_SCREENSHOTS`` overrides it; the README shows them):
``<template>.png`` as the template opens, ``<template> (100%).png`` its first shot at 100%, and
``after a run (100%).png`` (shot 3 of the story after the run).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from browser import Frontend, find_chromium, open_frontend
from test_example_workflows import NAMES, WORKFLOW_DIR, load_script
from test_server_nodes import server  # noqa: F401  (the session server with the tiny models)
from tiny_comfy_models import TINY_FILES

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium and chromium-driver are not installed (scripts/bootstrap.sh installs them)",
)

SHOTS_DIR = Path(os.environ.get("MEMENTO_SCREENSHOTS") or WORKFLOW_DIR.parent / "docs" / "screenshots")


@pytest.fixture(scope="module")
def page(server) -> Any:  # noqa: F811
    with open_frontend(server) as frontend:
        yield frontend


def overlapping(frontend: Frontend) -> list[tuple[str, str]]:
    boxes = frontend.boxes()
    return [(a.title, b.title) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def off_screen(frontend: Frontend) -> list[str]:
    view = frontend.view()
    out = []
    for box in frontend.boxes():
        x0, y0, x1, y1 = frontend.on_screen(box, view)
        if x0 < 0 or y0 < 0 or x1 > view["width"] or y1 > view["height"]:
            out.append(f"{box.title} at {[round(v) for v in (x0, y0, x1, y1)]}")
    return out


def group_view(workflow: dict[str, Any], title: str) -> tuple[float, tuple[float, float]]:
    """100% with the group titled ``title`` at the top left of the canvas."""
    (bounding,) = [g["bounding"] for g in workflow["groups"] if g["title"] == title]
    return 1.0, (70.0 - bounding[0], 90.0 - bounding[1])


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_readable(page: Frontend, name: str) -> None:
    script = load_script()
    stem = script.template_file(name)
    workflow = json.loads((WORKFLOW_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    page.load(workflow)
    assert page.missing_node_types() == []
    for text in page.dialogs():
        assert text.startswith("Missing Models"), f"error dialog: {text[:500]}"
        for model in workflow["models"]:
            assert f"{model['directory']} / {model['name']}" in text, (model, text)
    page.close_dialogs()
    assert page.dialogs() == []
    view = page.view()
    assert view["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"])
    assert off_screen(page) == []
    assert overlapping(page) == []
    width = max(g["bounding"][0] + g["bounding"][2] for g in workflow["groups"])
    assert width <= 4000, f"{width} canvas px wide"
    page.screenshot(SHOTS_DIR / f"{stem}.png")
    titles = [g["title"] for g in workflow["groups"]]
    first = "Shot 1" if "Shot 1" in titles else titles[1]  # the first shot, or the group after Models
    page.set_view(*group_view(workflow, first))
    page.screenshot(SHOTS_DIR / f"{stem} (100%).png")


def tiny_widgets(workflow: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """What an artist would change to run the template on the tiny files, fast."""
    values: dict[int, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind == "MementoLoadBackbone":
            values[node["id"]] = {
                "high_noise_model": TINY_FILES["high"],
                "low_noise_model": TINY_FILES["low"],
                "weight_dtype": "fp32",
                "offload": "none",
            }
        elif kind == "CLIPLoader":
            values[node["id"]] = {"clip_name": TINY_FILES["text_encoder"]}
        elif kind == "VAELoader":
            values[node["id"]] = {"vae_name": TINY_FILES["vae"]}
        elif kind == "MementoGenerateShot":
            values[node["id"]] = {"width": 64, "height": 32, "frames": 9, "steps": 2}
        elif kind == "MementoSaveMemoryBank":
            values[node["id"]] = {"filename_prefix": "browser/story_memory"}
    return values


def test_story_queued_from_the_page_reaches_its_preview(page: Frontend, server) -> None:  # noqa: F811
    script = load_script()
    stem = script.template_file("memento_3_shot_story")
    workflow = json.loads((WORKFLOW_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    page.load(workflow)
    page.close_dialogs()
    page.set_view(workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"])
    page.set_widgets(tiny_widgets(workflow))
    before = set(server.get_json("/history"))
    error = page.js_async(
        "const done = arguments[arguments.length - 1];"
        "app.queuePrompt(0, 1).then(() => done(null)).catch((e) => done(String(e)));"
    )
    assert not error, error
    end = time.monotonic() + 240
    while not (new := set(server.get_json("/history")) - before) and time.monotonic() < end:
        time.sleep(0.5)
    assert new, f"nothing ran; server log:\n{server.log_tail()}"
    entry = server.wait_history(new.pop(), timeout=240)
    assert entry.success, entry.error_message
    titles = {n["title"]: n["id"] for n in workflow["nodes"] if "title" in n}
    preview = titles["Memory bank"]
    page.wait(
        f"const n = app.graph.getNodeById({preview});"
        "return !!(n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0);",
        60,
        "the Memory bank preview shows the contact sheet",
    )
    summary = page.js(
        "const n = app.graph.getNodeById(arguments[0]);"
        "return n.widgets.find((w) => w.name === 'summary')?.value ?? null;",
        titles["Save Memory Bank"],
    )
    assert summary and "browser/story_memory" in summary and ".safetensors" in summary, summary
    page.js("app.graph.setDirtyCanvas(true, true);")
    time.sleep(1.0)
    assert overlapping(page) == [], "after the run"
    assert off_screen(page) == [], "after the run"
    page.set_view(*group_view(workflow, "Shot 3"))  # its memory: 16 frames, 6 local + 2 global picked
    page.screenshot(SHOTS_DIR / "after a run (100%).png")
