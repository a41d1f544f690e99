# ComfyUI-Memento. `make test` and `make demo` do all set-up on a fresh machine (scripts/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-comfy-latest demo workflows lint format bench bench-gpu clean-cache

setup:
	@bash scripts/bootstrap.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that run ComfyUI (in process and as a server), against another ComfyUI tree than CI's 0.3.75,
# e.g. a current one (README "Testing against a current ComfyUI"):
#   make test-comfy-latest COMFYUI_PATH=/path/to/ComfyUI COMFY_EXTRA_PATH=/path/to/extra-deps
# COMFYUI_PATH: the ComfyUI tree (GPL: keep it outside the repository). COMFY_EXTRA_PATH (optional): a
# folder of the Python packages that tree needs beyond the dev venv (`pip install --target`), put on
# PYTHONPATH for the tests and the test server. Without a ComfyUI tree at COMFYUI_PATH this says how to get
# one and exits 0 (skipped).
COMFY_EXTRA_PATH ?=
COMFY_TESTS = $(shell grep -lE 'comfy_host|comfy_server|from test_server_nodes import' tests/test_*.py)
test-comfy-latest:
	@if [ -z "$(COMFYUI_PATH)" ] || [ ! -f "$(COMFYUI_PATH)/main.py" ] || [ ! -f "$(COMFYUI_PATH)/nodes.py" ] \
	   || [ ! -f "$(COMFYUI_PATH)/execution.py" ] || [ ! -f "$(COMFYUI_PATH)/folder_paths.py" ] \
	   || [ ! -d "$(COMFYUI_PATH)/comfy" ]; then \
	  echo "test-comfy-latest: skipped: COMFYUI_PATH$(if $(COMFYUI_PATH), ($(COMFYUI_PATH)) is not a ComfyUI tree, is not set)."; \
	  echo "  Export a current ComfyUI outside the repository (README \"Testing against a current ComfyUI\"), put"; \
	  echo "  the packages it needs beyond .venv into a folder (pip install --target), then run:"; \
	  echo "  make test-comfy-latest COMFYUI_PATH=/path/to/ComfyUI COMFY_EXTRA_PATH=/path/to/extra-deps"; \
	  exit 0; \
	fi; \
	bash scripts/bootstrap.sh && \
	echo "ComfyUI $$(sed -n 's/^__version__ = //p' "$(COMFYUI_PATH)/comfyui_version.py" 2>/dev/null) at $(COMFYUI_PATH)" && \
	COMFYUI_PATH="$(COMFYUI_PATH)" $(if $(COMFY_EXTRA_PATH),PYTHONPATH="$(COMFY_EXTRA_PATH)") \
	  $(PY) -m pytest $(COMFY_TESTS) $(PYTEST_ARGS)

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
