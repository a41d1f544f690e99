"""Readable input errors of the Memento nodes, as ComfyUI reports them (real in-process ComfyUI), and
the Load Story Script / Memory Bank nodes' values."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_comfy_models import TINY_FILES, backbone_inputs, loader_nodes

W, H = 64, 32


def backbone(**over) -> dict:
    return {"class_type": "MementoLoadBackbone", "inputs": backbone_inputs(**over)}


def failed(host, graph: dict) -> str:
    """Run a graph that must fail in execution; return ComfyUI's error message (no traceback shown)."""
    run = host.run(graph, check=False)
    assert not run.success
    assert run.execution_error is not None, run.error_message
    assert run.execution_error["exception_type"].endswith("ValueError"), run.error_message
    return run.error_message or ""


def info(bb: dict) -> dict:
    return {"bb": bb, "show": {"class_type": "PreviewAny", "inputs": {"source": ["bb", 1]}}}


def test_backbone_loads_and_describes_itself(comfy_host, tiny):
    run = comfy_host.run(info(backbone(lora_1=TINY_FILES["memento_low"], strength_1=0.5, expert_1="low")))
    text = run.ui_text("bb")
    assert "high-noise expert: tiny_i2v_high.safetensors + backbone_high_noise.safetensors" in text
    assert "KeyframeQuery: 10 local + 2 global queries" in text and "extra LoRAs: backbone_low_noise" in text


def test_t2v_checkpoint_where_i2v_is_needed(comfy_host, tiny):
    msg = failed(comfy_host, info(backbone(high_noise_model=TINY_FILES["t2v"])))
    assert "Load Memento Backbone: high-noise expert" in msg and "tiny_t2v" in msg
    assert "T2V checkpoint (in_dim 16) but an I2V expert (in_dim 36) is required" in msg


def rejected(host, graph: dict) -> dict:
    """Run a graph that ComfyUI must refuse when it is queued; return its node_errors."""
    run = host.run(graph, check=False)
    assert not run.success and run.execution_error is None, run.error_message
    return run.node_errors


def test_missing_weights_file(comfy_host, tiny):
    """Missing files are refused when the prompt is queued (ComfyUI 0.3.75 and 0.33 alike), with one error
    on the loader naming every missing file, its widget and its folders; not ComfyUI's "Value not in list"."""
    errors = rejected(comfy_host, info(backbone(memento_low="backbone_missing.safetensors")))
    assert list(errors) == ["bb"]
    (error,) = errors["bb"]["errors"]
    msg = error["details"]
    assert msg.startswith(
        "Load Memento Backbone: the Memento file 'backbone_missing.safetensors' (memento_low)"
    )
    assert "was not found in" in msg and "memento" in msg and "loras" in msg
    assert "Put the .safetensors file there" in msg
    errors = rejected(
        comfy_host, info(backbone(high_noise_model="gone.safetensors", lora_2="gone_lora.safetensors"))
    )
    (error,) = errors["bb"]["errors"]
    lines = error["details"].splitlines()
    assert len(lines) == 2 and "Value not in list" not in error["details"]
    assert "model file 'gone.safetensors' (high_noise_model)" in lines[0] and "diffusion_models" in lines[0]
    assert "LoRA file 'gone_lora.safetensors' (lora_2)" in lines[1] and "loras" in lines[1]


def test_fp8_stores_block_weights_in_fp8(comfy_host, tiny):
    text = comfy_host.run(info(backbone(weight_dtype="fp8"))).ui_text("bb")
    assert text.count("dtype bfloat16 (block weights stored in fp8 e4m3fn)") == 2, text


def test_fast_paths_are_reported_on_the_canvas(comfy_host, tiny):
    """A backend that is not installed falls back to SDPA and says so in the loader's text."""
    text = comfy_host.run(info(backbone(attention="flash", weight_dtype="fp8"))).ui_text("bb")
    assert "attention: sdpa, fp8 dequantised to bf16" in text, text  # no fp8 tensor cores on a CPU
    assert "attention flash: using SDPA: flash is not installed" in text
    text = comfy_host.run(info(backbone(attention="sdpa", compile=True, offload="auto"))).ui_text("bb")
    assert "offload: auto -> none" in text  # ComfyUI computes on the CPU here: nothing to offload
    assert "attention: sdpa, compiled" in text and "using SDPA" not in text


