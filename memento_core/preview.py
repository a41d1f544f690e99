"""Contact sheets of memory frames: which frames a shot was conditioned on, local and global marked.

Used by the story runner (a PNG per shot) and by the ComfyUI preview nodes (an IMAGE). Pure torch for
the layout; Pillow (a ComfyUI dependency) draws the labels when it is installed, otherwise the sheet
has coloured frames only.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .fov import CameraPose
from .memory import MemoryBank, MemoryFrame, Selection

__all__ = ["MARK_COLORS", "SheetTile", "camera_map", "contact_sheet", "save_png", "selection_rows"]

#: Border colour (RGB in [0, 1]) of each kind of tile.
MARK_COLORS: dict[str, tuple[float, float, float]] = {
    "local": (0.15, 0.55, 1.0),  # chosen by the local queries (short-range continuity)
    "global": (1.0, 0.55, 0.1),  # chosen by the global queries (identity)
    "kept": (0.6, 0.6, 0.6),  # no selection needed (the pool fitted)
    "reference": (0.2, 0.8, 0.3),  # a pinned reference image (MR2V)
    "identity": (0.75, 0.3, 0.9),  # the identity slot's output
}
_BORDER = 3  # frame width around each tile, in the mark's colour
_GAP = 6  # between cells (and below each line of cells)
_MARGIN = 8  # around the sheet
_BLOCK_GAP = 10  # between one row's block and the next
_MIN_WIDTH = 120
_BACKGROUND = 0.12
_TITLE_RGB = (240, 240, 240)
_LABEL_RGB = (215, 215, 215)


@dataclass(frozen=True)
class SheetTile:
    """One picture on a sheet: image [3, H, W] in [-1, 1], a short label, a mark (key of MARK_COLORS)."""

    image: Tensor
    label: str = ""
    mark: str | None = None


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[SheetTile]]], tile_height: int = 120, columns: int = 4
) -> Tensor:
    """Lay out titled rows of tiles as a grid -> an image [H, W, 3] float32 in [0, 1].

    Each row becomes a block: a header (its title and frame count) above its tiles, wrapped into lines
    of at most ``columns`` tiles (row-major). Tiles are resized to ``tile_height`` (aspect kept), framed
    in their mark's colour and labelled below (labels cut with "…" to the cell width). Blocks are
    stacked top to bottom under a legend of the marks present, so more tiles make the sheet taller,
    not wider. An empty row shows its header only ("title (empty)").
    """
    if isinstance(columns, bool) or not isinstance(columns, numbers.Integral) or columns < 1:
        raise ValueError(f"contact_sheet: columns must be an integer >= 1, got {columns!r}")
    if tile_height < 8:
        raise ValueError(f"contact_sheet: tile_height must be >= 8, got {tile_height}")
    tile_height = int(tile_height)
    label_font, title_font = _Font(_label_size(tile_height)), _Font(_label_size(tile_height) + 3)
    blocks = [
        (_row_title(title, len(tiles)), list(tiles), [_framed(t, tile_height) for t in tiles])
        for title, tiles in rows
    ]
    cell_w = max((img.shape[2] for _, _, imgs in blocks for img in imgs), default=0)
    cell_h = tile_height + 2 * _BORDER
    label_h = label_font.line_height + 4
    title_h = title_font.line_height + 6
    marks = {t.mark for _, tiles, _ in blocks for t in tiles}
    legend = [(m, MARK_COLORS[m]) for m in MARK_COLORS if m in marks]

    # widths: the widest grid line, header or legend
    used_cols = min(columns, max((len(imgs) for _, _, imgs in blocks), default=0))
    width = used_cols * (cell_w + _GAP) - _GAP if used_cols else 0
    width = max(width, *(title_font.width(title) for title, _, _ in blocks), 0)
    swatch = max(6, label_font.line_height * 2 // 3)
    legend_w = sum(swatch + 4 + label_font.width(m) for m, _ in legend) + 14 * max(0, len(legend) - 1)
    width = max(_MIN_WIDTH, 2 * _MARGIN + max(width, legend_w))

    # heights and positions
    texts: list[tuple[int, int, str, _Font, tuple[int, int, int]]] = []
    pastes: list[tuple[int, int, Tensor]] = []
    swatches: list[tuple[int, int, tuple[float, float, float]]] = []
    y = _MARGIN
    if legend:
        x = _MARGIN
        for mark, rgb in legend:
            swatches.append((x, y + (label_font.line_height - swatch) // 2, rgb))
            x += swatch + 4
            texts.append((x, y, mark, label_font, _rgb255(rgb)))
            x += label_font.width(mark) + 14
        y += label_font.line_height + _BLOCK_GAP
    for b, (title, tiles, imgs) in enumerate(blocks):
        if b:
            y += _BLOCK_GAP
        texts.append((_MARGIN, y, title, title_font, _TITLE_RGB))
        y += title_h
        for start in range(0, len(imgs), columns):
            for j, (tile, img) in enumerate(
                zip(tiles[start : start + columns], imgs[start : start + columns], strict=True)
            ):
                x = _MARGIN + j * (cell_w + _GAP)
                pastes.append((x + (cell_w - img.shape[2]) // 2, y, img))
                label = label_font.fit(tile.label, cell_w)
                if label:
                    texts.append((x, y + cell_h + 2, label, label_font, _LABEL_RGB))
            y += cell_h + label_h + _GAP
    height = y + _MARGIN

    sheet = torch.full((3, height, width), _BACKGROUND)
    for x, y0, img in pastes:
        sheet[:, y0 : y0 + img.shape[1], x : x + img.shape[2]] = img
    for x, y0, rgb in swatches:
        sheet[:, y0 : y0 + swatch, x : x + swatch] = torch.tensor(rgb)[:, None, None]
    return _draw_texts(sheet.permute(1, 2, 0).contiguous(), texts)


def _row_title(title: str, count: int) -> str:
    """A block's header: "high (8 frames)", "identity (1 frame)", "none (empty)"."""
    if count == 0:
        return f"{title} (empty)"
    return f"{title} ({count} frame{'' if count == 1 else 's'})"


