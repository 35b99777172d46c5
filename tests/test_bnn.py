"""Pyro BNN: model/guide, SVI training, constrained posterior, save/load, predictions."""

from __future__ import annotations

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from pfp.artifacts.posterior import load_posterior, save_posterior
from pfp.backends.torch_ref import deterministic_forward
from pfp.bnn import (
    Posterior,
    PosteriorError,
    guide_loc_and_scale,
    local_reparameterization_elbo,
    make_model,
    posterior_from_guide,
    predict_deterministic,
    predict_svi,
    prior_scales,
    site_names,
    train_svi,
)
from pfp.config import GradientEstimator, PriorScaling, TrainConfig
from pfp.data.dirty_mnist import normalise
from pfp.data.idx import DataError, load_split
from pfp.spec import Dense, Flatten, ModelSpec, ReLU, build_spec

EMBEDDED_MNIST = "data/embedded/mnist"
INIT_SCALE = 0.05  # large enough that softplus^-1 and log differ clearly (exp(raw) = 0.0513)


def random_posterior(spec: ModelSpec, seed: int = 0, scale: float = 0.05) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    loc, sc = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 0.1 * torch.randn(shape, generator=g)
            sc[site] = scale * (0.5 + torch.rand(shape, generator=g))
    return Posterior(spec=spec, loc=loc, scale=sc)


def tiny_spec() -> ModelSpec:
    return ModelSpec("tiny", (1, 2, 2), (Flatten(), Dense("fc1", 4, 3), ReLU(), Dense("fc2", 3, 3)))


def tiny_spec_for_mnist() -> ModelSpec:
    return ModelSpec("mnist_linear", (1, 28, 28), (Flatten(), Dense("fc1", 784, 10)))


@pytest.fixture(scope="module")
def mnist_256():
    images, labels = load_split(EMBEDDED_MNIST, "train")
    return normalise(images[:256]), torch.from_numpy(labels[:256].astype(np.int64))


