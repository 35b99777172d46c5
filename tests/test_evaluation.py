"""evaluate_model on tiny arrays: metric keys and ranges, det/PFP/SVI consistency, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfp.bnn import Posterior, predict_deterministic, site_names
from pfp.calibrate import CalibrationResult
from pfp.config import EvaluateConfig
from pfp.convert import convert_posterior, predict_pfp
from pfp.data.dirty_mnist import normalise
from pfp.data.idx import load_split
from pfp.evaluation import SET_ARRAYS, EvalSet, Method, evaluate_model, moment_errors, objective_metrics, predict
from pfp.spec import build_spec

KEYS = {"accuracy", "nll", "ece", "brier", "auroc_mi", "auroc_sme", "auroc_var",
        "mi_id", "mi_ood", "sme_id", "sme_ood"}
LOG10 = math.log(10)
CONFIG = EvaluateConfig(svi_samples=3, logit_samples=4, moment_samples=3, moment_images=8, ece_bins=5, batch_size=7,
                        fidelity_samples=30, fidelity_images=8)


def posterior(scale: float, seed: int = 0) -> Posterior:
    spec = build_spec("mlp")
    g = torch.Generator().manual_seed(seed)
    loc, sc = {}, {}
    for layer in spec.parametric_layers():
        fan_in = int(np.prod(layer.weight_shape[1:]))
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 2.0 / math.sqrt(fan_in) * torch.randn(shape, generator=g)
            sc[site] = torch.full(shape, scale / math.sqrt(fan_in))
    return Posterior(spec, loc, sc)


def calibration(scale=1.0, temperature=1.0) -> CalibrationResult:
    return CalibrationResult(variance_scale=scale, temperature=temperature, nll_before=1.0, nll_after=1.0,
                             ece_before=0.1, ece_after=0.1)


@pytest.fixture(scope="module")
def arrays():
    mnist_x, mnist_y = load_split("data/embedded/mnist", "t10k")
    ood_x, ood_y = load_split("data/embedded/fashion-mnist", "t10k")
    rng = np.random.default_rng(0)
    return {
        "mnist_test_x": mnist_x[:16], "mnist_test_y": mnist_y[:16].astype(np.int64),
        "ambiguous_test_x": mnist_x[16:26], "ambiguous_test_y": rng.integers(0, 10, size=(10, 3)),
        "ood_test_x": ood_x[:12], "ood_test_y": ood_y[:12].astype(np.int64),
    }


@pytest.fixture(scope="module")
def evaluated(arrays, tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    post = posterior(0.5)
    plot_dir = tmp_path_factory.mktemp("plots") / "evaluate"
    results = evaluate_model(post, convert_posterior(post), calibration(0.7, 1.2), arrays, CONFIG, seed=0, plot_dir=plot_dir)
    torch.set_num_threads(previous)
    return post, results, plot_dir


def test_output_keys_and_ranges(evaluated):
    _, results, _ = evaluated
    assert set(results) == {"svi", "pfp", "det"}
    assert {"fidelity", "objectives"} <= set(results["pfp"])
    for method, values in results.items():
        assert KEYS <= set(values), method
        assert 0.0 <= values["accuracy"] <= 1.0
        assert values["nll"] > 0
        assert 0.0 <= values["ece"] <= 1.0
        assert 0.0 <= values["brier"] <= 2.0
        for key in ("auroc_mi", "auroc_sme", "auroc_var", "auroc_mi_dirty", "auroc_sme_dirty", "auroc_var_dirty"):
            assert 0.0 <= values[key] <= 1.0, (method, key)
        for key in ("mi_id", "mi_ood", "mi_ambiguous", "sme_id", "sme_ood", "sme_ambiguous"):
            assert 0.0 <= values[key] <= LOG10 + 1e-9, (method, key)
        assert set(values["sets"]) == {"mnist", "ambiguous", "fashion"}
        # top-level classification metrics are those of the MNIST test set
        for key in ("accuracy", "nll", "ece", "brier"):
            assert values[key] == values["sets"]["mnist"][key]
        assert values["sets"]["mnist"]["mi"] == values["mi_id"]
        assert values["sets"]["fashion"]["sme"] == values["sme_ood"]
    for method in ("svi", "pfp"):
        assert results[method]["mi_id"] > 0 and results[method]["mi_ood"] > 0
    for key in ("logit_mean_rel_error", "logit_var_rel_error", "logit_mean_rel_error_calibrated", "logit_var_rel_error_calibrated"):
        assert np.isfinite(results["pfp"][key]) and results["pfp"][key] >= 0
    assert "logit_mean_rel_error" not in results["svi"]


def test_det_has_no_epistemic_uncertainty(evaluated):
    _, results, _ = evaluated
    det = results["det"]
    assert det["mi_id"] == 0.0 and det["mi_ood"] == 0.0 and det["mi_ambiguous"] == 0.0
    assert det["auroc_mi"] == 0.5 and det["auroc_var"] == 0.5 and det["auroc_mi_dirty"] == 0.5


def test_det_metrics_recomputed_independently(evaluated, arrays):
    post, results, _ = evaluated
    logits = predict_deterministic(post, normalise(arrays["mnist_test_x"]))
    probs = torch.softmax(logits, -1).numpy()
    labels = arrays["mnist_test_y"]
    assert results["det"]["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)))
    assert results["det"]["nll"] == pytest.approx(float(-np.mean(np.log(probs[np.arange(16), labels]))), rel=1e-5)
    entropy = -(probs * np.log(probs)).sum(1).mean()
    assert results["det"]["sme_id"] == pytest.approx(entropy, rel=1e-5)
    # ambiguous: every one of the 3 labels per image counts
    amb_probs = torch.softmax(predict_deterministic(post, normalise(arrays["ambiguous_test_x"])), -1).numpy()
    amb_labels = arrays["ambiguous_test_y"]
    expected = -np.mean(np.log(np.repeat(amb_probs, 3, axis=0)[np.arange(30), amb_labels.reshape(-1)]))
    assert results["det"]["sets"]["ambiguous"]["nll"] == pytest.approx(expected, rel=1e-5)


def test_plots_written(evaluated):
    _, _, plot_dir = evaluated
    files = sorted(p.name for p in plot_dir.iterdir())
    assert files == ["fidelity.png", "mi_hist.png", "reliability.png", "roc.png", "sme_hist.png"]
    for name in files:
        data = (plot_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_fidelity_section(evaluated):
    _, results, _ = evaluated
    table = results["pfp"]["fidelity"]
    assert list(table) == ["pfp", "pfp_nll"]  # a calibration file without fits: its one (nll) fit, scale 0.7
    for per_set in table.values():
        assert list(per_set) == ["mnist", "ambiguous", "fashion"]
        for row in per_set.values():
            assert row["images"] == 8 and row["samples"] == 30
            assert 0 < row["var_ratio_p10"] <= row["var_ratio_median"] <= row["var_ratio_p90"]
            assert row["mi_mc"] > 0 and row["mi_ratio"] == pytest.approx(row["mi_pfp"] / row["mi_mc"])
    for name in ("mnist", "fashion"):  # less variance at scale 0.7
        assert table["pfp_nll"][name]["var_ratio_median"] < table["pfp"][name]["var_ratio_median"]


def test_objectives_side_by_side(evaluated, arrays):
    _, results, _ = evaluated
    # a calibration file without fits: its one fit, the pfp metrics themselves (TVM there, the torch reference here)
    nll = results["pfp"]["objectives"]["nll"]
    assert list(results["pfp"]["objectives"]) == ["nll"] and nll["chosen"] is True
    assert (nll["variance_scale"], nll["temperature"]) == (0.7, 1.2)
    for key, pfp_key in (("accuracy", "accuracy"), ("nll", "nll"), ("ece", "ece"), ("mi_mnist", "mi_id"),
                         ("mi_fashion", "mi_ood"), ("mi_ambiguous", "mi_ambiguous"), ("auroc_mi", "auroc_mi")):
        assert nll[key] == pytest.approx(results["pfp"][pfp_key], rel=1e-3, abs=1e-6), key
    # both fits recorded: each objective at its own scale and temperature
    post = posterior(0.5)
    fits = {"nll": {"variance_scale": 0.7, "temperature": 1.2}, "mc_variance": {"variance_scale": 2.0, "temperature": 1.0}}
    both = CalibrationResult(variance_scale=2.0, temperature=1.0, nll_before=1.0, nll_after=1.0, ece_before=0.1,
                             ece_after=0.1, objective="mc_variance", fits=fits)
    inputs = {s: normalise(arrays[f"{SET_ARRAYS[s]}_x"]) for s in EvalSet}
    labels = {s: arrays[f"{SET_ARRAYS[s]}_y"] for s in EvalSet}
    side = objective_metrics(post, convert_posterior(post), both, inputs, labels, CONFIG, seed=0)
    assert list(side) == ["nll", "mc_variance"] and side["mc_variance"]["chosen"] and not side["nll"]["chosen"]
    assert side["nll"]["nll"] == pytest.approx(nll["nll"], rel=1e-9)
    for name in ("mi_mnist", "mi_ambiguous", "mi_fashion"):  # more variance, less temperature: more MI
        assert side["mc_variance"][name] > side["nll"][name]


def test_tiny_variance_pfp_equals_det(arrays):
    post = posterior(1e-6, seed=1)
    pfp_model = convert_posterior(post)
    results = evaluate_model(post, pfp_model, calibration(), arrays, CONFIG, seed=0)
    assert results["pfp"]["logit_mean_rel_error"] < 1e-5
    assert results["svi"]["nll"] == pytest.approx(results["det"]["nll"], rel=1e-4)
    assert results["pfp"]["nll"] == pytest.approx(results["det"]["nll"], rel=1e-4)
    assert results["pfp"]["accuracy"] == results["det"]["accuracy"] == results["svi"]["accuracy"]
    assert results["pfp"]["mi_id"] < 1e-6 and results["svi"]["mi_id"] < 1e-6


def test_zero_variance_pfp_logit_moments_equal_det_logits(arrays):
    post = posterior(0.0, seed=2)  # in memory only: a saved posterior must have scale > 0
    pfp_model = convert_posterior(post)
    x = normalise(arrays["mnist_test_x"])
    mean, var = predict_pfp(pfp_model, x)
    assert torch.all(var == 0)
    torch.testing.assert_close(mean, predict_deterministic(post, x), rtol=1e-5, atol=1e-5)
    pfp = predict(Method.PFP, post, pfp_model, calibration(), x, CONFIG, seed=0)
    det = predict(Method.DET, post, pfp_model, calibration(), x, CONFIG, seed=0)
    np.testing.assert_allclose(pfp.probs, det.probs, rtol=1e-5, atol=1e-6)
    assert np.all(pfp.mutual_information < 1e-6)
    assert np.all(pfp.logit_variance == 0)


def test_temperature_and_variance_scale_are_applied(arrays):
    post = posterior(0.5, seed=3)
    pfp_model = convert_posterior(post)
    x = normalise(arrays["mnist_test_x"])
    plain = predict(Method.PFP, post, pfp_model, calibration(), x, CONFIG, seed=0)
    hot = predict(Method.PFP, post, pfp_model, calibration(temperature=3.0), x, CONFIG, seed=0)
    assert hot.softmax_entropy.mean() > plain.softmax_entropy.mean()
    shrunk = predict(Method.PFP, post, pfp_model, calibration(scale=0.1), x, CONFIG, seed=0)
    # ReLUs make the logit variance non-linear in the scale, but it shrinks everywhere
    assert np.all(shrunk.logit_variance < plain.logit_variance)
    assert np.all(shrunk.logit_variance > 0)
    off = predict(Method.PFP, post, pfp_model, calibration(scale=0.0), x, CONFIG, seed=0)
    assert np.all(off.logit_variance == 0)


def test_moment_errors_shrink_with_more_samples(arrays):
    post = posterior(0.3, seed=4)
    pfp_model = convert_posterior(post)
    x = normalise(arrays["mnist_test_x"][:4])
    few = moment_errors(post, pfp_model, x, num_samples=4, seed=0)
    many = moment_errors(post, pfp_model, x, num_samples=400, seed=0)
    assert many["logit_mean_rel_error"] < few["logit_mean_rel_error"]
    assert many["logit_mean_rel_error"] < 0.05
    assert many["logit_var_rel_error"] < 0.35  # PFP is an approximation; 400 draws give ~7% noise


def test_evalset_arrays_are_all_used():
    assert {s.value for s in EvalSet} == {"mnist", "ambiguous", "fashion"}
    assert {m.value for m in Method} == {"svi", "pfp", "det"}


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_compiled_tvm_backend_matches_torch_reference(model):
    from pfp.config import PFPBackend
    from pfp.evaluation import pfp_logit_moments

    post = posterior(0.05)
    if model == "lenet":
        spec = build_spec("lenet")
        g = torch.Generator().manual_seed(3)
        loc = {s: 0.1 * torch.randn(shape, generator=g) for l in spec.parametric_layers()
               for s, shape in zip(site_names(l.name), (l.weight_shape, l.bias_shape))}
        post = Posterior(spec=spec, loc=loc, scale={s: 0.02 + 0.0 * v for s, v in loc.items()})
    pfp_model = convert_posterior(post)
    x = torch.randn(9, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    tvm_config = CONFIG.model_copy(update={"pfp_backend": PFPBackend.TVM})
    torch_config = CONFIG.model_copy(update={"pfp_backend": PFPBackend.TORCH})
    tvm_mean, tvm_var = pfp_logit_moments(pfp_model, x, variance_scale=0.7, config=tvm_config)
    ref_mean, ref_var = pfp_logit_moments(pfp_model, x, variance_scale=0.7, config=torch_config)
    assert tvm_mean.shape == (9, 10)
    torch.testing.assert_close(tvm_var, ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(tvm_mean, ref_mean, rtol=1e-4, atol=1e-6 * float(ref_mean.abs().max()))
