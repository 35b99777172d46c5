"""Predictive distributions from Gaussian (PFP) and sampled (SVI) logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfp.predictive import gaussian_logit_noise, gaussian_logit_softmax_samples, softmax_samples


def logits(n=4, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, c, generator=g), torch.rand(n, c, generator=g) + 0.1


def test_shapes_and_normalisation():
    mean, var = logits(4, 10)
    out = gaussian_logit_softmax_samples(mean, var, num_samples=7)
    assert isinstance(out, np.ndarray)
    assert out.shape == (7, 4, 10)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
    assert np.all(out >= 0)
    assert gaussian_logit_noise(5, (3, 2), seed=0).shape == (5, 3, 2)


def test_zero_variance_gives_softmax_of_mean_for_every_sample():
    mean, _ = logits()
    out = gaussian_logit_softmax_samples(mean, torch.zeros_like(mean), num_samples=6, seed=3)
    expected = torch.softmax(mean, -1).numpy()
    for sample in out:
        np.testing.assert_allclose(sample, expected, rtol=1e-6, atol=1e-7)


def test_negative_variance_is_clamped_to_zero():
    mean, _ = logits()
    out = gaussian_logit_softmax_samples(mean, torch.full_like(mean, -1.0), num_samples=3)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], torch.softmax(mean, -1).numpy(), rtol=1e-6, atol=1e-7)


def test_same_seed_reproducible_other_seed_differs():
    mean, var = logits()
    a = gaussian_logit_softmax_samples(mean, var, num_samples=5, seed=1)
    b = gaussian_logit_softmax_samples(mean, var, num_samples=5, seed=1)
    c = gaussian_logit_softmax_samples(mean, var, num_samples=5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # the samples differ from each other when the variance is positive
    assert np.abs(a[0] - a[1]).max() > 1e-3


def test_samples_follow_the_given_noise():
    mean, var = logits(3, 4)
    noise = gaussian_logit_noise(2, (3, 4), seed=9)
    expected = torch.softmax(mean + var.sqrt() * noise, -1).numpy()
    np.testing.assert_allclose(gaussian_logit_softmax_samples(mean, var, noise=noise), expected, rtol=1e-5, atol=1e-7)
    # explicit noise == the noise drawn from the same seed
    np.testing.assert_array_equal(gaussian_logit_softmax_samples(mean, var, num_samples=2, seed=9),
                                  gaussian_logit_softmax_samples(mean, var, noise=noise))


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_divides_the_logits(temperature):
    mean, var = logits()
    noise = gaussian_logit_noise(4, tuple(mean.shape), seed=0)
    scaled = gaussian_logit_softmax_samples(mean, var, temperature=temperature, noise=noise)
    expected = torch.softmax((mean + var.sqrt() * noise) / temperature, -1).numpy()
    np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-7)
    # equivalently: temperature T on (m, v) == temperature 1 on (m / T, v / T^2)
    same = gaussian_logit_softmax_samples(mean / temperature, var / temperature**2, noise=noise)
    np.testing.assert_allclose(scaled, same, rtol=1e-5, atol=1e-6)
    # higher temperature -> flatter predictive (higher mean entropy)
    plain = gaussian_logit_softmax_samples(mean, var, noise=noise)

    def entropy(p):
        return -(p * np.log(p + 1e-30)).sum(-1).mean()

    assert (entropy(scaled) > entropy(plain)) == (temperature > 1)


def test_softmax_samples():
    samples = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(0))
    out = softmax_samples(samples)
    assert out.shape == (3, 5, 10)
    np.testing.assert_allclose(out, torch.softmax(samples, -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(softmax_samples(samples, temperature=2.0), torch.softmax(samples / 2, -1).numpy(), rtol=1e-6)
