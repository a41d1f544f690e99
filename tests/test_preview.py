"""Contact sheets: layout, marks and the frames a selection used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memento_core.adapters import TinyVAE
from memento_core.memory import MemoryBank, recency_selector
from memento_core.preview import MARK_COLORS, SheetTile, _row_title, contact_sheet, save_png, selection_rows

BACKGROUND = round(0.12 * 255) / 255  # the sheet's background after the 8-bit round trip


def find_frames(sheet, rgb, min_w, min_h):
    """Boxes (top, bottom, left, right), end-exclusive, of the frames drawn in colour ``rgb``: a
    horizontal run of that colour at least ``min_w`` wide whose left column runs down at least ``min_h``.
    Found in the pixels only, independently of the layout code."""
    mask = ((sheet - torch.tensor(rgb)).abs().amax(-1) <= 1.5 / 255).numpy()
    boxes = []
    for y in range(mask.shape[0]):
        edges = np.diff(np.concatenate([[0], mask[y].astype(np.int8), [0]]))
        for x0, x1 in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            if x1 - x0 < min_w or (y > 0 and mask[y - 1, x0:x1].all()):
                continue
            column = mask[y:, x0]
            height = len(column) if column.all() else int(np.argmin(column))
            if height >= min_h:
                boxes.append((y, y + height, int(x0), int(x1)))
    return sorted(boxes)


def solid(rgb, h=40, w=64):
    """A tile of one colour (rgb in [0, 1]) as an image in [-1, 1]."""
    return (torch.tensor(rgb) * 2 - 1)[:, None, None].expand(3, h, w).clone()


def test_tiles_keep_their_pixels_and_show_their_mark():
    red = torch.zeros(3, 20, 40)
    red[0] = 1.0  # pure red in [-1, 1]: (1, -1, -1) after the next line
    red[1:] = -1.0
    sheet = contact_sheet(
        [("high", [SheetTile(red, "a", "local"), SheetTile(-red, "b", "global")])], tile_height=20
    )
    assert sheet.shape[2] == 3 and sheet.dtype == torch.float32
    ((y0, y1, x0, x1),) = find_frames(sheet, MARK_COLORS["local"], 40, 20)
    ((g0, g1, gx0, gx1),) = find_frames(sheet, MARK_COLORS["global"], 40, 20)
    assert (y1 - y0, x1 - x0) == (26, 46) and (g0, g1 - g0, gx1 - gx0) == (y0, 26, 46)  # 3 px frames
    assert gx0 > x1  # same line, local first
    torch.testing.assert_close(
        sheet[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3], torch.tensor([1.0, 0.0, 0.0]).expand(20, 40, 3)
    )
    torch.testing.assert_close(
        sheet[g0 + 3 : g1 - 3, gx0 + 3 : gx1 - 3], torch.tensor([0.0, 1.0, 1.0]).expand(20, 40, 3)
    )


def test_tiles_wrap_into_a_grid_in_row_major_order():
    colours = [(k / 9, 1 - k / 9, 0.5 if k % 2 else 0.2) for k in range(10)]
    tiles = [SheetTile(solid(c), f"f{k}", "local") for k, c in enumerate(colours)]
    sheet = contact_sheet([("high", tiles)], tile_height=40, columns=4)
    boxes = find_frames(sheet, MARK_COLORS["local"], 60, 40)
    assert len(boxes) == 10 and all((b - t, r - l) == (46, 70) for t, b, l, r in boxes)
    tops = sorted({t for t, _, _, _ in boxes})
    assert [sum(t == top for t, _, _, _ in boxes) for top in tops] == [4, 4, 2]  # 3 lines of <= 4 tiles
    lefts = sorted({l for _, _, l, _ in boxes})
    assert len(lefts) == 4  # the columns line up
    for (t, b, l, r), rgb in zip(sorted(boxes), colours, strict=True):  # row-major: by line, then by x
        torch.testing.assert_close(sheet[(t + b) // 2, (l + r) // 2], torch.tensor(rgb), atol=1 / 255, rtol=0)
    old_strip_width = 44 + 10 * (70 + 4)  # the former layout: a title column, then all tiles in a row
    assert sheet.shape[1] < old_strip_width / 2
    four = contact_sheet([("high", tiles[:4])], tile_height=40, columns=4)
    assert four.shape[1] == sheet.shape[1] and four.shape[0] < sheet.shape[0]  # taller, not wider
    one_line = contact_sheet([("high", tiles)], tile_height=40, columns=32)
    assert len({t for t, _, _, _ in find_frames(one_line, MARK_COLORS["local"], 60, 40)}) == 1
    one_column = contact_sheet([("high", tiles)], tile_height=40, columns=1)
    assert len({l for _, _, l, _ in find_frames(one_column, MARK_COLORS["local"], 60, 40)}) == 1


def test_rows_stack_as_blocks_and_empty_rows_show_a_header():
    tiles = [SheetTile(solid((0.1, 0.2, 0.3)), "a", "kept") for _ in range(3)]
    both = contact_sheet([("high", tiles), ("low", tiles[:2])], tile_height=40, columns=2)
    boxes = find_frames(both, MARK_COLORS["kept"], 60, 40)
    assert [sum(t == top for t, _, _, _ in boxes) for top in sorted({t for t, _, _, _ in boxes})] == [2, 1, 2]
    empty = contact_sheet([("archive", [])], tile_height=40)
    assert empty.shape[0] < 60 and empty.shape[1] >= 100 and not find_frames(empty, MARK_COLORS["kept"], 5, 5)
    with_empty = contact_sheet([("high", tiles), ("archive", [])], tile_height=40, columns=2)
    assert with_empty.shape[1] == contact_sheet([("high", tiles)], tile_height=40, columns=2).shape[1]
    assert with_empty.shape[0] > contact_sheet([("high", tiles)], tile_height=40, columns=2).shape[0]
    assert [_row_title("high", 8), _row_title("identity", 1), _row_title("none", 0)] == [
        "high (8 frames)",
        "identity (1 frame)",
        "none (empty)",
    ]


def test_long_labels_stay_inside_their_cell():
    tiles = [
        SheetTile(solid((0.1, 0.1, 0.5)), "frame_" + "x" * 200, "local"),
        SheetTile(solid((0.5, 0.1, 0.1)), "", "local"),
    ]
    sheet = contact_sheet([("high", tiles)], tile_height=40, columns=4)
    (t0, b0, l0, r0), (t1, b1, l1, r1) = find_frames(sheet, MARK_COLORS["local"], 60, 40)
    assert t0 == t1 and r0 < l1
    below = sheet[b0:]  # the label strip and the margin under the line
    bright = below.amax(-1) > 0.5
    assert bright[:, l0:r0].any()  # the (cut) label is drawn under its tile ...
    assert not bright[:, r0:].any()  # ... and nothing of it under the gap or the next tile
    torch.testing.assert_close(
        below[:, r0:], torch.full_like(below[:, r0:], BACKGROUND), atol=1 / 255, rtol=0
    )
    torch.testing.assert_close(
        sheet[t1 + 3 : b1 - 3, l1 + 3 : r1 - 3],
        torch.tensor([0.5, 0.1, 0.1]).expand(40, 64, 3),
        atol=1 / 255,
        rtol=0,
    )


def test_labels_are_drawn_at_a_readable_size():
    def label_rows(tile_height):
        tile = SheetTile(solid((0.2, 0.2, 0.2), 90, 160), "Hg 12", "local")
        sheet = contact_sheet([("high", [tile])], tile_height=tile_height)
        ((_, bottom, left, right),) = find_frames(sheet, MARK_COLORS["local"], tile_height, tile_height)
        rows = (sheet[bottom:, left:right].amax(-1) > 0.5).any(-1).nonzero()[:, 0]
        return int(rows.max() - rows.min()) + 1

    assert 10 <= label_rows(120) < label_rows(240) <= 30  # the bitmap default font was ~8 px


def test_legend_shows_only_the_marks_present():
    local = [SheetTile(solid((0.1, 0.1, 0.1)), "a", "local")]
    only_local = contact_sheet([("high", local)], tile_height=40)
    assert (
        find_frames(only_local, MARK_COLORS["local"], 4, 4)[0][1]
        < find_frames(only_local, MARK_COLORS["local"], 60, 40)[0][0]
    )
    for mark in ("global", "kept", "reference", "identity"):
        assert not find_frames(only_local, MARK_COLORS[mark], 5, 5), mark
    mixed = contact_sheet(
        [("high", [*local, SheetTile(solid((0.1, 0.1, 0.1)), "b", "global")])], tile_height=40
    )
    first_top = find_frames(mixed, MARK_COLORS["global"], 60, 40)[0][0]
    assert any(
        b <= first_top for _, b, _, _ in find_frames(mixed, MARK_COLORS["global"], 4, 4)
    )  # a swatch above
    assert not find_frames(mixed, MARK_COLORS["identity"], 5, 5)
    plain = contact_sheet([("high", [SheetTile(solid((0.1, 0.1, 0.1)), "a")])], tile_height=40)
    assert plain.shape[0] < only_local.shape[0]  # no marks, no legend line


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"columns": 0}, "columns must be an integer >= 1"),
        ({"columns": -3}, "columns must be an integer >= 1"),
        ({"columns": 2.5}, "columns must be an integer >= 1"),
        ({"tile_height": 7}, "tile_height must be >= 8"),
    ],
)
def test_bad_layout_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contact_sheet([("high", [SheetTile(solid((0.1, 0.1, 0.1)), "a", "local")])], **kwargs)


def test_selection_rows_mark_references_and_kept_frames(tmp_path):
    vae = TinyVAE()
    refs = vae.encode(torch.zeros(3, 1, 32, 32))[:, 0][None]
    bank = MemoryBank.empty("memento").with_references(refs)
    shot = torch.randn(8, 16, 4, 4)
    bank = bank.with_shot(shot, frame_indices=list(range(8)), frames_per_shot=9)
    chosen, selection = bank.select_for_shot({"high": recency_selector, "low": recency_selector})
    used = {"high": chosen.frame_ids("high")}
    n = len(used["high"])
    rows = selection_rows(bank, used, selection, vae.decode, {"high": list(range(-n, 0))})
    ((title, tiles),) = rows
    assert title == "high" and [t.label.split()[0] for t in tiles] == used["high"]
    marks = {t.label.split()[0]: t.mark for t in tiles}
    assert marks["ref0"] == "reference"
    assert tiles[0].label.endswith(f"@{-n}") and tiles[-1].label.endswith("@-1")
    torch.testing.assert_close(tiles[-1].image, vae.decode(bank.get(used["high"][-1]).latent[:, None])[:, 0])
    path = save_png(contact_sheet(rows), tmp_path / "s.png")
    from PIL import Image

    assert Image.open(path).size[1] == contact_sheet(rows).shape[0]


def test_selection_rows_refuse_positions_that_do_not_match_the_frames():
    """A shot's full positions (identity slot first) must not be taken for the memory frames' labels:
    that shifted every label one slot late."""
    vae = TinyVAE()
    bank = MemoryBank.empty("memento").with_shot(torch.randn(3, 16, 4, 4), frame_indices=[0, 4, 8])
    used = {"high": bank.frame_ids("high")}
    full = bank.frame_positions("high", identity=True, n_target=2).tolist()  # [-512, m1, m2, m3, 0, 1]
    with pytest.raises(ValueError, match="3 frames but 6 positions"):
        selection_rows(bank, used, None, vae.decode, {"high": full})
    memory = full[1:4]
    rows = selection_rows(bank, used, None, vae.decode, {"high": memory})
    assert [t.label for t in rows[0][1]] == [
        f"{fid} @{p}" for fid, p in zip(used["high"], memory, strict=True)
    ]
    assert all("@-512" not in t.label for t in rows[0][1])


def test_memory_slot_positions_leave_out_identity_and_target():
    from memento_core.memory.positions import frame_positions, memory_slot_positions

    front = frame_positions("memento", [3, 40], 60, n_target=3, identity=True).tolist()
    back = frame_positions("memento", [3, 40], 60, n_target=3, identity=True, identity_back=True).tolist()
    plain = frame_positions("memento", [3, 40], 60, n_target=3).tolist()
    assert front[0] == -512 and back[2] == back[1] + 5  # the layouts this relies on
    assert memory_slot_positions(front, 2, True) == plain[:2]
    assert memory_slot_positions(back, 2, True, identity_back=True) == plain[:2]
    assert memory_slot_positions(plain, 2, False) == plain[:2]
