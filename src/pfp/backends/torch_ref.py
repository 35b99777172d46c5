"""PyTorch reference backend of the Probabilistic Forward Pass (PFP).

Every activation is carried as a pair ``(mean, var)`` of float32 tensors shaped like the
activation itself (batch first). The operators implement the moment-matching equations of
``docs/pfp-notes.md`` section 1 and are the ground truth the compiled (TVM) backend is
tested against, so they favour clarity and numerical robustness over raw speed; all of them
are still fully vectorised.

Example::

    >>> spec = build_spec("mlp")
    >>> logit_mean, logit_var = pfp_forward(spec, params, images)   # (B, 10) each
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pfp.backends.covariance import CovarianceBlock, covariance_block
from pfp.spec import Conv2d, Dense, LayerTable, ModelSpec, PoolRule, layer_entry, pool_rule

__all__ = [
    "CLARK_EPS",
    "RELU_VAR_EPS",
    "LOGISTIC_C1",
    "LOGISTIC_C3",
    "LOGISTIC_CDF_MAX_ERROR",
    "LOGISTIC_MEAN_MAX_ERROR",
    "LOGISTIC_PDF_MAX_ERROR",
    "LOGISTIC_POOL_MEAN_ERROR",
    "LOGISTIC_POOL_MEAN_ERROR_ANY",
    "LOGISTIC_POOL_VAR_ERROR",
    "LOGISTIC_VAR_MAX_ERROR",
    "GaussianLayerParams",
    "conv2d",
    "conv2d_first",
    "covariance_correction",
    "dense",
    "dense_first",
    "deterministic_forward",
    "ensemble_forward",
    "flatten",
    "max2",
    "maxpool2x2",
    "pfp_forward",
    "relu",
    "sampled_forward",
    "scale_variance",
]

#: Added to var1 + var2 in Clark's max so t > 0 even when both inputs are deterministic.
#: Small enough that the bias it adds to a tie of two deterministic values (sqrt(eps)*phi(0)
#: = 4e-7) is negligible, large enough to stay a normal float32.
CLARK_EPS = 1e-12
#: Below this variance a ReLU input is treated as deterministic (ReLU applied to the mean).
RELU_VAR_EPS = 1e-12
# Standardised arguments beyond this are clipped. Phi saturates to exactly 0/1 in float32
# beyond |a| ~ 14, so clipping changes no result; it only keeps a^2 finite (no inf * 0 = nan).
_MAX_STD_ARG = 40.0
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class GaussianLayerParams:
    """Mean-field Gaussian parameters of one layer (float32 tensors)."""

    weight_mean: Tensor
    weight_var: Tensor  # sigma_w^2
    weight_m2: Tensor  # E[w^2] = sigma_w^2 + mu_w^2, precomputed at conversion
    bias_mean: Tensor
    bias_var: Tensor

    @classmethod
    def from_mean_var(cls, weight_mean: Tensor, weight_var: Tensor,
                      bias_mean: Tensor, bias_var: Tensor) -> GaussianLayerParams:
        """Build the parameters from means and variances, precomputing E[w^2]."""
        weight_mean, weight_var, bias_mean, bias_var = (
            torch.as_tensor(t, dtype=torch.float32) for t in (weight_mean, weight_var, bias_mean, bias_var))
        if weight_mean.shape != weight_var.shape or bias_mean.shape != bias_var.shape:
            raise ValueError("mean and variance tensors must have the same shape")
        return cls(weight_mean, weight_var, weight_var + weight_mean.square(), bias_mean, bias_var)


def scale_variance(p: GaussianLayerParams, factor: float) -> GaussianLayerParams:
    """Multiply every weight and bias variance by ``factor`` (E[w^2] recomputed)."""
    if factor == 1.0:
        return p
    if factor < 0:
        raise ValueError(f"variance scale must be >= 0, got {factor}")
    return GaussianLayerParams.from_mean_var(p.weight_mean, p.weight_var * factor,
                                             p.bias_mean, p.bias_var * factor)


# --------------------------------------------------------------------------- helpers

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _cdf(a: Tensor) -> Tensor:
    """Standard normal CDF via erfc: accurate in the lower tail, where ndtr's (1 + erf) / 2 is not."""
    return 0.5 * torch.special.erfc(-a * _INV_SQRT2)


