"""Tensor-expression (TE) operators of the Probabilistic Forward Pass for TVM 0.27.

Every Gaussian activation is a pair of float32 tensors ``(mean, var)`` shaped like the
activation (batch first, NCHW for images). The operators implement the same equations and the
same numerically careful forms as :mod:`pfp.backends.torch_ref` (the ground truth they are
tested against):

* linear layers use the all-positive variance form
  ``var = var_x * E[w^2] + mu_x^2 * sigma_w^2 + var_b`` (first layer: ``x^2 * sigma_w^2 + var_b``);
  the weight terms ``E[w^2]`` and ``sigma_w^2`` are separate input arrays precomputed at
  conversion time, never recomputed per inference;
* ReLU and Clark's max use ``var * (Phi(a) + h(a))`` / ``var1 Phi(a) + var2 Phi(-a) + t^2 h(a)``
  with ``h(a) = a^2 Phi(a) Phi(-a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2``, standardised
  arguments clamped to +-40.

Joint operators (``*_joint``) compute mean and variance in ONE reduction: a tuple
``te.comm_reducer`` (sum of pairs) gives one TIR block with two accumulators that share the
loads of the input and of the weights; the bias is added by an epilogue block of the same
operator (TE's ``init=`` argument of a reduction is silently dropped by
``te.create_prim_func`` in TVM 0.27, so the bias cannot be the accumulator's initial value).
The separate-path operators (``*_mean`` / ``*_var``) are two ordinary single-output
reductions, for the ablation. The deterministic operators serve the deterministic twin.

The standard normal cdf is evaluated from an accurate upper-tail function
``Q(|a|) = erfc(|a|/sqrt 2)/2 = phi(a) t G(t) sqrt(pi/2)`` with ``t = 1/(1 + |a|/(2 sqrt 2))`` and
``G`` a polynomial fit of the scaled ``erfcx`` (float32 relative error < 7e-7 for ``|a| < 5``, then
growing like ``a^2/2`` float32 epsilons from the rounding of ``a^2``), so ``Phi(a)``
and ``Phi(-a)`` both keep their relative accuracy in the tails, and ``Phi`` costs no exp beyond
the one ``phi`` needs. TVM has no ``erfc`` intrinsic, and ``(1 + erf)/2`` loses all relative
accuracy below a ~ -4.

All functions take and return ``te.Tensor`` objects, so they plug into
``relax.BlockBuilder.emit_te`` (see :mod:`pfp.backends.tvm.graph`) or into
``te.create_prim_func`` (see :func:`~pfp.backends.tvm.ops.kernels.make_prim_func`) for per-operator tests and tuning.

Modules: :mod:`~.gaussian` (phi, Phi via the erfcx fit, exp, Clark's max, ReLU moments),
:mod:`~.linear` (dense and conv2d: joint, separate, deterministic; the conv grid and the
channels-last form), :mod:`~.pointwise` (ReLU, 2x2 max-pool, flatten), :mod:`~.ensemble`
(S weight draws in one pass), :mod:`~.head` (Gaussian logits -> probabilities, MI, SME), :mod:`~.kernels` (one operator as a stand-alone function). This
package re-exports them: ``from pfp.backends.tvm import ops; ops.dense_joint(...)``.
"""

from pfp.backends.tvm.ops.common import DTYPE
from pfp.backends.tvm.ops.ensemble import conv2d_ensemble, dense_ensemble
from pfp.backends.tvm.ops.gaussian import CLARK_EPS, MAX_STD_ARG, RELU_VAR_EPS
from pfp.backends.tvm.ops.head import packed_width, uncertainty_head
from pfp.backends.tvm.ops.kernels import CompiledOp, make_prim_func
from pfp.backends.tvm.ops.linear import (
    CHANNEL_VECTOR,
    CHANNELS_LAST_ANNOTATION,
    FLAT_ALIGN,
    FLAT_ALIGN_TWO_INPUTS,
    FLAT_ROW_ANNOTATION,
    LIGHT_ANNOTATION,
    channels_last_suits,
    conv2d,
    conv2d_joint,
    conv2d_joint_first,
    conv2d_var,
    conv2d_var_first,
    conv_output_size,
    dense,
    dense_joint,
    dense_joint_first,
    dense_var,
    dense_var_first,
)
from pfp.backends.tvm.ops.pointwise import flatten, flatten_gaussian, maxpool2x2, maxpool2x2_gaussian, relu, relu_gaussian

__all__ = [
    "CHANNELS_LAST_ANNOTATION",
    "CHANNEL_VECTOR",
    "CLARK_EPS",
    "DTYPE",
    "FLAT_ALIGN",
    "FLAT_ALIGN_TWO_INPUTS",
    "FLAT_ROW_ANNOTATION",
    "LIGHT_ANNOTATION",
    "MAX_STD_ARG",
    "RELU_VAR_EPS",
    "conv2d",
    "conv2d_ensemble",
    "conv2d_joint",
    "conv2d_joint_first",
    "conv2d_var",
    "conv2d_var_first",
    "channels_last_suits",
    "conv_output_size",
    "dense",
    "dense_ensemble",
    "dense_joint",
    "dense_joint_first",
    "dense_var",
    "dense_var_first",
    "flatten",
    "flatten_gaussian",
    "CompiledOp",
    "make_prim_func",
    "maxpool2x2",
    "maxpool2x2_gaussian",
    "packed_width",
    "relu",
    "relu_gaussian",
    "uncertainty_head",
]

