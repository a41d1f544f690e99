"""The command line's real-weights path on tiny files in the real formats.

diffusers' AutoencoderKLWan and transformers' UMT5EncoderModel (tiny configs, random weights, saved as
safetensors folders), Wan DiT experts and Memento files in the official key layouts, a model config
JSON -> ``python -m memento_core.story --models`` renders two shots through exactly the code that
loads the 14B weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_comfy_models import write_tiny_memento

from memento_core.cli import cli
from memento_core.memory import load_bank
from memento_core.real_models import (
    DiffusersWanVAE,
    ModelConfigError,
    UMT5TextEncoder,
    clean_prompt,
    load_model_config,
)
from memento_core.tiny import random_state_dict, tiny_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parents[1] / "example_stories" / "lighthouse_keeper.json"
WORDS = (
    "global caption shot person a an the elderly man with white beard walks climbs lamp sea : ; [ ] ,".split()
)


def write_vae(folder: Path) -> Path:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, num_res_blocks=1)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def write_text_encoder(folder: Path, tok_folder: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(tok_folder)
    cfg = transformers.UMT5Config(
        vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    torch.manual_seed(1)
    transformers.UMT5EncoderModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder, tok_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_vae(root / "vae")
    write_text_encoder(root / "text_encoder", root / "tokenizer")
    for name, kind, seed in [
        ("i2v_high", "i2v", 1),
        ("i2v_low", "i2v", 2),
        ("t2v_high", "t2v", 3),
        ("t2v_low", "t2v", 4),
    ]:
        save_file(random_state_dict(tiny_config(kind), seed), root / f"{name}.safetensors")
    write_tiny_memento(root / "backbone_high_noise.safetensors", tiny_config("i2v"), seed=5)
    write_tiny_memento(root / "backbone_low_noise.safetensors", tiny_config("i2v"), seed=6)
    config = {
        "i2v_high": "i2v_high.safetensors", "i2v_low": "i2v_low.safetensors",
        "t2v_high": "t2v_high.safetensors", "t2v_low": "t2v_low.safetensors",
        "memento_high": "backbone_high_noise.safetensors", "memento_low": "backbone_low_noise.safetensors",
        "text_encoder": "text_encoder", "tokenizer": "tokenizer", "vae": "vae",
        "dtype": "fp32", "device": "cpu",
    }  # fmt: skip
    (root / "models.json").write_text(json.dumps(config))
    return root


def test_vae_adapter_normalises_like_wan(model_dir):
    """encode = (posterior mean - latents_mean) / latents_std; decode inverts the normalisation."""
    adapter = DiffusersWanVAE(str(model_dir / "vae"))
    vae = adapter.vae
    clip = torch.rand(3, 5, 32, 48) * 2 - 1
    z = adapter.encode(clip)
    assert z.shape == (16, 2, 4, 6)
    mean = torch.tensor(vae.config.latents_mean).view(16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(16, 1, 1, 1)
    with torch.no_grad():
        raw = vae.encode(clip[None]).latent_dist.mean[0]
        torch.testing.assert_close(z, (raw - mean) / std)
        torch.testing.assert_close(
            adapter.decode(z), vae.decode((z * std + mean)[None]).sample[0].clamp(-1, 1)
        )


def test_text_encoder_returns_the_real_tokens_only(model_dir):
    """Padding to 512 with the attention mask gives the same states as encoding the bare tokens."""
    enc = UMT5TextEncoder(str(model_dir / "text_encoder"), str(model_dir / "tokenizer"))
    text = "the  elderly man climbs ,   the lamp"
    out = enc.encode(text)
    ids = enc.tokenizer(clean_prompt(text), return_tensors="pt").input_ids
    assert ids[0, -1] == 1 and out.shape == (1, ids.shape[1], 64)
    with torch.no_grad():
        bare = enc.model(ids).last_hidden_state
    torch.testing.assert_close(out, bare, atol=1e-5, rtol=1e-5)
    assert clean_prompt(" a &amp;  b\n") == "a & b"


def test_story_on_real_formats(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [str(EXAMPLE), "--models", str(model_dir / "models.json"), "--out", str(out)]
    assert (
        cli([*argv, "--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "--shots", "2"]) == 0
    )
    err = capsys.readouterr().err
    assert "TINY" not in err
    log = json.loads((out / "story_log.json").read_text())
    assert log["models"]["kind"] == "real" and log["models"]["i2v_high"].endswith("i2v_high.safetensors")
    assert [s["mode"] for s in log["shots"]] == ["t2v", "mi2v"]
    assert load_bank(out / "memory_bank.safetensors").current_time == 18


def test_model_config_errors(model_dir, tmp_path):
    cfg = json.loads((model_dir / "models.json").read_text())
    bad = tmp_path / "m.json"
    for change, needle in [
        ({"vae": "nowhere"}, "field 'vae'"),
        ({"t2v_low": None}, "both t2v_high and t2v_low"),
        ({"dtype": "int8"}, "field 'dtype'"),
        ({"lora": 1}, "unknown field"),
    ]:
        data = {
            k: (str(model_dir / v) if isinstance(v, str) and (model_dir / v).exists() else v)
            for k, v in cfg.items()
        }
        data.update(change)
        bad.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
        with pytest.raises(ModelConfigError, match=needle):
            load_model_config(bad)
    with pytest.raises(ModelConfigError, match="no such file"):
        load_model_config(tmp_path / "none.json")


def test_fp8_and_expert_swap_from_the_config(model_dir, tmp_path):
    cfg = json.loads((model_dir / "models.json").read_text())
    cfg = {
        k: str(model_dir / v) if isinstance(v, str) and (model_dir / v).exists() else v
        for k, v in cfg.items()
    }
    (tmp_path / "m.json").write_text(json.dumps({**cfg, "dtype": "fp8", "offload": "swap_experts"}))
    config = load_model_config(tmp_path / "m.json")
    from memento_core.fp8 import is_fp8
    from memento_core.real_models import real_models

    models = real_models(config)
    assert models.swap_experts and is_fp8(models.backbone().high) and is_fp8(models.load_t2v()[0])
    argv = [str(EXAMPLE), "--models", str(tmp_path / "m.json"), "--out", str(tmp_path / "run")]
    assert (
        cli([*argv, "--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "--shots", "2"]) == 0
    )
    log = json.loads((tmp_path / "run" / "story_log.json").read_text())
    assert log["models"]["dtype"] == "fp8" and [s["mode"] for s in log["shots"]] == ["t2v", "mi2v"]


def test_storymem_files_pick_the_storymem_policy(model_dir, tmp_path, monkeypatch, capsys):
    """StoryMem's files (LoRA, no KeyframeQuery) make the family, and so the default policy, storymem;
    its keyframes need the config's CLIP file, which is read from disk (never downloaded)."""
    from memento_core import keyframes
    from memento_core.adapters import TinyImageEmbedder
    from memento_core.real_models import real_models

    for pool, seed in (("high", 7), ("low", 8)):
        write_tiny_memento(
            tmp_path / f"storymem_{pool}.safetensors", tiny_config("i2v"), seed=seed, with_kfq=False
        )
    clip_file = tmp_path / "ViT-B-32.safetensors"
    save_file({"stand_in": torch.zeros(1)}, clip_file)
    cfg = json.loads((model_dir / "models.json").read_text())
    cfg = {
        k: str(model_dir / v) if isinstance(v, str) and (model_dir / v).exists() else v
        for k, v in cfg.items()
    }
    storymem = {**cfg, "memento_high": str(tmp_path / "storymem_high.safetensors")}
    storymem["memento_low"] = str(tmp_path / "storymem_low.safetensors")
    (tmp_path / "mixed.json").write_text(json.dumps({**cfg, "memento_low": storymem["memento_low"]}))
    with pytest.raises(ModelConfigError, match="different families"):
        real_models(load_model_config(tmp_path / "mixed.json"))
    (tmp_path / "noclip.json").write_text(json.dumps(storymem))
    models = real_models(load_model_config(tmp_path / "noclip.json"))
    assert models.family == "storymem" and models.load_embedder is None
    argv = [str(EXAMPLE), "--out", str(tmp_path / "run"), "--width", "32", "--height", "32"]
    argv += ["--frames", "9", "--steps", "2", "--shots", "2"]
    assert cli([*argv, "--models", str(tmp_path / "noclip.json")]) == 2
    assert '"clip"' in capsys.readouterr().err  # names the config field to add

    calls = []

    def create(model_name="ViT-B-32", pretrained=None, **kw):
        calls.append((model_name, pretrained))
        return TinyImageEmbedder()

    monkeypatch.setattr(keyframes.ClipEmbedder, "create", staticmethod(create))
    (tmp_path / "clip.json").write_text(json.dumps({**storymem, "clip": str(clip_file)}))
    assert cli([*argv, "--models", str(tmp_path / "clip.json")]) == 0
    assert calls == [("ViT-B-32", str(clip_file))]
    log = json.loads((tmp_path / "run" / "story_log.json").read_text())
    assert log["settings"]["policy"] == "storymem" and log["models"]["clip"] == str(clip_file)
    assert [s["mode"] for s in log["shots"]] == ["t2v", "mi2v"]
    assert all("keyframes" in s and "bank_ids" in s for s in log["shots"])


def test_run_options_in_the_model_config(model_dir, tmp_path):
    """The released pipelines' options may live in the config's "run" object; the command line wins."""
    cfg = json.loads((model_dir / "models.json").read_text())
    cfg = {
        k: str(model_dir / v) if isinstance(v, str) and (model_dir / v).exists() else v
        for k, v in cfg.items()
    }
    run = {"noise": "device", "fix": 1, "storymem_mode": True, "solver": "dpm++", "memory_noise": "fixed"}
    (tmp_path / "m.json").write_text(json.dumps({**cfg, "run": run}))
    argv = [str(EXAMPLE), "--models", str(tmp_path / "m.json"), "--out", str(tmp_path / "run")]
    argv += ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "--shots", "2", "-q"]
    assert cli([*argv, "--solver", "euler"]) == 0
    settings = json.loads((tmp_path / "run" / "story_log.json").read_text())["settings"]
    assert (settings["noise"], settings["fix"], settings["storymem_mode"]) == ("device", 1, True)
    assert (settings["solver"], settings["memory_noise"]) == ("euler", "fixed")  # the flag over the config
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "run": {"threads": 2}}))
    with pytest.raises(ModelConfigError, match="field 'run': unknown option"):
        load_model_config(tmp_path / "bad.json")
