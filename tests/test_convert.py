"""The pickle -> safetensors converter: a StoryMem-style PEFT LoRA merged through the converted file
matches PEFT, code-carrying and non-flat pickles are refused with nothing written, atomic output,
the command line, and the loaders' refusal naming the converter command."""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import memento_core.convert as convert_mod
from memento_core.convert import ConversionReport, convert_pickle, describe_content, main
from memento_core.errors import CheckpointError
from memento_core.expert import load_memento_expert
from memento_core.loading import load_dit, open_checkpoint
from memento_core.lora import load_lora
from memento_core.tiny import tiny_dit

REPO = Path(__file__).resolve().parent.parent
TARGETS = [
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
]  # fmt: skip
RANK = ALPHA = 16  # the release uses r = alpha = 128; the Memento default rule assumes r = alpha


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def storymem(tmp_path_factory):
    """A tiny I2V base (safetensors) and a StoryMem-style PEFT LoRA as safetensors and as a .pth."""
    root = tmp_path_factory.mktemp("storymem")
    base = tiny_dit("i2v", seed=21)
    base_file = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, target_modules=TARGETS)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # B starts at zero in PEFT: give both halves random values
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 / math.sqrt(p.shape[1]))
    pm.eval()
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    peft_scale = pm.base_model.model.blocks[0].self_attn.q.scaling["default"]
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()

    (root / "st").mkdir()
    st_file = root / "st" / "storymem.safetensors"
    save_file(sd, st_file)
    (root / "pth").mkdir()
    pth_file = root / "pth" / "storymem.pth"
    torch.save(sd, pth_file)
    return {
        "base": base,
        "base_file": base_file,
        "sd": sd,
        "peft_scale": peft_scale,
        "merged": merged,
        "st": st_file,
        "pth": pth_file,
    }


# ------------------------------------------------------------------------------------------------
# StoryMem-style LoRA: parity with PEFT through safetensors and through a converted .pth


def test_peft_state_dict_has_storymem_key_layout(storymem):
    n_layers = storymem["base"].config.num_layers
    pattern = re.compile(
        r"base_model\.model\.blocks\.(\d+)\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\.lora_[AB]\.weight"
    )
    keys = list(storymem["sd"])
    assert all(pattern.fullmatch(k) for k in keys), keys[:4]
    assert len(keys) == 2 * len(TARGETS) * n_layers
    assert storymem["peft_scale"] == pytest.approx(ALPHA / math.sqrt(RANK))


def test_convert_storymem_pth_is_lossless(storymem, tmp_path):
    out = tmp_path / "storymem.safetensors"
    report = convert_pickle(storymem["pth"], out)
    sd = storymem["sd"]
    assert isinstance(report, ConversionReport)
    assert report.path == out
    assert report.n_tensors == len(sd)
    assert report.bytes == sum(t.numel() * 4 for t in sd.values())
    assert report.dtypes == ("float32",)
    n_modules = len(TARGETS) * storymem["base"].config.num_layers
    assert report.kind == f"StoryMem-style LoRA (no KeyframeQuery): LoRA ({n_modules} layers)"
    assert report.unwrapped is None
    back = load_file(out)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    assert files_in(tmp_path) == {out.name}  # no temp file left


@pytest.mark.parametrize("source", ["safetensors", "converted_pth"])
def test_storymem_lora_merges_like_peft(storymem, tmp_path, source):
    if source == "safetensors":
        lora_file = storymem["st"]
    else:
        lora_file = tmp_path / "storymem.safetensors"
        convert_pickle(storymem["pth"], lora_file)
    lora = load_lora(lora_file)  # no adapter config beside it: Memento's r = alpha, rsLoRA rule
    scales = {lora.scale(n) for n in lora.entries}
    assert len(scales) == 1 and scales.pop() == pytest.approx(storymem["peft_scale"], rel=1e-12)

    dit, kfq = load_memento_expert(storymem["base_file"], lora_file, dtype=torch.float32)
    assert kfq is None  # StoryMem files have no KeyframeQuery
    ours, merged, base = dit.state_dict(), storymem["merged"], storymem["base"].state_dict()
    assert set(ours) == set(merged)
    err = max(rel_err(ours[k], merged[k]) for k in merged)
    print(f"\n[{source}] merge vs PEFT merge_and_unload: max relative error {err:.3e}")
    assert err <= 1e-5
    # the LoRA really moved every targeted weight (so the comparison above could fail)
    n_layers = storymem["base"].config.num_layers
    for n in range(n_layers):
        for t in TARGETS:
            key = f"blocks.{n}.{t}.weight"
            assert rel_err(merged[key], base[key]) > 0.05, key


# ------------------------------------------------------------------------------------------------
# Pickles that carry code are refused, and nothing in them runs


