"""Benchmark helpers: the vectorized SVI-30 baseline and the Pyro guide rebuilt from a posterior
must compute the same thing as the per-sample reference, or the timings compare different work."""

from __future__ import annotations

import os

import numpy as np
import pyro
import pytest
import torch

from pfp.backends.torch_ref import deterministic_forward
from pfp.backends.tvm import physical_cores
from pfp.backends.weights import sample_stacked_weights
from pfp.bench import TUNED_KEYS, benchmark_model, ensemble_forward, guide_from_posterior, time_call, time_side_by_side
from pfp.bnn import make_model
from pfp.config import Variant
from pfp.convert import convert_posterior

from .common import random_posterior


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_ensemble_forward_matches_per_sample_networks(model):
    posterior = random_posterior(model)
    weights = sample_stacked_weights(posterior, 4, torch.Generator().manual_seed(1))
    x = torch.randn(3, 1, 28, 28)
    batched = ensemble_forward(posterior.spec, weights, x)
    assert batched.shape == (4, 3, 10)
    for s in range(4):
        single = deterministic_forward(posterior.spec, {k: (w[s], b[s]) for k, (w, b) in weights.items()}, x)
        torch.testing.assert_close(batched[s], single, rtol=1e-5, atol=1e-5)


def test_guide_from_posterior_holds_the_trained_values():
    posterior = random_posterior("mlp")
    model = make_model(posterior.spec, prior_scale=1.0)
    guide = guide_from_posterior(posterior, model, torch.randn(2, 1, 28, 28))
    medians = guide.median()
    for site in posterior.loc:
        loc, scale = getattr(guide.locs, site), getattr(guide.scales, site)  # Pyro's public (constrained) view
        torch.testing.assert_close(loc.detach(), posterior.loc[site])
        torch.testing.assert_close(medians[site], posterior.loc[site])
        torch.testing.assert_close(scale.detach(), posterior.scale[site], rtol=1e-4, atol=1e-7)
    pyro.clear_param_store()


def test_guide_from_posterior_stores_the_inverse_softplus_as_before():
    """Same raw parameters as the hand-written inverse softplus it replaced (float32 round-off),
    and Pyro's own constraint maps them back to the posterior's scales."""
    posterior = random_posterior("mlp", seed=3)
    guide = guide_from_posterior(posterior, make_model(posterior.spec, prior_scale=1.0), torch.randn(2, 1, 28, 28))
    raw = dict(pyro.get_param_store().named_parameters())
    assert guide.scale_constraint is pyro.distributions.constraints.softplus_positive
    for site, scale in posterior.scale.items():
        before = torch.log(torch.expm1(scale.double())).float()  # the former hand-written inverse
        unconstrained = raw[f"AutoNormal.scales.{site}"].detach()
        assert unconstrained.dtype == torch.float32
        torch.testing.assert_close(unconstrained, before, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.nn.functional.softplus(unconstrained), scale, rtol=2e-6, atol=0)
        assert torch.equal(raw[f"AutoNormal.locs.{site}"].detach(), posterior.loc[site])
    pyro.clear_param_store()


def test_time_call_counts_repeats():
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeat=5) >= 0
    assert len(calls) == 7


class _RecordingModel:
    """A real compiled module that notes when it is timed (to see the order of the rounds)."""

    def __init__(self, name, model, log):
        self.name, self.model, self.log = name, model, log

    def time(self, **kwargs):
        self.log.append((self.name, kwargs["repeat"]))
        return self.model.time(**kwargs)


def test_time_side_by_side_interleaves_rounds():
    from pfp.backends.tvm.pipeline import compile_deterministic, compile_pfp

    posterior = random_posterior("mlp")
    log: list = []
    models = {"det": _RecordingModel("det", compile_deterministic(posterior.spec, posterior.mean_weights(), batch_size=2), log),
              "pfp": _RecordingModel("pfp", compile_pfp(posterior.spec, convert_posterior(posterior).params, batch_size=2), log)}
    x = np.random.default_rng(0).standard_normal((2, *posterior.spec.input_shape)).astype(np.float32)
    times = time_side_by_side(models, x, number=2, rounds=3)
    # one measurement of each model per round, never all of one model's measurements in a row
    assert log == [("det", 1), ("pfp", 1)] * 3
    assert set(times) == {"det", "pfp"} and all(value > 0 for value in times.values())


def test_benchmark_model_reports_every_predictor():
    posterior = random_posterior("mlp")
    results = benchmark_model(posterior, convert_posterior(posterior, covariance_layers=2), batch_size=2, svi_samples=3,
                              repeat=1, tvm_number=1, tvm_repeat=1)
    expected = {"svi_pyro_ms", "svi_torch_ms", "svi_tvm_ms", "pfp_torch_ms", "pfp_tvm_untuned_ms", "pfp_tvm_separate_untuned_ms",
                "det_tvm_untuned_ms", "pfp_tvm_hand_ms", "pfp_tvm_ms", "pfp_tvm_separate_ms", "det_tvm_ms", "pfp_cov_tvm_ms"}
    assert expected <= set(results)
    assert all(results[key] > 0 for key in expected)
    assert results["svi_pyro_over_pfp_tvm"] == pytest.approx(results["svi_pyro_ms"] / results["pfp_tvm_ms"])
    assert results["pfp_over_det_tvm"] == pytest.approx(results["pfp_tvm_ms"] / results["det_tvm_ms"])
    assert results["pfp_cov_over_pfp_tvm"] == pytest.approx(results["pfp_cov_tvm_ms"] / results["pfp_tvm_ms"])
    # no tuned libraries given: every compiled variant was built here with the hand schedules
    assert results["schedules"] == {variant.value: "hand" for variant in TUNED_KEYS}
    # the thread counts the figures ran with: TVM's pool on every physical core (unless the environment says)
    assert results["threads"]["tvm"] == int(os.environ.get("TVM_NUM_THREADS", physical_cores()))
    assert results["threads"]["torch"] == torch.get_num_threads()


def test_benchmark_model_times_the_libraries_it_is_given():
    from pfp.backends.tvm.pipeline import compile_deterministic

    posterior = random_posterior("mlp")
    library = compile_deterministic(posterior.spec, posterior.mean_weights(), batch_size=2)
    results = benchmark_model(posterior, convert_posterior(posterior), batch_size=2, svi_samples=3, repeat=1, tvm_number=1,
                              tvm_repeat=1, libraries={Variant.DET: library})
    assert results["schedules"]["det"] == "tuned" and results["schedules"]["pfp"] == "hand"
    assert results["det_tvm_ms"] > 0
