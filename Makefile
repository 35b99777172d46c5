# Commands for a newcomer on a fresh clone:
#   make run    set up .venv and run the whole pipeline on the embedded sample data
#   make predict  and then predict: the main job's bundle on a few test images
#   make test   set up .venv and the Debian packages the ARM and stack tests need, run the quick test suite (what CI runs)
#   make stack-up / stack-down / stack-status   the shared services (MLflow on PostgreSQL, Prefect, RPC tracker)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup system-deps emulated-pi run run-full repro predict test test-slow lint stack-up stack-down stack-status deploy ui-check exp

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the local CPU build: any looser spec makes pip fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Debian packages (needs root or sudo): the aarch64 cross-linker for Raspberry Pi libraries; for the
# emulated Pi (infra/rpc/emulated-pi.sh) qemu-user-static and dpkg's arm64 architecture, whose package
# lists let apt-get download Debian's arm64 python3.11; PostgreSQL 15 for the service stack (infra/stack.sh
# runs its own cluster from /usr/lib/postgresql/15/bin).
system-deps:
	@{ command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64-static && test -x /usr/lib/postgresql/15/bin/initdb \
	   && dpkg --print-foreign-architectures | grep -qx arm64 && apt-cache show python3.11:arm64; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO dpkg --add-architecture arm64 && \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user-static postgresql-15; }

# The service stack on loopback (infra/README.md): PostgreSQL + MLflow server, Prefect server + a worker on
# the pfp-process pool, the RPC tracker + the emulated Pi (STACK_BOARD=none: without it). Then: source .stack/env
stack-up: setup system-deps
	infra/stack.sh up

stack-down:
	infra/stack.sh down

stack-status:
	infra/stack.sh status

# Scheduled retraining: deploy the flow on the stack's Prefect server (pool pfp-process, README: Scheduled
# retraining); the stack's worker runs it. CRON=... WORKDIR=... change the schedule and the workspace.
CRON ?= 0 3 * * 0
WORKDIR ?= runs/scheduled
deploy: setup
	@test -n "$$PREFECT_API_URL" || { echo "PREFECT_API_URL is not set: make stack-up, then source .stack/env" >&2; exit 1; }
	$(BIN)/python -m flows.deployment --cron "$(CRON)" --workdir $(WORKDIR)

# A DVC experiment in the main job's workspace (after make run): make exp ARGS="-S train.mlp.epochs=5";
# then: cd runs/embedded && dvc exp show, dvc plots diff
exp: setup
	@test -d runs/embedded/.git || { echo "no workspace at runs/embedded: run 'make run' first" >&2; exit 1; }
	cd runs/embedded && PATH="$(CURDIR)/$(BIN):$$PATH" $(CURDIR)/$(BIN)/dvc exp run $(ARGS)

# The MLflow UI check (docs/mlflow-ui.md): Debian's Chromium driven by Playwright, a screenshot of the runs table
ui-check: setup
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	$(BIN)/pip install --quiet -e '.[dev,ui-check]'
	$(BIN)/python scripts/mlflow_ui_screenshot.py --output mlflow-ui-runs.png

# The emulated Raspberry Pi's runtime folder (cached in ~/.cache/pfp/emulated-pi) and its smoke check;
# start it with infra/rpc/emulated-pi.sh start (see infra/rpc/README.md).
emulated-pi: setup system-deps
	HOST_PYTHON=$(BIN)/python infra/rpc/emulated-pi.sh check

run: setup
	$(BIN)/python -m flows.pipeline --workdir runs/embedded --params configs/embedded.yaml

# And then predict: the main job's LeNet bundle on a few MNIST test digits and Fashion-MNIST images
# (pfp predict takes any bundle folder or archive and IDX, .npy or PNG files; see README, Deploy).
PREDICT_BUNDLE ?= runs/embedded/models/lenet/bundle/host
predict: setup
	@test -f $(PREDICT_BUNDLE)/bundle.json || { echo "no bundle at $(PREDICT_BUNDLE): run 'make run' first" >&2; exit 1; }
	$(BIN)/pfp predict $(PREDICT_BUNDLE) data/embedded/mnist/t10k-images-idx3-ubyte.gz --limit 5
	$(BIN)/pfp predict $(PREDICT_BUNDLE) data/embedded/fashion-mnist/t10k-images-idx3-ubyte.gz --limit 5

# The recorded full run: params.yaml on ../shared/data, in this repo's DVC workspace.
run-full: setup
	$(BIN)/python -m flows.pipeline

# DVC alone on params.yaml (stage commands say `python`: the venv's must come first on PATH).
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# the ARM tests need the cross-linker and qemu: installed here (or a clear failure), never skipped.
# TEST_WORKERS pytest-xdist workers (most tests are single-threaded and many wait on servers); a worker takes a
# whole module, or a whole folder whose tests share a costly session fixture (tests/conftest.py: xdist_group)
TEST_WORKERS ?= 2
test: setup system-deps
	$(BIN)/ruff check src tasks flows tests
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) -m 'not slow and not quiet_host'
	$(BIN)/python -m pytest -q -m 'quiet_host and not slow'

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tasks flows tests
