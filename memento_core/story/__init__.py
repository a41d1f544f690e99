"""Story scripts (SPEC 7): ``load_story`` / ``parse_story`` -> :class:`Story` (see :mod:`.script`).

``python -m memento_core.story STORY.json --out DIR`` renders one (:mod:`memento_core.cli`).
"""

from .script import Story, StoryError, StoryShot, load_story, parse_story

__all__ = ["Story", "StoryError", "StoryShot", "load_story", "parse_story"]
