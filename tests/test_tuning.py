"""The tune stage's library: every variant x batch size compiled, recorded and exported; the
libraries compute what the PyTorch reference computes (hand schedules measured, no search)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from pfp.backends.torch_ref import deterministic_forward, pfp_forward  # noqa: E402
from pfp.bench import ensemble_forward  # noqa: E402
from pfp.config import TuneParams, Variant  # noqa: E402
from pfp.convert import convert_posterior  # noqa: E402
from pfp.data.idx import DataError  # noqa: E402
from pfp.tuning import ensemble_weights, library_path, load_library, tune_model  # noqa: E402

from .common import random_posterior  # noqa: E402

SCALE = 0.5


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    posterior = random_posterior("lenet")
    pfp_model = convert_posterior(posterior)
    params = TuneParams(batch_sizes=[2], variants=[Variant.PFP, Variant.DET, Variant.SVI], trials_per_task=0,
                        svi_samples=3, number=1, min_repeat_ms=1)
    out = tmp_path_factory.mktemp("workspace") / "models" / "lenet" / "tvm"  # the stage's layout
    libraries = tune_model(posterior, pfp_model, params, out, variance_scale=SCALE, seed=3)
    return posterior, pfp_model, params, out, libraries


def test_every_variant_and_batch_is_written(tuned):
    _, _, params, out, libraries = tuned
    assert [(lib.variant, lib.batch_size) for lib in libraries] == [(v, 2) for v in params.variants]
    for lib in libraries:
        assert lib.path == library_path(out, "host", lib.variant, 2) and lib.path.is_file()
        assert (lib.path.parent / f"{lib.variant.value}_b2" / "database_tuning_record.json").stat().st_size > 0
        assert not (lib.path.parent / f"{lib.variant.value}_b2" / "logs").exists()
        # no search: every task runs its measured hand schedule
        assert lib.report["tasks"] and all(row["kept"] == "hand" and row["hand_ms"] > 0 for row in lib.report["tasks"])
        info = json.loads((lib.path.parent / f"{lib.path.name}.json").read_text())["info"]
        assert info["variant"] == lib.variant.value and info["variance_scale"] == SCALE


def test_libraries_compute_the_reference(tuned):
    posterior, pfp_model, _, out, _ = tuned
    x = torch.randn(5, *posterior.spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # PFP in the converted layer order; the twin and the ensemble (also built in that order)
        # against the trained one: the same functions
        assert pfp_model.spec != posterior.spec
        ref_mean, ref_var = pfp_forward(pfp_model.spec, pfp_model.params, x, variance_scale=SCALE)
        ref_det = deterministic_forward(posterior.spec, posterior.mean_weights(), x)
        ref_svi = ensemble_forward(posterior.spec, ensemble_weights(posterior, 3, seed=3), x[:2])
    mean, var = load_library(out, "host", Variant.PFP, 2).predict(x.numpy())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(load_library(out, "host", Variant.DET, 2).predict(x.numpy()), ref_det, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load_library(out, "host", Variant.SVI, 2)(x[:2].numpy()), ref_svi, rtol=1e-4, atol=1e-6)


def test_second_run_resumes_from_the_recorded_measurements(tuned):
    posterior, pfp_model, params, out, first = tuned
    again = tune_model(posterior, pfp_model, params, out, variance_scale=SCALE, seed=3)
    for before, after in zip(first, again):
        assert after.report["records"] == before.report["records"]  # hand schedules not measured twice
        assert [row["hand_ms"] for row in after.report["tasks"]] == [row["hand_ms"] for row in before.report["tasks"]]


def test_missing_library_names_the_stage(tmp_path):
    with pytest.raises(DataError, match="run the tune stage first"):
        load_library(tmp_path, "host", Variant.PFP, 1)


def test_evaluate_takes_the_tuned_library_and_refuses_a_stale_one(tuned, monkeypatch):
    from tasks.evaluate import tuned_pfp_library

    _, _, params, out, _ = tuned
    monkeypatch.chdir(out.parents[2])
    library, path = tuned_pfp_library("lenet", params, SCALE)
    assert path == "models/lenet/tvm/host/pfp_b2.so" and library.info["variance_scale"] == SCALE
    with pytest.raises(DataError, match="variance scale 0.5, calibration says 1.0; re-run tune"):
        tuned_pfp_library("lenet", params, 1.0)


def test_evaluate_compiles_on_the_host_when_the_libraries_are_for_a_board():
    from tasks.evaluate import tuned_pfp_library

    board = TuneParams(target="rasp4b", rpc={"tracker": "127.0.0.1:9190", "key": "rasp4b"})
    library, note = tuned_pfp_library("mlp", board, 1.0)
    assert library is None and "rasp4b is a board" in note
