"""The bad-input matrix: command line, story scripts, memory banks and checkpoints (nodes: in
``test_bad_inputs_nodes``). Every case asserts the exact outcome: the exit code or error type, a message
that names the input (file, field or option) and says what to do, and, where a run is refused, that
nothing on disk changed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memento_core import media
from memento_core.cli import cli
from memento_core.errors import CheckpointError
from memento_core.loading import load_dit
from memento_core.media import read_mp4
from memento_core.memory import MemoryBank, MemoryBankError, load_bank, save_bank
from memento_core.real_models import ModelConfigError, load_model_config
from memento_core.story import StoryError, parse_story

SMALL = ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "-q"]
STORY = {
    "story_name": "two shots",
    "reconstruct_target": "[Person A] a sailor",
    "scenes": [{"scene_num": 1, "video_prompts": ["a harbour", "a boat"], "cut": [True, False]}],
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> the sha256 of its bytes (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def story(tmp_path: Path) -> Path:
    path = tmp_path / "story.json"
    path.write_text(json.dumps(STORY))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-shot run on the tiny models (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("finished")
    story = root / "story.json"
    story.write_text(json.dumps(STORY))
    assert cli([str(story), "--out", str(root / "run"), *SMALL]) == 0
    return story, root / "run"


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    story, run = finished
    shutil.copytree(run, tmp_path / "run")
    shutil.copy(story, tmp_path / "story.json")
    return tmp_path / "story.json", tmp_path / "run"


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit 2 and one error line holding every needle, no traceback."""
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])
    return err[-1]


# --------------------------------------------------------------------- command line: values given


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--frames", "0"], ["frames: expected a count of the form 4n+1", "got 0"]),
        (["--frames", "10"], ["frames: expected a count of the form 4n+1", "got 10"]),
        (["--frames", "5"], ["frames: need at least 9 frames per shot"]),
        (["--width", "0"], ["size: width and height must be positive multiples of 16", "0x32"]),
        (["--height", "30"], ["size: width and height must be positive multiples of 16", "32x30"]),
        (["--width", "4112"], ["size: at most 4096x4096 px"]),
        (["--steps", "0"], ["steps: expected 1 to 1000", "got 0"]),
        (["--steps", "1000000"], ["steps: expected 1 to 1000", "got 1000000"]),
        (["--shots", "0"], ["max_shots: must be >= 1, got 0"]),
        (["--memory-capacity", "0"], ["capacity: must be >= 1, got 0"]),
        (["--fix", "-1"], ["fix: must be >= 0, got -1"]),
        (["--seed", "-1"], ["seed: -1 is out of range"]),
        (
            ["--seed", str(2**64 - 1)],
            ["seed: 18446744073709551615 is out of range", "up to +1", "18446744073709551614"],
        ),
        (["--policy", "storymem", "--idt-back-mode"], ["identity_back: an option of Memento's pipeline"]),
    ],
)
def test_command_line_values_are_validated_not_replaced(capsys, tmp_path, story, flags, needles) -> None:
    out = tmp_path / "out"
    refused(capsys, [str(story), "--out", str(out), *SMALL, *flags], *needles)
    assert not out.exists()  # refused before anything was written


def test_the_largest_seed_that_fits_the_story_is_accepted(tmp_path, story) -> None:
    assert cli([str(story), "--out", str(tmp_path / "out"), *SMALL, "--seed", str(2**64 - 2)]) == 0
    log = json.loads((tmp_path / "out" / "story_log.json").read_text())
    assert [s["seed"] for s in log["shots"]] == [2**64 - 2, 2**64 - 1]


# --------------------------------------------------------------------------- command line: files


def test_out_is_a_file(capsys, tmp_path, story) -> None:
    out = tmp_path / "out"
    out.write_text("keep me")
    refused(capsys, [str(story), "--out", str(out), *SMALL], str(out), "is a file, not a folder")
    assert out.read_text() == "keep me"


