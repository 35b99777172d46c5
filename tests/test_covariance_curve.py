"""The fidelity-versus-cost curve (pfp.covariance_curve): the whole-network linearised correction
against an independent oracle, the cost counts, and the curve's structure on a small conv net."""

from __future__ import annotations

import torch

from pfp.backends.torch_ref import GaussianLayerParams
from pfp.bnn import Posterior, site_names
from pfp.covariance_curve import correction_macs, curve, linearised_correction, pfp_macs
from pfp.spec import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, ReLU, build_spec

SMALL = ModelSpec("small", (1, 6, 6), (Conv2d("conv1", 1, 2, 3, padding=1), MaxPool2d(), ReLU(), Flatten(),
                                       Dense("fc1", 18, 6), ReLU(), Dense("fc2", 6, 5), ReLU(), Dense("fc3", 5, 3)))


def small_posterior(seed: int = 0) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    loc, scale = {}, {}
    for layer in SMALL.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 0.2 + 0.4 * torch.randn(shape, generator=g)
            scale[site] = 0.05 + 0.05 * torch.rand(shape, generator=g)
    return Posterior(spec=SMALL, loc=loc, scale=scale)


def params_of(posterior: Posterior) -> dict[str, GaussianLayerParams]:
    out = {}
    for layer in posterior.spec.parametric_layers():
        w, b = site_names(layer.name)
        out[layer.name] = GaussianLayerParams.from_mean_var(posterior.loc[w], posterior.scale[w] ** 2,
                                                            posterior.loc[b], posterior.scale[b] ** 2)
    return out


def test_linearised_correction_matches_finite_covariance_of_the_linear_model():
    """Oracle: the network linearised at the means is linear in the weights, so its logit covariance is
    J diag(sigma^2) J^T with J from finite differences; the independent part comes from a float64 walk."""
    posterior = small_posterior()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    correction = linearised_correction(SMALL, posterior, x)
    # exact part by central finite differences of the deterministic network in float64
    from pfp.backends.torch_ref import deterministic_forward
    from pfp.covariance_curve import LINEARISED_INDEPENDENT

    means = {name: (w.double(), b.double()) for name, (w, b) in posterior.mean_weights().items()}
    exact = torch.zeros(2, 3, dtype=torch.float64)
    step = 1e-4
    for name, (w, b) in means.items():
        wsite, bsite = site_names(name)
        for tensor, var in ((w, posterior.scale[wsite].double() ** 2), (b, posterior.scale[bsite].double() ** 2)):
            flat = tensor.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + step
                up = torch.stack([_forward64(means, xi) for xi in x])
                flat[i] = old - step
                down = torch.stack([_forward64(means, xi) for xi in x])
                flat[i] = old
                exact += ((up - down) / (2 * step)) ** 2 * var.view(-1)[i]
    variances = {layer.name: tuple(posterior.scale[s].double() ** 2 for s in site_names(layer.name))
                 for layer in SMALL.parametric_layers()}
    _, independent = LINEARISED_INDEPENDENT.walk(SMALL, (x.double(), None), {"mean": means, "var": variances})
    torch.testing.assert_close(correction.double(), exact - independent, rtol=2e-3, atol=1e-5)
    assert deterministic_forward  # the module the oracle mirrors


def _forward64(means, image):
    import torch.nn.functional as F

    h = image.unsqueeze(0).double()
    for layer in SMALL.layers:
        if layer.kind == "conv2d":
            h = F.conv2d(h, *means[layer.name], padding=layer.padding)
        elif layer.kind == "dense":
            h = F.linear(h.flatten(1), *means[layer.name])
        elif layer.kind == "relu":
            h = torch.relu(h)
        elif layer.kind == "maxpool2d":
            h = F.max_pool2d(h, 2)
    return h[0]


def test_cost_counts():
    lenet = build_spec("lenet")
    # k = 2: forward vector 120x84 + 84x10, backward 10 rows through fc2 (10 x 120 x 84)
    assert correction_macs(lenet, 2) == 120 * 84 + 84 * 10 + 10 * 120 * 84
    assert correction_macs(lenet, 0) == 0
    assert pfp_macs(build_spec("mlp")) == 100 * 784 * 2 + 100 * 100 * 3 + 10 * 100 * 3


def test_curve_reports_every_option_against_monte_carlo():
    posterior = small_posterior(1)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    report = curve(SMALL, posterior, params_of(posterior), x, samples=400, draws_per_pass=200)
    options = report["options"]
    assert list(options) == ["plain", "dense_last_2", "dense_last_3", "linearised_all_layers"]
    assert options["plain"]["share_of_dropped_covariance"] == 0.0
    assert options["linearised_all_layers"]["share_of_dropped_covariance"] == 1.0
    assert options["dense_last_2"]["extra_macs"] < options["dense_last_3"]["extra_macs"]
    # positive-leaning weights: the dropped covariance is positive, and the dense block holds part of it
    assert 0 < options["dense_last_2"]["share_of_dropped_covariance"] < 1.5
    for row in options.values():
        assert row["p10_ratio"] <= row["median_ratio"] <= row["p90_ratio"]
    assert abs(report["single_variance_rel_se"] - (2 / 399) ** 0.5) < 1e-12


def test_cost_of_a_block_at_the_input_skips_the_first_layer():
    mlp = build_spec("mlp")
    # k = 3 on the MLP: fc1's noise (784 x 100), forward/backward through fc2 and fc3 only
    assert correction_macs(mlp, 3) == 784 * 100 + (100 * 100 + 100 * 10) + 10 * 100 * 100
    assert correction_macs(mlp, 2) == (100 * 100 + 100 * 10) + 10 * 100 * 100
