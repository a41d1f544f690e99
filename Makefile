# ComfyUI-Memento. `make test` and `make demo` do all set-up on a fresh machine (scripts/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo workflows lint format bench bench-gpu clean-cache

setup:
	@bash scripts/bootstrap.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Renders a story: the built-in tiny models by default, real weights when MEMENTO_MODELS names a model
# config (README "Real models"). Override STORY, DEMO_OUT or DEMO_ARGS (e.g. DEMO_ARGS="--resume").
STORY ?= example_stories/lighthouse_keeper.json
DEMO_OUT ?= output/demo
DEMO_ARGS ?= --overwrite
demo: setup
	$(PY) -m memento_core.story $(STORY) --out $(DEMO_OUT) $(DEMO_ARGS)

# Regenerates example_workflows/*.json and thumbnails from scripts/make_example_workflows.py.
workflows: setup
	$(PY) scripts/make_example_workflows.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	PYTHONPATH=. $(PY) bench/bench_memory_forward.py
	PYTHONPATH=. $(PY) bench/bench_lora_merge.py
	PYTHONPATH=. $(PY) bench/bench_load.py

# The GPU benchmark (issue 14): real A14B shapes, random weights made on the GPU; `--tiny` on a CPU.
bench-gpu: setup
	PYTHONPATH=. $(PY) bench/bench_gpu.py $(BENCH_ARGS)

clean-cache:
	rm -rf "$${MEMENTO_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/comfyui-memento}" .venv .comfyui
