"""StoryMem in the ComfyUI nodes (real in-process ComfyUI 0.3.75, tiny files).

- Load Memento Backbone reads StoryMem's files (LoRA, no KeyframeQuery) and names the family; a pair
  of files of two families is refused.
- The CLIP_VISION adapter equals ComfyUI's own ``encode_image`` on frames both prepare alike.
- Update Memory with a StoryMem bank: the policy's update (continuation frames dropped, CLIP keyframes,
  sink + recent) equals ``StoryMemPolicy.remember`` called directly; without CLIP vision it is refused.
"""

from __future__ import annotations

import pytest
import torch
from test_nodes_errors import backbone, failed, info
from tiny_comfy_models import TINY_FILES, write_tiny_memento

from memento_core.memory import FinishedShot, MemoryTools, StoryMemPolicy
from memento_core.tiny import tiny_config

STORYMEM = {
    "high": "storymem/backbone_high_noise.safetensors",
    "low": "storymem/backbone_low_noise.safetensors",
}


@pytest.fixture(scope="module")
def storymem_files(comfy_host, tiny):
    folder = comfy_host.model_dir("loras")
    cfg = tiny_config("i2v", text_dim=64)
    for seed, pool in ((21, "high"), (22, "low")):
        write_tiny_memento(folder / STORYMEM[pool], cfg, seed=seed, with_kfq=False)
    comfy_host.refresh_model_lists()
    return STORYMEM


def test_backbone_reads_storymem_files_and_names_the_family(comfy_host, storymem_files):
    text = comfy_host.run(
        info(backbone(memento_high=storymem_files["high"], memento_low=storymem_files["low"]))
    ).ui_text("bb")
    assert text.count("family: StoryMem (LoRA only, no KeyframeQuery)") == 2
    assert "KeyframeQuery: none in the file" in text
    memento = comfy_host.run(info(backbone())).ui_text("bb")
    assert memento.count("family: Memento (LoRA + KeyframeQuery)") == 2


def test_backbone_refuses_files_of_two_families(comfy_host, storymem_files):
    msg = failed(comfy_host, info(backbone(memento_low=storymem_files["low"])))
    assert "Memento (LoRA + KeyframeQuery) file but memento_low is a StoryMem" in msg


def clip_vision(comfy_host):
    return comfy_host.nodes.CLIPVisionLoader().load_clip(TINY_FILES["clip_vision"])[0]


def test_clip_vision_adapter_equals_comfyui_encode_image(comfy_host, tiny):
    adapters = comfy_host.pack_submodule("nodes.comfy_adapters")
    cv = clip_vision(comfy_host)
    size = cv.image_size
    # Frames at the model's input size on 8-bit levels: ComfyUI's preprocessing (resize skipped at that
    # size, rounding to 1/255) and StoryMem's squash resize both leave them as they are.
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 3, size, size), generator=gen).float() / 255
    got = adapters.ComfyImageEmbedder(cv)(frames)
    want = cv.encode_image(frames.permute(0, 2, 3, 1), crop=False)["image_embeds"].float()
    assert torch.allclose(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5), atol=1e-5)


def update_graph(**inputs) -> dict:
    return {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_FILES["vae"]}},
        "bank": {"class_type": "MementoMemoryBank", "inputs": {"policy": "storymem", "capacity": 0}},
        "update": {
            "class_type": "MementoUpdateMemory",
            "inputs": {"memory": ["bank", 0], "vae": ["vae", 0], "prompt": "p", "shot_index": 1} | inputs,
        },
    }


def test_update_memory_runs_the_storymem_policy(comfy_host, tiny, monkeypatch):
    memory_nodes = comfy_host.pack_submodule("nodes.memory_nodes")
    adapters = comfy_host.pack_submodule("nodes.comfy_adapters")
    vae = adapters.ComfyVideoVAE(comfy_host.nodes.VAELoader().load_vae(TINY_FILES["vae"])[0])
    cv = clip_vision(comfy_host)
    gen = torch.Generator().manual_seed(3)
    # three flat-coloured scenes of 6, 6 and 5 frames: keyframes at the scene changes
    colours = [torch.rand(3, generator=gen) for _ in range(3)]
    images = torch.cat(
        [c.view(1, 1, 1, 3).expand(n, 32, 64, 3) for c, n in zip(colours, (6, 6, 5), strict=True)]
    )
    bank = memory_nodes.MementoMemoryBank.execute("storymem", 0).result[0]
    out = memory_nodes.MementoUpdateMemory.execute(
        bank, vae.vae, "p", images=images, shot_index=1, clip_vision=cv, cut=False
    ).result
    new_bank, frames = out
    assert torch.equal(frames, images[1:])  # MI2V: the repeated first frame is dropped
    video = images.permute(3, 0, 1, 2) * 2 - 1
    direct = StoryMemPolicy().remember(
        bank, FinishedShot(video, "mi2v", "p", 1), MemoryTools(vae, adapters.ComfyImageEmbedder(cv))
    )
    assert new_bank.frame_ids("high") == direct.bank.frame_ids("high") == direct.log["bank_ids"]
    assert new_bank.capacity == 10 and new_bank.current_time == 16
    for a, b in zip(new_bank.frames(), direct.bank.frames(), strict=True):
        assert torch.allclose(a.latent, b.latent, atol=1e-5) and torch.equal(
            a.clip_embedding, b.clip_embedding
        )
    # "evenly spaced (Memento)" on the same bank forces Memento's rule: 8 frames of the whole shot.
    memento = memory_nodes.MementoUpdateMemory.execute(
        bank, vae.vae, "p", images=images, update="evenly spaced (Memento)"
    ).result[0]
    assert memento.frame_ids("high") == [f"s1f{i}" for i in (0, 2, 5, 7, 9, 11, 14, 16)]


def test_update_memory_without_clip_vision_is_refused(comfy_host, tiny):
    graph = update_graph()
    graph["img"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 32, "batch_size": 9, "color": 0},
    }
    graph["update"]["inputs"]["images"] = ["img", 0]
    graph["save"] = {
        "class_type": "MementoSaveMemoryBank",
        "inputs": {"memory_bank": ["update", 0], "filename_prefix": "storymem_nodes/bank"},
    }
    msg = failed(comfy_host, graph)
    assert "Update Memory: the storymem update picks keyframes" in msg and "Load CLIP Vision" in msg


def test_memory_bank_capacity_zero_is_the_policy_default(comfy_host, tiny):
    memory_nodes = comfy_host.pack_submodule("nodes.memory_nodes")
    vae = comfy_host.nodes.VAELoader().load_vae(TINY_FILES["vae"])[0]
    refs = torch.rand(3, 32, 64, 3, generator=torch.Generator().manual_seed(1))
    bank = memory_nodes.MementoMemoryBank.execute("storymem", 0, refs, vae).result[0]
    assert (bank.policy, bank.capacity, bank.shared) == ("storymem", 10, True)
    assert bank.frame_ids("high") == ["ref0", "ref1", "ref2"] and all(f.pinned for f in bank.high)
    assert memory_nodes.MementoMemoryBank.execute("memento", 0).result[0].capacity == 8
    with pytest.raises(ValueError, match="3 reference images exceed the capacity 2"):
        memory_nodes.MementoMemoryBank.execute("storymem", 2, refs, vae)