@pytest.fixture(scope="module")
def trained(mnist_256):
    """30 SVI steps of the MLP on 256 real MNIST images (256 points in 784-D: separable)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = mnist_256
    config = TrainConfig(epochs=100, batch_size=64, lr=0.01, init_scale=INIT_SCALE, max_steps=30)
    posterior, losses = train_svi(build_spec("mlp"), config, x, y, seed=0, progress=False)
    raw = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
    torch.set_num_threads(previous)
    return posterior, losses, raw


# --------------------------------------------------------------------------- training


def test_train_svi_loss_decreases_and_fits(trained, mnist_256):
    posterior, losses, _ = trained
    x, y = mnist_256
    # 30 steps of 4 per epoch: 7 full epochs + one of 2 steps
    assert len(losses) == 8
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))
    accuracy = (predict_deterministic(posterior, x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


def test_posterior_sites_and_shapes(trained):
    posterior, _, _ = trained
    spec = build_spec("mlp")
    expected = {}
    for layer in spec.parametric_layers():
        weight_site, bias_site = site_names(layer.name)
        expected[weight_site], expected[bias_site] = layer.weight_shape, layer.bias_shape
    assert {k: tuple(v.shape) for k, v in posterior.loc.items()} == expected
    assert {k: tuple(v.shape) for k, v in posterior.scale.items()} == expected
    assert site_names("fc1") == ("fc1_weight", "fc1_bias")


def test_posterior_scale_is_softplus_of_the_raw_parameter(trained):
    posterior, _, raw = trained
    for site, scale in posterior.scale.items():
        assert torch.all(scale > 0), site
        unconstrained = raw[f"AutoNormal.scales.{site}"]
        torch.testing.assert_close(scale, F.softplus(unconstrained), rtol=1e-6, atol=0)
        torch.testing.assert_close(posterior.loc[site], raw[f"AutoNormal.locs.{site}"], rtol=0, atol=0)
        # exp() of the raw value (the wrong constraint) differs: by ~2.5% at this scale
        assert not torch.allclose(scale, unconstrained.exp(), rtol=1e-2, atol=0), site
    # training moved the scales away from their initial value
    assert not torch.allclose(posterior.scale["fc1_weight"], torch.full((100, 784), INIT_SCALE), atol=1e-4)


def test_zero_epochs_materialises_initial_guide(mnist_256):
    x, y = mnist_256
    config = TrainConfig(epochs=0, init_scale=0.02)
    posterior, losses = train_svi(tiny_spec_for_mnist(), config, x[:8], y[:8], seed=1, progress=False)
    assert losses == []
    assert set(posterior.scale) == {"fc1_weight", "fc1_bias"}
    for scale in posterior.scale.values():
        torch.testing.assert_close(scale, torch.full_like(scale, 0.02))
    assert torch.equal(posterior.loc["fc1_bias"], torch.zeros(10))
    bound = 1 / np.sqrt(784)
    assert posterior.loc["fc1_weight"].abs().max() <= bound
    assert posterior.loc["fc1_weight"].std() > 0.3 * bound  # uniform(-b, b), not zeros


# --------------------------------------------------------------------------- minibatch ELBO


def test_obs_site_scaled_by_num_data_over_batch(mnist_256):
    spec = build_spec("mlp")
    x, y = mnist_256
    model = make_model(spec, prior_scale=1.0)
    fixed = random_posterior(spec, seed=3)
    data = dict(fixed.loc)
    batch = 16
    trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x[:batch], y[:batch], 256)
    trace.compute_log_prob()
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(256 / batch)
    assert torch.equal(obs["value"], y[:batch])
    logits = deterministic_forward(spec, fixed.mean_weights(), x[:batch])
    unscaled = dist.Categorical(logits=logits).log_prob(y[:batch]).sum()
    torch.testing.assert_close(obs["log_prob_sum"], unscaled * 256 / batch, rtol=1e-5, atol=1e-4)
    # without num_data the batch is the whole data set: no scaling
    trace_full = poutine.trace(poutine.condition(model, data=data)).get_trace(x[:batch], y[:batch])
    trace_full.compute_log_prob()
    assert trace_full.nodes["obs"]["scale"] == 1.0
    torch.testing.assert_close(trace_full.nodes["obs"]["log_prob_sum"], unscaled, rtol=1e-5, atol=1e-5)
    # prior sites are never scaled by the data plate
    assert trace.nodes["fc1_weight"]["scale"] == 1.0


def test_minibatch_elbo_averages_to_full_batch_elbo():
    """For one fixed guide draw, the mean over a partition into batches of the scaled
    minibatch loss equals the full-data loss exactly (KL counted once per step)."""
    spec = tiny_spec()
    g = torch.Generator().manual_seed(0)
    n, batch = 12, 4
    x = torch.randn(n, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    pyro.clear_param_store()
    model = make_model(spec, prior_scale=0.7)
    guide = AutoNormal(model, init_scale=0.3)
    guide(x, y, n)  # set up the parameters before seeding, so every loss sees the same draw
    elbo = TraceMeanField_ELBO()

    def loss(xb, yb, num_data):
        pyro.set_rng_seed(123)
        return elbo.loss(model, guide, xb, yb, num_data)

    full = loss(x, y, None)
    minibatch = [loss(x[i : i + batch], y[i : i + batch], n) for i in range(0, n, batch)]
    assert np.mean(minibatch) == pytest.approx(full, rel=1e-5)
    # and the individual batches do differ (the check is not trivially satisfied)
    assert np.ptp(minibatch) > 1e-3

    # the scaled likelihood term: loss(num_data=N) - loss(num_data=B) = -(N/B - 1) * loglik(batch)
    pyro.set_rng_seed(123)
    guide_trace = poutine.trace(guide).get_trace(x[:batch], y[:batch], n)
    weights = {l.name: tuple(guide_trace.nodes[s]["value"] for s in site_names(l.name)) for l in spec.parametric_layers()}
    loglik = dist.Categorical(logits=deterministic_forward(spec, weights, x[:batch])).log_prob(y[:batch]).sum().item()
    difference = loss(x[:batch], y[:batch], n) - loss(x[:batch], y[:batch], batch)
    assert difference == pytest.approx(-(n / batch - 1) * loglik, rel=1e-5)
    pyro.clear_param_store()


def test_posterior_from_guide_reads_constrained_scale():
    spec = tiny_spec()
    pyro.clear_param_store()
    model = make_model(spec, prior_scale=1.0)
    guide = AutoNormal(model, init_scale=0.25)
    guide(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    posterior = posterior_from_guide(spec, guide)
    raw = dict(pyro.get_param_store().named_parameters())
    for site in posterior.scale:
        torch.testing.assert_close(posterior.scale[site], torch.full_like(posterior.scale[site], 0.25))
        torch.testing.assert_close(posterior.scale[site], F.softplus(raw[f"AutoNormal.scales.{site}"]).detach())
    pyro.clear_param_store()


def test_guide_loc_and_scale_is_the_guides_public_constrained_view():
    """The values the ELBO uses (Pyro's public locs / scales) are the raw loc and softplus(raw scale),
    and gradients reach the raw parameters the optimiser updates."""
    spec = tiny_spec()
    pyro.clear_param_store()
    guide = AutoNormal(make_model(spec, prior_scale=1.0), init_scale=0.25)
    guide(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    raw = dict(pyro.get_param_store().named_parameters())
    medians = guide.median()
    for site in ("fc1_weight", "fc2_bias"):
        loc, scale = guide_loc_and_scale(guide, site)
        assert torch.equal(loc, raw[f"AutoNormal.locs.{site}"]) and torch.equal(medians[site], loc.detach())
        torch.testing.assert_close(scale, F.softplus(raw[f"AutoNormal.scales.{site}"]), rtol=0, atol=0)
        (loc.sum() + scale.sum()).backward()
        assert raw[f"AutoNormal.locs.{site}"].grad is not None and raw[f"AutoNormal.scales.{site}"].grad is not None
    pyro.clear_param_store()


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    posterior = random_posterior(build_spec("lenet"), seed=1)
    path = tmp_path / "posterior.npz"
    save_posterior(posterior, path)
    assert [p.name for p in tmp_path.iterdir()] == ["posterior.npz"]  # no temp file left behind
    loaded = load_posterior(path, None)
    assert loaded.spec == posterior.spec
    assert loaded.loc.keys() == posterior.loc.keys() == loaded.scale.keys()
    for site in posterior.loc:
        assert torch.equal(loaded.loc[site], posterior.loc[site])
        assert torch.equal(loaded.scale[site], posterior.scale[site])
        assert loaded.loc[site].dtype == torch.float32


@pytest.fixture()
def saved_arrays(tmp_path):
    posterior = random_posterior(build_spec("mlp"), seed=2)
    path = tmp_path / "good.npz"
    save_posterior(posterior, path)
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def _write(tmp_path, arrays, name="posterior.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _load_error(path) -> str:
    with pytest.raises(PosteriorError) as info:
        load_posterior(path, None)
    assert isinstance(info.value, DataError)  # the stages turn it into exit code 2
    assert str(path) in str(info.value)
    return str(info.value)


def test_load_rejects_nan_loc(tmp_path, saved_arrays):
    saved_arrays["fc2_weight.loc"][3, 4] = np.nan
    message = _load_error(_write(tmp_path, saved_arrays))
    assert "fc2_weight.loc contains NaN or infinite values" in message


def test_load_rejects_infinite_scale(tmp_path, saved_arrays):
    saved_arrays["fc1_bias.scale"][0] = np.inf
    assert "fc1_bias.scale contains NaN or infinite values" in _load_error(_write(tmp_path, saved_arrays))


def test_load_rejects_zero_scale(tmp_path, saved_arrays):
    saved_arrays["fc3_bias.scale"][2] = 0.0
    message = _load_error(_write(tmp_path, saved_arrays))
    assert "fc3_bias.scale has 1 non-positive value(s)" in message


def test_load_rejects_negative_scale(tmp_path, saved_arrays):
    saved_arrays["fc1_weight.scale"][:2, 0] = -0.1
    message = _load_error(_write(tmp_path, saved_arrays))
    assert "fc1_weight.scale has 2 non-positive value(s)" in message


def test_load_rejects_missing_array(tmp_path, saved_arrays):
    del saved_arrays["fc2_bias.scale"]
    assert "missing array 'fc2_bias.scale'" in _load_error(_write(tmp_path, saved_arrays))


def test_load_rejects_wrong_shape(tmp_path, saved_arrays):
    saved_arrays["fc1_weight.loc"] = saved_arrays["fc1_weight.loc"].T.copy()
    message = _load_error(_write(tmp_path, saved_arrays))
    assert "fc1_weight.loc has shape (784, 100), spec says (100, 784)" in message


def test_load_rejects_missing_spec(tmp_path, saved_arrays):
    del saved_arrays["spec"]
    assert "no model description (entry 'spec')" in _load_error(_write(tmp_path, saved_arrays))


def test_load_file_not_found(tmp_path):
    assert "posterior file not found" in _load_error(tmp_path / "missing.npz")


def test_load_not_an_npz(tmp_path):
    path = tmp_path / "posterior.npz"
    path.write_text("this is not an npz archive\n")
    assert "not a readable posterior file" in _load_error(path)


def test_load_truncated_npz(tmp_path):
    path = tmp_path / "posterior.npz"
    save_posterior(random_posterior(tiny_spec()), path)
    path.write_bytes(path.read_bytes()[:200])  # an interrupted copy: zip magic, no directory
    assert "not a readable posterior file" in _load_error(path)


# --------------------------------------------------------------------------- predictions


def test_predict_svi_shape_seeds_and_batching(mnist_256):
    posterior = random_posterior(build_spec("mlp"), seed=4)
    x = mnist_256[0][:7]
    a = predict_svi(posterior, x, num_samples=5, seed=0)
    assert a.shape == (5, 7, 10)
    assert torch.equal(a, predict_svi(posterior, x, num_samples=5, seed=0))
    b = predict_svi(posterior, x, num_samples=5, seed=1)
    assert not torch.allclose(a, b)
    # the samples differ from each other, and batching does not change the draws
    assert (a[0] - a[1]).abs().max() > 1e-3
    torch.testing.assert_close(predict_svi(posterior, x, num_samples=5, seed=0, batch_size=3), a, rtol=1e-5, atol=1e-5)
    # each draw is one weight sample from the generator, in order
    g = torch.Generator().manual_seed(0)
    first = deterministic_forward(posterior.spec, posterior.sample_weights(g), x)
    torch.testing.assert_close(a[0], first, rtol=1e-5, atol=1e-5)


def test_predict_svi_mean_approaches_deterministic_for_small_scale(mnist_256):
    posterior = random_posterior(build_spec("mlp"), seed=4, scale=1e-6)
    x = mnist_256[0][:5]
    samples = predict_svi(posterior, x, num_samples=3, seed=0)
    torch.testing.assert_close(samples.mean(0), predict_deterministic(posterior, x), rtol=0, atol=1e-3)


def test_predict_deterministic_uses_posterior_means(mnist_256):
    posterior = random_posterior(build_spec("lenet"), seed=5)
    x = mnist_256[0][:6]
    weights = {l.name: (posterior.loc[f"{l.name}_weight"], posterior.loc[f"{l.name}_bias"]) for l in posterior.spec.parametric_layers()}
    expected = deterministic_forward(posterior.spec, weights, x)
    out = predict_deterministic(posterior, x, batch_size=4)
    assert out.shape == (6, 10)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not out.requires_grad


def test_local_reparameterization_estimates_the_same_elbo():
    """Both estimators are unbiased for the same negative ELBO: their Monte-Carlo means agree,
    and the local reparameterization one has the smaller spread."""
    spec = ModelSpec(name="lrt", input_shape=(1, 2, 3), layers=(Flatten(), Dense("fc1", 6, 5), ReLU(), Dense("fc2", 5, 3)))
    g = torch.Generator().manual_seed(1)
    n = 40
    x = torch.randn(n, 1, 2, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = make_model(spec, prior_scale=0.5)
    guide = AutoNormal(model, init_scale=0.3)
    guide(x, y, 1000)
    weight_sampling = TraceMeanField_ELBO()
    lrt = local_reparameterization_elbo(spec, guide, prior_scales(spec, 0.5))
    draws = 1500  # enough for a 4-standard-error agreement and the spread comparison; each draw is a Pyro trace
    with torch.no_grad():
        reference = np.array([weight_sampling.loss(model, guide, x, y, 1000) for _ in range(draws)])
        estimate = np.array([float(lrt(model, guide, x, y, 1000)) for _ in range(draws)])
    standard_error = np.sqrt(reference.var() / draws + estimate.var() / draws)
    assert abs(estimate.mean() - reference.mean()) < 4 * standard_error
    assert estimate.std() < reference.std()
    pyro.clear_param_store()


def test_fan_in_prior_scales():
    spec = build_spec("lenet")
    scales = prior_scales(spec, 1.0, PriorScaling.FAN_IN)
    assert scales["conv1_weight"] == pytest.approx(1 / 5)  # fan-in 1 * 5 * 5
    assert scales["fc1_weight"] == pytest.approx(1 / 20)  # fan-in 400
    assert scales["fc1_bias"] == 1.0
    assert set(prior_scales(spec, 0.3).values()) == {0.3}


def test_train_with_local_reparameterization_fits(mnist_256):
    x, y = mnist_256
    config = TrainConfig(epochs=10, batch_size=64, lr=0.01, estimator=GradientEstimator.LOCAL_REPARAMETERIZATION)
    posterior, losses = train_svi(build_spec("mlp"), config, x, y, seed=0, progress=False)
    assert len(losses) == 10 and losses[-1] < losses[0]
    logits = predict_deterministic(posterior, x)
    assert (logits.argmax(-1) == y).float().mean() > 0.5
