"""Posterior -> PFP parameters: moments, sampling consistency, save/load, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfp.artifacts.pfp_params import load_pfp_params, save_pfp_params
from pfp.backends.torch_ref import deterministic_forward, maxpool2x2, pfp_forward, relu
from pfp.bnn import Posterior, PosteriorError, site_names
from pfp.convert import convert_posterior, pool_before_relu, predict_pfp, with_pool_rule
from pfp.spec import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, PoolRule, ReLU, SpecError, build_spec

N_SIGMA = 5.0


def random_posterior(spec: ModelSpec, seed: int = 0, scale: float = 0.1, loc_scale: float = 1.0) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    loc, sc = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = loc_scale * torch.randn(shape, generator=g)
            sc[site] = scale * (0.2 + 2 * torch.rand(shape, generator=g))
    return Posterior(spec=spec, loc=loc, scale=sc)


def tiny_spec() -> ModelSpec:
    return ModelSpec("tiny", (1, 2, 2), (Flatten(), Dense("fc1", 4, 3), ReLU(), Dense("fc2", 3, 2)))


def test_convert_moments_exact():
    posterior = random_posterior(build_spec("lenet"), seed=1)
    model = convert_posterior(posterior, pool_first=False)
    assert model.spec == posterior.spec
    assert list(model.params) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for layer in posterior.spec.parametric_layers():
        p = model.params[layer.name]
        w, b = site_names(layer.name)
        loc, scale = posterior.loc[w].double(), posterior.scale[w].double()
        assert p.weight_mean.shape == layer.weight_shape and p.bias_var.shape == layer.bias_shape
        assert all(t.dtype == torch.float32 for t in (p.weight_mean, p.weight_var, p.weight_m2, p.bias_mean, p.bias_var))
        assert torch.equal(p.weight_mean, posterior.loc[w])
        torch.testing.assert_close(p.weight_var.double(), scale**2, rtol=1e-6, atol=0)
        torch.testing.assert_close(p.weight_m2.double(), scale**2 + loc**2, rtol=1e-6, atol=0)
        assert torch.equal(p.bias_mean, posterior.loc[b])
        torch.testing.assert_close(p.bias_var.double(), posterior.scale[b].double() ** 2, rtol=1e-6, atol=0)
        # the variance is scale^2, not the scale itself
        assert not torch.allclose(p.weight_var, posterior.scale[w])


def test_m2_keeps_precision_for_tiny_variances():
    spec = tiny_spec()
    posterior = random_posterior(spec, seed=2, scale=1e-4)
    p = convert_posterior(posterior).params["fc1"]
    # computed in float64 first: E[w^2] - mu^2 recovers sigma^2 to float32 rounding of E[w^2]
    assert torch.all(p.weight_var > 0)
    torch.testing.assert_close(p.weight_m2, (posterior.scale["fc1_weight"].double() ** 2 + posterior.loc["fc1_weight"].double() ** 2).float(), rtol=0, atol=0)


def _check_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, what: str) -> None:
    n = samples.shape[0]
    samples = samples.double()
    mean, var = mean.double(), var.double()
    sample_mean = samples.mean(0)
    sample_var = samples.var(0)
    mean_se = (var / n).sqrt()
    var_se = var * np.sqrt(2.0 / (n - 1))  # Gaussian: Var[s^2] = 2 sigma^4 / (n - 1)
    assert torch.all((sample_mean - mean).abs() <= N_SIGMA * mean_se), f"{what}: mean"
    assert torch.all((sample_var - var).abs() <= N_SIGMA * var_se), f"{what}: variance"
    # the bounds are tight enough to detect var = scale (instead of scale^2)
    assert torch.all((sample_var - var.sqrt()).abs() > N_SIGMA * var_se), f"{what}: bound too loose"


def test_sampling_from_converted_parameters_reproduces_posterior_moments():
    spec = tiny_spec()
    posterior = random_posterior(spec, seed=3, scale=0.1)  # scales in [0.02, 0.22]: far from 1
    model = convert_posterior(posterior)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    for layer in spec.parametric_layers():
        p = model.params[layer.name]
        for site, mean, var in zip(site_names(layer.name), (p.weight_mean, p.bias_mean), (p.weight_var, p.bias_var)):
            draws = mean.double() + var.double().sqrt() * torch.randn((n, *mean.shape), generator=g, dtype=torch.float64)
            _check_moments(draws, posterior.loc[site], posterior.scale[site] ** 2, f"{site} vs posterior")
        # E[w^2] of the draws matches the precomputed second moment
        draws = p.weight_mean.double() + p.weight_var.double().sqrt() * torch.randn((n, *p.weight_mean.shape), generator=g, dtype=torch.float64)
        m2_se = (draws**2).std(0) / np.sqrt(n)
        assert torch.all(((draws**2).mean(0) - p.weight_m2.double()).abs() <= N_SIGMA * m2_se)


def test_posterior_sample_weights_matches_converted_moments():
    spec = tiny_spec()
    posterior = random_posterior(spec, seed=4, scale=0.1)
    model = convert_posterior(posterior)
    g = torch.Generator().manual_seed(1)
    n = 20_000
    draws = [posterior.sample_weights(g) for _ in range(n)]
    for layer in spec.parametric_layers():
        p = model.params[layer.name]
        weights = torch.stack([d[layer.name][0] for d in draws])
        biases = torch.stack([d[layer.name][1] for d in draws])
        _check_moments(weights, p.weight_mean, p.weight_var, f"{layer.name} weight")
        _check_moments(biases, p.bias_mean, p.bias_var, f"{layer.name} bias")


def test_pfp_model_save_load_round_trip(tmp_path):
    model = convert_posterior(random_posterior(build_spec("mlp"), seed=5))
    path = tmp_path / "pfp.npz"
    save_pfp_params(model, path, parent=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pfp.npz"]
    loaded = load_pfp_params(path, None)
    assert loaded.spec == model.spec
    assert loaded.params.keys() == model.params.keys()
    for name, p in model.params.items():
        for field in ("weight_mean", "weight_var", "weight_m2", "bias_mean", "bias_var"):
            assert torch.equal(getattr(loaded.params[name], field), getattr(p, field)), (name, field)


def _saved_arrays(tmp_path):
    path = tmp_path / "good.npz"
    save_pfp_params(convert_posterior(random_posterior(tiny_spec(), seed=6)), path, parent=None)
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize("key", ["fc1.weight_var", "fc2.bias_mean", "fc1.weight_m2"])
def test_load_rejects_nan(tmp_path, key):
    arrays = _saved_arrays(tmp_path)
    arrays[key].flat[0] = np.nan
    path = tmp_path / "pfp.npz"
    np.savez(path, **arrays)
    with pytest.raises(PosteriorError) as info:
        load_pfp_params(path, None)
    assert str(path) in str(info.value)
    assert f"{key} contains NaN or infinite values" in str(info.value)


def test_load_missing_array_and_missing_file(tmp_path):
    arrays = _saved_arrays(tmp_path)
    del arrays["fc2.weight_m2"]
    path = tmp_path / "pfp.npz"
    np.savez(path, **arrays)
    with pytest.raises(PosteriorError, match="missing array 'fc2.weight_m2'"):
        load_pfp_params(path, None)
    with pytest.raises(PosteriorError, match="PFP parameter file not found"):
        load_pfp_params(tmp_path / "absent.npz", None)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior(tiny_spec(), seed=6)), path, parent=None)
    path.write_bytes(path.read_bytes()[:150])
    with pytest.raises(PosteriorError, match="not a readable PFP parameter file"):
        load_pfp_params(path, None)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_predict_pfp_batching_is_identical(name):
    spec = build_spec(name)
    model = convert_posterior(random_posterior(spec, seed=7, scale=0.05, loc_scale=0.1))
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    mean, var = predict_pfp(model, x)
    assert mean.shape == var.shape == (7, 10)
    assert torch.all(var > 0)
    mean_b, var_b = predict_pfp(model, x, batch_size=3)
    # same arithmetic per example; only BLAS blocking may change float32 rounding
    torch.testing.assert_close(mean_b, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var_b, var, rtol=1e-5, atol=1e-6)
    # one example at a time equals the reference forward pass on that example
    ref_mean, ref_var = pfp_forward(model.spec, model.params, x[4:5])
    torch.testing.assert_close(predict_pfp(model, x, batch_size=1)[0][4:5], ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var[4:5], ref_var, rtol=1e-5, atol=1e-7)


def test_predict_pfp_variance_scale():
    model = convert_posterior(random_posterior(tiny_spec(), seed=8))
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    _, var1 = predict_pfp(model, x)
    mean0, var0 = predict_pfp(model, x, variance_scale=0.0)
    assert torch.all(var0 == 0)
    weights = {n: (p.weight_mean, p.bias_mean) for n, p in model.params.items()}
    from pfp.backends.torch_ref import deterministic_forward
    torch.testing.assert_close(mean0, deterministic_forward(model.spec, weights, x), rtol=1e-6, atol=1e-6)
    _, var2 = predict_pfp(model, x, variance_scale=2.0)
    assert torch.all(var2 > var1)


# --------------------------------------------------------------------------- layer order

def test_pool_before_relu_swaps_each_relu_pool_pair_only():
    lenet = build_spec("lenet")
    kinds = [layer.kind for layer in pool_before_relu(lenet).layers]
    assert kinds == ["conv2d", "maxpool2d", "relu", "conv2d", "maxpool2d", "relu", "flatten",
                     "dense", "relu", "dense", "relu", "dense"]
    assert pool_before_relu(lenet).parametric_layers() == lenet.parametric_layers()
    assert pool_before_relu(build_spec("mlp")) == build_spec("mlp")  # no pooling: unchanged
    # a pool not directly after a ReLU keeps its place; a ReLU without a following pool too
    odd = ModelSpec("odd", (1, 4, 4), (MaxPool2d(), ReLU(), Conv2d("c", 1, 2, 1), ReLU(), Flatten(), Dense("d", 8, 2)))
    assert pool_before_relu(odd) == odd


def test_convert_runs_pools_before_relus_by_default_and_saves_that_order(tmp_path):
    posterior = random_posterior(build_spec("lenet"), seed=11)
    model = convert_posterior(posterior)
    assert model.spec == pool_before_relu(posterior.spec)
    assert convert_posterior(posterior, pool_first=False).spec == posterior.spec
    save_pfp_params(model, tmp_path / "pfp.npz", parent=None)
    assert load_pfp_params(tmp_path / "pfp.npz", None).spec == model.spec


@pytest.mark.parametrize("pool_first", [True, False])
@pytest.mark.parametrize("rule", list(PoolRule))
def test_conversion_puts_the_pool_rule_on_every_maxpool(tmp_path, rule, pool_first):
    posterior = random_posterior(build_spec("lenet"), seed=12)
    model = convert_posterior(posterior, pool_first=pool_first, pool_rule=rule.value)
    pools = [layer for layer in model.spec.layers if isinstance(layer, MaxPool2d)]
    assert len(pools) == 2 and all(layer.rule is rule for layer in pools)
    # only the rule changed: same layers, same order as without it
    assert model.spec == with_pool_rule(convert_posterior(posterior, pool_first=pool_first).spec, rule)
    assert posterior.spec.layers[2].rule is PoolRule.CLARK  # the posterior's spec is left alone
    save_pfp_params(model, tmp_path / "pfp.npz", parent=None)
    assert load_pfp_params(tmp_path / "pfp.npz", None).spec == model.spec


def test_conversion_refuses_an_unknown_pool_rule():
    with pytest.raises(SpecError, match="'max'"):
        convert_posterior(random_posterior(build_spec("lenet"), seed=12), pool_rule="max")


def test_pool_first_order_is_the_same_deterministic_network():
    """relu(max(a, b)) == max(relu(a), relu(b)) exactly: the twin and each SVI member are unchanged."""
    spec = build_spec("lenet")
    weights = random_posterior(spec, seed=12).mean_weights()
    x = torch.rand(4, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(deterministic_forward(pool_before_relu(spec), weights, x), deterministic_forward(spec, weights, x))
    # the pool rule is PFP's alone: the twin ignores it
    assert torch.equal(deterministic_forward(with_pool_rule(spec, PoolRule.ARGMAX_MEAN), weights, x),
                       deterministic_forward(spec, weights, x))


def test_pool_first_matches_monte_carlo_closer_than_relu_first():
    """Independent Gaussian pre-activations around 0 (where the ReLU matters): the max is taken of
    Gaussians (Clark exact on the first pair) instead of rectified values, 3-4x closer to sampling."""
    g = torch.Generator().manual_seed(0)
    mean_in = 0.5 * torch.randn(2, 3, 6, 6, generator=g)
    var_in = 0.1 + 0.9 * torch.rand(2, 3, 6, 6, generator=g)
    n = 50_000
    draws = mean_in.double() + var_in.double().sqrt() * torch.randn(n, *mean_in.shape, generator=g, dtype=torch.float64)
    pooled = F.max_pool2d(torch.relu(draws).flatten(0, 1), 2).unflatten(0, (n, 2))
    mc_mean, mc_var = pooled.mean(0), pooled.var(0)
    pool_first = relu(*maxpool2x2(mean_in, var_in))
    relu_first = maxpool2x2(*relu(mean_in, var_in))

    def errors(moments):
        return (moments[0].double() - mc_mean).abs().mean(), ((moments[1].double() - mc_var).abs() / mc_var).mean()

    mean_error, var_error = errors(pool_first)
    mean_error_relu_first, var_error_relu_first = errors(relu_first)
    assert mean_error < 0.02 and var_error < 0.2, (mean_error, var_error)
    assert mean_error < 0.5 * mean_error_relu_first and var_error < 0.5 * var_error_relu_first
