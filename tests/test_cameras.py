"""Context-as-Memory end to end: SPEC 6's overlap rule on hand-computed geometry, camera trajectories,
run collapsing and the k cap, bad camera input, and the revisit story (workshop, workshop, garden x3,
back to the workshop) under ``fov``, ``memento+fov`` and ``memento``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memento_core.camera import CameraError, CameraPath, parse_camera, preset_path
from memento_core.cli import cli
from memento_core.fov import CameraPose as P
from memento_core.fov import retrieve_by_fov, sector_overlap, sector_polygon, views_overlap
from memento_core.memory import load_bank
from memento_core.story import StoryError, load_story, parse_story

STORY = Path(__file__).resolve().parents[1] / "example_stories" / "clockmaker_returns.json"
SMALL = ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "-q"]

# ------------------------------------------------------------------------------------------- overlap


@pytest.mark.parametrize(
    ("a", "b", "overlap", "why"),
    [
        (P(0, 0, 0), P(0, 5, 180), True, "facing each other 5 m apart: both views cover the gap"),
        (P(0, 0, 0), P(0, -1, 180), False, "back to back: a sees z >= 0.087, b sees z <= -1.087"),
        (P(0, 0, 0), P(5, 5, 270), True, "crossing: b looks along -x through a's view at z = 5"),
        (P(0, 0, 0), P(0, 100, 0), False, "beyond far: a's view ends at z = 30, b's starts at z = 100.1"),
        (P(0, 0, 0), P(0, 59, 180), True, "facing 59 m apart: the far arcs (30 m) overlap near z = 29.5"),
        (P(0, 0, 0), P(0, 61, 180), False, "facing 61 m apart: 30 + 30 < 61"),
        (P(0, 0, 0), P(0, 0, 0), True, "the same pose (the paper's ray test misses it)"),
        (P(3, 4, 359), P(3, 4, 1), True, "yaw wrap-around: 359 and 1 degrees look the same way"),
        (P(0, 0, 0), P(40, 0, 0), False, "side by side 40 m apart: edges reach x = 15 and x = 25 at z = 26"),
        (P(0, 0, 0, 20), P(0, 0, 180, 20), False, "same spot, opposite headings, narrow views"),
    ],
)
def test_sector_overlap_geometry(a: P, b: P, overlap: bool, why: str) -> None:
    assert sector_overlap(a, b) is overlap, why
    assert sector_overlap(b, a) is overlap, why  # symmetric


def test_the_ray_rule_misses_identical_poses_and_stays_an_option() -> None:
    same = P(2, 2, 30)
    assert views_overlap(same, same, "sector") and not views_overlap(same, same, "rays")
    with pytest.raises(Exception, match="overlap rule"):
        views_overlap(same, same, "cones")


def test_sector_polygon_is_the_view() -> None:
    poly = sector_polygon(P(0, 0, 0), near=0.1, far=30.0)
    area = abs(sum(poly[i][0] * poly[i - 1][1] - poly[i - 1][0] * poly[i][1] for i in range(len(poly))) / 2)
    # a 60-degree sector of radius 30 (471.2 m^2) less the near triangle, the arc as a polygon
    assert area == pytest.approx(0.5 * 30**2 * math.pi / 3, rel=2e-3)
    assert max(p[1] for p in poly) == pytest.approx(30.0) and min(p[1] for p in poly) == pytest.approx(
        0.1 * math.cos(math.pi / 6)
    )


# ---------------------------------------------------------------------------------------- trajectories


def test_trajectory_interpolation() -> None:
    path = parse_camera(
        [{"frame": 80, "x": 8, "z": 4, "yaw": 10, "fov": 80}, {"frame": 0, "x": 0, "z": 0, "yaw": 350}]
    )
    assert isinstance(path, CameraPath) and [f for f, _ in path.keys] == [0, 80]
    mid = path.pose_at(40)
    assert (mid.x, mid.z, mid.fov) == (4.0, 2.0, 70.0)
    assert mid.yaw == pytest.approx(0.0) or mid.yaw == pytest.approx(360.0)  # the shorter arc, through 0
    assert path.pose_at(20).yaw == pytest.approx(355.0)
    assert path.pose_at(-5) == path.keys[0][1] and path.pose_at(500) == path.keys[1][1]  # nearest key
    assert [p.x for p in path.targets(81)] == [0.0, 4.0, 8.0]  # start, middle, end
    static = parse_camera({"x": 1, "z": 2, "yaw": 3})
    assert static.targets(81) == [P(1, 2, 3)] and static.to_json() == {
        "x": 1.0,
        "z": 2.0,
        "yaw": 3.0,
        "fov": 60.0,
    }


def test_presets() -> None:
    assert preset_path("static", 81, 1, 2, 30).targets(81) == [P(1, 2, 30)]
    pan = preset_path("pan", 81, yaw=0, amount=90)
    assert [p.yaw for p in pan.targets(81)] == [0.0, 45.0, 90.0]
    dolly = preset_path("dolly", 81, yaw=90, amount=4)
    assert dolly.pose_at(80).x == pytest.approx(4.0) and dolly.pose_at(80).z == pytest.approx(0.0, abs=1e-9)
    orbit = preset_path("orbit", 81, yaw=0, amount=180, distance=3)
    for frame in (0, 40, 80):  # on the circle of radius 3 around (0, 3), facing its centre
        pose = orbit.pose_at(frame) if frame in dict(orbit.keys) else orbit.keys[-1][1]
        assert math.hypot(pose.x, pose.z - 3) == pytest.approx(3.0, abs=1e-6)
        fx, fz = pose.direction()
        assert (fx * (0 - pose.x) + fz * (3 - pose.z)) / 3 == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(CameraError, match="camera preset: expected one of static, pan, orbit, dolly"):
        preset_path("crane", 81)


# ------------------------------------------------------------------------------ runs collapse, k cap


def test_runs_collapse_within_a_shot_and_k_keeps_the_most_recent() -> None:
    target = P(0, 0, 0)
    seen = P(0, 0, 0)
    away = P(0, 0, 180)
    cands = [seen, seen, seen, away, seen, seen, seen, seen]
    shots = [1, 1, 1, 1, 1, 1, 2, 2]
    # hits 0-2 (one run), 4-5 (shot 1) and 6-7 (shot 2): neighbours of different shots stay apart
    assert retrieve_by_fov(cands, [target], rule="sector", far=30.0, groups=shots, k=8) == [1, 5, 7]
    assert retrieve_by_fov(cands, [target], rule="sector", far=30.0, k=8) == [1, 6]  # without shots: 4-7
    assert retrieve_by_fov(cands, [target], rule="sector", far=30.0, groups=shots, k=2) == [5, 7]


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("camera", "match"),
    [
        ({"x": 0, "yaw": 0}, r"scenes\[0\].camera\[0\].z': missing"),
        ({"x": 0, "z": 0, "yaw": float("nan")}, r"scenes\[0\].camera\[0\].yaw': expected a finite number"),
        ({"x": 0, "z": 0, "yaw": 0, "fov": 180}, r"camera\[0\].fov': expected an angle in \(0, 180\)"),
        ({"x": 0, "z": 0, "yaw": 0, "fov": 0}, r"camera\[0\].fov': expected an angle in \(0, 180\)"),
        ({"x": "1", "z": 0, "yaw": 0}, r"camera\[0\].x': expected a number"),
        ({"x": 0, "z": 0, "yaw": 0, "roll": 3}, r"unknown field\(s\) \['roll'\]"),
        ([{"x": 0, "z": 0, "yaw": 0}], r"camera\[0\]\[0\].frame': missing"),
        ([{"frame": -1, "x": 0, "z": 0, "yaw": 0}], r"camera\[0\]\[0\].frame': expected a frame number"),
        ([], r"camera\[0\]': an empty list"),
        ("north", r"camera\[0\]': expected a pose, a list of poses or null"),
        ({"frame": 3, "x": 0, "z": 0, "yaw": 0}, r"camera\[0\].frame': a single pose has no frame"),
    ],
)
def test_bad_cameras_name_the_field(camera, match) -> None:
    script = {
        "story_name": "s",
        "scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [True], "camera": [camera]}],
    }
    with pytest.raises(StoryError, match=match):
        parse_story(script, source="s.json")


def test_camera_list_longer_than_the_prompts() -> None:
    script = {
        "story_name": "s",
        "scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": [True], "camera": [None, None]}],
    }
    with pytest.raises(StoryError, match=r"scenes\[0\].camera': has 2 entries but there are 1 video prompts"):
        parse_story(script)


# ---------------------------------------------------------------------------------- the revisit story


@pytest.fixture(scope="module")
def revisit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("revisit")
    for policy in ("fov", "memento+fov", "memento"):
        out = root / policy.replace("+", "_")
        assert cli([str(STORY), "--out", str(out), *SMALL, "--first-shot", "empty", "--policy", policy]) == 0
    return root


def shot6(root: Path, policy: str) -> dict:
    log = json.loads((root / policy.replace("+", "_") / "story_log.json").read_text())
    assert [s["label"] for s in log["shots"]] == ["01_01", "01_02", "02_01", "02_02", "02_03", "03_01"]
    return log["shots"][-1]


def shot_of(frame_id: str) -> int:
    return int(frame_id[1 : frame_id.index("f")])


@pytest.mark.parametrize("policy", ["fov", "memento+fov"])
def test_back_in_the_workshop_recalls_the_workshop(revisit, policy) -> None:
    last = shot6(revisit, policy)
    for pool in ("high", "low"):
        used = last["memory_ids"][pool]
        assert used and {shot_of(i) for i in used} <= {1, 2}, (pool, used)
    # the log: the target camera, and every candidate's overlap by the same ids as memory_ids
    assert last["camera"] == [{"x": 0.5, "z": 0.5, "yaw": 5.0, "fov": 60.0}]
    overlap = last["overlap"]
    assert set(last["memory_ids"]["high"]) <= {i for i, hit in overlap.items() if hit}
    assert all(hit == (shot_of(i) in (1, 2)) for i, hit in overlap.items())  # the garden is 60 m away
    assert len(overlap) == 40  # the whole history: 5 shots x 8 frames (selection never evicts)


def test_memento_alone_does_not_recall_the_workshop(revisit) -> None:
    used = shot6(revisit, "memento")["memory_ids"]["high"]
    assert {shot_of(i) for i in used} & {3, 4, 5}  # its pools are mostly the recent garden shots


def test_fov_keeps_one_frame_per_run_and_memento_fov_uses_the_keyframe_query(revisit) -> None:
    fov = shot6(revisit, "fov")
    record = fov["selection"]["pools"]["high"]
    assert record["method"] == "fov" and record["fov_ids"] == fov["memory_ids"]["high"]
    # shots 1 and 2 overlap with all their 8 frames: each shot's run collapses to its middle frame
    assert fov["memory_ids"]["high"] == ["s1f5", "s2f5"]  # frames 0, 1, 2, 3, 5, 6, 7, 8 of 9: middle 5
    both = shot6(revisit, "memento+fov")
    record = both["selection"]["pools"]["high"]
    # 16 overlapping frames > 8 slots: the KeyframeQuery picks 6 local + 2 global among them
    assert record["method"] == "memento+fov" and record["fov_ids"] == []
    assert (len(record["local_ids"]), len(record["global_ids"])) == (6, 2)


def test_garden_shots_recall_nothing_of_the_workshop_and_empty_overlap_is_an_empty_memory(revisit) -> None:
    log = json.loads((revisit / "fov" / "story_log.json").read_text())
    first_garden = log["shots"][2]
    assert not any(first_garden["overlap"].values())  # nothing seen from the garden before
    assert first_garden["memory_ids"]["high"] == [] and first_garden["memory_placeholder"]


def test_poses_survive_the_bank_file(revisit) -> None:
    bank = load_bank(revisit / "fov" / "memory_bank.safetensors")
    frames = {f.frame_id: f for f in bank.frames()}
    assert frames["s1f0"].camera == P(0, 0, 0, 60)
    # the pan from -20 to 20 degrees over frames 0..80: frame 8 is at -16 (stored as 344)
    assert frames["s2f0"].camera.yaw == pytest.approx(-20.0) and frames["s2f8"].camera.yaw == pytest.approx(
        344.0
    )
    assert frames["s4f8"].camera.x == pytest.approx(60 + 3 * 8 / 80)  # the dolly's pose at frame 8 of 80
    assert len(bank.frames()) == 48  # 6 shots x 8 frames, all kept


def test_camera_maps_are_drawn(revisit) -> None:
    from PIL import Image

    maps = sorted((revisit / "fov" / "memory").glob("*_cameras.png"))
    assert [p.name for p in maps] == [
        f"{label}_cameras.png" for label in ("01_01", "01_02", "02_01", "02_02", "02_03", "03_01")
    ]
    img = Image.open(maps[-1])
    assert img.size[0] == 640 and 100 < img.size[1] <= 640 and len(set(img.getdata())) > 8  # wedges, colours
    story = load_story(STORY)
    assert story.shots[1].camera is not None and story.shots[1].camera.keys[-1][0] == 80
