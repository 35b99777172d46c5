# Two commands for a newcomer on a fresh clone:
#   make run    set up .venv and run the whole pipeline on the embedded sample data
#   make test   set up .venv and run the quick test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup system-deps run run-full repro test test-slow lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the local CPU build: any looser spec makes pip fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Debian packages: the aarch64 cross-linker for Raspberry Pi libraries (needs root or sudo).
system-deps:
	@command -v aarch64-linux-gnu-gcc >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc-aarch64-linux-gnu; }

run: setup
	$(BIN)/python -m flows.pipeline --workdir runs/embedded --params configs/embedded.yaml

# The recorded full run: params.yaml on ../shared/data, in this repo's DVC workspace.
run-full: setup
	$(BIN)/python -m flows.pipeline

# DVC alone on params.yaml (stage commands say `python`: the venv's must come first on PATH).
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/ruff check src tasks flows tests
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tasks flows tests
