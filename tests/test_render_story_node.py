"""Memento Render Story: the story runner inside a real in-process ComfyUI 0.3.75, with ComfyUI's loaders.

Independent expectation: memento_core's ``render_shot`` called shot by shot with the same files, CLIP
and VAE (``test_nodes_graph.expected``: shot 1 a cut from an empty memory, shots 2 and 3 continuing,
seeds 101/102/103, CFG 3.5). The node must give those latents and that final bank; an interrupted
render resumed in ComfyUI must give exactly the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_nodes_errors import backbone, failed, rejected
from test_nodes_graph import (
    FRAMES,
    NEGATIVE,
    PROMPTS,
    RECONSTRUCT,
    STEPS,
    H,
    W,
    direct_models,
    rel_diff,
    render_expected,
)
from tiny_comfy_models import TINY_FILES, loader_nodes

from memento_core.media import read_mp4
from memento_core.memory import load_bank
from memento_core.models import ModelSet
from memento_core.runner import Progress, RunSettings, render_story
from memento_core.story import parse_story

STORY = {
    "story_name": "harbour",
    "story_overview": "a sailor in a harbour",
    "reconstruct_target": RECONSTRUCT,
    "scenes": [{"scene_num": 1, "video_prompts": PROMPTS, "cut": [True, False, False]}],
}


def render_inputs(folder: str, **over) -> dict:
    return {
        "backbone": ["bb", 0],
        "clip": ["clip", 0],
        "vae": ["vae", 0],
        "path": "",
        "text": json.dumps(STORY),
        "output_folder": folder,
        "if_exists": "resume",
        "width": W,
        "height": H,
        "frames": FRAMES,
        "steps": STEPS,
        "seed": 101,
        "shift": 5.0,
        "boundary": 0.9,
        "cfg": 3.5,
        "cut_cfg": 3.5,  # the expectation renders its cut at the default CFG
        "solver": "unipc",
        "first_shot": "empty memory",
        "identity": True,
        "max_shots": 0,
        "negative": NEGATIVE,
        "sampler_settings": "widgets",  # the shift / boundary / cfg widgets above, not the policy's
    } | over


def render_graph(folder: str, **over) -> dict:
    return {
        **loader_nodes(),
        "bb": backbone(),
        "render": {"class_type": "MementoRenderStory", "inputs": render_inputs(folder, **over)},
    }


def output_dir(host) -> Path:
    return Path(host.folder_paths.get_output_directory())


def shot_latents(folder: Path) -> list[torch.Tensor]:
    files = sorted((folder / "state").glob("shot_*.safetensors"))
    return [load_file(str(f))["latent"] for f in files]


@pytest.fixture(scope="module")
def expected(comfy_host, tiny):
    return render_expected(comfy_host, tiny)


@pytest.fixture(scope="module")
def rendered(comfy_host, tiny):
    result = comfy_host.run(render_graph("rs/full"))
    return result, output_dir(comfy_host) / "rs" / "full"


def test_render_story_equals_render_shot(rendered, expected):
    result, folder = rendered
    records, banks, _ = expected
    latents = shot_latents(folder)
    assert len(latents) == 3
    for i, (got, record) in enumerate(zip(latents, records, strict=True), start=1):
        err = rel_diff(got, record.latent)
        print(f"shot {i}: max rel diff Render Story vs render_shot {err:.2e}")
        assert err <= 1e-5
    final = load_bank(folder / "memory_bank.safetensors")
    for pool in ("high", "low"):
        assert final.frame_ids(pool) == banks[2].frame_ids(pool)
        assert torch.allclose(final.latents(pool), banks[2].latents(pool), atol=1e-5, rtol=1e-4)
    log = json.loads((folder / "story_log.json").read_text())
    assert [s["mode"] for s in log["shots"]] == ["empty", "mi2v", "mi2v"]  # shot 1: M2V from an empty memory
    assert [s["seed"] for s in log["shots"]] == [101, 102, 103]
    assert log["models"]["kind"] == "comfyui"
    assert log["models"]["backbone"]["experts"] == {"high": TINY_FILES["high"], "low": TINY_FILES["low"]}
    video = read_mp4(folder / "story.mp4")
    assert tuple(video.shape) == (3 * FRAMES, H, W, 3)
    assert sorted(p.name for p in (folder / "shots").glob("*.mp4")) == ["01_01.mp4", "01_02.mp4", "01_03.mp4"]
    assert len(list((folder / "memory").glob("*.png"))) == 3
    assert len(list((folder / "identity").glob("*.png"))) == 3
    text = result.ui_text("render")
    assert "harbour: 3 shots (01_01 empty, 01_02 mi2v, 01_03 mi2v)" in text


def test_outputs_go_into_core_video_saving_and_bank_nodes(comfy_host, tiny, rendered):
    """Same inputs as the first render (resume: nothing to sample); VIDEO into core SaveVideo, the bank
    into Save Memory Bank, the folder as text."""
    _, folder = rendered
    graph = render_graph("rs/full")
    graph["save_video"] = {
        "class_type": "SaveVideo",
        "inputs": {"video": ["render", 0], "filename_prefix": "rs/story", "format": "mp4", "codec": "h264"},
    }
    graph["save_bank"] = {
        "class_type": "MementoSaveMemoryBank",
        "inputs": {"memory_bank": ["render", 1], "filename_prefix": "rs/bank"},
    }
    result = comfy_host.run(graph)
    (item,) = result.ui("save_video")["images"]
    saved = read_mp4(output_dir(comfy_host) / item["subfolder"] / item["filename"])
    assert tuple(saved.shape) == (3 * FRAMES, H, W, 3)
    bank = load_bank(result.ui_text("save_bank").splitlines()[0])
    assert bank.shots_done == 3 and bank.current_time == 3 * FRAMES
    assert bank.frame_ids("high") == load_bank(folder / "memory_bank.safetensors").frame_ids("high")
    assert str(folder) in result.ui_text("render")


def test_interrupted_render_resumes_to_the_same_frames(comfy_host, tiny, rendered):
    import comfy.model_management as mm
    import comfy.utils

    _, full = rendered
    seen: list[int] = []

    def hook(value, total, preview=None, node_id=None):
        if total == 3 * STEPS:
            seen.append(value)
            if value >= STEPS + 1:  # the first step of shot 2 (in process, the hook is the only tap)
                mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        run = comfy_host.run(render_graph("rs/resumed"), check=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert not run.success
    assert any(event == "execution_interrupted" for event, _ in run.messages), run.messages
    folder = output_dir(comfy_host) / "rs" / "resumed"
    assert len(shot_latents(folder)) == 1  # shot 1 finished and kept; no joined story yet
    assert not (folder / "story.mp4").exists()

    comfy_host.run(render_graph("rs/resumed"))  # the same inputs: resume after shot 1
    for got, want in zip(shot_latents(folder), shot_latents(full), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(read_mp4(folder / "story.mp4"), read_mp4(full / "story.mp4"))
    log = json.loads((folder / "story_log.json").read_text())
    assert [s["label"] for s in log["shots"]] == ["01_01", "01_02", "01_03"]


def test_folder_of_another_render_is_refused(comfy_host, tiny, rendered):
    msg = failed(comfy_host, render_graph("rs/full", steps=STEPS + 1))
    assert "Memento Render Story: the output folder" in msg
    assert "holds a render of other inputs (settings.steps)" in msg and "'overwrite'" in msg
    msg = failed(comfy_host, render_graph("rs/full", if_exists="stop", seed=7))
    assert "already holds a render" in msg


def test_bad_inputs_are_named(comfy_host, tiny):
    msg = failed(comfy_host, render_graph("../outside"))
    assert "'output_folder' '../outside' points outside ComfyUI's output folder" in msg
    msg = failed(comfy_host, render_graph("rs/t2v_missing", first_shot="t2v"))
    assert "first_shot 't2v' needs the Wan2.2 T2V experts" in msg
    graph = render_graph(
        "rs/t2v_gone", first_shot="t2v", t2v_high="gone_t2v.safetensors", t2v_low=TINY_FILES["t2v"]
    )
    errors = rejected(comfy_host, graph)  # refused when queued, by the pack, in 0.3.75 and 0.33 alike
    (entry,) = errors.values()  # one error, on Render Story
    (error,) = entry["errors"]
    assert "T2V file 'gone_t2v.safetensors' (t2v_high)" in error["details"], error
    assert "diffusion_models" in error["details"] and "Value not in list" not in json.dumps(errors)
    msg = failed(comfy_host, render_graph("rs/refs_missing", first_shot="reference images"))
    assert "needs the 'reference_images' input" in msg
    bad = dict(STORY, scenes=[{"scene_num": 1, "video_prompts": PROMPTS, "cut": [True, "no", True]}])
    msg = failed(comfy_host, render_graph("rs/bad_script", text=json.dumps(bad)))
    assert "scenes[0].cut[1]" in msg
    msg = failed(comfy_host, render_graph("rs/frames", frames=11))
    assert "4n+1" in msg


def test_t2v_first_shot_and_reference_images(comfy_host, tiny):
    t2v = render_graph(
        "rs/t2v",
        first_shot="t2v",
        continuation="mm2v",
        cut_cfg=5.0,
        t2v_high=TINY_FILES["t2v"],
        t2v_low=TINY_FILES["t2v"],
        max_shots=2,
    )
    comfy_host.run(t2v)
    log = json.loads((output_dir(comfy_host) / "rs" / "t2v" / "story_log.json").read_text())
    assert [s["mode"] for s in log["shots"]] == ["t2v", "mm2v"]  # continuation mm2v for cut: false
    assert log["shots"][1]["guidance"]["high"] == 5.0  # cut_cfg, as the reference's --mm2v
    assert log["shots"][0]["shift"] == 12.0 and log["shots"][0]["boundary"] == 0.875

    refs = render_graph("rs/refs", first_shot="reference images", max_shots=1)
    refs["render"]["inputs"]["reference_images"] = ["refs", 0]
    refs["refs"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 2 * W, "height": 2 * H, "batch_size": 2, "color": 0x336699},
    }
    refs["save_bank"] = {
        "class_type": "MementoSaveMemoryBank",
        "inputs": {"memory_bank": ["render", 1], "filename_prefix": "rs/refs_bank"},
    }
    result = comfy_host.run(refs)
    bank = load_bank(result.ui_text("save_bank").splitlines()[0])
    pinned = [f for f in bank.frames() if f.pinned]
    assert [f.frame_id for f in pinned] == ["ref0", "ref1"]
    folder = output_dir(comfy_host) / "rs" / "refs" / "references"
    assert len(list(folder.glob("ref_0*_*.png"))) == 2
    log = json.loads((folder.parent / "story_log.json").read_text())
    assert log["shots"][0]["mode"] == "references"


STORYMEM_STORY = {
    "story_name": "harbour, StoryMem",
    "scenes": [
        {"scene_num": 1, "video_prompts": PROMPTS[:2], "cut": [True, False]},
        {"scene_num": 2, "video_prompts": [PROMPTS[2], PROMPTS[0]], "cut": [True, "False"]},
    ],
}


def test_storymem_render_story_equals_the_story_runner(comfy_host, tiny, tmp_path):
    """A 4-shot StoryMem story in Render Story (policy storymem, CLIP vision) gives the latents and the
    bank of the command line's runner (``render_story``) driven by the same ComfyUI CLIP, VAE, CLIP
    vision and tiny weights."""
    graph = {
        **loader_nodes(),
        "bb": backbone(),
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": TINY_FILES["clip_vision"]}},
        "render": {
            "class_type": "MementoRenderStory",
            "inputs": render_inputs(
                "rs/storymem",
                text=json.dumps(STORYMEM_STORY),
                policy="storymem",
                sampler_settings="policy defaults",
                clip_vision=["cv", 0],
            ),
        },
    }
    comfy_host.run(graph)
    node_folder = output_dir(comfy_host) / "rs" / "storymem"

    m = direct_models(comfy_host, tiny)
    clip_vision = comfy_host.nodes.CLIPVisionLoader().load_clip(TINY_FILES["clip_vision"])[0]
    models = ModelSet(
        kind="direct",
        description={},
        vae=m.vae,
        text_encoder=m.text,
        load_backbone=lambda: m.backbone,
        family=m.backbone.family,
        load_embedder=lambda: m.adapters.ComfyImageEmbedder(clip_vision),
    )
    settings = RunSettings(
        width=W, height=H, frames=FRAMES, steps=STEPS, seed=101, policy="storymem", first_shot="empty",
        negative=NEGATIVE,
    )  # fmt: skip
    log = render_story(
        parse_story(STORYMEM_STORY), models, settings, tmp_path / "cli", progress=Progress(4, enabled=False)
    )
    node_log = json.loads((node_folder / "story_log.json").read_text())
    for i, (got, want) in enumerate(
        zip(shot_latents(node_folder), shot_latents(tmp_path / "cli"), strict=True)
    ):
        err = rel_diff(got, want)
        print(f"storymem shot {i + 1}: max rel diff Render Story vs the runner {err:.2e}")
        assert err <= 1e-5
    for key in (
        "mode",
        "seed",
        "guidance",
        "shift",
        "boundary",
        "positions",
        "memory_ids",
        "keyframes",
        "bank_ids",
    ):
        assert [s[key] for s in node_log["shots"]] == [s[key] for s in log["shots"]], key
    assert [s["mode"] for s in log["shots"]] == ["empty", "mi2v", "cut", "mi2v"]
    assert {s["policy"] for s in node_log["shots"]} == {"storymem"}
    assert [s["guidance"]["high"] for s in log["shots"]] == [3.5] * 4 and log["settings"]["shift"] == 4.0
    node_bank = load_bank(node_folder / "memory_bank.safetensors")
    cli_bank = load_bank(tmp_path / "cli" / "memory_bank.safetensors")
    assert node_bank.policy == "storymem" and node_bank.frame_ids("high") == cli_bank.frame_ids("high")
    assert node_bank.frame_ids("high") == log["shots"][-1]["bank_ids"]
    frames = [read_mp4(node_folder / s["files"]["video"]).shape[0] for s in node_log["shots"]]
    assert frames == [FRAMES, FRAMES - 1, FRAMES, FRAMES - 1]  # continuations drop the repeated frame


def test_storymem_without_clip_vision_is_refused_by_name(comfy_host, tiny):
    graph = render_graph("rs/storymem_no_cv", policy="storymem")
    message = failed(comfy_host, graph)
    assert "storymem policy picks keyframes" in message and "clip_vision" in message
