"""Weight sets every backend builds its baselines from: draws from the mean-field posterior.

The SVI ensemble of every backend (compiled or reference) uses :func:`ensemble_weights`, the
same ``samples`` draws for a given seed, so their outputs can be compared one to one.
"""

from __future__ import annotations

import torch

from pfp.bnn import Posterior, site_names

__all__ = ["ensemble_weights", "sample_stacked_weights"]


def sample_stacked_weights(posterior: Posterior, samples: int, generator: torch.Generator | None = None) -> dict:
    """``samples`` weight sets from the mean-field posterior, stacked per layer: {name: (w (S, ...), b (S, ...))}."""
    weights = {}
    for layer in posterior.spec.parametric_layers():
        pair = []
        for site in site_names(layer.name):
            loc, scale = posterior.loc[site], posterior.scale[site]
            pair.append(loc + scale * torch.randn((samples, *loc.shape), generator=generator))
        weights[layer.name] = tuple(pair)
    return weights


def ensemble_weights(posterior: Posterior, samples: int, seed: int) -> dict:
    """``samples`` weight sets drawn once from the posterior (fixed by ``seed``), stacked per layer."""
    return sample_stacked_weights(posterior, samples, torch.Generator().manual_seed(seed))
