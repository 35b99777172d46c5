"""Benchmark helpers: the vectorized SVI-30 baseline and the Pyro guide rebuilt from a posterior
must compute the same thing as the per-sample reference, or the timings compare different work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
import yaml

from pfp.backends.torch_ref import deterministic_forward, pfp_forward
from pfp.backends.tvm import physical_cores
from pfp.backends.weights import sample_stacked_weights
from pfp.bench import TUNED_KEYS, benchmark_model, ensemble_forward, guide_from_posterior, time_call, time_side_by_side
from pfp.bnn import make_model
from pfp.config import BenchmarkConfig, ConfigError, Peer, Variant, load_params
from pfp.convert import convert_posterior
from pfp.peers import PeerMismatchError, check_agrees, make_peer

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
                              repeat=1, tvm_number=1, tvm_repeat=1, peers=[])
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
    # no peers (the default, peers=[]): no peer keys; PFP-TVM is still compared with the eager PyTorch PFP
    assert not any(f"{peer.value}_ms" in results for peer in Peer)
    assert "peers" not in results and "det_tvm_over_best_peer_det" not in results
    assert results["pfp_tvm_over_best_peer_pfp"] == pytest.approx(results["pfp_tvm_ms"] / results["pfp_torch_ms"])


def test_benchmark_model_times_the_libraries_it_is_given():
    from pfp.backends.tvm.pipeline import compile_deterministic

    posterior = random_posterior("mlp")
    library = compile_deterministic(posterior.spec, posterior.mean_weights(), batch_size=2)
    results = benchmark_model(posterior, convert_posterior(posterior), batch_size=2, svi_samples=3, repeat=1, tvm_number=1,
                              tvm_repeat=1, libraries={Variant.DET: library})
    assert results["schedules"]["det"] == "tuned" and results["schedules"]["pfp"] == "hand"
    assert results["det_tvm_ms"] > 0


# --------------------------------------------------------------------------- peers (pfp.peers)

def _inputs(posterior, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *posterior.spec.input_shape)).astype(np.float32)


def _assert_time_contract(peer, x):
    timing = peer.time(number=3, repeat=2, x=x)
    assert timing["number"] == 3 and timing["repeat"] == 2
    assert timing["median_ms"] > 0 and timing["mean_ms"] > 0 and timing["std_ms"] >= 0


def _eager(variant, posterior, pfp_model, x, variance_scale):
    """The eager references, computed here from torch_ref directly (not through pfp.peers)."""
    with torch.no_grad():
        if variant is Variant.PFP:
            return tuple(t.numpy() for t in pfp_forward(pfp_model.spec, pfp_model.params, torch.from_numpy(x),
                                                        variance_scale=variance_scale))
        return (deterministic_forward(pfp_model.spec, posterior.mean_weights(), torch.from_numpy(x)).numpy(),)


def _compiled_peers_agree(model: str, seed: int, batch: int) -> list:
    """Both torch.compile peers of a random ``model`` posterior: eager's outputs, the timing contract."""
    posterior = random_posterior(model, seed=seed)
    pfp_model = convert_posterior(posterior)
    x = _inputs(posterior, batch)
    made_peers = []
    for peer in (Peer.PFP_TORCH_COMPILE, Peer.DET_TORCH_COMPILE):
        made = make_peer(peer, pfp_model, posterior, x, variance_scale=0.7, threads=1)
        for actual, want in zip(made.predict(x), _eager(peer.variant, posterior, pfp_model, x, 0.7), strict=True):
            np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        _assert_time_contract(made, x)
        made_peers.append(made)
    return made_peers