def _phi(a: Tensor) -> Tensor:
    """Standard normal pdf."""
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _clark_h(a: Tensor, cdf: Tensor, cdf_neg: Tensor, pdf: Tensor) -> Tensor:
    """h(a) = a^2 Phi(a) Phi(-a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2  (<= 0).

    Var[max(X1, X2)] = var1 Phi(a) + var2 Phi(-a) + t^2 h(a) is the algebraic rewrite of
    Clark's E2 - mu^2. The rewrite never subtracts the (possibly huge) squared means, so
    the absolute error is ~ float eps * t^2 instead of ~ float eps * mu^2. Phi(-a) is
    evaluated directly (not as 1 - Phi(a)) so Phi(a) Phi(-a) keeps its relative accuracy.
    """
    return a * a * cdf * cdf_neg + a * pdf * (cdf_neg - cdf) - pdf * pdf


# --------------------------------------------------------------------------- linear layers

def dense_first(x: Tensor, p: GaussianLayerParams) -> tuple[Tensor, Tensor]:
    """Gaussian dense layer on a deterministic input x of shape (B, in)."""
    mean = F.linear(x, p.weight_mean, p.bias_mean)
    var = F.linear(x.square(), p.weight_var, p.bias_var)
    return mean, var


def dense(mean: Tensor, var: Tensor, p: GaussianLayerParams) -> tuple[Tensor, Tensor]:
    """Gaussian dense layer on independent Gaussian inputs N(mean, var) of shape (B, in)."""
    out_mean = F.linear(mean, p.weight_mean, p.bias_mean)
    # All-positive form var_x E[w^2] + mu_x^2 sigma_w^2 + var_b instead of the textbook
    # E[x^2] E[w^2] - mu_x^2 mu_w^2: when variances are small next to the squared means the
    # difference subtracts two nearly equal large numbers (catastrophic cancellation in
    # float32, it can even come out negative); a sum of non-negative terms has a relative
    # error of a few ulps and is >= 0 by construction. Same cost: two products per weight.
    out_var = F.linear(var, p.weight_m2, p.bias_var) + F.linear(mean.square(), p.weight_var)
    return out_mean, out_var


