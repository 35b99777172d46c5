"""The uncertainty head: Gaussian logits -> predictive probabilities, mutual information, softmax entropy.

With fixed standard-normal draws ``eps`` (S, C) (quasi-random, :func:`pfp.head.head_draws`), per
image ``z_s = (mean + sqrt(var) * eps_s) / T``, ``p_s = softmax(z_s)``, and

* ``probs = mean_s p_s``;
* ``sme = -sum_c probs log probs`` (softmax entropy of the prediction);
* ``mi = sme - mean_s H(p_s)`` (mutual information; ``H(p_s) = log sum_c e^{z_s - max} - sum_c
  p_s (z_s - max)``, no log of a probability that underflowed), clamped at 0.

The same draws for every image make the outputs deterministic functions of the logits; the
numpy reference :func:`pfp.head.head_reference` computes the same numbers.
"""

from __future__ import annotations

from tvm import te, tirx

from pfp.backends.tvm.ops.common import _check, _f, _ints
from pfp.backends.tvm.ops.gaussian import _exp, _Lets
from pfp.backends.tvm.ops.linear import LIGHT_ANNOTATION

__all__ = ["packed_width", "uncertainty_head"]

#: probabilities below this count as this in ``p log p`` (their term is then ~0 either way)
PROB_FLOOR = 1e-30
#: the per-draw blocks are a few flops per element: parallel only from the light-work threshold
#: on (one image's 128 x 10 draws run serially: a thread-pool launch would cost more than they do)
_LIGHT = {LIGHT_ANNOTATION: 1}


def uncertainty_head(mean: te.Tensor, var: te.Tensor, draws: te.Tensor, inverse_temperature: float, *,
                     packed: bool = False) -> list[te.Tensor]:
    """``[probs (B, C), mi (B,), sme (B,)]`` of Gaussian logits ``(mean, var)`` (B, C) with ``draws`` (S, C).

    ``packed``: one (B, 3C + 2) tensor ``[probs | logit_mean | logit_var | mi | sme]`` instead
    (the deployed function's output: the runtime converts one tensor per call, not five).
    """
    batch, classes = _ints(mean.shape)
    samples, draw_classes = _ints(draws.shape)
    _check(_ints(var.shape) == (batch, classes), "head: mean and variance differ in shape")
    _check(draw_classes == classes, f"head: draws have {draw_classes} classes, the logits {classes}")
    scale = _f(inverse_temperature)
    std = te.compute((batch, classes), lambda b, c: tirx.sqrt(tirx.max(var[b, c], _f(0.0))), name="head_std", attrs=_LIGHT)
    logits = te.compute((batch, samples, classes), lambda b, s, c: (mean[b, c] + std[b, c] * draws[s, c]) * scale,
                        name="head_logits", attrs=_LIGHT)
    k = te.reduce_axis((0, classes), name="k")
    top = te.compute((batch, samples), lambda b, s: te.max(logits[b, s, k], axis=k), name="head_max")
    def shifted_exp(b, s, c):
        lets = _Lets()
        return lets.wrap(_exp(lets, logits[b, s, c] - top[b, s]))

    # the polynomial exp vectorises; tirx.exp is one libm call per element
    shifted = te.compute((batch, samples, classes), shifted_exp, name="head_exp", attrs=_LIGHT)
    k2 = te.reduce_axis((0, classes), name="k2")
    total = te.compute((batch, samples), lambda b, s: te.sum(shifted[b, s, k2], axis=k2), name="head_sum")
    k3 = te.reduce_axis((0, classes), name="k3")
    weighted = te.compute((batch, samples), lambda b, s: te.sum(shifted[b, s, k3] * (logits[b, s, k3] - top[b, s]), axis=k3),
                          name="head_weighted")
    inverse_samples = _f(1.0 / samples)
    r = te.reduce_axis((0, samples), name="r")
    probs = te.compute((batch, classes), lambda b, c: te.sum(shifted[b, r, c] / total[b, r] * inverse_samples, axis=r),
                       name="head_probs")
    r2 = te.reduce_axis((0, samples), name="r2")
    expected = te.compute((batch,), lambda b: te.sum((tirx.log(total[b, r2]) - weighted[b, r2] / total[b, r2]) * inverse_samples,
                                                     axis=r2), name="head_expected_entropy")
    k4 = te.reduce_axis((0, classes), name="k4")
    sme = te.compute((batch,), lambda b: te.sum(-probs[b, k4] * tirx.log(tirx.max(probs[b, k4], _f(PROB_FLOOR))), axis=k4),
                     name="head_sme")
    mi = te.compute((batch,), lambda b: tirx.max(sme[b] - expected[b], _f(0.0)), name="head_mi")
    if not packed:
        return [probs, mi, sme]

    def column(b, j):
        # if_then_else evaluates only the branch taken (no out-of-range read of the others)
        return tirx.if_then_else(j < classes, probs[b, j], tirx.if_then_else(
            j < 2 * classes, mean[b, j - classes], tirx.if_then_else(
                j < 3 * classes, var[b, j - 2 * classes], tirx.if_then_else(j == 3 * classes, mi[b], sme[b]))))

    return [te.compute((batch, packed_width(classes)), column, name="head_packed")]


def packed_width(classes: int) -> int:
    """Columns of the packed output: probs, logit mean, logit variance (C each), MI, SME."""
    return 3 * classes + 2
