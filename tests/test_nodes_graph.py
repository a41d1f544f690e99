"""A 3-shot Memento story as a ComfyUI graph (real in-process ComfyUI 0.3.75, tiny models), checked
against memento_core's own ``render_shot`` driven with the same CLIP and VAE through the adapters.

Graph per shot: CLIP Text Encode -> Keyframe Query Retrieve -> Memento Generate Shot -> VAE Decode ->
Update Memory (fed the shot's MEMORY_SELECTION); shots 2 and 3 continue from the previous decoded
video (first_frame). Core nodes: CLIPLoader (type wan, tiny umT5 via the test patch), CLIPTextEncode,
VAELoader, VAEDecode, SaveLatent. Also: interruption (bank untouched), block-swap offload gives the same
latent, and nodes never modify their inputs. (Progress per step as the UI receives it: test_server_nodes.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_comfy_models import TINY_FILES, backbone_inputs, loader_nodes

from memento_core.expert import load_memento_expert
from memento_core.m2v import Backbone, ShotRequest, render_shot
from memento_core.memory import MemoryBank, get_policy, load_bank
from memento_core.shot import ShotSettings

W, H, FRAMES, STEPS = 64, 32, 9, 3
GLOBAL = "global caption: [Person A]: a red-haired sailor in a blue coat; shot caption: "
PROMPTS = [
    GLOBAL + "[Person A] walks along the harbour at dawn.",
    GLOBAL + "[Person A] stops and looks at the ships.",
    GLOBAL + "[Person A] climbs aboard a small boat.",
]
NEGATIVE = "blurry, static, low quality"
RECONSTRUCT = "[Person A] a red-haired sailor in a blue coat"


def generate_inputs(i: int, **over) -> dict:
    return {
        "backbone": ["bb", 0],
        "selection": [f"s{i}_ret", 0],
        "clip": ["clip", 0],
        "positive": [f"s{i}_pos", 0],
        "negative": ["neg", 0],
        "vae": ["vae", 0],
        "reconstruct": RECONSTRUCT,
        "width": W,
        "height": H,
        "frames": FRAMES,
        "steps": STEPS,
        "shift": 5.0,
        "cfg_high": 3.5,
        "cfg_low": 3.5,
        "boundary": 0.9,
        "seed": 100 + i,
        "position_scheme": "memento",
        "solver": "unipc",
    } | over


def story_graph(tag: str, shots: int, offload: str = "none", swap_blocks: int = 0, bank: list | None = None):
    """API-format prompt: loaders, then per shot Retrieve -> Generate -> Decode -> Update (+ saves)."""
    g: dict[str, dict] = {
        **loader_nodes(),
        "bb": {"class_type": "MementoLoadBackbone", "inputs": backbone_inputs(offload, swap_blocks)},
        "bank0": {"class_type": "MementoMemoryBank", "inputs": {"policy": "memento", "capacity": 8}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": NEGATIVE}},
    }
    prev_bank, prev_images = bank or ["bank0", 0], None
    for i in range(1, shots + 1):
        s = f"s{i}"
        g[f"{s}_pos"] = {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": ["clip", 0], "text": PROMPTS[i - 1]},
        }
        g[f"{s}_ret"] = {
            "class_type": "MementoKeyframeRetrieve",
            "inputs": {
                "backbone": ["bb", 0],
                "memory_bank": prev_bank,
                "clip": ["clip", 0],
                "prompt": PROMPTS[i - 1],
                "global_caption": "",
            },
        }
        extra = {"first_frame": prev_images} if prev_images else {}
        g[f"{s}_gen"] = {"class_type": "MementoGenerateShot", "inputs": generate_inputs(i, **extra)}
        g[f"{s}_dec"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{s}_gen", 0], "vae": ["vae", 0]}}
        g[f"{s}_upd"] = {
            "class_type": "MementoUpdateMemory",
            "inputs": {
                "memory": [f"{s}_ret", 0],
                "vae": ["vae", 0],
                "prompt": PROMPTS[i - 1],
                "images": [f"{s}_dec", 0],
                "shot_index": i,
            },
        }
        g[f"{s}_lat"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"{s}_gen", 0], "filename_prefix": f"t/{tag}_{s}"},
        }
        for name, source in (("sel", [f"{s}_ret", 1]), ("bank", [f"{s}_upd", 0])):
            g[f"{s}_save_{name}"] = {
                "class_type": "MementoSaveMemoryBank",
                "inputs": {"memory_bank": source, "filename_prefix": f"t/{tag}_{s}_{name}"},
            }
        prev_bank, prev_images = [f"{s}_upd", 0], [f"{s}_dec", 0]
    return g


def saved_latent(host, result, node: str) -> torch.Tensor:
    info = result.ui(node)["latents"][0]
    folder = Path(host.folder_paths.get_output_directory()) / info["subfolder"]
    return load_file(str(folder / info["filename"]))["latent_tensor"]


def saved_bank_path(result, node: str) -> Path:
    return Path(result.ui_text(node).splitlines()[0])


@pytest.fixture(scope="module")
def story(comfy_host, tiny):
    return comfy_host.run(story_graph("story", 3))


@pytest.fixture(scope="module")
def expected(comfy_host, tiny):
    return render_expected(comfy_host, tiny)


@dataclass(frozen=True)
class DirectModels:
    """The tiny files loaded without the pack's nodes: CLIP and VAE through ComfyUI's loaders and the
    pack's adapters, the backbone through memento_core."""

    adapters: Any
    text: Any
    vae: Any
    backbone: Backbone


