"""Context-as-Memory retrieval: keep memory frames whose camera field of view overlaps the target's.

Context-as-Memory (Yu et al., 2025, arXiv 2506.03141; no public code) simplifies cameras to the ground
plane: a position and a yaw. Each camera casts two rays from its position at yaw -/+ FOV/2 (the edges of
its view). Two cameras overlap when one of the four pairs of rays (one ray of each camera) intersects, and
the intersection is neither too close to nor too far from the cameras: here both distances along the
rays must lie in [near, far]. Among the hits, temporally adjacent frames are nearly identical, so one
frame is kept per run of consecutive hits ("non-adjacent" filtering), then at most ``k`` are kept.

Choices where the paper says nothing precise (documented so callers can rely on them):

- the frame kept from a run is its middle one (the later of the two middle frames for even runs);
- with more than ``k`` runs, the ``k`` most recent are kept;
- a pure ray test misses cameras on one line of sight (one behind the other, same heading) and
  identical poses; ``cone_containment=True`` adds those cases (off by default, as in the paper).

Coordinates: OpenCV-style world, y down, so the ground plane is x-z. Yaw is in degrees, 0 looks along
+z, +90 looks along +x: the forward vector is ``(sin yaw, cos yaw)`` in (x, z).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MementoError, ShapeError

__all__ = ["CameraPose", "collapse_runs", "fov_overlap", "retrieve_by_fov"]

_PARALLEL_EPS = 1e-12


@dataclass(frozen=True)
class CameraPose:
    """A camera on the ground plane: position (x, z) and yaw in degrees (0 = looking along +z)."""

    x: float
    z: float
    yaw: float

    def __post_init__(self) -> None:
        for name in ("x", "z", "yaw"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise MementoError(f"CameraPose.{name}: expected a finite number, got {value}")
            object.__setattr__(self, name, value)

    @classmethod
    def from_matrix(cls, c2w: Any, convention: str = "opencv") -> CameraPose:
        """Project a 3D camera-to-world pose ([4, 4] or [3, 4], tensor / array / nested lists).

        Position: (c2w[0, 3], c2w[2, 3]). Heading: the camera's viewing axis in world coordinates,
        third column of the rotation for ``"opencv"`` (camera looks along +z, y down) or its negation for
        ``"opengl"`` (camera looks along -z, y up), projected on x-z; yaw = atan2(f_x, f_z). A camera
        looking straight up or down takes its heading from the image's up axis instead. The world is
        assumed to have y as its vertical axis.
        """
        m = torch.as_tensor(c2w, dtype=torch.float64)
        if m.shape not in ((4, 4), (3, 4)):
            raise ShapeError(f"c2w: expected a [4, 4] or [3, 4] camera-to-world matrix, got {tuple(m.shape)}")
        if convention == "opencv":
            forward, up = m[:3, 2], -m[:3, 1]
        elif convention == "opengl":
            forward, up = -m[:3, 2], m[:3, 1]
        else:
            raise MementoError(f"convention: expected 'opencv' or 'opengl', got {convention!r}")
        fx, fz = float(forward[0]), float(forward[2])
        if math.hypot(fx, fz) < 1e-6:
            # Looking straight down (or up): the top of the image points where the camera is heading.
            sign = 1.0 if float(forward[1]) > 0 else -1.0
            fx, fz = sign * float(up[0]), sign * float(up[2])
        return cls(float(m[0, 3]), float(m[2, 3]), math.degrees(math.atan2(fx, fz)))

    def direction(self, offset_deg: float = 0.0) -> tuple[float, float]:
        """Unit (x, z) vector at ``yaw + offset_deg``."""
        a = math.radians(self.yaw + offset_deg)
        return math.sin(a), math.cos(a)


def _check_view(fov_deg: float, near: float, far: float) -> None:
    if not 0.0 < fov_deg < 180.0:
        raise MementoError(f"fov_deg: expected an angle in (0, 180) degrees, got {fov_deg}")
    if not 0.0 <= near <= far:
        raise MementoError(f"near/far: expected 0 <= near <= far, got near={near}, far={far}")


def _ray_hit(
    p: tuple[float, float], r: tuple[float, float], q: tuple[float, float], u: tuple[float, float]
) -> tuple[float, float] | None:
    """Distances (t, s) with p + t·r = q + s·u for unit r, u; None for parallel rays."""
    den = r[0] * u[1] - r[1] * u[0]
    if abs(den) < _PARALLEL_EPS:
        return None
    dx, dz = q[0] - p[0], q[1] - p[1]
    t = (dx * u[1] - dz * u[0]) / den
    s = (dx * r[1] - dz * r[0]) / den
    return t, s


def _sees(a: CameraPose, b: CameraPose, half_fov: float, near: float, far: float) -> bool:
    """True when b's position lies in a's view sector: distance in [near, far], angle <= FOV/2."""
    dx, dz = b.x - a.x, b.z - a.z
    dist = math.hypot(dx, dz)
    if not near <= dist <= far or dist == 0.0:
        return False
    fx, fz = a.direction()
    return (dx * fx + dz * fz) / dist >= math.cos(math.radians(half_fov))


def _yaw_gap(a: float, b: float) -> float:
    """Absolute difference of two headings in degrees, in [0, 180]."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


