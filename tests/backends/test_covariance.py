"""The covariance-aware PFP (pfp.backends.covariance + the PyTorch epilogue): the plan, an
independent full-covariance oracle, Monte-Carlo of the network it approximates, the variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfp.backends import base
from pfp.backends.base import Backend
from pfp.backends.covariance import covariance_block, max_covariance_layers, variant_covariance_layers
from pfp.backends.torch_ref import GaussianLayerParams, ensemble_forward, pfp_forward, relu
from pfp.convert import PFPModel, convert_posterior, predict_pfp
from pfp.spec import Dense, Flatten, ModelSpec, ReLU, SpecError, build_spec

from ..common import random_posterior

TOY = ModelSpec("toy", (1, 2, 2), (Flatten(), Dense("fc1", 4, 8), ReLU(), Dense("fc2", 8, 8), ReLU(), Dense("fc3", 8, 3)))


def toy_params(seed: int = 0, mean_offset: float = 0.3, scale: float = 0.25) -> dict[str, GaussianLayerParams]:
    """Positive-leaning mean weights: units that share inputs co-vary strongly (what plain PFP drops)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for layer in TOY.parametric_layers():
        wm = mean_offset + 0.3 * torch.randn(layer.weight_shape, generator=g)
        bm = 0.1 * torch.randn(layer.bias_shape, generator=g)
        params[layer.name] = GaussianLayerParams.from_mean_var(
            wm, (scale * (0.5 + torch.rand(layer.weight_shape, generator=g))) ** 2,
            bm, torch.full(layer.bias_shape, 0.01))
    return params


def toy_input(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed)).abs() + 0.5


# --------------------------------------------------------------------------- the plan

def test_block_covers_the_trailing_dense_layers():
    assert max_covariance_layers(build_spec("mlp")) == 3
    assert max_covariance_layers(build_spec("lenet")) == 3  # a max-pool sits before fc1
    plan = covariance_block(build_spec("lenet"), 2)
    assert plan.dense_names == ("fc2", "fc3") and plan.noisy_dense == ()
    assert covariance_block(build_spec("mlp"), 3).noisy_dense == ("fc1",)
    assert covariance_block(build_spec("mlp"), 0) is None and covariance_block(build_spec("mlp"), 1) is None


@pytest.mark.parametrize("layers", [4, -1, 2.0, True])
def test_block_refuses_what_the_model_lacks(layers):
    with pytest.raises(SpecError, match="covariance_layers"):
        covariance_block(build_spec("lenet"), layers)


def test_variant_layers():
    assert variant_covariance_layers("pfp", 2) == 0 and variant_covariance_layers("pfp_cov", 3) == 3
    with pytest.raises(SpecError, match="convert.covariance_layers >= 2"):
        variant_covariance_layers("pfp_cov", 0)


# --------------------------------------------------------------------------- oracles

def full_covariance_oracle(params, x: torch.Tensor, layers: int) -> torch.Tensor:
    """Independent of the Jacobian code: plain PFP up to the block (float64), then full covariance
    matrices through the block's linearisation (Cov(a) = W C W^T + diag(noise), ReLU: S C S), minus
    the same linearisation with the off-diagonal dropped at every layer; added to plain PFP's variance."""
    p = {name: GaussianLayerParams(q.weight_mean.double(), q.weight_var.double(),
                                   q.weight_var.double() + q.weight_mean.double() ** 2, q.bias_mean.double(), q.bias_var.double())
         for name, q in params.items()}
    names = ["fc1", "fc2", "fc3"][3 - layers:]
    h, var = x.double().flatten(1), None
    for name in ["fc1", "fc2", "fc3"][:3 - layers]:
        q = p[name]
        h, var = (h @ q.weight_mean.T + q.bias_mean,
                  (0 if var is None else var @ q.weight_m2.T) + (h * h) @ q.weight_var.T + q.bias_var)
        h, var = relu(h, var)
    plain_var = pfp_forward(TOY, params, x)[1].double()  # float32 plain PFP; the correction below is float64
    corrections = []
    for b in range(x.shape[0]):
        mean_b = h[b]
        cov = torch.zeros(len(mean_b), len(mean_b), dtype=torch.float64) if var is None else torch.diag(var[b])
        diag = cov.clone()
        m, v = mean_b, (torch.zeros_like(mean_b) if var is None else var[b])
        for i, name in enumerate(names):
            q = p[name]
            noise = q.weight_var @ (m * m + v) + q.bias_var if i < len(names) - 2 else 0.0
            cov = q.weight_mean @ cov @ q.weight_mean.T + torch.diag(torch.as_tensor(noise).expand(q.weight_mean.shape[0]))
            diag = torch.diag(torch.diagonal(q.weight_mean @ diag @ q.weight_mean.T)
                              + torch.as_tensor(noise).expand(q.weight_mean.shape[0]))
            m_pre = q.weight_mean @ m + q.bias_mean
            v_pre = v @ q.weight_m2.T + (m * m) @ q.weight_var.T + q.bias_var
            if name != names[-1]:
                slope = torch.distributions.Normal(0.0, 1.0).cdf(m_pre / v_pre.sqrt())
                cov = slope[:, None] * cov * slope[None, :]
                diag = slope[:, None] * diag * slope[None, :]
                m, v = relu(m_pre.unsqueeze(0), v_pre.unsqueeze(0))
                m, v = m[0], v[0]
        corrections.append(torch.diagonal(cov) - torch.diagonal(diag))
    return (plain_var + torch.stack(corrections)).clamp_min(0.0)


