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

__all__ = [
    "OVERLAP_RULES",
    "CameraPose",
    "collapse_runs",
    "fov_overlap",
    "overlaps",
    "retrieve_by_fov",
    "sector_overlap",
    "sector_polygon",
    "views_overlap",
]

_PARALLEL_EPS = 1e-12
#: How two views are compared: SPEC 6's sector intersection (default), or the paper's edge rays.
OVERLAP_RULES = ("sector", "rays")
#: Default view depth (SPEC 6): the sector between NEAR and FAR metres.
NEAR, FAR = 0.1, 30.0
#: The far arc of a sector polygon is sampled at least every this many degrees.
ARC_STEP = 5.0
#: Intersections smaller than this (square metres) are a shared edge or point, not an overlap.
MIN_AREA = 1e-9


@dataclass(frozen=True)
class CameraPose:
    """A camera on the ground plane: position (x, z) in metres, yaw in degrees (0 = looking along +z, 90
    along +x) and its horizontal field of view ``fov`` in degrees, in (0, 180) (default 60)."""

    x: float
    z: float
    yaw: float
    fov: float = 60.0

    def __post_init__(self) -> None:
        for name in ("x", "z", "yaw", "fov"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise MementoError(f"CameraPose.{name}: expected a finite number, got {value}")
            object.__setattr__(self, name, value)
        if not 0.0 < self.fov < 180.0:
            raise MementoError(f"CameraPose.fov: expected an angle in (0, 180) degrees, got {self.fov}")

    def to_json(self) -> dict[str, float]:
        """``{"x", "z", "yaw", "fov"}`` (SPEC 6)."""
        return {"x": self.x, "z": self.z, "yaw": self.yaw, "fov": self.fov}

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
    fov_deg: float | None = None,
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
    fov_a, fov_b = (a.fov, b.fov) if fov_deg is None else (fov_deg, fov_deg)
    _check_view(fov_a, near, far)
    _check_view(fov_b, near, far)
    half_a, half_b = fov_a / 2.0, fov_b / 2.0
    pa, pb = (a.x, a.z), (b.x, b.z)
    for ra in (a.direction(-half_a), a.direction(half_a)):
        for rb in (b.direction(-half_b), b.direction(half_b)):
            hit = _ray_hit(pa, ra, pb, rb)
            if hit is not None and near <= hit[0] <= far and near <= hit[1] <= far:
                return True
    if not cone_containment:
        return False
    if math.hypot(b.x - a.x, b.z - a.z) < near:
        return _yaw_gap(a.yaw, b.yaw) < max(fov_a, fov_b)
    return _sees(a, b, half_a, near, far) or _sees(b, a, half_b, near, far)


def sector_polygon(pose: CameraPose, near: float = NEAR, far: float = FAR) -> list[tuple[float, float]]:
    """A camera's view as a convex polygon, counter-clockwise in (x, z): the chord of the near arc, then
    the far arc sampled at least every ``ARC_STEP`` degrees (convex since the FOV is below 180)."""
    _check_view(pose.fov, near, far)
    half = pose.fov / 2.0
    n = max(1, math.ceil(pose.fov / ARC_STEP))
    px, pz = pose.x, pose.z
    # yaw grows clockwise in (x, z) (0 = +z, 90 = +x): walk from +half to -half for counter-clockwise
    far_arc = [pose.direction(half - pose.fov * i / n) for i in range(n + 1)]
    left, right = pose.direction(half), pose.direction(-half)
    points = [(px + near * right[0], pz + near * right[1])] if near > 0 else [(px, pz)]
    points += [(px + far * dx, pz + far * dz) for dx, dz in reversed(far_arc)]
    if near > 0:
        points.append((px + near * left[0], pz + near * left[1]))
    return _counter_clockwise(points)


def _area(poly: Sequence[tuple[float, float]]) -> float:
    """Signed area (shoelace): positive for counter-clockwise vertices."""
    return 0.5 * sum(
        poly[i][0] * poly[(i + 1) % len(poly)][1] - poly[(i + 1) % len(poly)][0] * poly[i][1]
        for i in range(len(poly))
    )


def _counter_clockwise(poly: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return poly if _area(poly) >= 0 else poly[::-1]


def _clip(
    subject: list[tuple[float, float]], a: tuple[float, float], b: tuple[float, float]
) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of ``subject`` left of the directed edge a -> b."""

    def inside(p: tuple[float, float]) -> bool:
        return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= 0.0

    def cross(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float]:
        dx, dz = q[0] - p[0], q[1] - p[1]
        ex, ez = b[0] - a[0], b[1] - a[1]
        den = dx * ez - dz * ex
        t = ((a[0] - p[0]) * ez - (a[1] - p[1]) * ex) / den
        return p[0] + t * dx, p[1] + t * dz

    out: list[tuple[float, float]] = []
    for i, cur in enumerate(subject):
        prev = subject[i - 1]
        if inside(cur):
            if not inside(prev):
                out.append(cross(prev, cur))
            out.append(cur)
        elif inside(prev):
            out.append(cross(prev, cur))
    return out


def intersection_area(p: Sequence[tuple[float, float]], q: Sequence[tuple[float, float]]) -> float:
    """Area of the intersection of two convex counter-clockwise polygons."""
    region = list(p)
    for i in range(len(q)):
        if not region:
            return 0.0
        region = _clip(region, q[i], q[(i + 1) % len(q)])
    return abs(_area(region)) if len(region) >= 3 else 0.0


def sector_overlap(a: CameraPose, b: CameraPose, near: float = NEAR, far: float = FAR) -> bool:
    """SPEC 6: the two views (sectors between ``near`` and ``far`` within each camera's FOV, as convex
    polygons) intersect with positive area. Identical or near-identical poses overlap."""
    return intersection_area(sector_polygon(a, near, far), sector_polygon(b, near, far)) > MIN_AREA


def views_overlap(
    a: CameraPose, b: CameraPose, rule: str = "sector", near: float = NEAR, far: float = FAR
) -> bool:
    """``sector_overlap`` (rule "sector") or the paper's edge-ray test ``fov_overlap`` (rule "rays")."""
    if rule == "sector":
        return sector_overlap(a, b, near, far)
    if rule == "rays":
        return fov_overlap(a, b, None, near, far)
    raise MementoError(f"overlap rule: expected one of {OVERLAP_RULES}, got {rule!r}")


def overlaps(
    candidates: Sequence[CameraPose | None],
    targets: Sequence[CameraPose],
    rule: str = "sector",
    near: float = NEAR,
    far: float = FAR,
) -> list[bool]:
    """For each candidate: does its view overlap any target's (a candidate without a pose never does)."""
    return [
        cand is not None and any(views_overlap(cand, t, rule, near, far) for t in targets)
        for cand in candidates
    ]


def collapse_runs(indices: Sequence[int], groups: Sequence[Any] | None = None) -> list[int]:
    """One index per run of consecutive integers: the middle one (upper middle for even runs).

    ``[0, 1, 2, 5, 7, 8]`` -> ``[1, 5, 8]``. Input is sorted and deduplicated first. With ``groups`` (a
    group per index position, e.g. each candidate frame's shot), a run also ends where the group changes.
    """
    ordered = sorted(set(int(i) for i in indices))
    picks: list[int] = []
    start = 0
    for j in range(1, len(ordered) + 1):
        broken = j == len(ordered) or ordered[j] != ordered[j - 1] + 1
        if not broken and groups is not None:
            broken = groups[ordered[j]] != groups[ordered[j - 1]]
        if broken:
            run = ordered[start:j]
            picks.append(run[len(run) // 2])
            start = j
    return picks


def retrieve_by_fov(
    candidates: Sequence[CameraPose | None],
    targets: Sequence[CameraPose],
    *,
    fov_deg: float | None = None,
    near: float = 0.1,
    far: float = 10.0,
    k: int = 8,
    rule: str = "rays",
    groups: Sequence[Any] | None = None,
    cone_containment: bool = False,
) -> list[int]:
    """Indices of memory frames to condition on, chosen by FOV overlap with the target camera(s).

    Args:
        candidates: camera pose of each memory frame in time order (None: no pose, never retrieved).
        targets: the camera poses of the shot to generate; a candidate is a hit when it overlaps any.
        rule: "rays" (the paper's edge-ray test, :func:`fov_overlap`, with ``fov_deg`` / the poses' FOV and
            ``cone_containment``) or "sector" (SPEC 6, :func:`sector_overlap`); near, far: the view depth.
        k: at most this many frames are returned (>= 0).
        groups: each candidate's group (its shot): runs of hits collapse only within one group.

    Returns:
        Sorted candidate indices: hits collapsed to one per run of consecutive indices
        (:func:`collapse_runs`), then the ``k`` most recent.
    """
    if rule not in OVERLAP_RULES:
        raise MementoError(f"overlap rule: expected one of {OVERLAP_RULES}, got {rule!r}")
    if fov_deg is not None or rule == "rays":
        _check_view(60.0 if fov_deg is None else fov_deg, near, far)
    if k < 0:
        raise MementoError(f"k: expected an integer >= 0, got {k}")
    if any(not isinstance(t, CameraPose) for t in targets):
        raise MementoError("targets: every target camera needs a CameraPose (got None or another type)")

    def hit(cand: CameraPose) -> bool:
        if rule == "sector":
            return any(sector_overlap(cand, t, near, far) for t in targets)
        return any(
            fov_overlap(cand, t, fov_deg, near, far, cone_containment=cone_containment) for t in targets
        )

    hits = [i for i, cand in enumerate(candidates) if cand is not None and hit(cand)]
    picks = collapse_runs(hits, groups)
    return picks[-k:] if k else []