def fov_overlap(
    a: CameraPose,
    b: CameraPose,
    fov_deg: float = 60.0,
    near: float = 0.1,
    far: float = 10.0,
    *,
    cone_containment: bool = False,
) -> bool:
    """Whether the views of two ground-plane cameras overlap (Context-as-Memory's rule).

    Each camera casts rays at yaw -/+ fov_deg/2; overlap when some ray of ``a`` meets some ray of ``b``
    at distances t (along a's ray) and s (along b's ray) both in [near, far]. Parallel rays never meet.
    With ``cone_containment``, also overlap when either camera's position lies in the other's view
    sector (distance in [near, far], within FOV/2 of its heading), or when the two positions are closer
    than ``near`` and the headings differ by less than the FOV.
    """
    _check_view(fov_deg, near, far)
    half = fov_deg / 2.0
    pa, pb = (a.x, a.z), (b.x, b.z)
    for ra in (a.direction(-half), a.direction(half)):
        for rb in (b.direction(-half), b.direction(half)):
            hit = _ray_hit(pa, ra, pb, rb)
            if hit is not None and near <= hit[0] <= far and near <= hit[1] <= far:
                return True
    if not cone_containment:
        return False
    if math.hypot(b.x - a.x, b.z - a.z) < near:
        return _yaw_gap(a.yaw, b.yaw) < fov_deg
    return _sees(a, b, half, near, far) or _sees(b, a, half, near, far)


def collapse_runs(indices: Sequence[int]) -> list[int]:
    """One index per run of consecutive integers: the middle one (upper middle for even runs).

    ``[0, 1, 2, 5, 7, 8]`` -> ``[1, 5, 8]``. Input is sorted and deduplicated first.
    """
    ordered = sorted(set(int(i) for i in indices))
    picks: list[int] = []
    start = 0
    for j in range(1, len(ordered) + 1):
        if j == len(ordered) or ordered[j] != ordered[j - 1] + 1:
            run = ordered[start:j]
            picks.append(run[len(run) // 2])
            start = j
    return picks


def retrieve_by_fov(
    candidates: Sequence[CameraPose | None],
    targets: Sequence[CameraPose],
    *,
    fov_deg: float = 60.0,
    near: float = 0.1,
    far: float = 10.0,
    k: int = 8,
    cone_containment: bool = False,
) -> list[int]:
    """Indices of memory frames to condition on, chosen by FOV overlap with the target camera(s).

    Args:
        candidates: camera pose of each memory frame in time order (None: no pose, never retrieved).
        targets: the camera poses of the shot to generate; a candidate is a hit when it overlaps any.
        fov_deg, near, far, cone_containment: see :func:`fov_overlap`.
        k: at most this many frames are returned (>= 0).

    Returns:
        Sorted candidate indices: hits collapsed to one per run of consecutive indices
        (:func:`collapse_runs`), then the ``k`` most recent.
    """
    _check_view(fov_deg, near, far)
    if k < 0:
        raise MementoError(f"k: expected an integer >= 0, got {k}")
    if any(not isinstance(t, CameraPose) for t in targets):
        raise MementoError("targets: every target camera needs a CameraPose (got None or another type)")
    hits = [
        i
        for i, cand in enumerate(candidates)
        if cand is not None
        and any(fov_overlap(cand, t, fov_deg, near, far, cone_containment=cone_containment) for t in targets)
    ]
    picks = collapse_runs(hits)
    return picks[-k:] if k else []
