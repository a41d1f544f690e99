"""The camera nodes in a real in-process ComfyUI: Camera Trajectory (JSON and presets, bad input), Update
Memory keeping each frame's pose, Keyframe Query Retrieve recalling the frames a camera overlaps (fov and
memento+fov) with its camera map, against memento_core's policies called directly."""

from __future__ import annotations

import pytest
import torch
from tiny_comfy_models import TINY_FILES


def packs(comfy_host):
    return (
        comfy_host.pack_submodule("nodes.camera_nodes").MementoCameraTrajectory,
        comfy_host.pack_submodule("nodes.memory_nodes"),
        comfy_host.pack_submodule("nodes.shot_nodes").MementoKeyframeRetrieve,
    )


def pose(p) -> tuple[float, float, float, float]:
    """A pose's numbers (the pack's classes are not the test's: compare values)."""
    return (p.x, p.z, p.yaw, p.fov)


def trajectory(node, preset="static", json="", **over):
    args = {"x": 0.0, "z": 0.0, "yaw": 0.0, "fov": 60.0, "amount": 30.0, "distance": 3.0, "frames": 9} | over
    return node.execute(preset, json=json, **args).result


def test_camera_trajectory_json_and_presets(comfy_host, tiny) -> None:
    node, _, _ = packs(comfy_host)
    path, picture, text = trajectory(
        node, "json", '[{"frame": 0, "x": 0, "z": 0, "yaw": 0}, {"frame": 8, "x": 4, "z": 0, "yaw": 90}]'
    )
    assert (
        [p.x for p in path.targets(9)] == [0.0, 2.0, 4.0] and picture.shape[0] == 1 and '"frame": 8' in text
    )
    pan, _, _ = trajectory(node, "pan", amount=90)
    assert [p.yaw for p in pan.targets(9)] == [0.0, 45.0, 90.0]
    static, _, text = trajectory(node, "static", x=2, z=3, yaw=45)
    assert [pose(p) for p in static.targets(9)] == [(2, 3, 45, 60)] and '"yaw": 45.0' in text


@pytest.mark.parametrize(
    ("json", "frames", "match"),
    [
        ('{"x": 0, "z": 0}', 9, r"Camera Trajectory: json.yaw: missing"),
        ('{"x": 0, "z": 0, "yaw": 0, "fov": 200}', 9, r"json.fov: expected an angle in \(0, 180\)"),
        (
            '[{"frame": 20, "x": 0, "z": 0, "yaw": 0}]',
            9,
            r"json\[0\].frame: 20 is past the shot's last frame \(8\)",
        ),
        ("{not json", 9, "'json' is not valid JSON"),
        ("", 9, "'json' is empty or null"),
    ],
)
def test_camera_trajectory_bad_json(comfy_host, tiny, json, frames, match) -> None:
    node, _, _ = packs(comfy_host)
    with pytest.raises(ValueError, match=match):
        trajectory(node, "json", json, frames=frames)


@pytest.fixture(scope="module")
def loaded(comfy_host, tiny):
    from tiny_comfy_models import backbone_inputs

    backbone = comfy_host.pack_submodule("nodes.backbone_nodes").MementoLoadBackbone
    return backbone.execute(**backbone_inputs()).result[0]


def test_update_memory_keeps_poses_and_retrieve_recalls_by_camera(comfy_host, tiny, loaded) -> None:
    node, memory, retrieve = packs(comfy_host)
    vae = comfy_host.nodes.VAELoader().load_vae(TINY_FILES["vae"])[0]
    clip = comfy_host.nodes.CLIPLoader().load_clip(TINY_FILES["text_encoder"], "wan")[0]
    here, _, _ = trajectory(node, "pan", yaw=-10, amount=20)  # the workshop, panning
    there, _, _ = trajectory(node, "static", x=60, yaw=90)  # the garden, 60 m away
    images = torch.rand(9, 32, 64, 3, generator=torch.Generator().manual_seed(0))
    for policy in ("fov", "memento+fov"):
        bank = memory.MementoMemoryBank.execute(policy, 0).result[0]
        bank = memory.MementoUpdateMemory.execute(
            bank, vae, "workshop", images=images, shot_index=1, camera=here
        ).result[0]
        bank = memory.MementoUpdateMemory.execute(
            bank, vae, "garden", images=images, shot_index=2, camera=there
        ).result[0]
        # each remembered frame keeps the pose of its frame along the pan (yaw -10 .. 10 over frames 0 .. 8)
        frames = {f.frame_id: f for f in bank.frames()}
        assert frames["s1f0"].camera.yaw == pytest.approx(-10.0) and frames[
            "s1f8"
        ].camera.yaw == pytest.approx(10.0)
        assert pose(frames["s2f0"].camera) == (60, 0, 90, 60)
        back, _, _ = trajectory(node, "static", x=0.5, z=0.5, yaw=5)
        selection, chosen, preview, cmap = retrieve.execute(
            loaded, bank, clip, "back in the workshop", camera=back
        ).result
        assert {f.shot for f in chosen.high} == {1} and {f.shot for f in chosen.low} == {1}, policy
        record = selection.selection.pool("high")
        assert all(hit == fid.startswith("s1") for fid, hit in record.overlap.items())
        assert cmap.shape[0] == 1 and cmap.shape[-1] == 3 and preview.shape[0] == 1
        if policy == "fov":  # the same as the policy called directly
            core = comfy_host.pack_submodule("memento_core.memory")
            target = comfy_host.pack_submodule("memento_core.fov").CameraPose(0.5, 0.5, 5)
            direct, _ = core.get_policy("fov").select(bank, core.SelectionInputs(targets=[target]))
            assert chosen.frame_ids("high") == direct.frame_ids("high") == ["s1f5"]


def test_retrieve_refuses_what_is_not_a_camera(comfy_host, tiny, loaded) -> None:
    _, memory, retrieve = packs(comfy_host)
    bank = memory.MementoMemoryBank.execute("fov", 0).result[0]
    with pytest.raises(ValueError, match="Keyframe Query Retrieve: the 'camera' input is not a camera"):
        retrieve.execute(loaded, bank, None, "p", camera="north")
