"""Story consistency (``memento_core.evaluate``): the measures on embeddings whose answer is known by
hand, the frames each shot contributes, a tiny run end to end (``--evaluate``, the evaluate command,
``--compare``), the heatmap's size and labels, and the Story Consistency node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memento_core import evaluate
from memento_core.cli import cli
from memento_core.evaluate import ConsistencyReport, consistency, heatmap, shot_embeddings

SMALL = ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "-q"]
STORY = {
    "story_name": "two rooms",
    "scenes": [
        {
            "scene_num": 1,
            "video_prompts": ["a kitchen", "global caption: x; shot caption: tea"],
            "cut": [True, False],
        },
        {"scene_num": 2, "video_prompts": ["a library"], "cut": [True]},
    ],
}


def test_identical_shots_are_fully_consistent() -> None:
    e = torch.tensor([[3.0, 4.0]]).repeat(4, 1)
    r = consistency(e, ["a", "b", "c", "d"], [1, 1, 2, 2])
    assert r.matrix == [[1.0] * 4] * 4
    assert (r.cross_shot_mean, r.top10_mean, r.within_scene_mean, r.across_scene_mean) == (1.0, 1.0, 1.0, 1.0)


def test_orthogonal_shots_have_zero_similarity() -> None:
    r = consistency(torch.eye(3), ["a", "b", "c"], [1, 2, 3])
    assert r.matrix == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert (r.cross_shot_mean, r.top10_mean, r.across_scene_mean) == (0.0, 0.0, 0.0)
    assert r.within_scene_mean is None  # no two shots share a scene


def test_means_written_out_by_hand() -> None:
    # unit vectors at 0, 60 and 90 degrees: cos = 0.5 (a, b), 0 (a, c), cos 30 (b, c)
    e = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2], [0.0, 1.0]])
    r = consistency(e, ["a", "b", "c"], [1, 1, 2], embedder="hand")
    c30 = 3**0.5 / 2
    assert r.matrix[0][1] == pytest.approx(0.5) and r.matrix[1][2] == pytest.approx(c30)
    # 3 pairs, fewer than 10: the top-10 mean is the mean of all of them
    assert r.cross_shot_mean == pytest.approx((0.5 + 0.0 + c30) / 3)
    assert r.top10_mean == pytest.approx(r.cross_shot_mean)
    assert r.within_scene_mean == pytest.approx(0.5)  # only (a, b) share scene 1
    assert r.across_scene_mean == pytest.approx((0.0 + c30) / 2)
    assert all(r.matrix[i][i] == 1.0 for i in range(3)) and r.embedder == "hand"


def test_top10_takes_the_ten_largest_of_more_pairs() -> None:
    # 6 shots on a circle of angles 0, 10, ..., 50 degrees: 15 pairs, cos of the angle differences
    import math

    angles = [math.radians(10 * k) for k in range(6)]
    e = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    r = consistency(e, [str(k) for k in range(6)])
    diffs = sorted(abs(i - j) * 10 for i in range(6) for j in range(i + 1, 6))
    cos = [math.cos(math.radians(d)) for d in diffs]
    assert r.cross_shot_mean == pytest.approx(sum(cos) / 15)
    assert r.top10_mean == pytest.approx(sum(cos[:10]) / 10)
    assert r.within_scene_mean is None and r.across_scene_mean is None  # no scenes given


def test_shot_embeddings_use_evenly_spaced_frames_and_are_unit() -> None:
    seen: list[list[float]] = []

    def embedder(frames: torch.Tensor) -> torch.Tensor:
        ids = frames[:, 0, 0, 0].tolist()  # each frame carries its index / 100
        seen.append([round(i * 100) for i in ids])
        return torch.stack([torch.tensor([1.0, float(i)]) for i in ids])

    video = torch.arange(81).float().view(81, 1, 1, 1).expand(81, 3, 2, 2) / 100
    out = shot_embeddings([video, video[:5]], embedder)
    assert seen == [[0, 11, 23, 34, 46, 57, 69, 80], [0, 1, 2, 3, 4]]
    assert torch.allclose(out.norm(dim=-1), torch.ones(2))


def test_heatmap_is_bounded_and_labelled() -> None:
    small = consistency(torch.eye(3), ["01_01", "01_02", "02_01"], [1, 1, 2], embedder="e")
    img = heatmap(small)
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] < 400
    background = torch.tensor([18, 18, 22]) / 255
    # every row's label area (left of the cells) holds text pixels
    for i in range(3):
        band = img[62 + i * 56 : 62 + (i + 1) * 56, :60]
        assert ((band - background).abs().sum(-1) > 0.5).any(), i
    big = consistency(torch.randn(300, 8), [f"{k // 100:02d}_{k % 100:02d}" for k in range(300)])
    big_img = heatmap(big)
    assert max(big_img.shape[:2]) <= evaluate.MAX_HEATMAP


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    story = root / "story.json"
    story.write_text(json.dumps(STORY))
    assert cli([str(story), "--out", str(root / "a"), *SMALL, "--evaluate"]) == 0
    assert cli([str(story), "--out", str(root / "b"), *SMALL, "--policy", "storymem"]) == 0
    return root


def test_evaluate_at_the_end_of_a_tiny_run(runs) -> None:
    report = json.loads((runs / "a" / "consistency.json").read_text())
    assert list(report) == [
        "embedder",
        "shots",
        "matrix",
        "cross_shot_mean",
        "top10_mean",
        "within_scene_mean",
        "across_scene_mean",
        "prompt_following",
    ]
    assert report["shots"] == ["01_01", "01_02", "02_01"] and report["embedder"].startswith("tiny")
    m = torch.tensor(report["matrix"])
    assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(3))
    assert report["within_scene_mean"] == pytest.approx(report["matrix"][0][1])  # the one pair in scene 1
    assert report["prompt_following"] is None  # the tiny models have no text tower
    assert (runs / "a" / "consistency.png").is_file()


def test_evaluate_command_is_deterministic_and_compares(runs, capsys, tmp_path) -> None:
    first = (runs / "a" / "consistency.json").read_text()
    assert evaluate.main([str(runs / "a"), "--json", str(tmp_path / "r.json")]) == 0
    assert (runs / "a" / "consistency.json").read_text() == first
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(first)
    assert evaluate.main([str(runs / "a"), "--compare", str(runs / "b")]) == 0
    out = capsys.readouterr().out
    assert "cross-shot mean" in out and "A: " in out and "B: " in out
    assert (runs / "a" / "consistency_compare.png").is_file()


def test_evaluate_refuses_what_it_cannot_measure(tmp_path, capsys) -> None:
    assert evaluate.main([str(tmp_path)]) == 2
    assert "no story_log.json" in capsys.readouterr().err
    run = tmp_path / "real"
    run.mkdir()
    (run / "story_log.json").write_text(json.dumps({"models": {"kind": "real"}, "shots": [{"label": "01_01",
        "scene": 1, "files": {"video": "shots/01_01.mp4"}}]}))  # fmt: skip
    (run / "shots").mkdir()
    from memento_core.media import write_mp4

    write_mp4(torch.zeros(3, 9, 16, 16), run / "shots" / "01_01.mp4")
    assert evaluate.main([str(run)]) == 2
    assert "give --clip WEIGHTS" in capsys.readouterr().err


def test_prompt_following_with_a_clip_text_tower(runs, monkeypatch) -> None:
    """--clip: frames and shot captions through one CLIP model (a small stand-in with both towers)."""

    class Model:
        def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
            return torch.stack([pixels.mean(dim=(1, 2, 3)), torch.ones(pixels.shape[0])], 1)

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[0.0, 1.0]]).repeat(tokens.shape[0], 1)

    class Embedder:
        model, device = Model(), torch.device("cpu")

        def __call__(self, frames: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.model.encode_image(frames), dim=-1)

    monkeypatch.setattr(
        "memento_core.keyframes.ClipEmbedder.create", staticmethod(lambda *a, **k: Embedder())
    )
    report = evaluate.evaluate_run(
        runs / "a", Embedder(), "stand-in", evaluate.clip_text_scorer(Embedder()), write=False
    )
    assert report.prompt_following is not None and len(report.prompt_following) == 3
    frames = evaluate.read_run(runs / "a").videos[1]
    picked = frames[[0, 1, 2, 3, 5, 6, 7, 8]]  # 8 evenly spaced of 9 frames
    expected = float(Embedder()(picked)[:, 1].mean())  # cos with the text direction (0, 1)
    assert report.prompt_following[1] == pytest.approx(expected, abs=1e-6)
    assert evaluate.shot_caption(STORY["scenes"][0]["video_prompts"][1]) == "tea"
    assert isinstance(report, ConsistencyReport)


def test_story_consistency_node(comfy_host, tiny, runs) -> None:
    from comfy_api.latest import InputImpl

    node = comfy_host.pack_submodule("nodes.evaluate_nodes").MementoStoryConsistency
    cv = comfy_host.nodes.CLIPVisionLoader().load_clip(
        __import__("tiny_comfy_models").TINY_FILES["clip_vision"]
    )[0]
    image, text = node.execute(cv, folder=str(runs / "a")).result
    assert (
        image.shape[0] == 1 and image.shape[-1] == 3 and "3 shots" in text and "ComfyUI CLIP vision" in text
    )
    video = InputImpl.VideoFromFile(str(runs / "a" / "story.mp4"))
    _, text = node.execute(cv, story=video, frames_per_shot=9).result
    assert "3 shots" in text  # 27 frames in shots of 9
    with pytest.raises(ValueError, match=r"Story Consistency: 'folder' .* is not a story run folder"):
        node.execute(cv, folder=str(runs))
    with pytest.raises(ValueError, match="connect a 'story' video or give a run 'folder'"):
        node.execute(cv)
    assert Path(runs / "a" / "consistency.json").is_file()
