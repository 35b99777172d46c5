"""Shared test helpers (not a test module): random posteriors and a stage workspace on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pfp.bnn import Posterior, site_names
from pfp.convert import convert_posterior
from pfp.spec import build_spec


def random_posterior(model: str, seed: int = 0) -> Posterior:
    spec = build_spec(model)
    g = torch.Generator().manual_seed(seed)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 0.1 * torch.randn(shape, generator=g)
            scale[site] = 0.01 + 0.02 * torch.rand(shape, generator=g)
    return Posterior(spec=spec, loc=loc, scale=scale)


def write_model_artifacts(workspace: Path, model: str, *, variance_scale: float = 1.0, seed: int = 0) -> Posterior:
    """The train, convert and calibrate stages' outputs for ``model`` under ``workspace/models/MODEL``."""
    posterior = random_posterior(model, seed)
    folder = workspace / "models" / model
    folder.mkdir(parents=True, exist_ok=True)
    posterior.save(folder / "posterior.npz")
    convert_posterior(posterior).save(folder / "pfp.npz")
    (folder / "calibration.json").write_text(json.dumps({
        "variance_scale": variance_scale, "temperature": 1.0, "nll_before": 1.0, "nll_after": 1.0,
        "ece_before": 0.1, "ece_after": 0.1}))
    return posterior


def write_prepared(workspace: Path, images: int = 12, seed: int = 0) -> None:
    """A tiny data/prepared/dirty_mnist.npz (random images, as the prepare stage lays it out)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key in ("mnist_train", "mnist_val", "mnist_test", "ambiguous_train", "ambiguous_val", "ambiguous_test",
                "ood_test"):
        arrays[f"{key}_x"] = rng.integers(0, 256, size=(images, 28, 28), dtype=np.uint8)
        labels = (images, 3) if key.startswith("ambiguous") else (images,)
        arrays[f"{key}_y"] = rng.integers(0, 10, size=labels).astype(np.int64)
    folder = workspace / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "dirty_mnist.npz", **arrays)
