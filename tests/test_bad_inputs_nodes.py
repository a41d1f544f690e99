"""The bad-input matrix, nodes: each case runs a node the way ComfyUI does (in-process ComfyUI 0.3.75,
tiny files) and asserts the ValueError names the node and the input, and that nothing was written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_nodes_errors import failed
from test_render_story_node import render_graph
from tiny_comfy_models import TINY_FILES


def nodes(comfy_host):
    return comfy_host.pack_submodule("nodes.memory_nodes"), comfy_host.pack_submodule("nodes.story_nodes")


def vae(comfy_host):
    return comfy_host.nodes.VAELoader().load_vae(TINY_FILES["vae"])[0]


def output_files(comfy_host) -> set[str]:
    root = Path(comfy_host.folder_paths.get_output_directory())
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def nan_images(n: int = 2, h: int = 32, w: int = 64) -> torch.Tensor:
    images = torch.rand(n, h, w, 3)
    images[0, 0, 0, 0] = float("nan")
    return images


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (
            torch.zeros(0, 32, 64, 3),
            "Memento Memory Bank: the 'reference_images' input is an empty IMAGE batch",
        ),
        (nan_images(), "Memento Memory Bank: the 'reference_images' input holds NaN or infinite values"),
        (
            torch.rand(1, 30, 64, 3),
            "Memento Memory Bank: the 'reference_images' input: width and height must be",
        ),
        (torch.rand(2, 32, 64), "Memento Memory Bank: the 'reference_images' input is not an IMAGE batch"),
    ],
)
def test_memory_bank_reference_images(comfy_host, tiny, images, match) -> None:
    memory, _ = nodes(comfy_host)
    with pytest.raises(ValueError, match=match):
        memory.MementoMemoryBank.execute("memento", 0, images, vae(comfy_host))


@pytest.mark.parametrize(
    ("images", "latent", "match"),
    [
        (
            torch.rand(9, 40, 24, 3),
            None,
            r"Update Memory: the 'images' input: width and height must be .* 24x40",
        ),
        (nan_images(9), None, "Update Memory: the 'images' input holds NaN or infinite values"),
        (torch.zeros(0, 32, 64, 3), None, "Update Memory: the 'images' input is an empty IMAGE batch"),
        (
            None,
            {"samples": torch.full((1, 16, 3, 4, 8), float("nan"))},
            "Update Memory: the 'latent' input holds NaN",
        ),
        (
            None,
            {"samples": torch.zeros(1, 16, 3, 3, 8)},
            r"Update Memory: the 'latent' input's frames: .* 64x24",
        ),
        (torch.rand(5, 32, 64, 3), None, "Update Memory: the shot has 5 frames"),
    ],
)
def test_update_memory_inputs(comfy_host, tiny, images, latent, match) -> None:
    memory, _ = nodes(comfy_host)
    bank = memory.MementoMemoryBank.execute("memento", 0).result[0]
    with pytest.raises(ValueError, match=match):
        memory.MementoUpdateMemory.execute(
            bank, vae(comfy_host), "p", images=images, latent=latent, shot_index=1
        )


def test_a_nul_byte_in_a_filename_prefix_names_the_node(comfy_host, tiny) -> None:
    memory, _ = nodes(comfy_host)
    bank = memory.MementoMemoryBank.execute("memento", 0).result[0]
    before = output_files(comfy_host)
    with pytest.raises(ValueError, match="Save Memory Bank: 'filename_prefix' contains a control character"):
        memory.MementoSaveMemoryBank.execute(bank, "memento/bank\x00x")
    assert output_files(comfy_host) == before
    with pytest.raises(ValueError, match="Load Memory Bank: 'path' contains a control character"):
        memory.MementoLoadMemoryBank.execute("memento/bank\x00.safetensors")


def test_load_story_script_path_with_a_nul_byte(comfy_host, tiny) -> None:
    _, story = nodes(comfy_host)
    with pytest.raises(ValueError, match="Load Story Script: 'path' contains a control character"):
        story.MementoLoadStoryScript.execute("stories/a\x00.json", "", 0)


def test_generate_shot_mm2v_needs_five_frames(comfy_host, tiny) -> None:
    from test_nodes_errors import shot_graph

    graph = shot_graph({"class_type": "MementoMemoryBank", "inputs": {"policy": "memento", "capacity": 8}})
    graph["img"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 32, "batch_size": 2, "color": 0},
    }
    graph["gen"]["inputs"] |= {"continue_with": "last 5 frames (MM2V)", "first_frame": ["img", 0]}
    msg = failed(comfy_host, graph)
    assert "Memento Generate Shot: MM2V continues from the last 5 frames, but 'first_frame' has 2" in msg


def test_generate_shot_refuses_an_empty_first_frame_directly(comfy_host, tiny) -> None:
    errors = comfy_host.pack_submodule("nodes.errors")
    with pytest.raises(
        ValueError, match="Memento Generate Shot: the 'first_frame' input is an empty IMAGE batch"
    ):
        errors.check_image(
            torch.zeros(0, 32, 64, 3), "first_frame", "Memento Generate Shot", frame_size=False
        )


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"seed": 2**64 - 1}, "seed: 18446744073709551615 is out of range for this story"),
        ({"output_folder": "memento/a\x00b"}, "'output_folder' contains a control character"),
        ({"width": 48, "height": 40}, "size: width and height must be positive multiples of 16, got 48x40"),
    ],
)
def test_render_story_inputs(comfy_host, tiny, over, match) -> None:
    before = output_files(comfy_host)
    graph = render_graph("bad/render", **over)
    msg = failed(comfy_host, graph)
    assert "Memento Render Story" in msg and match in msg, msg
    assert output_files(comfy_host) == before


def test_render_story_folder_of_an_earlier_run(comfy_host, tiny) -> None:
    root = Path(comfy_host.folder_paths.get_output_directory()) / "bad" / "earlier"
    (root / "shots").mkdir(parents=True, exist_ok=True)
    (root / "shots" / "01_01.mp4").write_bytes(b"earlier")
    before = output_files(comfy_host)
    msg = failed(comfy_host, render_graph("bad/earlier", if_exists="stop"))
    assert "already holds a render" in msg and "if_exists" in msg
    msg = failed(comfy_host, render_graph("bad/earlier"))  # resume: no state to resume from
    assert "cannot be resumed" in msg and "no state/run.json to resume from" in msg
    assert output_files(comfy_host) == before