def shot_graph(bank_node: dict, **gen) -> dict:
    inputs = {
        "backbone": ["bb", 0],
        "selection": ["ret", 0],
        "clip": ["clip", 0],
        "positive": ["pos", 0],
        "negative": ["pos", 0],
        "vae": ["vae", 0],
        "reconstruct": "",
        "width": W,
        "height": H,
        "frames": 9,
        "steps": 2,
        "shift": 5.0,
        "cfg_high": 3.5,
        "cfg_low": 3.5,
        "boundary": 0.9,
        "seed": 0,
        "position_scheme": "memento",
        "solver": "euler",
    } | gen
    return {
        **loader_nodes(),
        "bb": backbone(),
        "bank": bank_node,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a cat on a mat"}},
        "ret": {
            "class_type": "MementoKeyframeRetrieve",
            "inputs": {
                "backbone": ["bb", 0],
                "memory_bank": ["bank", 0],
                "clip": ["clip", 0],
                "prompt": "a cat",
                "global_caption": "",
            },
        },
        "gen": {"class_type": "MementoGenerateShot", "inputs": inputs},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["gen", 0], "vae": ["vae", 0]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
    }


def reference_bank(width: int, height: int) -> dict:
    return {
        "class_type": "MementoMemoryBank",
        "inputs": {
            "policy": "memento",
            "capacity": 8,
            "reference_images": ["refs", 0],
            "vae": ["vae", 0],
            "reference_captions": "",
        },
    }, {
        "class_type": "EmptyImage",
        "inputs": {"width": width, "height": height, "batch_size": 2, "color": 255},
    }


def test_bank_and_shot_resolution_mismatch(comfy_host, tiny):
    bank, refs = reference_bank(W, H)
    graph = shot_graph(bank, width=W, height=2 * H)
    graph["refs"] = refs
    msg = failed(comfy_host, graph)
    assert (
        "Memento Generate Shot: the memory bank holds frames of about 64x32 px but the shot is 64x64" in msg
    )


def test_reference_shot_renders_and_size_errors(comfy_host, tiny):
    bank, refs = reference_bank(W, H)
    graph = shot_graph(bank)
    graph["refs"] = refs
    comfy_host.run(graph)  # MR2V: two pinned references as the first shot's memory
    graph = shot_graph({"class_type": "MementoMemoryBank", "inputs": {"policy": "memento", "capacity": 8}})
    graph["gen"]["inputs"]["frames"] = 10
    assert "frames must be of the form 4n+1" in failed(comfy_host, graph)
    graph["gen"]["inputs"] |= {"frames": 9, "width": 72}
    assert "width and height must be positive multiples of 16, got 72x32" in failed(comfy_host, graph)
    graph["gen"]["inputs"] |= {
        "width": W,
        "first_frame": ["frame", 0],
        "continue_with": "last 5 frames (MM2V)",
    }
    graph["frame"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0},
    }
    assert "MM2V continues from the last 5 frames, but 'first_frame' has 1" in failed(comfy_host, graph)


def test_reference_images_need_a_vae(comfy_host, tiny):
    graph = {
        "refs": {
            "class_type": "EmptyImage",
            "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0},
        },
        "bank": {
            "class_type": "MementoMemoryBank",
            "inputs": {"policy": "memento", "capacity": 8, "reference_images": ["refs", 0]},
        },
        "prev": {"class_type": "MementoMemoryPreview", "inputs": {"memory": ["bank", 0], "tile_height": 32}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["prev", 0]}},
    }
    assert "reference_images need the 'vae' input" in failed(comfy_host, graph)


def story_graph(path: str = "", text: str = "", index: int = 0) -> dict:
    return {
        "story": {
            "class_type": "MementoLoadStoryScript",
            "inputs": {"path": path, "text": text, "shot_index": index},
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["story", 0]}},
    }


STORY = {
    "story_name": "harbour",
    "reconstruct_target": "[Person A] a sailor",
    "scenes": [
        {
            "scene_num": 1,
            "video_prompts": ["global caption: [Person A]: a sailor; shot caption: walks.", "looks."],
            "cut": [True, False],
        },
        {"scene_num": 2, "video_prompts": ["climbs aboard."], "cut": [True]},
    ],
}


def test_story_script_values(comfy_host, tiny):
    input_dir = comfy_host.folder_paths.get_input_directory()
    with open(f"{input_dir}/harbour.json", "w", encoding="utf-8") as fh:
        json.dump(STORY, fh)
    run = comfy_host.run(story_graph(path="harbour.json", index=0))
    assert run.ui_text("show").strip() == STORY["scenes"][0]["video_prompts"][0]
    node = comfy_host.pack_submodule("nodes.story_nodes").MementoLoadStoryScript
    out = node.execute(path="", text=json.dumps(STORY), shot_index=1).args
    assert out == ("looks.", "looks.", False, "[Person A] a sailor", 3, 1)
    out = node.execute(path=f"{input_dir}/harbour.json", text="", shot_index=0).args
    assert out[1] == "[Person A]: a sailor" and out[2] is True and out[4:] == (3, 0)


