"""Shared test helpers (not a test module: no test imports another test module)."""

from __future__ import annotations

import torch

from pfp.bnn import Posterior, site_names
from pfp.spec import build_spec


def random_posterior(model: str, seed: int = 0) -> Posterior:
    """A posterior of a built-in model: locs ~ 0.1 N(0, 1), scales in [0.01, 0.03)."""
    spec = build_spec(model)
    g = torch.Generator().manual_seed(seed)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = 0.1 * torch.randn(shape, generator=g)
            scale[site] = 0.01 + 0.02 * torch.rand(shape, generator=g)
    return Posterior(spec=spec, loc=loc, scale=scale)
