"""``python -m memento_core.story``: the story runner's command line (:mod:`memento_core.cli`)."""

from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main())