def direct_models(comfy_host, tiny) -> DirectModels:
    nodes = comfy_host.nodes
    adapters = comfy_host.pack_submodule("nodes.comfy_adapters")
    clip = nodes.CLIPLoader().load_clip(TINY_FILES["text_encoder"], "wan")[0]
    vae = adapters.ComfyVideoVAE(nodes.VAELoader().load_vae(TINY_FILES["vae"])[0])
    experts = [load_memento_expert(tiny[k], tiny[f"memento_{k}"]) for k in ("high", "low")]
    backbone = Backbone(experts[0][0], experts[1][0], experts[0][1], experts[1][1])
    return DirectModels(adapters, adapters.ComfyTextEncoder(clip), vae, backbone)


def shot_request(i: int, mode: str) -> ShotRequest:
    """Shot ``i`` (0-based) of the graph's story as a memento_core request: seed 101 + i, CFG 3.5, the
    memento policy's positions and empty memory (one zero latent frame, as --m2v_first_shot)."""
    return ShotRequest(
        prompt=PROMPTS[i], width=W, height=H, frames=FRAMES, mode=mode, reconstruct=RECONSTRUCT,
        negative=NEGATIVE, settings=ShotSettings(steps=STEPS, seed=101 + i),
    ).with_sampler(get_policy("memento").sampler)  # fmt: skip


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def render_expected(comfy_host, tiny):
    """memento_core's render_shot with the same files, CLIP and VAE (through the pack's adapters):
    shot 1 a cut from an empty memory, shots 2 and 3 continuing (mi2v), seeds 101..103, CFG 3.5
    -> (records, banks after each shot, the adapters module)."""
    m = direct_models(comfy_host, tiny)
    bank = MemoryBank.empty("memento")
    records, banks, video = [], [], None
    for i in range(len(PROMPTS)):
        request = shot_request(i, "cut" if i == 0 else "mi2v")
        record, bank = render_shot(
            m.backbone, bank, request, m.vae, m.text, previous_video=video, shot_index=i + 1
        )
        records.append(record)
        banks.append(bank)
        video = record.video
    return records, banks, m.adapters