def _label_size(tile_height: int) -> int:
    """Label font size in px: 13 for 120 px tiles, never under 10 or over 24."""
    return max(10, min(24, round(tile_height / 9)))


def _rgb255(rgb: tuple[float, float, float]) -> tuple[int, int, int]:
    r, g, b = (round(255 * c) for c in rgb)
    return r, g, b


class _Font:
    """A font of about ``size`` px with its measures: Pillow's scalable default font (Pillow >= 10.1
    with FreeType), else its small bitmap font, else (no Pillow) estimates and no text at all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pil = _load_font(size)
        if self.pil is None:
            self.line_height, self.ellipsis = size + 3, "..."
            return
        try:
            ascent, descent = self.pil.getmetrics()
            self.line_height = ascent + descent
        except AttributeError:  # the bitmap font
            self.line_height = self.pil.getbbox("Agy|")[3] + 1
        try:
            self.pil.getlength("…")
            self.ellipsis = "…"
        except UnicodeError:  # the bitmap font is Latin-1 only
            self.ellipsis = "..."

    def width(self, text: str) -> int:
        """Advance width of ``text`` in px."""
        if not text:
            return 0
        if self.pil is None:
            return math.ceil(0.6 * self.size * len(text))
        try:
            return math.ceil(self.pil.getlength(text))
        except UnicodeError:
            return math.ceil(self.pil.getlength(text.encode("latin-1", "replace").decode("latin-1")))

    def fit(self, text: str, max_width: int) -> str:
        """``text``, or its longest prefix + "…" that fits in ``max_width`` px ("" if not even that)."""
        if self.width(text) <= max_width:
            return text
        lo, hi = 0, len(text)  # invariant: prefix lo fits (with the ellipsis), prefix hi does not
        if self.width(self.ellipsis) > max_width:
            return ""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.width(text[:mid].rstrip() + self.ellipsis) <= max_width:
                lo = mid
            else:
                hi = mid
        return text[:lo].rstrip() + self.ellipsis


@functools.lru_cache(maxsize=16)
def _load_font(size: int) -> Any:
    try:
        from PIL import ImageFont
    except ImportError:  # pragma: no cover - Pillow ships with ComfyUI and the dev environment
        return None
    try:
        return ImageFont.load_default(size=size)  # scalable (Aileron) on Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):  # older Pillow: no size argument
        return ImageFont.load_default()


def _framed(tile: SheetTile, height: int) -> Tensor:
    img = tile.image.detach().float().cpu()
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"contact_sheet: a tile must be an image [3, H, W], got {list(img.shape)}")
    width = max(1, round(img.shape[2] * height / img.shape[1]))
    img = F.interpolate(img[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    img = ((img + 1) / 2).clamp(0, 1)
    color = torch.tensor(MARK_COLORS.get(tile.mark or "", (0.3, 0.3, 0.3)))[:, None, None]
    out = color.expand(3, height + 2 * _BORDER, width + 2 * _BORDER).clone()
    out[:, _BORDER : _BORDER + height, _BORDER : _BORDER + width] = img
    return out


def _draw_texts(image: Tensor, texts: list[tuple[int, int, str, _Font, tuple[int, int, int]]]) -> Tensor:
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - Pillow ships with ComfyUI and the dev environment
        return image
    pil = Image.fromarray((image.numpy() * 255).round().astype("uint8"))
    draw = ImageDraw.Draw(pil)
    for x, y, text, font, rgb in texts:
        if text and font.pil is not None:
            draw.text((x, y), text, fill=rgb, font=font.pil)
    return torch.from_numpy(np.asarray(pil).copy()).float() / 255


def selection_rows(
    bank: MemoryBank,
    used_ids: dict[str, list[str]],
    selection: Selection | None,
    decode: Callable[[Tensor], Tensor],
    positions: dict[str, list[int]] | None = None,
) -> list[tuple[str, list[SheetTile]]]:
    """Rows (one per pool) of the memory frames a shot used, marked local / global / kept / reference.

    bank: a bank holding the frames (before or after the shot); used_ids: per pool, frame ids in shot
    order; decode: latent [16, 1, h, w] -> video [3, 1, H, W]; positions: per pool, the RoPE positions
    of the used frames, one per frame id (shown in the labels; a list of another length, e.g. a shot's
    full positions with its identity slot, is an error rather than labels shifted by one). Frames are
    decoded once even when both pools use them.
    """
    cache: dict[str, Tensor] = {}
    rows = []
    for pool, ids in used_ids.items():
        chosen = None if selection is None else {p.pool: p for p in selection.pools}.get(pool)
        local = set(chosen.local_ids) if chosen is not None else set()
        glob = set(chosen.global_ids) if chosen is not None else set()
        pos = (positions or {}).get(pool, [])
        if positions is not None and len(pos) != len(ids):
            raise ValueError(
                f"selection_rows: pool {pool!r} has {len(ids)} frames but {len(pos)} positions "
                "(give the memory frames' positions only)"
            )
        tiles = []
        for k, fid in enumerate(ids):
            frame = bank.get(fid)
            if fid not in cache:
                cache[fid] = decode(frame.latent[:, None])[:, 0]
            if frame.source == "reference":
                mark = "reference"
            else:
                mark = "local" if fid in local else "global" if fid in glob else "kept"
            label = f"{fid} @{pos[k]}" if pos else fid
            tiles.append(SheetTile(cache[fid], label, mark))
        rows.append((pool, tiles))
    return rows


def save_png(image: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write an image [H, W, 3] (float in [0, 1] or uint8) as PNG; returns the path."""
    from PIL import Image

    arr = image.detach().cpu()
    if arr.dtype != torch.uint8:
        arr = (arr.float().clamp(0, 1) * 255).round().to(torch.uint8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.numpy()).save(out)
    return out


