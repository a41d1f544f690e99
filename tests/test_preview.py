"""Contact sheets: layout, marks and the frames a selection used."""

from __future__ import annotations

import pytest
import torch

from memento_core.adapters import TinyVAE
from memento_core.memory import MemoryBank, recency_selector
from memento_core.preview import MARK_COLORS, SheetTile, contact_sheet, save_png, selection_rows


def test_tiles_keep_their_pixels_and_show_their_mark():
    red = torch.zeros(3, 20, 40)
    red[0] = 1.0  # pure red in [-1, 1]: (1, -1, -1) after the next line
    red[1:] = -1.0
    sheet = contact_sheet(
        [("high", [SheetTile(red, "a", "local"), SheetTile(-red, "b", "global")])], tile_height=20
    )
    assert sheet.shape[2] == 3 and sheet.dtype == torch.float32
    x0, y0 = 44, 2  # title column, top margin
    inner = sheet[y0 + 3 : y0 + 23, x0 + 3 : x0 + 43]
    torch.testing.assert_close(inner, torch.tensor([1.0, 0.0, 0.0]).expand(20, 40, 3))
    torch.testing.assert_close(sheet[y0, x0], torch.tensor(MARK_COLORS["local"]), atol=1 / 255, rtol=0)
    x1 = x0 + 46 + 4
    torch.testing.assert_close(sheet[y0, x1], torch.tensor(MARK_COLORS["global"]), atol=1 / 255, rtol=0)
    torch.testing.assert_close(
        sheet[y0 + 3 : y0 + 23, x1 + 3 : x1 + 43], torch.tensor([0.0, 1.0, 1.0]).expand(20, 40, 3)
    )


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