def test_three_shot_graph_equals_render_shot(comfy_host, story, expected):
    result = story
    records, banks, adapters = expected
    for i, record in enumerate(records, start=1):
        got = saved_latent(comfy_host, result, f"s{i}_lat")
        want = adapters.raw_latent(record.latent)
        assert got.shape == (1, 16, 3, H // 8, W // 8)
        err = rel_diff(got, want)
        print(f"shot {i}: max rel diff graph vs render_shot {err:.2e}")
        assert err <= 1e-5
    final = load_bank(saved_bank_path(result, "s3_save_bank"))
    for pool in ("high", "low"):
        assert final.frame_ids(pool) == banks[2].frame_ids(pool)
        assert torch.allclose(final.latents(pool), banks[2].latents(pool), atol=1e-5, rtol=1e-4)
    assert final.current_time == 3 * FRAMES and final.shots_done == 3


def test_mm2v_continuation_equals_render_shot(comfy_host, tiny, expected):
    """Shot 2 with continue_with "last 5 frames (MM2V)": the last 5 decoded frames of shot 1 are the
    motion frames; equal to render_shot in mode mm2v from shot 1's bank and video."""
    records, banks, adapters = expected
    graph = story_graph("mm2v", 2)
    graph["s2_gen"]["inputs"]["continue_with"] = "last 5 frames (MM2V)"
    result = comfy_host.run(graph)
    m = direct_models(comfy_host, tiny)
    record, _ = render_shot(
        m.backbone, banks[0], shot_request(1, "mm2v"), m.vae, m.text, previous_video=records[0].video
    )
    err = rel_diff(saved_latent(comfy_host, result, "s2_lat"), adapters.raw_latent(record.latent))
    print(f"mm2v shot: max rel diff graph vs render_shot {err:.2e}")
    assert err <= 1e-5
    got = saved_latent(comfy_host, result, "s2_lat")
    assert rel_diff(got, adapters.raw_latent(records[1].latent)) > 1e-3  # not the MI2V shot


def test_memory_selection_and_eviction(comfy_host, story, expected):
    result = story
    records, _, _ = expected
    sel2 = load_bank(saved_bank_path(result, "s2_save_sel"))
    after2 = load_bank(saved_bank_path(result, "s2_save_bank"))
    sel3 = load_bank(saved_bank_path(result, "s3_save_sel"))
    assert all(len(sel2.pool(p)) == 8 and sel2.frame_ids(p)[0] == "s1f0" for p in ("high", "low"))
    assert records[1].selection.pool("high").method == "all"
    assert len(after2.pool("high")) == 16  # shot 1's 8 + shot 2's 8 candidates for shot 3
    for pool in ("high", "low"):
        assert len(sel3.pool(pool)) == 8  # KeyframeQuery: 16 -> 6 local + 2 global
        assert sel3.frame_ids(pool) == records[2].memory_ids[pool]
    assert records[2].selection.pool("high").method == "kfq"
    # Update Memory extended the bank AFTER selection: evicted frames are gone
    final = load_bank(saved_bank_path(result, "s3_save_bank"))
    evicted = set(after2.frame_ids("high")) - set(sel3.frame_ids("high"))
    assert len(evicted) == 8 and not evicted & set(final.frame_ids("high"))


def test_block_swap_offload_gives_the_same_shot(comfy_host, story):
    result = story
    swapped = comfy_host.run(story_graph("swap", 1, offload="block swap", swap_blocks=1))
    assert torch.equal(
        saved_latent(comfy_host, swapped, "s1_lat"), saved_latent(comfy_host, result, "s1_lat")
    )


def test_interrupt_leaves_the_bank_untouched(comfy_host, story):
    import comfy.model_management as mm
    import comfy.utils

    result = story
    bank_file = saved_bank_path(result, "s1_save_bank")
    before = hashlib.sha256(bank_file.read_bytes()).hexdigest()
    graph = story_graph("interrupted", 1, bank=["loaded", 0])
    graph["loaded"] = {"class_type": "MementoLoadMemoryBank", "inputs": {"path": str(bank_file)}}
    graph["s1_gen"]["inputs"]["first_frame"] = ["frame", 0]
    graph["frame"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0},
    }
    seen: list[int] = []

    def hook(value, total, preview=None, node_id=None):  # in process, the progress hook is the only tap
        if total == STEPS:
            seen.append(value)
            if value >= 2:
                mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        run = comfy_host.run(graph, check=False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert not run.success
    assert any(event == "execution_interrupted" for event, _ in run.messages), run.messages
    assert "interrupted" in (run.error_message or "")
    assert seen == [1, 2]
    assert hashlib.sha256(bank_file.read_bytes()).hexdigest() == before
    out = Path(comfy_host.folder_paths.get_output_directory()) / "t"
    assert list(out.glob("interrupted_s1_sel_*"))  # the selection (before Generate) was saved
    assert not list(out.glob("interrupted_s1_bank_*"))  # no updated bank came out
    assert not mm.processing_interrupted()


def _snapshot(bank):
    return (
        bank.current_time,
        bank.shots_done,
        {p: bank.frame_ids(p) for p in ("high", "low")},
        {f.frame_id: f.latent.clone() for f in bank.frames()},
    )


def _same(a, b) -> bool:
    return a[:3] == b[:3] and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def test_nodes_do_not_mutate_their_inputs(comfy_host, story, tiny):
    result = story
    nodes = comfy_host.nodes
    bb_mod, mem, shot = (
        comfy_host.pack_submodule(f"nodes.{m}") for m in ("backbone_nodes", "memory_nodes", "shot_nodes")
    )
    bank = comfy_host.pack_submodule("memento_core.memory").load_bank(saved_bank_path(result, "s2_save_bank"))
    before = _snapshot(bank)
    clip = nodes.CLIPLoader().load_clip(TINY_FILES["text_encoder"], "wan")[0]
    vae = nodes.VAELoader().load_vae(TINY_FILES["vae"])[0]
    backbone = bb_mod.MementoLoadBackbone.execute(**backbone_inputs())[0]
    sel = shot.MementoKeyframeRetrieve.execute(backbone, bank, clip, PROMPTS[2])[0]
    sel_before = _snapshot(sel.bank)
    pos = nodes.CLIPTextEncode().encode(clip, PROMPTS[2])[0]
    pos_copy = pos[0][0].clone()
    frame = torch.rand(2, H, W, 3)
    frame_copy = frame.clone()
    inputs = generate_inputs(3) | {"backbone": backbone, "selection": sel, "clip": clip, "positive": pos}
    inputs |= {"negative": pos, "vae": vae, "first_frame": frame, "steps": 2}
    latent = shot.MementoGenerateShot.execute(**inputs)[0]
    latent_copy = latent["samples"].clone()
    new_bank = mem.MementoUpdateMemory.execute(sel, vae, PROMPTS[2], latent=latent)[0]
    refs = torch.rand(2, H, W, 3)
    refs_copy = refs.clone()
    ref_bank = mem.MementoMemoryBank.execute("memento", 8, refs, vae, "a\nb")[0]
    assert _same(_snapshot(bank), before) and _same(_snapshot(sel.bank), sel_before)
    assert (
        torch.equal(pos[0][0], pos_copy) and torch.equal(frame, frame_copy) and torch.equal(refs, refs_copy)
    )
    assert torch.equal(latent["samples"], latent_copy)
    assert len(new_bank.pool("high")) == 16 and new_bank is not sel.bank
    assert [f.frame_id for f in ref_bank.frames()] == ["ref0", "ref1"] and ref_bank.resolution == (
        H // 8,
        W // 8,
    )
    sheet = mem.MementoMemoryPreview.execute(sel, None, 32)[0]
    assert sheet.ndim == 4 and sheet.shape[-1] == 3