def camera_map(
    frames: Sequence[MemoryFrame],
    targets: Sequence[CameraPose],
    chosen: Sequence[str] = (),
    overlap: dict[str, bool] | None = None,
    width: int = 640,
) -> Tensor:
    """A top-down map of where memory frames were seen from -> image [H, width, 3] in [0, 1] (H <= width).

    Each remembered frame with a pose is a wedge (its position, heading and field of view): grey, blue
    when its view overlaps the target's, orange when it was chosen; the target cameras are larger green
    wedges. Frames seen from nearby spots share one label (ids, or first .. last and a count). x grows to
    the right and z upwards (yaw 0 points up, 90 to the right); a scale bar gives metres.
    """
    from PIL import Image, ImageDraw

    posed = [f for f in frames if f.camera is not None]
    points = [(f.camera.x, f.camera.z) for f in posed] + [(t.x, t.z) for t in targets]  # type: ignore[union-attr]
    head, margin = 22, 34
    if not points:
        img = Image.new("RGB", (width, 80), (24, 26, 30))
        ImageDraw.Draw(img).text((12, 12), "no camera poses", fill=(220, 220, 220))
        return torch.from_numpy(np.asarray(img).copy()).float() / 255
    xs, zs = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(zs) - min(zs), 4.0)
    wedge = 0.07 * span  # wedges scale with the map so they stay visible
    x0, x1 = min(xs) - 2 * wedge, max(xs) + 2 * wedge
    z0, z1 = min(zs) - 2 * wedge, max(zs) + 2 * wedge
    scale = min((width - 2 * margin) / (x1 - x0), (width - head - 2 * margin) / (z1 - z0))
    height = int(head + 2 * margin + (z1 - z0) * scale)
    img = Image.new("RGB", (width, height), (24, 26, 30))
    draw = ImageDraw.Draw(img)

    def px(x: float, z: float) -> tuple[float, float]:
        return margin + (x - x0) * scale, height - margin - (z - z0) * scale

    def draw_wedge(
        pose: CameraPose, length: float, fill: tuple[int, int, int], outline: tuple[int, int, int]
    ) -> None:
        half = pose.fov / 2
        arc = [pose.direction(half - pose.fov * i / 12) for i in range(13)]
        poly = [px(pose.x, pose.z)] + [px(pose.x + length * dx, pose.z + length * dz) for dx, dz in arc]
        draw.polygon(poly, fill=fill, outline=outline)

    for t in targets:
        draw_wedge(t, 2 * wedge, (36, 90, 52), (90, 220, 120))
    chosen_set, overlap = set(chosen), overlap or {}
    order = sorted(posed, key=lambda f: (f.frame_id in chosen_set, bool(overlap.get(f.frame_id))))
    for f in order:  # chosen last, on top
        if f.frame_id in chosen_set:
            colours = ((200, 110, 30), (255, 170, 60))
        elif overlap.get(f.frame_id):
            colours = ((50, 100, 150), (110, 180, 255))
        else:
            colours = ((70, 70, 75), (150, 150, 155))
        draw_wedge(f.camera, wedge, *colours)  # type: ignore[arg-type]
    clusters: list[tuple[float, float, list[str]]] = []  # frames within 16 px share a label
    for f in posed:
        fx, fz = px(f.camera.x, f.camera.z)  # type: ignore[union-attr]
        for cx, cz, ids in clusters:
            if abs(cx - fx) < 16 and abs(cz - fz) < 16:
                ids.append(f.frame_id)
                break
        else:
            clusters.append((fx, fz, [f.frame_id]))
    for cx, cz, ids in clusters:
        label = " ".join(ids) if len(ids) <= 3 else f"{ids[0]} .. {ids[-1]} ({len(ids)} frames)"
        draw.text((min(cx + 6, width - 6 * len(label) - 4), cz + 4), label, fill=(235, 235, 235))
    draw.text(
        (8, 5), "target: green   chosen: orange   overlapping: blue   other: grey", fill=(200, 200, 200)
    )
    metres = 10 ** math.floor(math.log10(span / 2))
    bar = metres * scale
    draw.line(
        [(width - margin - bar, height - 12), (width - margin, height - 12)], fill=(200, 200, 200), width=2
    )
    draw.text((width - margin - bar, height - 26), f"{metres:g} m", fill=(200, 200, 200))
    return torch.from_numpy(np.asarray(img).copy()).float() / 255
