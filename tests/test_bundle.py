"""Building a bundle: the OOD threshold on validation images, the tuned schedules, an atomic replace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pfp.bundle import build_bundle, ood_threshold
from pfp.convert import convert_posterior
from pfp_runtime import load_bundle

from .common import make_bundle, random_posterior


def test_ood_threshold_accepts_the_target_fraction():
    scores = np.arange(1, 101) / 100.0
    threshold = ood_threshold(scores, 0.95)
    assert threshold == 0.95 and np.mean(scores <= threshold) == 0.95
    with pytest.raises(ValueError, match="finite in-distribution scores"):
        ood_threshold(np.array([0.1, np.nan]), 0.95)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        ood_threshold(scores, 1.0)


def test_threshold_is_chosen_on_the_validation_images_with_the_bundle_itself(tmp_path):
    built = make_bundle(tmp_path / "b", "mlp", batch_sizes=(1, 4), head_draws=16)
    validation = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)  # make_bundle's
    scores = load_bundle(built.folder).predict(validation).mi
    ood = json.loads((built.folder / "bundle.json").read_text())["ood"]
    assert ood["threshold"] == pytest.approx(float(np.quantile(scores, 0.95, method="inverted_cdf")), rel=1e-6)
    assert ood["validation_tpr"] == pytest.approx(np.mean(scores <= ood["threshold"])) and ood["validation_images"] == 40


def test_a_failed_build_leaves_the_old_bundle_in_place(tmp_path):
    built = make_bundle(tmp_path / "b", "mlp", batch_sizes=(1,), head_draws=16)
    before = (built.folder / "SHA256SUMS").read_text()
    pfp_model = convert_posterior(random_posterior("mlp"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        build_bundle(pfp_model, built.folder, target="host", batch_sizes=(1,), temperature=float("nan"), variance_scale=1.0,
                     threshold=0.1)
    assert (built.folder / "SHA256SUMS").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left behind


def test_threshold_or_validation_images_not_both(tmp_path):
    pfp_model = convert_posterior(random_posterior("mlp"))
    with pytest.raises(ValueError, match="give validation_images .* or a threshold, not both"):
        build_bundle(pfp_model, tmp_path / "b", target="host", batch_sizes=(1,), temperature=1.0, variance_scale=1.0)
    with pytest.raises(ValueError, match="rasp4b does not run here"):
        build_bundle(pfp_model, tmp_path / "b", target="rasp4b", batch_sizes=(1,), temperature=1.0, variance_scale=1.0,
                     validation_images=np.zeros((2, 28, 28), np.uint8))
