"""Tests of memento_core.fov: Context-as-Memory's ray-intersection FOV test on hand-computed geometry,
run collapsing and the cap k, and the projection of 3D camera-to-world poses onto the ground plane."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memento_core.errors import MementoError, ShapeError
from memento_core.fov import CameraPose, collapse_runs, fov_overlap, retrieve_by_fov


def test_facing_each_other_overlap() -> None:
    # A at the origin looks along +z, B 5 units ahead looks back. A's right edge ray (30 deg) meets B's
    # ray at 150 deg (dir (0.5, -0.866)) at t = s = 5 / (2 cos 30) = 2.887, inside [0.1, 10].
    a, b = CameraPose(0, 0, 0), CameraPose(0, 5, 180)
    assert fov_overlap(a, b)
    assert fov_overlap(b, a)
    # far below 2.887 -> no intersection counts.
    assert not fov_overlap(a, b, far=2.8)
    assert fov_overlap(a, b, far=2.9)


def test_back_to_back_do_not_overlap() -> None:
    # A's rays stay at z >= 0, B's (from z = -1, heading -z) at z <= -1.
    a, b = CameraPose(0, 0, 0), CameraPose(0, -1, 180)
    assert not fov_overlap(a, b)
    assert not fov_overlap(a, b, far=1000.0)
    assert not fov_overlap(a, b, cone_containment=True)


def test_parallel_side_by_side() -> None:
    # Both look along +z, d apart on x. A's right ray (dir (0.5, 0.866)) and B's left ray (dir (-0.5,
    # 0.866)) meet at x = d/2, at distance (d/2) / sin 30 = d from both cameras (FOV 60).
    a = CameraPose(0, 0, 0)
    assert fov_overlap(a, CameraPose(1, 0, 0))
    assert fov_overlap(a, CameraPose(9, 0, 0))  # meet at distance 9 <= far 10
    assert not fov_overlap(a, CameraPose(9, 0, 0), far=8.0)
    assert not fov_overlap(a, CameraPose(12, 0, 0))  # meet at 12 > far 10
    assert fov_overlap(a, CameraPose(12, 0, 0), far=12.5)
    # Narrower FOV 20: edges meet at (d/2) / sin 10 = 2.88 d -> d = 4 meets at 11.5 > 10.
    assert fov_overlap(a, CameraPose(3, 0, 0), fov_deg=20)
    assert not fov_overlap(a, CameraPose(4, 0, 0), fov_deg=20)
    # Facing away from each other sideways: A looks -x, B (to its right) looks +x.
    assert not fov_overlap(CameraPose(0, 0, -90), CameraPose(1, 0, 90), far=100.0)


def test_near_limit() -> None:
    # Facing each other 0.1 apart: the rays meet at 0.1 / (2 cos 30) = 0.0577 from both cameras.
    a, b = CameraPose(0, 0, 0), CameraPose(0, 0.1, 180)
    assert not fov_overlap(a, b, near=0.1)
    assert fov_overlap(a, b, near=0.05)


def test_cone_containment_option() -> None:
    # Same heading on one line of sight: no pair of edge rays meets (they are parallel or diverge).
    front, behind = CameraPose(0, 2, 0), CameraPose(0, 0, 0)
    assert not fov_overlap(front, behind)
    assert fov_overlap(front, behind, cone_containment=True)  # front stands 2 units inside behind's cone
    assert not fov_overlap(front, behind, far=1.5, cone_containment=True)  # ... unless beyond far
    # Identical poses (a revisit): only with containment (same apex, headings within the FOV).
    p = CameraPose(3, 4, 45)
    assert not fov_overlap(p, p)
    assert fov_overlap(p, p, cone_containment=True)
    assert fov_overlap(p, CameraPose(3, 4, 100), cone_containment=True)  # 55 < 60
    assert not fov_overlap(p, CameraPose(3, 4, 110), cone_containment=True)  # 65 > 60
    assert not fov_overlap(p, CameraPose(3, 4, 45 + 180), cone_containment=True)


def _turning(turns: int = 2, step: int = 30) -> list[CameraPose | None]:
    """A camera at the origin turning in place: yaw 0, 30, ..., 330, repeated ``turns`` times."""
    return [CameraPose(0, 0, (i * step) % 360) for i in range(turns * 360 // step)]


# Target at (0, 8) looking back at the origin (yaw 180). A candidate ray at angle a from the origin meets
# the target's edge ray at 150 deg at t = 8 / (2 cos(a - 60)), s = 8 sin a / cos(a - 60):
#   a = 0: s = 0 < near; a = 30: t = s = 4.62; a = 60: t = 4, s = 6.93; a = 90: t = 4.62, s = 9.24;
#   a = 120: s = 13.9 > far; a = 150: parallel; a >= 180: s <= 0 (mirror image for the 210-deg ray).
# So candidate yaws 0..120 and 240..330 overlap; 150, 180, 210 do not. Over two turns (indices 0..23):
# hits 0-4, 8-16, 20-23 -> middles 2, 12, 22.
TARGET = CameraPose(0, 8, 180)


def test_retrieve_collapses_runs_and_caps_k() -> None:
    cands = _turning()
    assert retrieve_by_fov(cands, [TARGET], k=10) == [2, 12, 22]
    assert retrieve_by_fov(cands, [TARGET], k=2) == [12, 22]  # the most recent k
    assert retrieve_by_fov(cands, [TARGET], k=1) == [22]
    assert retrieve_by_fov(cands, [TARGET], k=0) == []
    assert retrieve_by_fov(cands, [], k=10) == []


def test_retrieve_skips_missing_poses() -> None:
    cands = _turning()
    cands[13] = None  # splits the run 8-16 into 8-12 and 14-16
    cands[0] = None
    assert retrieve_by_fov(cands, [TARGET], k=10) == [3, 10, 15, 22]
    assert retrieve_by_fov([None, None], [TARGET]) == []


def test_retrieve_any_target() -> None:
    cands = _turning(turns=1)
    # A target 50 units from the origin: no intersection lies within far = 10 of both cameras.
    away = CameraPose(0, -50, 180)
    assert retrieve_by_fov(cands, [away], far=10.0) == []
    assert retrieve_by_fov(cands, [TARGET, away], far=10.0, k=10) == retrieve_by_fov(cands, [TARGET], k=10)


def test_collapse_runs() -> None:
    assert collapse_runs([]) == []
    assert collapse_runs([0, 1, 2, 5, 7, 8]) == [1, 5, 8]
    assert collapse_runs([8, 7, 7, 3]) == [3, 8]
    assert collapse_runs([4, 5, 6, 7]) == [6]


def test_validation() -> None:
    a = CameraPose(0, 0, 0)
    with pytest.raises(MementoError, match="fov_deg"):
        fov_overlap(a, a, fov_deg=180)
    with pytest.raises(MementoError, match="near/far"):
        fov_overlap(a, a, near=2.0, far=1.0)
    with pytest.raises(MementoError, match="k"):
        retrieve_by_fov([a], [a], k=-1)
    with pytest.raises(MementoError, match="targets"):
        retrieve_by_fov([a], [None])  # type: ignore[list-item]
    with pytest.raises(MementoError, match="yaw"):
        CameraPose(0, 0, math.nan)


def test_from_matrix() -> None:
    assert CameraPose.from_matrix(torch.eye(4)) == CameraPose(0, 0, 0)
    # 90 deg about y (OpenCV, y down): camera +z axis -> world +x. Translation (1, 2, 3): ground (1, 3).
    c2w = np.array([[0, 0, 1, 1], [0, 1, 0, 2], [-1, 0, 0, 3], [0, 0, 0, 1]], dtype=np.float64)
    pose = CameraPose.from_matrix(c2w)
    assert (pose.x, pose.z) == (1.0, 3.0)
    assert pose.yaw == pytest.approx(90.0)
    assert CameraPose.from_matrix(c2w[:3].tolist()).yaw == pytest.approx(90.0)
    # Pitching down 30 deg (rotation about x) keeps the heading.
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    pitch = [[1, 0, 0, 0], [0, c, s, 0], [0, -s, c, 0], [0, 0, 0, 1]]
    assert CameraPose.from_matrix(pitch).yaw == pytest.approx(0.0)
    # Looking straight down (camera +z = world +y): heading from the image's up axis (camera -y = +z).
    down = [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]]
    assert CameraPose.from_matrix(down).yaw == pytest.approx(0.0)
    # OpenGL cameras look along -z: the identity looks along world -z.
    assert abs(CameraPose.from_matrix(torch.eye(4), convention="opengl").yaw) == pytest.approx(180.0)
    with pytest.raises(ShapeError):
        CameraPose.from_matrix(torch.eye(3))
    with pytest.raises(MementoError, match="convention"):
        CameraPose.from_matrix(torch.eye(4), convention="blender")