class _WritesFile:
    """Unpickling this writes ``marker`` through a Python function: a stand-in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


class _RunsShell(_WritesFile):
    """Unpickling this runs a shell command (``os.system``) that writes ``marker``."""

    def __reduce__(self):
        return (os.system, (f"echo code ran > {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("payload", [_WritesFile, _RunsShell], ids=["write_text", "os_system"])
@pytest.mark.parametrize("fmt", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, fmt, payload):
    marker = tmp_path / "marker.txt"
    src = tmp_path / "evil.pth"
    content = {"w": torch.ones(2, 2), "x": payload(marker)}
    if fmt == "torch_zip":
        torch.save(content, src)
    elif fmt == "torch_legacy":
        torch.save(content, src, _use_new_zipfile_serialization=False)
    else:
        src.write_bytes(pickle.dumps(payload(marker), protocol=2))
    assert not marker.exists()
    out = tmp_path / "evil.safetensors"
    with pytest.raises(CheckpointError) as info:
        convert_pickle(src, out)
    msg = str(info.value)
    assert str(src) in msg and "restricted unpickler" in msg and "nothing in it ran" in msg
    assert "\n" not in msg
    assert not marker.exists(), "code in the pickle ran"
    assert not out.exists()
    assert files_in(tmp_path) == {src.name}
    # control: an unrestricted load of the same file does run the payload
    if fmt == "plain_pickle":
        pickle.loads(src.read_bytes())
    else:
        torch.load(src, weights_only=False)
    assert marker.read_text().strip() == "code ran"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "the file is empty"),
        (b"just some text, not a checkpoint", "not a torch.save checkpoint"),
        (None, "already a safetensors file"),
    ],
    ids=["empty", "text", "misnamed-safetensors"],
)
def test_files_that_are_not_torch_save_are_refused(tmp_path, data, expected):
    src = tmp_path / "x.pth"
    if data is None:
        save_file({"a": torch.ones(2)}, src)
    else:
        src.write_bytes(data)
    with pytest.raises(CheckpointError, match=expected):
        convert_pickle(src, tmp_path / "x.safetensors")
    assert files_in(tmp_path) == {src.name}


def test_cli_refuses_code_with_exit_2(tmp_path, capsys):
    marker = tmp_path / "marker.txt"
    src = tmp_path / "evil.pt"
    torch.save({"x": _WritesFile(marker)}, src)
    out = tmp_path / "out.safetensors"
    assert main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(src) in err and "refused" in err
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------------------------
# Content rules


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"w": torch.ones(2), "foo": "bar"}, r"key 'foo' holds a str, not a tensor"),
        ({"w": torch.ones(2), "step": 3}, r"key 'step' holds an int, not a tensor"),
        ([torch.ones(2), torch.ones(3)], r"holds a list \(nested structure\), not a mapping"),
        ({"w": torch.ones(2), "sub": {"a": torch.ones(2)}}, r"key 'sub' holds a dict \(nested structure\)"),
        ({"state_dict": {"a": torch.ones(2), "epoch": 1}}, r"key 'state_dict\.epoch' holds an int"),
        ({}, r"holds no tensors"),
        ({1: torch.ones(2)}, r"key 1 is an int, not a string"),
        (torch.ones(3), r"holds a Tensor, not a mapping"),
    ],
    ids=["str", "int", "list", "nested", "wrapped-int", "empty", "int-key", "bare-tensor"],
)
def test_non_flat_content_is_refused(tmp_path, content, expected):
    src = tmp_path / "bad.pth"
    torch.save(content, src)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(CheckpointError, match=expected) as info:
        convert_pickle(src, out)
    assert str(src) in str(info.value)
    assert files_in(tmp_path) == {src.name}


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_single_wrapper_is_unwrapped_and_said(tmp_path, wrapper, capsys):
    inner = {
        "blocks.0.ffn.0.lora_down.weight": torch.randn(4, 8),
        "blocks.0.ffn.0.lora_up.weight": torch.randn(6, 4),
    }
    src = tmp_path / "wrapped.ckpt"
    torch.save({wrapper: inner}, src)
    out = tmp_path / "wrapped.safetensors"
    assert main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"'{wrapper}'" in printed
    back = load_file(out)
    assert set(back) == set(inner)
    assert all(torch.equal(back[k], v) for k, v in inner.items())
    report = convert_pickle(src, out, overwrite=True)
    assert report.unwrapped == wrapper
    assert report.kind == "LoRA (1 layer)"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-non-zip"])
def test_aliased_views_noncontiguous_and_dtypes_round_trip(tmp_path, legacy):
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 8, generator=g)
    sd = {
        "full": full,
        "alias": full,  # the same tensor twice
        "rows": full[1:3],  # a view into a larger storage
        "transposed": full.t(),  # non-contiguous
        "strided": full[:, ::2],  # non-contiguous view
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "int": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    if legacy:  # the pre-1.6 format cannot hold float8 storages (torch cannot read them back)
        del sd["fp8"]
    expected = {k: v.clone() for k, v in sd.items()}
    src = tmp_path / "mixed.pt"
    torch.save(sd, src, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "mixed.safetensors"
    report = convert_pickle(src, out)
    assert report.n_tensors == len(sd)
    assert report.bytes == sum(v.numel() * v.element_size() for v in sd.values())
    fp8 = () if legacy else ("float8_e4m3fn",)
    assert report.dtypes == ("bfloat16", "float16", "float32", *fp8, "int64")
    assert report.kind == "weights without LoRA or KeyframeQuery keys"
    back = load_file(out)  # the safetensors library's own reader
    index = open_checkpoint(out)  # and this project's reader
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].float(), v.float()), k
        assert torch.equal(index.read(k).float(), v.float()), k


def test_memento_content_kind(tmp_path):
    sd = {
        "base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 8),
        "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.randn(8, 4),
        "base_model.model.blocks.1.ffn.2.lora_A.weight": torch.randn(4, 8),
        "base_model.model.blocks.1.ffn.2.lora_B.weight": torch.randn(8, 4),
        "base_model.model.keyframe_query.queries": torch.randn(3, 8),
        "keyframe_query.proj.weight": torch.randn(8, 8),
    }
    src = tmp_path / "memento.bin"
    torch.save(sd, src)
    report = convert_pickle(src, tmp_path / "memento.safetensors")
    assert report.kind == "Memento (LoRA + KeyframeQuery): LoRA (2 layers), 2 KeyframeQuery tensors"
    assert describe_content(["keyframe_query.queries"]) == "KeyframeQuery only (1 tensors, no LoRA)"


# ------------------------------------------------------------------------------------------------
# Output safety


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.arange(3.0)}, src)
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_pickle(src, out)
    assert out.read_bytes() == b"keep me"
    assert main([str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert main([str(src), str(out), "--overwrite"]) == 0
    assert torch.equal(load_file(out)["a"], torch.arange(3.0))
    assert files_in(tmp_path) == {src.name, out.name}


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.ones(1000)}, src)
    out = tmp_path / "w.safetensors"

    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_mod, "save_file", half_write)
    with pytest.raises(CheckpointError, match="No space left"):
        convert_pickle(src, out)
    assert files_in(tmp_path) == {src.name}


@pytest.mark.parametrize(
    ("src_name", "dst_name", "expected"),
    [
        ("missing.pth", "out.safetensors", "no such file"),
        ("w.pth", "out.pth", r"must end in \.safetensors"),
        ("w.pth", "nofolder/out.safetensors", "does not exist"),
    ],
)
def test_bad_paths(tmp_path, src_name, dst_name, expected):
    torch.save({"a": torch.ones(1)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=expected):
        convert_pickle(tmp_path / src_name, tmp_path / dst_name)
    assert files_in(tmp_path) == {"w.pth"}


# ------------------------------------------------------------------------------------------------
# Command line


def test_main_prints_summary(storymem, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main([str(storymem["pth"]), str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(storymem["sd"])
    mb = sum(t.numel() * 4 for t in storymem["sd"].values()) / 1e6
    assert f"wrote {out}: {n} tensors, {mb:.1f} MB, dtypes: float32" in printed
    assert "StoryMem-style LoRA (no KeyframeQuery)" in printed


def test_module_runs_as_a_script(tmp_path):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, src)
    out = tmp_path / "w.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "memento_core.convert"]
    ok = subprocess.run([*cmd, str(src), str(out)], capture_output=True, text=True, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "1 tensors" in ok.stdout and out.is_file()
    bad = subprocess.run([*cmd, str(src), str(out)], capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "already exists" in bad.stderr


# ------------------------------------------------------------------------------------------------
# The loaders refuse pickles and name the converter command


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_loaders_name_the_converter(storymem, tmp_path, suffix):
    lora_pickle = tmp_path / f"storymem{suffix}"
    torch.save(storymem["sd"], lora_pickle)
    command = f"python -m memento_core.convert {lora_pickle} {lora_pickle.with_suffix('.safetensors')}"
    for load in (
        lambda: load_lora(lora_pickle),
        lambda: load_memento_expert(storymem["base_file"], lora_pickle),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        assert command in str(info.value)
    # the command in the message works as given, and the result loads
    msg = str(info.value)
    argv = shlex.split(msg[msg.index(command) :])[3:5]
    assert main(argv) == 0
    dit, kfq = load_memento_expert(storymem["base_file"], argv[1])
    assert kfq is None
    merged = storymem["merged"]
    assert max(rel_err(v, merged[k]) for k, v in dit.state_dict().items()) <= 1e-5


def test_base_pickle_names_the_converter(storymem, tmp_path):
    base_pickle = tmp_path / "base.pt"
    torch.save(storymem["base"].state_dict(), base_pickle)
    with pytest.raises(
        CheckpointError, match=r"python -m memento_core\.convert .*base\.pt .*base\.safetensors"
    ):
        load_dit(base_pickle)
    with pytest.raises(CheckpointError, match=r"python -m memento_core\.convert"):
        load_memento_expert(base_pickle, storymem["st"])
