"""Mean-field Gaussian BNN in Pyro, built from a :class:`~pfp.spec.ModelSpec`.

Every weight and bias of a parametric layer is a sample site with an isotropic Gaussian
prior; the guide is Pyro's ``AutoNormal`` (independent Gaussian per weight). Training
maximises the minibatch ELBO scaled to the full data set (``pyro.plate`` with
``subsample``), with the KL term computed analytically (``TraceMeanField_ELBO``).

Example::

    >>> posterior, losses = train_svi(build_spec("mlp"), TrainConfig(epochs=1), x, y, seed=0)
    >>> save_posterior(posterior, "posterior.npz")  # pfp.artifacts.posterior
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from tqdm.auto import tqdm

from pfp.backends.torch_ref import deterministic_forward, sampled_forward
from pfp.config import GradientEstimator, PriorScaling, TrainConfig
from pfp.data.idx import DataError
from pfp.spec import ModelSpec


class PosteriorError(DataError):
    """A saved posterior is unreadable or holds invalid values (NaN, non-positive scales)."""


def site_names(layer_name: str) -> tuple[str, str]:
    # Underscores, not dots: AutoNormal nests dotted names into sub-modules.
    return f"{layer_name}_weight", f"{layer_name}_bias"


def prior_scales(spec: ModelSpec, prior_scale: float, scaling: PriorScaling = PriorScaling.FIXED) -> dict[str, float]:
    """Prior standard deviation per sample site."""
    scales = {}
    for layer in spec.parametric_layers():
        weight_site, bias_site = site_names(layer.name)
        fan_in = math.prod(layer.weight_shape[1:])
        # fan-in scaling keeps the prior's pre-activation variance independent of layer width
        scales[weight_site] = prior_scale / math.sqrt(fan_in) if scaling is PriorScaling.FAN_IN else prior_scale
        scales[bias_site] = prior_scale
    return scales


def make_model(spec: ModelSpec, prior_scale: float, scaling: PriorScaling = PriorScaling.FIXED) -> Callable:
    """Pyro model ``model(x, y=None, num_data=None, kl_weight=1.0)`` for a spec (x normalised, NCHW)."""

    scales = prior_scales(spec, prior_scale, scaling)

    def model(x: torch.Tensor, y: Optional[torch.Tensor] = None, num_data: Optional[int] = None, kl_weight: float = 1.0):
        weights = {}
        with poutine.scale(scale=kl_weight):  # KL warm-up; 1.0 is the exact ELBO
            for layer in spec.parametric_layers():
                weight_site, bias_site = site_names(layer.name)
                weight_prior = dist.Normal(0.0, scales[weight_site]).expand(layer.weight_shape).to_event(len(layer.weight_shape))
                weight = pyro.sample(weight_site, weight_prior)
                bias = pyro.sample(bias_site, dist.Normal(0.0, scales[bias_site]).expand(layer.bias_shape).to_event(1))
                weights[layer.name] = (weight, bias)
        logits = deterministic_forward(spec, weights, x)
        size = num_data if num_data is not None else x.shape[0]
        # subsample= makes Pyro scale the likelihood by size / batch: the unbiased full-data ELBO.
        with pyro.plate("data", size=size, subsample=torch.arange(x.shape[0])):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    return model


def _init_loc(site: dict) -> torch.Tensor:
    """Start means like PyTorch's default layer init (fan-in scaled), biases at zero."""
    shape = site["fn"].shape() if hasattr(site["fn"], "shape") else site["value"].shape
    if site["name"].endswith("_bias"):
        return torch.zeros(shape)
    fan_in = int(np.prod(shape[1:]))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