def test_bad_story_script(comfy_host, tiny):
    msg = failed(comfy_host, story_graph(text='{"story_name": "x", "scenes": [}'))
    assert "Load Story Script: story script the 'text' input: not valid JSON (line 1" in msg
    bad = dict(STORY, scenes=[{"scene_num": 1, "video_prompts": ["a"], "cut": ["yes"]}])
    msg = failed(comfy_host, story_graph(text=json.dumps(bad)))
    assert "field 'scenes[0].cut[0]': expected true or false" in msg
    msg = failed(comfy_host, story_graph(path="no_such_story.json"))
    assert "no_such_story.json: no such file" in msg
    msg = failed(comfy_host, story_graph(text=json.dumps(STORY), index=3))
    assert "shot_index 3 is out of range: the story 'harbour' has 3 shots (0..2)" in msg


def test_bad_bank_file(comfy_host, tiny, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    graph = {
        "bank": {
            "class_type": "MementoLoadMemoryBank",
            "inputs": {"path": str(tmp_path / "junk.safetensors")},
        },
        "save": {
            "class_type": "MementoSaveMemoryBank",
            "inputs": {"memory_bank": ["bank", 0], "filename_prefix": "t/x"},
        },
    }
    assert "Load Memory Bank: memory bank file" in failed(comfy_host, graph)


def test_wrong_socket_values_are_named(comfy_host, tiny):
    shot = comfy_host.pack_submodule("nodes.shot_nodes")
    with pytest.raises(ValueError, match="the 'backbone' input is not from Load Memento Backbone"):
        shot.MementoKeyframeRetrieve.execute(backbone=object(), memory_bank=None, clip=None, prompt="x")
    mem = comfy_host.pack_submodule("nodes.memory_nodes")
    with pytest.raises(ValueError, match="the 'memory' input is not a memory bank"):
        mem.MementoUpdateMemory.execute(memory=torch.zeros(1), vae=None, prompt="")


def test_more_reference_inputs_are_pinned_in_order_and_must_match_in_size(comfy_host, tiny):
    """reference_images_2..4 (instead of a core Batch Images node) are pinned after the first input's
    frames, in input order: each frame equals the same image encoded alone; a size mismatch is named."""
    from memento_core.memory import load_bank

    def image(color: int, width: int = W) -> dict:
        inputs = {"width": width, "height": H, "batch_size": 1, "color": color}
        return {"class_type": "EmptyImage", "inputs": inputs}

    def bank_graph(refs: dict[str, str], prefix: str, **images: dict) -> dict:
        """The images, a VAE, a Memory Bank with ``refs`` (input -> image node) and Save Memory Bank."""
        inputs = {"policy": "memento", "capacity": 8, "vae": ["vae", 0]}
        inputs |= {name: [source, 0] for name, source in refs.items()}
        return {
            **images,
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_FILES["vae"]}},
            "bank": {"class_type": "MementoMemoryBank", "inputs": inputs},
            "save": {
                "class_type": "MementoSaveMemoryBank",
                "inputs": {"memory_bank": ["bank", 0], "filename_prefix": prefix},
            },
        }

    def saved_latents(refs: dict[str, str], prefix: str, **images: dict) -> list[torch.Tensor]:
        graph = bank_graph(refs, prefix, **images)
        bank = load_bank(comfy_host.run(graph).ui_text("save").splitlines()[0])
        assert all(f.source == "reference" for f in bank.frames())
        return [f.latent for f in bank.frames()]

    red, blue = image(0xFF0000), image(0x0000FF)
    both = saved_latents(
        {"reference_images": "red", "reference_images_3": "blue"}, "refs_both", red=red, blue=blue
    )
    (alone_red,) = saved_latents({"reference_images": "red"}, "refs_red", red=red)
    (alone_blue,) = saved_latents({"reference_images": "blue"}, "refs_blue", blue=blue)
    assert len(both) == 2 and not torch.equal(alone_red, alone_blue)
    assert torch.equal(both[0], alone_red) and torch.equal(both[1], alone_blue)
    wide_blue = image(0x0000FF, width=W + 16)
    graph = bank_graph(
        {"reference_images": "red", "reference_images_3": "blue"}, "refs_bad", red=red, blue=wide_blue
    )
    msg = failed(comfy_host, graph)
    assert f"reference_images_3 is {W + 16}x{H} but reference_images is {W}x{H}" in msg