def test_torch_compile_peers_compute_the_eager_reference():
    """MLP at batch 1 only: torch.compile takes seconds per graph (LeNet: the slow test below)."""
    for made in _compiled_peers_agree("mlp", seed=4, batch=1):
        described = made.describe()
        assert described["compile_mode"] == "default" and described["compile_s"] > 0
        assert described["threads"] == torch.get_num_threads() and described["runtime"] == f"torch {torch.__version__}"
        # timing never compiles: another batch size than the one compiled for is refused, not compiled in the timed loop
        with pytest.raises(RuntimeError, match="(?i)recompil"):
            made.time(number=1, x=_inputs(random_posterior("mlp", seed=4), 2))


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_onnxruntime_peers_compute_the_eager_reference(model):
    import onnxruntime

    posterior = random_posterior(model, seed=5)
    pfp_model = convert_posterior(posterior)
    x = _inputs(posterior, 3)
    for peer in (Peer.DET_ONNXRUNTIME, Peer.PFP_ONNXRUNTIME):
        made = make_peer(peer, pfp_model, posterior, x, variance_scale=0.5, threads=1)
        outputs = made.predict(x)
        assert len(outputs) == (2 if peer.variant is Variant.PFP else 1)
        for actual, want in zip(outputs, _eager(peer.variant, posterior, pfp_model, x, 0.5), strict=True):
            np.testing.assert_allclose(actual, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        _assert_time_contract(made, x)
        described = made.describe()
        assert described["threads"] == 1 and onnxruntime.__version__ in described["runtime"]
        assert "dynamo=True" in described["exporter"]


def test_a_peer_that_computes_something_else_is_refused():
    posterior, other = random_posterior("mlp", seed=6), random_posterior("mlp", seed=7)
    pfp_model = convert_posterior(posterior)
    x = _inputs(posterior, 2)
    # the twin of another posterior's weights
    wrong = _eager(Variant.DET, other, convert_posterior(other), x, 1.0)
    with pytest.raises(PeerMismatchError, match=r"det_onnxruntime: output 0 differs from the eager PyTorch reference"):
        make_peer(Peer.DET_ONNXRUNTIME, pfp_model, posterior, x, threads=1, reference=wrong)
    # the PFP with another variance scale (the ReLU moments change the means too)
    uncalibrated = _eager(Variant.PFP, posterior, pfp_model, x, 1.0)
    with pytest.raises(PeerMismatchError, match=r"pfp_onnxruntime: output [01] differs"):
        make_peer(Peer.PFP_ONNXRUNTIME, pfp_model, posterior, x, variance_scale=0.5, threads=1, reference=uncalibrated)
    # a non-finite output and a missing output are refused too
    good = uncalibrated[0]
    with pytest.raises(PeerMismatchError, match="differs"):
        check_agrees("p", (np.where(good > 0, np.nan, good),), (good,))
    with pytest.raises(PeerMismatchError, match="1 outputs, the reference has 2"):
        check_agrees("p", (good,), uncalibrated)
    assert check_agrees("p", uncalibrated, uncalibrated) == 0.0


def test_benchmark_model_times_peers_beside_the_compiled_predictors():
    posterior = random_posterior("mlp")
    peers = [Peer.DET_ONNXRUNTIME, Peer.PFP_ONNXRUNTIME]
    results = benchmark_model(posterior, convert_posterior(posterior), batch_size=2, svi_samples=3, repeat=1, tvm_number=1,
                              tvm_repeat=2, variance_scale=0.8, peers=peers)
    assert results["det_onnxruntime_ms"] > 0 and results["pfp_onnxruntime_ms"] > 0
    assert "det_torch_compile_ms" not in results and "pfp_torch_compile_ms" not in results
    assert results["pfp_tvm_over_best_peer_pfp"] == pytest.approx(
        results["pfp_tvm_ms"] / min(results["pfp_torch_ms"], results["pfp_onnxruntime_ms"]))
    assert results["det_tvm_over_best_peer_det"] == pytest.approx(results["det_tvm_ms"] / results["det_onnxruntime_ms"])
    # what each peer ran with: ONNX Runtime on the compiled predictors' thread count
    assert set(results["peers"]) == {"det_onnxruntime", "pfp_onnxruntime"}
    assert all(0 <= entry["max_error_vs_eager"] < 1e-5 for entry in results["peers"].values())  # checked before timing
    assert all(entry["threads"] == results["threads"]["tvm"] for entry in results["peers"].values())


def test_peers_import_onnx_only_when_used():
    code = ("import sys; import pfp.bench, pfp.peers; "
            "assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), sorted(m for m in sys.modules if 'onnx' in m)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("peers, message", [
    (["pfp_torch_compile", "tvm_turbo"], r"benchmark\.peers\.1:.*'pfp_torch_compile'.*'det_onnxruntime'"),
    (["det_onnxruntime", "det_onnxruntime"], r"benchmark\.peers:.*lists a peer twice"),
])
def test_unknown_or_repeated_peer_is_a_config_error(tmp_path, peers, message):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["benchmark"]["peers"] = peers
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_params_files_run_every_peer_or_a_cheap_subset():
    """The full run compares every peer; the default is all of them."""
    assert load_params("params.yaml").benchmark.peers == list(Peer)
    assert BenchmarkConfig().peers == list(Peer)


@pytest.mark.slow
def test_lenet_torch_compile_peers_compute_the_eager_reference():
    assert len(_compiled_peers_agree("lenet", seed=8, batch=2)) == 2
