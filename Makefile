# ComfyUI-Memento. `make test` and `make demo` do all set-up on a fresh machine (scripts/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint format bench clean-cache

setup:
	@bash scripts/bootstrap.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

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

clean-cache:
	rm -rf "$${MEMENTO_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/comfyui-memento}" .venv .comfyui