@pytest.mark.parametrize("layers", [2, 3])
def test_correction_matches_the_full_covariance_oracle(layers):
    params, x = toy_params(), toy_input()
    _, var = pfp_forward(TOY, params, x, covariance_layers=layers)
    expected = full_covariance_oracle(params, x, layers)
    np.testing.assert_allclose(var.numpy(), expected.numpy(), rtol=2e-4, atol=1e-6)
    _, plain = pfp_forward(TOY, params, x)
    assert (var > 1.05 * plain).all(), "positive-leaning weights: the dropped covariance is positive"


def test_covariance_aware_variance_matches_monte_carlo_where_plain_pfp_does_not():
    """The network PFP approximates: 40,000 whole-weight draws (relative s.e. of a variance ~0.7 %)."""
    params, x = toy_params(scale=0.12), toy_input(4)
    torch.manual_seed(0)
    samples = []
    for _ in range(8):
        stacked = {name: (p.weight_mean + p.weight_var.sqrt() * torch.randn(5000, *p.weight_mean.shape),
                          p.bias_mean + p.bias_var.sqrt() * torch.randn(5000, *p.bias_mean.shape))
                   for name, p in params.items()}
        samples.append(ensemble_forward(TOY, stacked, x))
    mc_var = torch.cat(samples).var(0)
    plain = (pfp_forward(TOY, params, x)[1] / mc_var).median().item()
    corrected = (pfp_forward(TOY, params, x, covariance_layers=2)[1] / mc_var).median().item()
    assert plain < 0.85, plain
    assert 0.93 < corrected < 1.07 and abs(corrected - 1) < abs(plain - 1) / 3, (plain, corrected)


def test_zero_variance_gives_the_plain_network():
    params = {name: GaussianLayerParams.from_mean_var(p.weight_mean, 0 * p.weight_var, p.bias_mean, 0 * p.bias_var)
              for name, p in toy_params().items()}
    mean, var = pfp_forward(TOY, params, toy_input(), covariance_layers=3)
    assert torch.isfinite(mean).all() and (var == 0).all()


# --------------------------------------------------------------------------- the model option

def test_model_option_round_trips_and_selects_the_variant(tmp_path):
    from pfp.artifacts.pfp_params import load_pfp_params, save_pfp_params

    posterior = random_posterior("mlp", seed=3)
    model = convert_posterior(posterior, covariance_layers=2)
    assert model.pfp_variant == "pfp_cov" and convert_posterior(posterior).pfp_variant == "pfp"
    save_pfp_params(model, tmp_path / "pfp.npz", parent=None)
    loaded = load_pfp_params(tmp_path / "pfp.npz", "mlp")
    assert loaded.covariance_layers == 2
    x = torch.randn(3, 1, 28, 28)
    own = predict_pfp(loaded, x)[1]
    assert torch.equal(own, predict_pfp(loaded, x, covariance_layers=2)[1])
    assert not torch.equal(own, predict_pfp(loaded, x, covariance_layers=0)[1])
    with pytest.raises(SpecError, match="exceeds"):
        convert_posterior(posterior, covariance_layers=4)


def test_torch_predictor_variants():
    posterior = random_posterior("mlp", seed=3)
    model = convert_posterior(posterior, covariance_layers=2)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    options = {"batch_size": 3, "variance_scale": 0.7}
    plain = base.create(Backend.TORCH, "pfp", model, posterior, **options).predict(x)[1]
    cov = base.create(Backend.TORCH, "pfp_cov", model, posterior, **options).predict(x)[1]
    expected = pfp_forward(model.spec, model.params, torch.from_numpy(x), variance_scale=0.7, covariance_layers=2)[1]
    np.testing.assert_allclose(cov, expected.numpy(), rtol=1e-6)
    assert not np.allclose(plain, cov)
    with pytest.raises(SpecError, match="pfp_cov"):
        base.create(Backend.TORCH, "pfp_cov", PFPModel(model.spec, model.params), posterior, **options)
