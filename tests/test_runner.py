"""The story runner on the embedded tiny models: outputs, Memento's shot rules, resume equivalence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

from memento_core.cli import cli
from memento_core.m2v import ShotRequest, remember_shot, render_shot
from memento_core.media import read_mp4
from memento_core.memory import MemoryBank, load_bank
from memento_core.models import tiny_models
from memento_core.runner import Progress, RunnerError, RunSettings, render_story
from memento_core.shot import ShotSettings, ShotText, sample_t2v_shot
from memento_core.story import load_story

EXAMPLE = Path(__file__).resolve().parents[1] / "example_stories" / "lighthouse_keeper.json"
SETTINGS = RunSettings(width=64, height=32, frames=17, steps=4, seed=7)


def latents(out: Path, label: str) -> torch.Tensor:
    return load_file(str(out / "state" / f"shot_{label}.safetensors"))["latent"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    story = load_story(EXAMPLE)
    log = render_story(story, tiny_models(), SETTINGS, out, progress=Progress(3, enabled=False))
    return story, out, log


def test_outputs_of_a_three_shot_story(full_run):
    _, out, log = full_run
    labels = ["01_01", "01_02", "01_03"]
    for label in labels:
        frames = read_mp4(out / "shots" / f"{label}.mp4")
        assert frames.shape == (17, 32, 64, 3)
        assert (out / "memory" / f"{label}.png").is_file()
    with av.open(str(out / "shots" / "01_02.mp4")) as f:
        assert f.streams.video[0].average_rate == 16
    joined = read_mp4(out / "story.mp4")  # the shots' own frames, one after another (no re-encoding)
    assert torch.equal(joined, torch.cat([read_mp4(out / "shots" / f"{label}.mp4") for label in labels]))
    # identity previews for the memory shots (shot 1 is T2V: no identity slot)
    assert not (out / "identity" / "01_01.png").exists()
    assert (out / "identity" / "01_02.png").is_file() and (out / "identity" / "01_03.png").is_file()
    bank = load_bank(out / "memory_bank.safetensors")
    assert bank.current_time == 3 * 17 and bank.shots_done == 3
    saved = json.loads((out / "story_log.json").read_text(encoding="utf-8"))
    assert saved["shots"] == json.loads(json.dumps(log["shots"]))
    assert [s["label"] for s in saved["shots"]] == labels
    assert saved["models"]["kind"] == "tiny" and saved["settings"]["steps"] == 4


def test_memento_shot_rules(full_run):
    """Modes, seeds and CFG as in Memento's pipeline: T2V first shot (CFG 3.5, shift 12), continue ->
    MI2V with 3.5, hard cut -> 5.0; seed = seed + index in scene; shot 3 selects 6 local + 2 global."""
    _, _, log = full_run
    shots = log["shots"]
    assert [s["mode"] for s in shots] == ["t2v", "mi2v", "cut"]
    assert [s["seed"] for s in shots] == [7, 8, 9]
    assert [s["guidance"]["high"] for s in shots] == [3.5, 3.5, 5.0]
    assert [s["shift"] for s in shots] == [12.0, 5.0, 5.0]
    assert [s["boundary"] for s in shots] == [0.875, 0.9, 0.9]
    pool = shots[2]["selection"]["pools"]["high"]
    assert pool["method"] == "kfq" and len(pool["local_ids"]) == 6 and len(pool["global_ids"]) == 2
    assert shots[1]["selection"]["pools"]["high"]["method"] == "all"


def test_shots_equal_direct_calls_of_the_shot_functions(full_run):
    """Independent expectation: the runner's shots equal memento_core's shot functions called by hand
    with the rules above."""
    story, out, _ = full_run
    models = tiny_models()
    enc, vae, backbone = models.text_encoder, models.vae, models.backbone()
    neg = enc.encode(SETTINGS.negative)
    high, low = models.load_t2v()
    t2v = ShotSettings(steps=4, shift=12.0, boundary=0.875, guidance_high=3.5, guidance_low=3.5, seed=7)
    first = sample_t2v_shot(high, low, ShotText(enc.encode(story.shots[0].prompt), neg), (5, 4, 8), t2v)
    assert torch.equal(first.target, latents(out, "01_01"))
    video = vae.decode(first.target)
    bank = remember_shot(MemoryBank.empty("memento"), vae, video, story.shots[0].prompt, 1).bank
    for k, (mode, guidance) in enumerate([("mi2v", 3.5), ("cut", 5.0)], start=1):
        request = ShotRequest(
            prompt=story.shots[k].prompt, width=64, height=32, frames=17, mode=mode,
            reconstruct=story.reconstruct_target,
            settings=ShotSettings(steps=4, guidance_high=guidance, guidance_low=guidance, seed=7 + k),
        )  # fmt: skip
        record, bank = render_shot(backbone, bank, request, vae, enc, previous_video=video, shot_index=k + 1)
        assert torch.equal(record.latent, latents(out, story.shots[k].label))
        video = record.video


def test_mm2v_continuation_uses_the_last_five_frames(full_run, tmp_path):
    """continuation="mm2v": the cut: false shot continues from the previous shot's last 5 frames (mode
    mm2v) at CFG 5.0 (the reference's --mm2v alone adds 1.5); shot 1 is unchanged."""
    story, full, _ = full_run
    settings = replace(SETTINGS, continuation="mm2v", max_shots=2)
    log = render_story(story, tiny_models(), settings, tmp_path, progress=Progress(2, enabled=False))
    assert [s["mode"] for s in log["shots"]] == ["t2v", "mm2v"]
    assert log["shots"][1]["guidance"] == {"high": 5.0, "low": 5.0}
    assert torch.equal(latents(tmp_path, "01_01"), latents(full, "01_01"))
    models = tiny_models()
    vae = models.vae
    video = vae.decode(latents(full, "01_01"))
    bank = remember_shot(MemoryBank.empty("memento"), vae, video, story.shots[0].prompt, 1).bank
    request = ShotRequest(
        prompt=story.shots[1].prompt, width=64, height=32, frames=17, mode="mm2v",
        reconstruct=story.reconstruct_target,
        settings=ShotSettings(steps=4, guidance_high=5.0, guidance_low=5.0, seed=8),
    )  # fmt: skip
    record, _ = render_shot(
        models.backbone(), bank, request, vae, models.text_encoder, previous_video=video, shot_index=2
    )
    assert torch.equal(record.latent, latents(tmp_path, "01_02"))
    assert not torch.equal(record.latent, latents(full, "01_02"))  # MI2V gives another shot
    with pytest.raises(RunnerError, match="continuation: expected one of"):
        render_story(story, tiny_models(), replace(SETTINGS, continuation="motion"), tmp_path / "x")


class _StopAt(Progress):
    """Raises KeyboardInterrupt (what Ctrl-C does) at a given step of a given shot."""

    def __init__(self, label: str, step: int) -> None:
        super().__init__(3, enabled=False)
        self.stop_label, self.stop_step = label, step

    def step(self, info):
        if self.label.split()[2] == self.stop_label and info.step == self.stop_step:
            raise KeyboardInterrupt


def test_resume_gives_the_frames_of_an_uninterrupted_run(full_run, tmp_path):
    story, full, _ = full_run
    with pytest.raises(KeyboardInterrupt):
        render_story(story, tiny_models(), SETTINGS, tmp_path, progress=_StopAt("01_03", 2))
    assert (tmp_path / "shots" / "01_02.mp4").exists() and not (tmp_path / "shots" / "01_03.mp4").exists()
    with pytest.raises(RunnerError, match="--resume"):
        render_story(story, tiny_models(), SETTINGS, tmp_path, progress=Progress(3, enabled=False))
    with pytest.raises(RunnerError, match=r"different inputs \(settings\.steps\)"):
        render_story(story, tiny_models(), replace(SETTINGS, steps=5), tmp_path, resume=True)

    log = render_story(
        story, tiny_models(), SETTINGS, tmp_path, resume=True, progress=Progress(3, enabled=False)
    )
    assert [s["label"] for s in log["shots"]] == ["01_01", "01_02", "01_03"]
    for label in ("01_01", "01_02", "01_03"):
        assert torch.equal(latents(tmp_path, label), latents(full, label))
    a, b = load_bank(tmp_path / "memory_bank.safetensors"), load_bank(full / "memory_bank.safetensors")
    assert [f.frame_id for f in a.frames()] == [f.frame_id for f in b.frames()]
    assert all(torch.equal(x.latent, y.latent) for x, y in zip(a.frames(), b.frames(), strict=True))
    assert torch.equal(read_mp4(tmp_path / "story.mp4"), read_mp4(full / "story.mp4"))


def test_resume_in_steps_with_max_shots(full_run, tmp_path):
    story, full, _ = full_run
    render_story(
        story, tiny_models(), replace(SETTINGS, max_shots=1), tmp_path, progress=Progress(1, enabled=False)
    )
    assert read_mp4(tmp_path / "story.mp4").shape[0] == 17
    render_story(story, tiny_models(), SETTINGS, tmp_path, resume=True, progress=Progress(3, enabled=False))
    assert torch.equal(latents(tmp_path, "01_03"), latents(full, "01_03"))


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(EXAMPLE), "--out", str(out), "--width", "64", "--height", "32", "--frames", "17"]
    assert cli([*args, "--steps", "2", "--shots", "2", "--tiny"]) == 0
    err = capsys.readouterr().err
    assert "TINY models" in err and "step 2/2" in err and "done:" in err
    assert read_mp4(out / "story.mp4").shape == (2 * 17, 32, 64, 3)
    assert cli([*args, "--steps", "2", "--shots", "2", "--tiny"]) == 2  # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"story_name": "x", "scenes": [{"scene_num": 1, "video_prompts": ["a"], "cut": ["y"]}]}')
    assert cli([str(bad), "--out", str(tmp_path / "o"), "--tiny"]) == 2
    assert "scenes[0].cut[0]" in capsys.readouterr().err
    assert cli([*args, "--frames", "18", "--tiny"]) == 2
    assert "4n+1" in capsys.readouterr().err


