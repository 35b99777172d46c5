"""Shared entry-point plumbing for the stage scripts in ``tasks/``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pfp.config import ConfigError, PipelineParams, load_params
from pfp.data.idx import DataError
from pfp.io import WriteFailed

# Errors a user can fix from the message alone (PosteriorError is a DataError; WriteFailed: a full disk):
# no traceback, exit code 2.
USER_ERRORS = (ConfigError, DataError, WriteFailed)

# Where each stage writes; dvc.yaml names the same paths.
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")


def posterior_path(model: str) -> Path:
    return MODELS_DIR / model / "posterior.npz"


def pfp_params_path(model: str) -> Path:
    return MODELS_DIR / model / "pfp.npz"


def calibration_path(model: str) -> Path:
    return MODELS_DIR / model / "calibration.json"


def tvm_dir(model: str) -> Path:
    """Compiled libraries and tuning databases of the tune stage."""
    return MODELS_DIR / model / "tvm"


def bundle_dir(model: str, target: str) -> Path:
    """The deployable bundle of ``model`` for ``target`` (the bundle stage's output, one folder per target)."""
    return MODELS_DIR / model / "bundle" / str(target)


def run_stage(main: Callable[[PipelineParams, list[str]], None], params_path: str = "params.yaml") -> None:
    """Load params, run ``main(params, argv)``; user errors print one clear line and exit 2."""
    try:
        params = load_params(params_path)
        main(params, sys.argv[1:])
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def model_argument(params: PipelineParams, argv: list[str]) -> str:
    if len(argv) != 1:
        raise ConfigError("usage: python -m tasks.<stage> MODEL")
    model = argv[0]
    if model not in {m.value for m in params.models}:
        raise ConfigError(f"models: {model!r} is not one of the configured models {[m.value for m in params.models]}")
    return model
