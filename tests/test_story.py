"""Story scripts (SPEC 7): the 15 showcase scripts parse; malformed scripts name the file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memento_core import load_story
from memento_core.story import StoryError, parse_story

STORIES = Path(os.environ.get("MEMENTO_STORIES", Path(__file__).resolve().parents[2] / "shared" / "stories"))
EXAMPLE = Path(__file__).resolve().parents[1] / "example_stories" / "lighthouse_keeper.json"

G = "global caption: [Person A]: a tall woman in a red coat; shot caption: "
GOOD = {
    "story_name": "Two scenes",
    "story_overview": "x",
    "reconstruct_target": "[Person A] a tall woman in a red coat",
    "scenes": [
        {"scene_num": 1, "video_prompts": [G + "She walks.", G + "She stops."], "cut": [True, False]},
        {"scene_num": 2, "video_prompts": ["A plain prompt without markers."], "cut": [True]},
    ],
}


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"story scripts not found at {STORIES}")
def test_all_showcase_scripts_parse():
    files = sorted(STORIES.glob("*.json"))
    assert len(files) == 15
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        story = load_story(f)
        prompts = [p for s in raw["scenes"] for p in s["video_prompts"]]
        assert [s.prompt for s in story.shots] == [p.strip() for p in prompts]
        assert story.reconstruct_target == (raw.get("reconstruct_target") or None)  # "" means none
        assert [s.number for s in story.shots] == list(range(len(prompts)))
        for shot in story.shots:
            assert "shot caption:" not in shot.global_caption
            # empty only where the script's global caption is empty (13_titanic opens that way)
            assert bool(shot.global_caption) != shot.prompt.startswith("global caption: ; shot caption:")
            assert not shot.global_caption.endswith(";")
        firsts = [s for s in story.shots if s.index_in_scene == 0]
        assert len(firsts) == len(raw["scenes"]) and all(s.cut for s in firsts)
        # the scripts' own flags, where given
        for scene in raw["scenes"]:
            got = [s.cut for s in story.shots if s.scene == scene["scene_num"]]
            assert got[: len(scene["cut"])] == scene["cut"]


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"story scripts not found at {STORIES}")
def test_short_cut_list_is_tolerated_and_reported():
    story = load_story(STORIES / "6_santa.json")
    scene4 = [s for s in story.shots if s.scene == 4]
    assert [s.cut for s in scene4] == [True, True, True]
    assert len(story.warnings) == 1 and "scenes[3].cut" in story.warnings[0]


def test_fields_of_a_parsed_story(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(GOOD), encoding="utf-8")
    story = load_story(path)
    assert story.name == "Two scenes" and story.source == str(path)
    assert story.reconstruct_target == "[Person A] a tall woman in a red coat"
    assert [(s.scene, s.index_in_scene, s.cut, s.label) for s in story.shots] == [
        (1, 0, True, "01_01"),
        (1, 1, False, "01_02"),
        (2, 0, True, "02_01"),
    ]
    # SPEC 4.7 rule, by hand: text between the markers, stripped, trailing ';' removed
    assert story.shots[0].global_caption == "[Person A]: a tall woman in a red coat"
    assert story.shots[2].global_caption == "A plain prompt without markers."
    assert parse_story(story.to_dict()).shots == story.shots  # round trip
    assert load_story(EXAMPLE).shots[1].cut is False


def _broken(**change):
    data = json.loads(json.dumps(GOOD))
    for dotted, value in change.items():
        *path, last = dotted.split("__")
        node = data
        for p in path:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"story_name": KeyError}, "'story_name'"),
        ({"story_name": 3}, "'story_name'"),
        ({"scenes": []}, "'scenes'"),
        ({"scenes__1": "scene two"}, "'scenes[1]'"),
        ({"scenes__0__scene_num": "1"}, "'scenes[0].scene_num'"),
        ({"scenes__1__scene_num": 1}, "'scenes[1].scene_num'"),
        ({"scenes__0__video_prompts": "one prompt"}, "'scenes[0].video_prompts'"),
        ({"scenes__0__video_prompts__1": ""}, "'scenes[0].video_prompts[1]'"),
        ({"scenes__1__cut": KeyError}, "'scenes[1].cut'"),
        ({"scenes__0__cut__1": "no"}, "'scenes[0].cut[1]'"),
        ({"scenes__0__cut": [True, False, True]}, "'scenes[0].cut'"),
        ({"reconstruct_target": {"A": "x"}}, "'reconstruct_target'"),
        ({"story_overview": 5}, "'story_overview'"),
    ],
)
def test_malformed_script_names_file_and_field(tmp_path, change, field):
    path = tmp_path / "bad_story.json"
    path.write_text(json.dumps(_broken(**change)), encoding="utf-8")
    with pytest.raises(StoryError) as err:
        load_story(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(StoryError, match="no such file"):
        load_story(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"story_name": "x",\n "scenes": [}', encoding="utf-8")
    with pytest.raises(StoryError, match=r"bad\.json: not valid JSON \(line 2"):
        load_story(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(StoryError, match="expected a JSON object"):
        load_story(bad)
    assert isinstance(StoryError("x"), ValueError)  # readable errors are ValueErrors (ComfyUI shows them)