def test_references_as_first_shot_memory(tmp_path):
    """MR2V: reference images become pinned memory of the first shot."""
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(ref)
    settings = replace(SETTINGS, first_shot="references", references=(str(ref),), max_shots=1)
    log = render_story(
        load_story(EXAMPLE), tiny_models(), settings, tmp_path / "o", progress=Progress(1, enabled=False)
    )
    shot = log["shots"][0]
    assert shot["mode"] == "references" and shot["memory_ids"]["high"] == ["ref0"]
    assert shot["guidance"]["high"] == 5.0
    bank = load_bank(tmp_path / "o" / "memory_bank.safetensors")
    assert bank.get("ref0").pinned
    with pytest.raises(RunnerError, match="reference image"):
        render_story(
            load_story(EXAMPLE), tiny_models(),
            replace(settings, references=(str(tmp_path / "nope.png"),)), tmp_path / "o2",
        )  # fmt: skip


def test_expert_swap_moves_one_expert_at_a_time(full_run, tmp_path):
    """swap_experts: before the first high-noise step the low expert leaves the device and the high one
    arrives, then the reverse at the boundary; results are unchanged."""
    story = full_run[0]
    models = tiny_models()
    models.swap_experts = True
    backbone = models.backbone()
    moves: list[tuple[str, str]] = []
    for name in ("high", "low"):
        expert = getattr(backbone, name)
        original = expert.to
        expert.to = lambda device, *a, _o=original, _n=name, **k: (
            moves.append((_n, str(device))),
            _o(device),
        )[1]
    settings = replace(SETTINGS, first_shot="empty", max_shots=2)
    render_story(story, models, settings, tmp_path, progress=Progress(2, enabled=False))
    per_shot = [("low", "cpu"), ("high", "cpu"), ("high", "cpu"), ("low", "cpu")]  # (other off, this on) x 2
    assert moves == per_shot * 2
    render_story(story, tiny_models(), settings, tmp_path / "plain", progress=Progress(2, enabled=False))
    for label in ("01_01", "01_02"):
        assert torch.equal(latents(tmp_path, label), latents(tmp_path / "plain", label))


def test_memory_sheet_labels_are_the_memory_frames_positions(tmp_path, monkeypatch):
    """memory/SS_NN.png labels each memory frame with ITS position: the shot's positions are
    [identity -512 | memory | target], so the identity slot and the target are left out (they used to
    shift every label one slot late)."""
    import memento_core.runner as runner_module

    seen = []
    real_rows = runner_module.selection_rows

    def spy(bank, used, selection, decode, positions=None):
        seen.append((used, positions))
        return real_rows(bank, used, selection, decode, positions)

    monkeypatch.setattr(runner_module, "selection_rows", spy)
    settings = replace(SETTINGS, steps=2, max_shots=2)
    log = render_story(
        load_story(EXAMPLE), tiny_models(), settings, tmp_path, progress=Progress(2, enabled=False)
    )
    shot = log["shots"][1]
    used, positions = seen[-1]
    for pool in ("high", "low"):
        ids = shot["memory_ids"][pool]
        assert used[pool] == ids and len(ids) > 0
        assert shot["positions"][pool][0] == -512  # the identity slot comes first in the shot
        assert positions[pool] == shot["positions"][pool][1 : 1 + len(ids)]
        assert -512 not in positions[pool]