def test_out_below_a_file(capsys, tmp_path, story) -> None:
    (tmp_path / "file").write_text("x")
    refused(capsys, [str(story), "--out", str(tmp_path / "file" / "run"), *SMALL], "file")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ["no such file"]),
        ("{ not json", ["not valid JSON (line 1"]),
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
        (
            '{"story_name": "x", "scenes": [{"scene_num": ' + "1" * 5000 + "}]}",
            ["not a readable story script"],
        ),
        (
            json.dumps({**STORY, "scenes": [{**STORY["scenes"][0], "scene_num": 10**6}]}),
            ["scenes[0].scene_num", "0 to 9999"],
        ),
        (json.dumps([STORY]), ["expected a JSON object at the top"]),
        (b"\xff\xfe story", ["cannot be read as UTF-8"]),
    ],
)
def test_bad_story_files(capsys, tmp_path, content, needles) -> None:
    path = tmp_path / "story.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    refused(capsys, [str(path), "--out", str(tmp_path / "out"), *SMALL], str(path), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"\xff\xfe{}", ["not UTF-8 text"]),
        (b"[" * 100_000, ["not readable JSON"]),
        (b"[]", ["expected a JSON object"]),
        (b'{"vae": "x"}', ["missing field(s)"]),
        (b'{"dtype": "int8", "lora": 1}', ["unknown field(s) ['lora']"]),
    ],
)
def test_bad_model_configs(capsys, tmp_path, story, content, needles) -> None:
    config = tmp_path / "models.json"
    config.write_bytes(content)
    refused(
        capsys,
        [str(story), "--models", str(config), "--out", str(tmp_path / "out"), *SMALL],
        str(config),
        *needles,
    )


def test_model_config_run_options_are_checked(tmp_path) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"run": {"threads": 4}}))
    with pytest.raises(ModelConfigError, match=r"field 'run': unknown option\(s\) \['threads'\]"):
        load_model_config(config)


# ------------------------------------------------------------------------- command line: run folders


@pytest.mark.parametrize(
    "outputs", [["shots/01_01.mp4"], ["story.mp4"], ["story_log.json"], ["memory_bank.safetensors"]]
)
def test_a_folder_with_any_run_output_is_refused(capsys, tmp_path, story, outputs) -> None:
    out = tmp_path / "out"
    for name in outputs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"an earlier run's " + name.encode())
    before = snapshot(out)
    refused(
        capsys, [str(story), "--out", str(out), *SMALL], "already holds a story run", outputs[0].split("/")[0]
    )
    refused(capsys, [str(story), "--out", str(out), *SMALL, "--resume"], "no state/run.json to resume from")
    assert snapshot(out) == before


def test_a_finished_run_is_refused_without_resume_or_overwrite(capsys, finished, tmp_path) -> None:
    story, run = copy_run(finished, tmp_path)
    before = snapshot(run)
    refused(
        capsys,
        [str(story), "--out", str(run), *SMALL],
        "already holds a story run",
        "--resume",
        "--overwrite",
    )
    refused(capsys, [str(story), "--out", str(run), *SMALL, "--steps", "3", "--resume"], "settings.steps")
    assert snapshot(run) == before


def test_overwrite_removes_the_old_run_so_a_resume_cannot_mix_them(finished, tmp_path) -> None:
    """An interrupted --overwrite followed by --resume gives exactly the new run (never the old frames)."""
    story, run = copy_run(finished, tmp_path)
    (run / "notes.txt").write_text("mine")  # not a run output: kept
    assert cli([str(story), "--out", str(run), *SMALL, "--seed", "9", "--overwrite", "--shots", "1"]) == 0
    assert not (run / "story_log.json").read_text().count('"01_02"')  # the old shot 2 is gone
    assert not (run / "shots" / "01_02.mp4").exists() and (run / "notes.txt").read_text() == "mine"
    assert cli([str(story), "--out", str(run), *SMALL, "--seed", "9", "--resume"]) == 0
    fresh = tmp_path / "fresh"
    assert cli([str(story), "--out", str(fresh), *SMALL, "--seed", "9"]) == 0
    for label in ("01_01", "01_02"):
        assert torch.equal(
            read_mp4(run / "shots" / f"{label}.mp4"), read_mp4(fresh / "shots" / f"{label}.mp4")
        )
    assert [s["seed"] for s in json.loads((run / "story_log.json").read_text())["shots"]] == [9, 10]


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        ("state/run.json", ["run.json (the run's fingerprint) is damaged", "--overwrite"]),
        ("story_log.json", ["story_log.json (the run log) is damaged", "--overwrite"]),
        ("state/shot_01_02.safetensors", ["shot_01_02.safetensors (the state after shot 01_02) is damaged"]),
        ("state/bank_01_02.safetensors", ["bank_01_02.safetensors", "--overwrite"]),
    ],
)
def test_damaged_state_is_named_not_a_traceback(capsys, finished, tmp_path, damage, needles) -> None:
    story, run = copy_run(finished, tmp_path)
    path = run / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    before = snapshot(run)
    refused(capsys, [str(story), "--out", str(run), *SMALL, "--resume"], *needles)
    assert snapshot(run) == before


