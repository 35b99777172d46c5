"""From logits to predictive distributions, for sampled (SVI) and Gaussian (PFP) logits."""

from __future__ import annotations

import numpy as np
import torch


def gaussian_logit_noise(num_samples: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal draws for Monte-Carlo over Gaussian logits (fixed per seed, so the
    calibration objective is a smooth, deterministic function of its parameters)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_samples, *shape), generator=generator)


def gaussian_logit_softmax_samples(
    logit_mean: torch.Tensor,
    logit_var: torch.Tensor,
    *,
    num_samples: int = 100,
    temperature: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
) -> np.ndarray:
    """Softmax of K draws z ~ N(mean, var) over the logits only (no network passes): (K, N, C).

    Averaging gives E[softmax(z)]; the spread gives the mutual information.
    """
    if noise is None:
        noise = gaussian_logit_noise(num_samples, tuple(logit_mean.shape), seed)
    logits = (logit_mean + logit_var.clamp_min(0).sqrt() * noise) / temperature
    return torch.softmax(logits, dim=-1).numpy()


def softmax_samples(logit_samples: torch.Tensor, *, temperature: float = 1.0) -> np.ndarray:
    """Per-sample softmax of sampled logits (S, N, C), e.g. SVI's weight draws."""
    return torch.softmax(logit_samples / temperature, dim=-1).numpy()
