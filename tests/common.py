"""Shared test helpers (not a test module: no test imports another test module)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pfp.bnn import Posterior, site_names
from pfp.data.dirty_mnist import SPLIT_KEYS, save_prepared
from pfp.spec import build_spec


def require_command(command: str, package: str) -> str:
    """The path of ``command``; a test that needs it fails (never skips) when it is missing."""
    path = shutil.which(command)
    if path is None:
        pytest.fail(f"{command} not found: this test needs the Debian package {package} "
                    "(run `make system-deps`, which installs it; `make test` does so first)", pytrace=False)
    return path


def random_posterior(model: str, seed: int = 0) -> Posterior:
    """A posterior of a built-in model: locs ~ 0.1 N(0, 1), scales in [0.01, 0.03)."""
    spec = build_spec(model)
    g = torch.Generator().manual_seed(seed)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 0.1 * torch.randn(shape, generator=g)
            scale[site] = 0.01 + 0.02 * torch.rand(shape, generator=g)
    return Posterior(spec=spec, loc=loc, scale=scale)


def predictor_options(batch_size: int) -> dict:
    """The options the backend tests give ``pfp.backends.base.create`` (any backend)."""
    return {"batch_size": batch_size, "variance_scale": 0.7, "svi_samples": 3, "seed": 2}


def write_prepared(root: Path, *, per_split: int = 12, labels_per_image: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A small prepared data set under ``root/data/prepared`` (random images, the prepare stage's layout)."""
    rng = np.random.default_rng(seed)
    arrays, counts = {}, {}
    for key in SPLIT_KEYS:
        arrays[f"{key}_x"] = rng.integers(0, 256, (per_split, 28, 28), dtype=np.uint8)
        shape = (per_split, labels_per_image) if key.startswith("ambiguous") else (per_split,)
        arrays[f"{key}_y"] = rng.integers(0, 10, shape).astype(np.int64)
        counts[key] = per_split
    manifest = {"seed": seed, "counts": counts, "ambiguous": {"source": "test"}, "data_hash": "0" * 64}
    save_prepared(Path(root) / "data" / "prepared", arrays, manifest)
    return arrays


def write_model_artifacts(workspace: Path, model: str, *, variance_scale: float = 1.0, seed: int = 0) -> Posterior:
    """The train, convert and calibrate stages' outputs for ``model`` under ``workspace/models/MODEL``."""
    from pfp.artifacts.calibration import save_calibration
    from pfp.artifacts.pfp_params import save_pfp_params
    from pfp.artifacts.posterior import save_posterior
    from pfp.calibrate import CalibrationResult
    from pfp.convert import convert_posterior

    posterior = random_posterior(model, seed)
    folder = Path(workspace) / "models" / model
    folder.mkdir(parents=True, exist_ok=True)
    save_posterior(posterior, folder / "posterior.npz")
    save_pfp_params(convert_posterior(posterior), folder / "pfp.npz", parent=folder / "posterior.npz")
    calibration = CalibrationResult(variance_scale=variance_scale, temperature=1.0, nll_before=1.0, nll_after=1.0,
                                    ece_before=0.1, ece_after=0.1)
    save_calibration(calibration, folder / "calibration.json", model=model, parent=folder / "pfp.npz")
    metrics = Path(workspace) / "metrics"
    metrics.mkdir(exist_ok=True)
    (metrics / f"train_{model}.json").write_text(json.dumps({"elbo_loss": [2.0, 1.5, 1.25], "final_elbo_loss": 1.25, "epochs": 3}))
    return posterior


def npz_header(path) -> dict:
    """The artifact header of an npz file, as a dict."""
    with np.load(path) as archive:
        return json.loads(str(archive["artifact"]))


def refusal(error_type, call, *fragments) -> str:
    """The message of the ``error_type`` ``call()`` raises (an ArtifactError, a DataError), checked for ``fragments``."""
    from pfp.artifacts.header import ArtifactError
    from pfp.data.idx import DataError

    with pytest.raises(error_type) as info:
        call()
    assert isinstance(info.value, ArtifactError) and isinstance(info.value, DataError)  # exit code 2 in the stages
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def make_bundle(folder: Path, model: str = "mlp", *, target: str = "host", batch_sizes=(1, 4), temperature: float = 1.3,
                variance_scale: float = 0.7, seed: int = 0, threshold: float | None = None, head_draws: int = 64):
    """A small bundle (``pfp.bundle.build_bundle``) of a random posterior, hand schedules; returns the BuiltBundle.

    Host bundles choose their OOD threshold on 40 random validation images unless ``threshold``
    is given; a board's bundle (it does not run here) takes ``threshold`` (default 0.1).
    """
    from pfp.bundle import build_bundle
    from pfp.convert import convert_posterior

    pfp_model = convert_posterior(random_posterior(model, seed))
    validation = None
    if threshold is None and target == "host":
        validation = np.random.default_rng(seed).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    elif threshold is None:
        threshold = 0.1
    return build_bundle(pfp_model, folder, target=target, batch_sizes=batch_sizes, temperature=temperature,
                        variance_scale=variance_scale, head_draw_count=head_draws, seed=seed,
                        validation_images=validation, threshold=threshold)


def assert_served_predictions(predictions: dict, expected: dict) -> None:
    """The endpoint's ``predictions`` equal the runtime predictor's (``expected``: ``Prediction.to_dict()``)."""
    from pfp.mlflow_model import OUTPUTS

    assert set(predictions) == set(OUTPUTS)
    for name in OUTPUTS:
        got, want = np.asarray(predictions[name]), expected[name]
        assert got.shape == want.shape, name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