def conv2d_first(x: Tensor, p: GaussianLayerParams, stride: int = 1,
                 padding: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian 2-D convolution (NCHW) on a deterministic input."""
    # Zero padding is a deterministic 0, which adds nothing to either sum: plain F.conv2d
    # padding is exact for both moments.
    mean = F.conv2d(x, p.weight_mean, p.bias_mean, stride=stride, padding=padding)
    var = F.conv2d(x.square(), p.weight_var, p.bias_var, stride=stride, padding=padding)
    return mean, var


def conv2d(mean: Tensor, var: Tensor, p: GaussianLayerParams, stride: int = 1,
           padding: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian 2-D convolution (NCHW) on independent Gaussian inputs."""
    out_mean = F.conv2d(mean, p.weight_mean, p.bias_mean, stride=stride, padding=padding)
    # Same all-positive variance form as :func:`dense` (see there for why).
    out_var = (F.conv2d(var, p.weight_m2, p.bias_var, stride=stride, padding=padding)
               + F.conv2d(mean.square(), p.weight_var, None, stride=stride, padding=padding))
    return out_mean, out_var


# --------------------------------------------------------------------------- non-linearities

def relu(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ReLU(X) for X ~ N(mean, var) (rectified Gaussian)."""
    var = var.clamp_min(0.0)
    std = torch.sqrt(var.clamp_min(RELU_VAR_EPS))  # clamp: no 0/0 where var == 0
    a = (mean / std).clamp(-_MAX_STD_ARG, _MAX_STD_ARG)
    cdf, cdf_neg, pdf = _cdf(a), _cdf(-a), _phi(a)
    out_mean = mean * cdf + std * pdf
    # ReLU(X) = max(X, 0): Clark's variance with var2 = 0, i.e. var * (Phi(a) + h(a)). This
    # equals E[relu^2] - E[relu]^2 but stays accurate when mean^2 >> var (e.g. a confident
    # positive pre-activation, where the difference would be pure float32 rounding noise).
    out_var = (var * (cdf + _clark_h(a, cdf, cdf_neg, pdf))).clamp_min(0.0)
    # Vanishing variance: ReLU is deterministic there; use it exactly rather than the
    # (already tiny) std * phi(a) correction computed with the clamped std.
    deterministic = var <= RELU_VAR_EPS
    out_mean = torch.where(deterministic, mean.clamp_min(0.0), out_mean)
    out_var = torch.where(deterministic, torch.zeros_like(out_var), out_var)
    return out_mean, out_var


#: Logistic approximation of the normal cdf, Phi(a) ~ sigmoid(a (C1 + C3 a^2)) (Bowling et al. 2009), and
#: its derivative for phi: one exp, vectorisable, no erfc. Max abs errors over the whole real line
#: (float64, a grid of step 1e-4 on [-40, 40]; tests/backends/test_torch_ref.py checks them):
LOGISTIC_C1, LOGISTIC_C3 = 1.5976, 0.07056
LOGISTIC_CDF_MAX_ERROR = 1.5e-4  # |Phi_L(a) - Phi(a)| (1.42e-4 at |a| ~ 0.4 and 2.3)
LOGISTIC_PDF_MAX_ERROR = 4.6e-4  # |phi_L(a) - phi(a)|
#: Error of one Clark max with the approximation: mean = mu2 + t (a Phi(a) + phi(a)) errs by at most
#: this x t; the variance (var1 Phi(a) + var2 Phi(-a) + t^2 h(a)) by at most LOGISTIC_VAR_MAX_ERROR x t^2.
LOGISTIC_MEAN_MAX_ERROR = 4.8e-4
LOGISTIC_VAR_MAX_ERROR = 1.3e-3
#: ... and of a whole 2x2 pool (three Clark maxima, each stage's error fed into the next): measured, not
#: proven, over 400k random windows (scales 1e-3..1e3, 20 % with a deterministic element) as at most
#: 2.9e-3 s on the mean and 1.9e-3 s^2 on the variance, s^2 the sum of the window's four variances
#: (pairwise Clark's own bias against the true max of four is ~0.1 s). Bounds with a margin:
LOGISTIC_POOL_MEAN_ERROR = 3.5e-3
LOGISTIC_POOL_VAR_ERROR = 2.5e-3
#: The mean bound above does not hold for every window: when two near-deterministic elements tie and the
#: other two lie far below with large variances, the vertical max takes the square root of two small
#: first-stage variances whose absolute error (LOGISTIC_VAR_MAX_ERROR t^2) is large relative to them.
#: Worst case found by optimisation (Nelder-Mead from 300 random windows, float64; the window is in
#: tests/reliability/test_numerics_torch.py): 1.36e-2 s on the mean, while the variance stayed within
#: LOGISTIC_POOL_VAR_ERROR (worst 1.92e-3 s^2). Bound over all windows, with a margin:
LOGISTIC_POOL_MEAN_ERROR_ANY = 1.6e-2


def _logistic_stats(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Phi_L(a), Phi_L(-a), phi_L(a)) of the logistic approximation (phi_L = Phi_L', so the moments stay consistent)."""
    z = a * (LOGISTIC_C1 + LOGISTIC_C3 * a * a)
    cdf, cdf_neg = torch.sigmoid(z), torch.sigmoid(-z)
    return cdf, cdf_neg, cdf * cdf_neg * (LOGISTIC_C1 + 3.0 * LOGISTIC_C3 * a * a)


def max2(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor, *,
         logistic: bool = False) -> tuple[Tensor, Tensor]:
    """Clark's moment matching of max(X1, X2) for independent Gaussians X1, X2.

    ``logistic``: Phi and phi by the logistic approximation (:data:`LOGISTIC_C1`), error bounded by
    :data:`LOGISTIC_MEAN_MAX_ERROR` t and :data:`LOGISTIC_VAR_MAX_ERROR` t^2.
    """
    var1, var2 = var1.clamp_min(0.0), var2.clamp_min(0.0)
    t2 = var1 + var2 + CLARK_EPS
    t = torch.sqrt(t2)
    a = ((mean1 - mean2) / t).clamp(-_MAX_STD_ARG, _MAX_STD_ARG)
    cdf, cdf_neg, pdf = _logistic_stats(a) if logistic else (_cdf(a), _cdf(-a), _phi(a))
    out_mean = mean1 * cdf + mean2 * cdf_neg + t * pdf
    # Algebraically identical to E2 - mu^2 of the notes, without the cancellation (see _clark_h).
    out_var = (var1 * cdf + var2 * cdf_neg + t2 * _clark_h(a, cdf, cdf_neg, pdf)).clamp_min(0.0)
    return out_mean, out_var


def _argmax2(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """The moments of whichever input has the larger mean (the first on a tie)."""
    second = mean2 > mean1
    return torch.where(second, mean2, mean1), torch.where(second, var2, var1).clamp_min(0.0)


def maxpool2x2(mean: Tensor, var: Tensor, rule: PoolRule | str = PoolRule.CLARK) -> tuple[Tensor, Tensor]:
    """2x2 max-pooling, stride 2 (NCHW), by ``rule`` (:class:`pfp.spec.PoolRule`): horizontal pairs, then vertical.

    ``clark`` / ``clark_logistic``: pairwise Clark max (exact / logistic Phi); ``argmax_mean``: the
    moments of the window element with the largest mean, the first in row-major order on ties (the
    pairs keep their first element on a tie, and the top row comes first).
    Each output (i, j) depends only on its own window rows 2i..2i+1, columns 2j..2j+1.
    """
    height, width = mean.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"2x2 max-pool needs even height and width, got {height}x{width}")
    rule = pool_rule(rule)
    pair = _argmax2 if rule is PoolRule.ARGMAX_MEAN else functools.partial(
        max2, logistic=rule is PoolRule.CLARK_LOGISTIC)
    # Strided slices pick the left/right column of every window at once: (.., H, W/2).
    row_mean, row_var = pair(mean[..., 0::2], var[..., 0::2], mean[..., 1::2], var[..., 1::2])
    # Then the top/bottom row of every window: (.., H/2, W/2).
    return pair(row_mean[..., 0::2, :], row_var[..., 0::2, :], row_mean[..., 1::2, :], row_var[..., 1::2, :])


def flatten(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten every dimension after the batch one (C, H, W order, like torch.flatten)."""
    return mean.flatten(1), var.flatten(1)


# --------------------------------------------------------------------------- whole network

def _check_input(spec: ModelSpec, x: Tensor) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise ValueError(f"{spec.name}: expects input (B, {', '.join(map(str, spec.input_shape))}), "
                         f"got {tuple(x.shape)}")
    return x





# The four PyTorch networks of one spec, each a LayerTable driven by the one walk
# (pfp.spec.LayerTable.walk). Handlers: (layer, index, state, context) -> state.

@dataclass(frozen=True)
class _PFPContext:
    params: dict[str, GaussianLayerParams]
    variance_scale: float
    block: CovarianceBlock | None = None  # the covariance-aware PFP's corrected block
    records: list = field(default_factory=list)  # (kind, name, mean, var) of the block's layer inputs

    def record(self, index: int, kind: str, name: str | None, state) -> None:
        if self.block is not None and index >= self.block.start:
            self.records.append((kind, name, *state))


def _flat(tensor: Tensor | None, start: int = 1) -> Tensor | None:
    return None if tensor is None else tensor.flatten(start)


def _pfp_dense(layer: Dense, index, state, ctx: _PFPContext):
    h, var = state
    p = scale_variance(layer_entry(ctx.params, layer.name), ctx.variance_scale)
    if h.dim() > 2:  # tolerate a spec that omits Flatten before a dense layer
        h, var = h.flatten(1), _flat(var)
    ctx.record(index, "dense", layer.name, (h, var))
    return dense_first(h, p) if var is None else dense(h, var, p)


def _pfp_conv2d(layer: Conv2d, _index, state, ctx: _PFPContext):
    h, var = state
    p = scale_variance(layer_entry(ctx.params, layer.name), ctx.variance_scale)
    return (conv2d_first(h, p, layer.stride, layer.padding) if var is None
            else conv2d(h, var, p, layer.stride, layer.padding))


def _pfp_relu(_layer, index, state, ctx: _PFPContext):
    ctx.record(index, "relu", None, state)
    return (torch.relu(state[0]), None) if state[1] is None else relu(*state)


def _relu_slope(mean: Tensor, var: Tensor | None) -> Tensor:
    """E[ReLU'(X)] = Phi(mean / std): the first-order covariance transfer of a Gaussian ReLU."""
    if var is None:
        return (mean > 0).to(mean.dtype)
    std = torch.sqrt(var.clamp_min(RELU_VAR_EPS))
    return torch.where(var <= RELU_VAR_EPS, (mean > 0).to(mean.dtype),
                       _cdf((mean / std).clamp(-_MAX_STD_ARG, _MAX_STD_ARG)))


def covariance_correction(ctx: _PFPContext) -> Tensor:
    """``exact - independent`` of :mod:`pfp.backends.covariance` from the block's recorded inputs, (B, C)."""
    block, records = ctx.block, ctx.records
    params = {name: scale_variance(layer_entry(ctx.params, name), ctx.variance_scale) for name in block.dense_names}
    noisy = set(block.noisy_dense)
    slopes = {i: _relu_slope(mean, var) for i, (kind, _, mean, var) in enumerate(records) if kind == "relu"}
    noise = {name: F.linear(mean.square() + (0 if var is None else var), params[name].weight_var, params[name].bias_var)
             for kind, name, mean, var in records if kind == "dense" and name in noisy}
    # independent: one vector forward through squared mean weights and squared slopes
    boundary = records[0][3]
    independent = boundary
    for i, (kind, name, _mean, _var) in enumerate(records):
        if kind == "dense":
            w2 = params[name].weight_mean.square()
            independent = None if independent is None else F.linear(independent, w2)
            if name in noise:
                independent = noise[name] if independent is None else independent + noise[name]
        elif kind == "relu" and independent is not None:
            independent = independent * slopes[i].square()
    # exact: C Jacobian rows backward through the mean weights and slopes, (B, C, units)
    jacobian, exact = None, 0.0
    for i in range(len(records) - 1, -1, -1):
        kind, name = records[i][:2]
        if kind == "dense":
            if name in noise:
                exact = exact + (jacobian.square() * noise[name].unsqueeze(1)).sum(-1)
            if i == 0 and boundary is None:
                break  # deterministic block input: no boundary variance to carry
            weight = params[name].weight_mean
            jacobian = weight.expand(1, *weight.shape) if jacobian is None else jacobian @ weight
        elif kind == "relu":
            jacobian = jacobian * slopes[i].unsqueeze(1)
    if boundary is not None:
        exact = exact + (jacobian.square() * boundary.unsqueeze(1)).sum(-1)
    return exact - (0.0 if independent is None else independent)


#: (mean, var) through the network; var is None while the activation is still deterministic
PFP_LAYERS = LayerTable("torch.pfp", {
    "flatten": lambda _layer, _index, state, _ctx: (state[0].flatten(1), _flat(state[1])),
    "dense": _pfp_dense,
    "conv2d": _pfp_conv2d,
    "relu": _pfp_relu,
    "maxpool2d": lambda layer, _index, state, _ctx: ((F.max_pool2d(state[0], 2), None) if state[1] is None
                                                     else maxpool2x2(*state, layer.rule)),
})


def pfp_forward(spec: ModelSpec, params: dict[str, GaussianLayerParams], x: Tensor, *,
                variance_scale: float = 1.0, covariance_layers: int = 0) -> tuple[Tensor, Tensor]:
    """One probabilistic forward pass: logit mean and variance, each (B, num_classes).

    ``x`` is the deterministic input (B, *spec.input_shape). ``variance_scale`` multiplies
    every weight and bias variance (calibration); 0 gives the network of the means.
    ``covariance_layers`` > 1 adds back the covariance the last that many dense layers' shared
    inputs induce (:mod:`pfp.backends.covariance`); 0 is plain PFP.
    """
    ctx = _PFPContext(params, variance_scale, covariance_block(spec, covariance_layers))
    h, var = PFP_LAYERS.walk(spec, (_check_input(spec, x), None), ctx)
    if var is None:  # a spec without parametric layers: deterministic output
        var = torch.zeros_like(h)
    elif ctx.block is not None:
        var = (var + covariance_correction(ctx)).clamp_min(0.0)
    return h, var


def _det_dense(layer: Dense, _index, h: Tensor, weights) -> Tensor:
    weight, bias = layer_entry(weights, layer.name)
    return F.linear(h.flatten(1) if h.dim() > 2 else h, weight, bias)


def _det_conv2d(layer: Conv2d, _index, h: Tensor, weights) -> Tensor:
    weight, bias = layer_entry(weights, layer.name)
    return F.conv2d(h, weight, bias, stride=layer.stride, padding=layer.padding)


_DETERMINISTIC_POINTWISE = {
    "flatten": lambda _layer, _index, h, _ctx: h.flatten(1),
    "relu": lambda _layer, _index, h, _ctx: torch.relu(h),
    "maxpool2d": lambda _layer, _index, h, _ctx: F.max_pool2d(h, 2),
}

#: logits of one weight set {layer: (weight, bias)}
DETERMINISTIC_LAYERS = LayerTable("torch.deterministic", {
    **_DETERMINISTIC_POINTWISE, "dense": _det_dense, "conv2d": _det_conv2d})


def deterministic_forward(spec: ModelSpec, weights: dict[str, tuple[Tensor, Tensor]],
                          x: Tensor) -> Tensor:
    """Plain forward pass with one (weight, bias) pair per parametric layer; logits (B, C).

    Used for the deterministic baseline and for each weight sample of SVI.
    """
    return DETERMINISTIC_LAYERS.walk(spec, _check_input(spec, x), weights)


def _sampled_dense(layer: Dense, _index, h: Tensor, moments) -> Tensor:
    (w_loc, w_scale), (b_loc, b_scale) = moments[layer.name]
    mean = F.linear(h, w_loc, b_loc)
    var = F.linear(h * h, w_scale * w_scale, b_scale * b_scale)
    return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)


def _sampled_conv2d(layer: Conv2d, _index, h: Tensor, moments) -> Tensor:
    (w_loc, w_scale), (b_loc, b_scale) = moments[layer.name]
    weight = w_loc + w_scale * torch.randn_like(w_loc)
    bias = b_loc + b_scale * torch.randn_like(b_loc)
    return F.conv2d(h, weight, bias, stride=layer.stride, padding=layer.padding)


#: one sampled network of SVI training: dense layers by local reparameterization (the
#: pre-activation drawn from its Gaussian), convolutions with one weight draw per batch
SAMPLED_LAYERS = LayerTable("torch.sampled", {
    **_DETERMINISTIC_POINTWISE, "dense": _sampled_dense, "conv2d": _sampled_conv2d})


def sampled_forward(spec: ModelSpec, moments: dict, x: Tensor) -> Tensor:
    """Logits of one sampled network; ``moments[layer] = ((w_loc, w_scale), (b_loc, b_scale))``.

    Draws from torch's global generator (seed it for repeatable draws).
    """
    return SAMPLED_LAYERS.walk(spec, x, moments)


@dataclass(frozen=True)
class _EnsembleContext:
    weights: dict[str, tuple[Tensor, Tensor]]
    samples: int
    batch: int


def _ensemble_dense(layer: Dense, _index, h: Tensor, ctx: _EnsembleContext) -> Tensor:
    weight, bias = ctx.weights[layer.name]
    return torch.baddbmm(bias.unsqueeze(1), h.flatten(2), weight.transpose(1, 2))


def _ensemble_conv2d(layer: Conv2d, _index, h: Tensor, ctx: _EnsembleContext) -> Tensor:
    weight, bias = ctx.weights[layer.name]
    # grouped convolution: sample s sees only its own weights
    grouped = h.transpose(0, 1).reshape(ctx.batch, ctx.samples * h.shape[2], *h.shape[3:])
    out = F.conv2d(grouped, weight.flatten(0, 1), bias.flatten(), stride=layer.stride, padding=layer.padding,
                   groups=ctx.samples)
    return out.reshape(ctx.batch, ctx.samples, layer.out_channels, *out.shape[2:]).transpose(0, 1)


#: S weight draws in one batched pass, activations (S, B, ...)
ENSEMBLE_LAYERS = LayerTable("torch.ensemble", {
    "flatten": lambda _layer, _index, h, _ctx: h.flatten(2),
    "dense": _ensemble_dense,
    "conv2d": _ensemble_conv2d,
    "relu": lambda _layer, _index, h, _ctx: torch.relu(h),
    "maxpool2d": lambda _layer, _index, h, ctx: F.max_pool2d(h.flatten(0, 1), 2).unflatten(0, (ctx.samples, ctx.batch)),
})


def ensemble_forward(spec: ModelSpec, weights: dict[str, tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """S weight draws in one batched pass: weights have a leading sample dim; returns (S, B, C)."""
    samples = next(iter(weights.values()))[0].shape[0]
    h = x.unsqueeze(0).expand(samples, *x.shape)  # (S, B, ...)
    return ENSEMBLE_LAYERS.walk(spec, h, _EnsembleContext(weights, samples, x.shape[0]))