@dataclass
class Posterior:
    """Constrained mean-field posterior: loc and scale (std, > 0) per sample site."""

    spec: ModelSpec
    loc: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]

    def mean_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {layer.name: tuple(self.loc[site] for site in site_names(layer.name)) for layer in self.spec.parametric_layers()}

    def sample_weights(self, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        weights = {}
        for layer in self.spec.parametric_layers():
            pair = []
            for site in site_names(layer.name):
                noise = torch.randn(self.loc[site].shape, generator=generator)
                pair.append(self.loc[site] + self.scale[site] * noise)
            weights[layer.name] = tuple(pair)
        return weights


def guide_loc_and_scale(guide: AutoNormal, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loc and *constrained* scale (``guide.scale_constraint``, softplus) of one site, with gradients.

    Reads the guide's public ``locs`` / ``scales`` modules: a ``PyroParam`` attribute returns its
    constrained value (site names hold no dots, so each is a direct attribute).
    """
    return getattr(guide.locs, site), getattr(guide.scales, site)


def posterior_from_guide(spec: ModelSpec, guide: AutoNormal) -> Posterior:
    """Read loc (``guide.median()``: every site is real-valued) and *constrained* scale from the guide."""
    medians = guide.median()
    loc, scale = {}, {}
    with torch.no_grad():
        for layer in spec.parametric_layers():
            for site in site_names(layer.name):
                loc[site] = medians[site].detach().clone()
                scale[site] = getattr(guide.scales, site).detach().clone()
    return Posterior(spec=spec, loc=loc, scale=scale)


def local_reparameterization_elbo(spec: ModelSpec, guide: AutoNormal, priors: dict[str, float], num_particles: int = 1) -> Callable:
    """Negative ELBO of the same model and AutoNormal guide, estimated with the local
    reparameterization trick: analytic KL plus a likelihood term where each dense layer's
    pre-activations are drawn from their exact Gaussian given the layer input (independent
    per example, so far less gradient noise than one weight draw shared by the minibatch).
    Conv layers draw their weights once per minibatch (pre-activations there are correlated).
    Returns a callable ``loss(model, guide, x, y, num_data, kl_weight)`` for ``pyro.infer.SVI``.
    """

    def loss(_model, _guide, x, y, num_data, kl_weight=1.0):
        kl = x.new_zeros(())
        moments = {}
        for layer in spec.parametric_layers():
            pair = []
            for site in site_names(layer.name):
                loc, scale = guide_loc_and_scale(guide, site)
                kl = kl + torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, priors[site])).sum()
                pair.append((loc, scale))
            moments[layer.name] = pair
        nll = x.new_zeros(())
        for _ in range(num_particles):
            nll = nll + F.cross_entropy(sampled_forward(spec, moments, x), y, reduction="sum")
        return nll * (num_data / x.shape[0]) / num_particles + kl_weight * kl

    return loss


def train_svi(
    spec: ModelSpec,
    config: TrainConfig,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    seed: int,
    progress: bool = True,
) -> tuple[Posterior, list[float]]:
    """Fit the mean-field posterior by SVI; returns it with the mean ELBO loss per epoch (per example)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_data = x_train.shape[0]
    model = make_model(spec, config.prior_scale, config.prior_scaling)
    guide = AutoNormal(model, init_loc_fn=_init_loc, init_scale=float(config.init_scale))

    def scaled_guide(x, y=None, num_data=None, kl_weight=1.0):
        # TraceMeanField_ELBO scales each analytic KL term by the guide site's scale.
        with poutine.scale(scale=kl_weight):
            return guide(x, y, num_data, kl_weight)

    steps_per_epoch = math.ceil(num_data / config.batch_size)
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # Exponential decay to lr * lr_final_factor at the last step: SVI's noisy gradients need it to settle.
    lr_decay = config.lr_final_factor ** (1.0 / max(total_steps, 1))
    if config.estimator is GradientEstimator.LOCAL_REPARAMETERIZATION:
        guide(x_train[:1], y_train[:1], num_data)  # create the guide's parameters
        elbo = local_reparameterization_elbo(spec, guide, prior_scales(spec, config.prior_scale, config.prior_scaling), config.num_particles)
        parameters = list(guide.parameters())  # the unconstrained locs and scales
        optimiser = torch.optim.Adam(parameters, lr=config.lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=lr_decay)

        def step_fn(x, y, kl_weight):
            optimiser.zero_grad()
            loss = elbo(model, guide, x, y, num_data, kl_weight)
            loss.backward()
            for parameter in parameters:  # same per-tensor clipping as pyro's ClippedAdam
                torch.nn.utils.clip_grad_norm_(parameter, 10.0)
            optimiser.step()
            schedule.step()
            return float(loss.detach())
    else:
        elbo = TraceMeanField_ELBO(num_particles=config.num_particles)
        svi = SVI(model, scaled_guide, pyro.optim.ClippedAdam({"lr": config.lr, "lrd": lr_decay}), loss=elbo)

        def step_fn(x, y, kl_weight):
            return svi.step(x, y, num_data, kl_weight)

    losses: list[float] = []
    step = 0
    bar = tqdm(total=total_steps, desc=f"SVI {spec.name}", unit="step", disable=not progress)
    while step < total_steps:
        order = torch.randperm(num_data, generator=generator)
        epoch_loss, epoch_count = 0.0, 0
        for start in range(0, num_data, config.batch_size):
            if step >= total_steps:
                break
            index = order[start : start + config.batch_size]
            kl_weight = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
            loss = step_fn(x_train[index], y_train[index], kl_weight)
            if not math.isfinite(loss):
                raise FloatingPointError(f"SVI {spec.name}: loss became {loss} at step {step}; lower train.{spec.name}.lr")
            epoch_loss += loss
            epoch_count += 1
            step += 1
            bar.update(1)
        losses.append(epoch_loss / epoch_count / num_data)
        bar.set_postfix(elbo_loss=f"{losses[-1]:.4f}")
    bar.close()
    if total_steps == 0:
        guide(x_train[:1], y_train[:1], num_data)  # materialise the guide's parameters
    return posterior_from_guide(spec, guide), losses


def predict_svi(
    posterior: Posterior, x: torch.Tensor, *, num_samples: int, seed: int, batch_size: int = 1000
) -> torch.Tensor:
    """Logits of ``num_samples`` weight draws, shape (S, N, C)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    with torch.no_grad():
        for _ in range(num_samples):
            weights = posterior.sample_weights(generator)
            outputs.append(torch.cat([deterministic_forward(posterior.spec, weights, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]))
    return torch.stack(outputs)


def predict_deterministic(posterior: Posterior, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    weights = posterior.mean_weights()
    with torch.no_grad():
        return torch.cat([deterministic_forward(posterior.spec, weights, x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
