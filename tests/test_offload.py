"""memento_core.offload on CPU: where every expert and block is at each step (recorded by the movers),
and that swapping changes nothing numerically."""

from __future__ import annotations

import pytest
import torch

from memento_core.errors import MementoError
from memento_core.offload import (
    BlockSwap,
    ExpertSwap,
    MoverTransfer,
    StreamedTransfer,
    resident_modules,
    swapped_blocks,
)
from memento_core.shot import ShotSettings, ShotText, sample_t2v_shot
from memento_core.tiny import tiny_dit


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 7, model.config.text_dim, generator=g)
    return x, torch.tensor([500.0]), ctx


def test_block_swap_moves_each_block_in_for_its_forward_only():
    model = tiny_dit("t2v", seed=1, num_layers=4)
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        expected = model(x, t, ctx)
    where = {id(b): "cpu-offload" for b in model.blocks}
    log = []

    def mover(module, device):
        where[id(module)] = str(device)
        log.append((list(model.blocks).index(module), str(device)))

    blocks = swapped_blocks(model, 2)
    assert blocks == list(model.blocks)[2:]
    seen = []
    swap = BlockSwap(blocks, "gpu", "cpu-offload", mover=mover)
    with torch.no_grad(), swap.attached():
        recorders = [  # registered after the swap's hooks, so they see the blocks in place
            block.register_forward_pre_hook(lambda _m, _a, i=i: seen.append((i, dict(where))))
            for i, block in enumerate(model.blocks)
        ]
        out = model(x, t, ctx)
        for r in recorders:
            r.remove()
    assert torch.equal(out, expected)
    # block 2 runs with 2 (and prefetched 3) on the device; block 3 with 3 there and 2 back
    at = {i: w for i, w in seen}
    b2, b3 = (id(model.blocks[k]) for k in (2, 3))
    assert at[2][b2] == "gpu" and at[3][b3] == "gpu" and at[3][b2] == "cpu-offload"
    assert log == [(2, "gpu"), (3, "gpu"), (2, "cpu-offload"), (3, "cpu-offload")]
    assert all(w == "cpu-offload" for w in where.values())  # all back after the shot
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)  # hooks removed
    with torch.no_grad():
        model(x, t, ctx)
    assert len(log) == 4  # detached: no more moves


def test_streamed_transfer_uses_host_copies_and_gives_the_originals_back():
    """The pinned/stream path's bookkeeping (CPU: synchronous copies). During its forward a block
    computes with fresh device copies (prefetched one block ahead); between forwards its weights are the
    host copies (no device -> host copy); after the shot every tensor is a host tensor again (on this
    CPU machine its original one, as nothing needs pinning)."""
    model = tiny_dit("t2v", seed=1, num_layers=4)
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        expected = model(x, t, ctx)
    blocks = swapped_blocks(model, 3)
    original = {id(p): p.data_ptr() for b in blocks for p in b.parameters()}
    values = {id(p): p.detach().clone() for b in blocks for p in b.parameters()}
    transfer = StreamedTransfer("cpu")
    host_ptrs: dict[int, int] = {}
    seen = []

    def state(block):
        """'device' when every tensor of the block is a copy made by bring(), 'host' when all are the
        host copies."""
        kinds = {"host" if p.data_ptr() == host_ptrs[id(p)] else "device" for p in block.parameters()}
        assert len(kinds) == 1
        return kinds.pop()

    swap = BlockSwap(blocks, "cpu", "cpu", transfer=transfer)
    assert swap.transfer is transfer
    with torch.no_grad(), swap.attached():
        host_ptrs.update({id(p): p.data_ptr() for b in blocks for p in b.parameters()})
        recorders = [
            block.register_forward_pre_hook(lambda _m, _a, i=i: seen.append([state(b) for b in blocks]))
            for i, block in enumerate(blocks)
        ]
        out = model(x, t, ctx)
        for r in recorders:
            r.remove()
        assert [state(b) for b in blocks] == ["host"] * 3
    assert torch.equal(out, expected)
    # block 1 of the swapped three runs with itself and the prefetched next one on the device
    assert seen == [["device", "device", "host"], ["host", "device", "device"], ["host", "host", "device"]]
    assert {id(p): p.data_ptr() for b in blocks for p in b.parameters()} == original
    assert all(torch.equal(p, values[id(p)]) for b in blocks for p in b.parameters())


def test_block_swap_picks_its_transfer():
    model = tiny_dit("t2v", num_layers=2)
    assert isinstance(BlockSwap(list(model.blocks), "cpu", "cpu").transfer, MoverTransfer)
    recorded = BlockSwap(list(model.blocks), "cuda", "cpu", mover=lambda m, d: None)
    assert isinstance(recorded.transfer, MoverTransfer)  # a given mover is always honoured


def test_resident_modules_share_parameters_and_leave_out_swapped_blocks():
    model = tiny_dit("i2v", seed=2, num_layers=3)
    res = resident_modules(model, 1, {"extra": torch.nn.Linear(2, 2)})
    ids = {id(p) for p in res.parameters()}
    assert all(id(p) in ids for p in model.blocks[0].parameters())
    assert not any(id(p) in ids for p in model.blocks[2].parameters())
    assert id(model.head.head.weight) in ids
    with pytest.raises(MementoError, match=r"\[0, 3\]"):
        swapped_blocks(model, 4)


def test_expert_swap_activates_high_then_low_once():
    high, low = tiny_dit("t2v", seed=3), tiny_dit("t2v", seed=4)
    ctx = torch.randn(1, 5, 64)
    text = ShotText(prompt=ctx, negative=torch.zeros(1, 0, 64))
    settings = ShotSettings(steps=4, shift=12.0, boundary=0.875, seed=5)
    expected = sample_t2v_shot(high, low, text, (2, 4, 4), settings).target
    calls = []
    swap = ExpertSwap({"high": high, "low": low}, calls.append)
    with swap.attached():
        out = sample_t2v_shot(high, low, text, (2, 4, 4), settings).target
    assert torch.equal(out, expected)
    assert calls == ["high", "low"] and swap.active == "low"
    with pytest.raises(MementoError, match="unknown expert"):
        swap.ensure("middle")
    sample_t2v_shot(high, low, text, (2, 4, 4), settings)  # hooks removed
    assert calls == ["high", "low"]