def test_a_truncated_finished_shot_is_rebuilt_from_the_saved_state(finished, tmp_path) -> None:
    story, run = copy_run(finished, tmp_path)
    good = read_mp4(run / "shots" / "01_02.mp4")
    shot = run / "shots" / "01_02.mp4"
    shot.write_bytes(shot.read_bytes()[:200])
    assert cli([str(story), "--out", str(run), *SMALL, "--resume"]) == 0
    rebuilt = read_mp4(shot)
    # The same latent decoded and encoded again: equal up to float rounding of the decode, which H.264
    # can amplify; far closer to the original than another shot is.
    other = read_mp4(run / "shots" / "01_01.mp4")
    diff = (rebuilt.float() - good.float()).abs().mean()
    assert rebuilt.shape == good.shape and diff < 0.25 * (other.float() - good.float()).abs().mean()
    assert read_mp4(run / "story.mp4").shape[0] == 18


def test_a_folder_being_rendered_is_refused(capsys, tmp_path, story) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "run.lock", "a+b") as other:  # another process holds the run's lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(capsys, [str(story), "--out", str(out), *SMALL], "being rendered by another process")
    assert snapshot(out) == {"run.lock": hashlib.sha256(b"").hexdigest()}
    assert cli([str(story), "--out", str(out), *SMALL]) == 0  # the lock is gone: it renders


def test_disk_full_is_one_line(capsys, monkeypatch, tmp_path, story) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shots" / "01_01.mp4"))

    monkeypatch.setattr("memento_core.runner.write_mp4", full)
    refused(
        capsys,
        [str(story), "--out", str(tmp_path / "out"), *SMALL],
        "01_01.mp4",
        "the disk is full",
        "--resume",
    )


def test_an_unexpected_error_is_one_line_and_v_shows_the_traceback(
    capsys, monkeypatch, tmp_path, story
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("memento_core.runner.write_mp4", boom)
    refused(capsys, [str(story), "--out", str(tmp_path / "a"), *SMALL], "unexpected RuntimeError: boom", "-v")
    assert cli([str(story), "--out", str(tmp_path / "b"), *SMALL, "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == (
        "error: unexpected RuntimeError: boom (run with -v for the traceback, and please report it)"
    )


# -------------------------------------------------------------------------------------- story scripts


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"story_name": ""}, "field 'story_name': expected a non-empty string"),
        ({"scenes": []}, "field 'scenes': expected a non-empty list"),
        (
            {"scenes": [{**STORY["scenes"][0], "cut": [True, False, True]}]},
            r"scenes\[0\].cut': has 3 entries",
        ),
        ({"scenes": [STORY["scenes"][0], STORY["scenes"][0]]}, r"scenes\[1\].scene_num': scene 1 is already"),
        (
            {"scenes": [{**STORY["scenes"][0], "cut": [True, "no"]}]},
            r"scenes\[0\].cut\[1\]': expected true or false",
        ),
        (
            {"scenes": [{**STORY["scenes"][0], "video_prompts": ["a", ""]}]},
            r"video_prompts\[1\]': expected a non-empty",
        ),
        ({"reconstruct_target": 3}, "field 'reconstruct_target'"),
        ({"scenes": [{**STORY["scenes"][0], "scene_num": -1}]}, r"scenes\[0\].scene_num'"),
    ],
)
def test_story_script_fields_are_named(change, match) -> None:
    with pytest.raises(StoryError, match=match):
        parse_story({**STORY, **change}, source="s.json")


# ------------------------------------------------------------------------------------------ banks


def bank_with(tmp_path: Path, **frame_overrides) -> Path:
    good = save_bank(
        MemoryBank.empty().with_shot(torch.randn(8, 16, 4, 4), shot_index=1), tmp_path / "good.safetensors"
    )
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        header = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for key, value in frame_overrides.items():
        tensors[key] = value
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


def test_bank_with_nan_latents(tmp_path) -> None:
    latent = torch.zeros(16, 4, 4)
    latent[0, 0, 0] = float("nan")
    with pytest.raises(MemoryBankError, match=r"bad\.safetensors.*NaN or infinite"):
        load_bank(bank_with(tmp_path, **{"latent.2": latent}))


def test_bank_with_infinite_latents(tmp_path) -> None:
    with pytest.raises(MemoryBankError, match="NaN or infinite"):
        load_bank(bank_with(tmp_path, **{"latent.0": torch.full((16, 4, 4), float("inf"))}))


def test_bank_with_a_latent_of_another_shape(tmp_path) -> None:
    with pytest.raises(Exception, match=r"expected one latent frame \[16, h, w\]"):
        load_bank(bank_with(tmp_path, **{"latent.0": torch.zeros(15, 4, 4)}))


def test_bank_with_a_huge_header_is_refused_without_reading_it(tmp_path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 99_900_000))
        fh.truncate(8 + 99_900_000 + 16)  # sparse: nothing is read
    with pytest.raises(MemoryBankError, match=r"huge\.safetensors.*more than any real checkpoint.s"):
        load_bank(path)


def test_bank_with_deeply_nested_metadata(tmp_path) -> None:
    path = tmp_path / "nested.safetensors"
    save_file({"latent.0": torch.zeros(16, 4, 4)}, str(path), metadata={"memento_bank": "[" * 100_000})
    with pytest.raises(MemoryBankError, match=r"nested\.safetensors: its metadata is not valid JSON"):
        load_bank(path)


def test_truncated_bank(tmp_path) -> None:
    good = save_bank(
        MemoryBank.empty().with_shot(torch.randn(8, 16, 4, 4), shot_index=1), tmp_path / "b.safetensors"
    )
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(MemoryBankError, match=r"b\.safetensors is not a readable \.safetensors file"):
        load_bank(good)


# ------------------------------------------------------------------------------------- checkpoints


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "needles"),
    [
        (
            {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}},
            b"\0" * 32,
            ["tensor 'w' (F32 [4, 4]) needs 64 bytes but its byte range holds 32"],
        ),
        (
            {"w": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}},
            b"\0" * 16,
            ["tensor 'w' has dtype 'C64', which this loader does not read"],
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            ["tensor 'w' has a negative shape or byte range"],
        ),
        (
            {"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}},
            b"\0" * 16,
            ["truncated: the header describes"],
        ),
        (
            {"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 4]}},
            b"\0" * 4,
            ["malformed header entry for tensor 'w'"],
        ),
    ],
)
def test_checkpoint_headers_are_checked(tmp_path, header, data, needles) -> None:
    path = raw_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as info:
        load_dit(path)
    for needle in needles:
        assert needle in str(info.value) and str(path) in str(info.value)


def test_checkpoint_with_a_huge_header_is_refused_at_once(tmp_path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 99_900_000))
        fh.truncate(8 + 99_900_000 + 16)
    with pytest.raises(
        CheckpointError, match="its header declares 99900000 bytes, more than any real checkpoint's"
    ):
        load_dit(path)


def test_checkpoint_header_not_json_and_empty_file(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="header is not JSON"):
        load_dit(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load_dit(empty)


def test_pickle_checkpoints_name_the_converter(tmp_path) -> None:
    path = tmp_path / "backbone_high_noise.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(
        CheckpointError, match=r"python -m memento_core\.convert .*backbone_high_noise\.safetensors"
    ):
        load_dit(path)


def test_media_probe_names_a_damaged_file(tmp_path) -> None:
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"x\.mp4: not a readable video file"):
        media.probe_frames(bad)
