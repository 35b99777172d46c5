"""ModelSpec + parameters -> Relax IRModule: the PFP network, its deterministic twin, an S-member ensemble.

Each builder is a :class:`~pfp.spec.LayerTable` from layer kind to a handler that emits that
layer's operators (:mod:`pfp.backends.tvm.ops`) into a ``relax.BlockBuilder``; the table's walk
over the spec builds the function ``main``:

* :data:`PFP_TABLE` (``tvm.pfp``): ``main(x[, weights...]) -> (logit_mean, logit_var)``; the
  state is the pair ``(mean, var)``, ``var`` None while the activation is deterministic;
* :data:`DETERMINISTIC_TABLE` (``tvm.deterministic``): ``main(x[, weights...]) -> logits``;
* :data:`ENSEMBLE_TABLE` (``tvm.ensemble``): ``main(x[, weights...]) -> logits (S, B, C)``, all
  members in one batched pass (the first layer reads the shared input, later layers carry S*B rows).

Each TIR function is named after its layer (``primfunc_name_hint``: ``fc1_dense_joint``,
``relu_gaussian2``, ...): the names of the tuning tasks and of the profiler's rows. The batch size
is fixed at build time (static shapes are what the Meta Scheduler tunes best).

Example::

    >>> mod = build_pfp_module(spec, params, batch_size=8)
    >>> executable = compile_module(mod, "host")       # pfp.backends.tvm.pipeline
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from pfp.backends.covariance import CovarianceBlock, covariance_block
from pfp.backends.tvm import ops
from pfp.backends.tvm.ops import covariance as cov_ops
from pfp.spec import Conv2d, LayerTable, ModelSpec, PoolRule, layer_entry

__all__ = [
    "DETERMINISTIC_TABLE",
    "ENSEMBLE_TABLE",
    "PFP_TABLE",
    "Head",
    "build_deterministic_module",
    "build_ensemble_module",
    "build_pfp_module",
    "deterministic_weight_arrays",
    "ensemble_weight_arrays",
    "pfp_weight_arrays",
]

DTYPE = "float32"


# --------------------------------------------------------------------------- weights

def _array(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(value, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"{what} has shape {array.shape}, the model spec says {tuple(shape)}")
    return array





def _first_parametric_index(spec: ModelSpec) -> int:
    return next((index for index, layer in enumerate(spec.layers) if layer.parametric), len(spec.layers))


def pfp_weight_arrays(spec: ModelSpec, params: Mapping, *, variance_scale: float = 1.0,
                      covariance_layers: int = 0) -> dict[str, np.ndarray]:
    """The weight arrays the PFP module uses, in its parameter order (float32, C-contiguous).

    Keys are ``<layer>_<field>``. The first parametric layer (deterministic input) needs
    ``weight_mean, weight_var, bias_mean, bias_var``; later ones also ``weight_m2`` (E[w^2]).
    ``variance_scale`` multiplies every weight/bias variance (E[w^2] recomputed, as in
    :func:`pfp.backends.torch_ref.scale_variance`). With ``covariance_layers`` the corrected
    block's dense layers add ``weight_mean_sq_t`` ((W^2)^T, out axis zero-padded) and, all but the last,
    ``weight_mean_padded`` (W, in axis zero-padded; see :func:`~pfp.backends.tvm.ops.covariance.gemm_padded_width`).
    """
    if variance_scale < 0:
        raise ValueError(f"variance scale must be >= 0, got {variance_scale}")
    first = _first_parametric_index(spec)
    arrays: dict[str, np.ndarray] = {}
    for index, layer in enumerate(spec.layers):
        if not layer.parametric:
            continue
        p = layer_entry(params, layer.name)
        w_shape, b_shape = tuple(layer.weight_shape), tuple(layer.bias_shape)
        wm = _array(p.weight_mean, f"{layer.name}.weight_mean", w_shape)
        wv = _array(p.weight_var, f"{layer.name}.weight_var", w_shape)
        bm = _array(p.bias_mean, f"{layer.name}.bias_mean", b_shape)
        bv = _array(p.bias_var, f"{layer.name}.bias_var", b_shape)
        if variance_scale != 1.0:
            wv = (wv * np.float32(variance_scale)).astype(np.float32)
            bv = (bv * np.float32(variance_scale)).astype(np.float32)
            m2 = (wv + wm * wm).astype(np.float32)
        else:
            m2 = _array(p.weight_m2, f"{layer.name}.weight_m2", w_shape)
        arrays[f"{layer.name}_weight_mean"] = wm
        if index != first:
            arrays[f"{layer.name}_weight_m2"] = m2
        arrays[f"{layer.name}_weight_var"] = wv
        arrays[f"{layer.name}_bias_mean"] = bm
        arrays[f"{layer.name}_bias_var"] = bv
    block = covariance_block(spec, covariance_layers)
    for name in () if block is None else block.dense_names:
        wm = arrays[f"{name}_weight_mean"]
        arrays[f"{name}_weight_mean_sq_t"] = _pad_columns(np.ascontiguousarray((wm * wm).T))
        if name != block.dense_names[-1]:
            arrays[f"{name}_weight_mean_padded"] = _pad_columns(wm)
    return arrays


def _pad_columns(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with zero columns appended up to :func:`~pfp.backends.tvm.ops.covariance.gemm_padded_width`."""
    rows, columns = matrix.shape
    padded = np.zeros((rows, cov_ops.gemm_padded_width(columns)), dtype=np.float32)
    padded[:, :columns] = matrix
    return padded


def deterministic_weight_arrays(spec: ModelSpec, weights: Mapping) -> dict[str, np.ndarray]:
    """``<layer>_weight`` / ``<layer>_bias`` arrays of the deterministic twin, in parameter order.

    ``weights[name]`` is a ``(weight, bias)`` pair (as for
    :func:`pfp.backends.torch_ref.deterministic_forward`) or a ``GaussianLayerParams`` (its means).
    """
    arrays: dict[str, np.ndarray] = {}
    for layer in spec.parametric_layers():
        entry = layer_entry(weights, layer.name)
        weight, bias = (entry.weight_mean, entry.bias_mean) if hasattr(entry, "weight_mean") else entry
        arrays[f"{layer.name}_weight"] = _array(weight, f"{layer.name} weight", tuple(layer.weight_shape))
        arrays[f"{layer.name}_bias"] = _array(bias, f"{layer.name} bias", tuple(layer.bias_shape))
    return arrays


class _Weights:
    """Hands out weights either as bound constants or as (recorded) function parameters."""

    def __init__(self, arrays: Mapping[str, np.ndarray], as_params: bool) -> None:
        self.arrays = arrays
        self.as_params = as_params
        self._by_name = {name: relax.Var(name, relax.TensorType(array.shape, DTYPE))
                         for name, array in arrays.items()} if as_params else {}
        self.params = list(self._by_name.values())

    def __getitem__(self, name: str) -> relax.Expr:
        if self.as_params:
            return self._by_name[name]
        return relax.const(self.arrays[name], DTYPE)


def ensemble_weight_arrays(spec: ModelSpec, stacked: Mapping) -> dict[str, np.ndarray]:
    """``<layer>_weight`` (S, *weight_shape) / ``<layer>_bias`` (S, *bias_shape): S weight draws."""
    arrays: dict[str, np.ndarray] = {}
    members = None
    for layer in spec.parametric_layers():
        weight, bias = layer_entry(stacked, layer.name)
        weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
        members = weight.shape[0] if members is None else members
        arrays[f"{layer.name}_weight"] = _array(weight, f"{layer.name} weight", (members, *layer.weight_shape))
        arrays[f"{layer.name}_bias"] = _array(bias, f"{layer.name} bias", (members, *layer.bias_shape))
    return arrays


# --------------------------------------------------------------------------- common emitters

def _input_var(spec: ModelSpec, batch_size: int) -> relax.Var:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    spec.output_shapes()  # fail early on an inconsistent spec
    return relax.Var("x", relax.TensorType((batch_size, *spec.input_shape), DTYPE))


def _flatten(bb: relax.BlockBuilder, value: relax.Expr, batch_size: int) -> relax.Expr:
    shape = [int(dim) for dim in value.ty.shape]
    if len(shape) == 2:
        return value
    return bb.emit(relax.op.reshape(value, (batch_size, math.prod(shape[1:]))))


def _pair(bb: relax.BlockBuilder, value: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
    return bb.emit(relax.TupleGetItem(value, 0)), bb.emit(relax.TupleGetItem(value, 1))


def _conv_layout(bb: relax.BlockBuilder, layer: Conv2d, *weights: relax.Expr | None,
                 stacked: bool = False) -> tuple[list[relax.Expr | None], dict]:
    """The conv weights in the layout the operator takes (None stays None), and its keyword arguments.

    Channels-last convolutions (:func:`ops.channels_last_suits`) take (C, kh, kw, O) weights (per
    member when ``stacked``: (S, C, kh, kw, O)): a transpose in the graph, which ``FoldConstant``
    evaluates at compile time for bound weights.
    """
    kwargs = {"stride": layer.stride, "padding": layer.padding}
    if not ops.channels_last_suits(layer.out_channels, layer.stride):
        return list(weights), kwargs
    axes = [0, 2, 3, 4, 1] if stacked else [1, 2, 3, 0]
    return ([None if w is None else bb.emit(relax.op.permute_dims(w, axes)) for w in weights],
            {**kwargs, "channels_last": True})


@dataclass
class _Build:
    """What every handler of one build shares (the walk's context)."""

    bb: relax.BlockBuilder
    weights: _Weights
    batch_size: int
    joint: bool = True  # PFP: one-reduction mean+variance operators (False: the separate-path ablation)
    members: int = 1  # ensemble: weight draws
    block: CovarianceBlock | None = None  # covariance-aware PFP: the corrected trailing block
    records: list = field(default_factory=list)  # (kind, name, mean, var) of the block's layer inputs

    def record(self, index: int, kind: str, name: str | None, mean, var) -> None:
        if self.block is not None and index >= self.block.start:
            self.records.append((kind, name, mean, var))


def _build(spec: ModelSpec, table: LayerTable, state_of_input, output, context: _Build) -> tvm.IRModule:
    """``main(x, *weight parameters)``: ``table`` walked over ``spec`` from ``state_of_input(x)``, then ``output(state, context)``."""
    x = _input_var(spec, context.batch_size)
    bb = context.bb
    with bb.function("main", [x, *context.weights.params]):
        with bb.dataflow():
            state = table.walk(spec, state_of_input(x), context)
            result = bb.emit_output(output(state, context))
        bb.emit_func_output(result)
    return bb.get()


# --------------------------------------------------------------------------- PFP

def _pfp_flatten(layer, index: int, state, ctx: _Build):
    mean, var = state
    return _flatten(ctx.bb, mean, ctx.batch_size), (None if var is None else _flatten(ctx.bb, var, ctx.batch_size))


def _pfp_linear(layer, index: int, state, ctx: _Build):
    """A Gaussian dense or conv2d layer: joint (one reduction) or separate (mean and variance apart)."""
    bb, weights, batch_size, joint = ctx.bb, ctx.weights, ctx.batch_size, ctx.joint
    mean, var = state
    name = layer.name
    wm, wv = weights[f"{name}_weight_mean"], weights[f"{name}_weight_var"]
    m2 = None if var is None else weights[f"{name}_weight_m2"]
    bm, bv = weights[f"{name}_bias_mean"], weights[f"{name}_bias_var"]
    conv = layer.kind == "conv2d"
    kw = {}
    if conv:  # m2 is None for a first layer
        (wm, wv, m2), kw = _conv_layout(bb, layer, wm, wv, m2)
    if not conv:
        mean = _flatten(bb, mean, batch_size)
        var = None if var is None else _flatten(bb, var, batch_size)
        ctx.record(index, "dense", name, mean, var)
    kind = layer.kind
    if var is None:
        if joint:
            op = ops.conv2d_joint_first if conv else ops.dense_joint_first
            return _pair(bb, bb.emit_te(op, mean, wm, wv, bm, bv, **kw, primfunc_name_hint=f"{name}_{kind}_joint_first"))
        mean_op, var_op = (ops.conv2d, ops.conv2d_var_first) if conv else (ops.dense, ops.dense_var_first)
        x_in = mean
        mean = bb.emit_te(mean_op, x_in, wm, bm, **kw, primfunc_name_hint=f"{name}_{kind}_mean")
        var = bb.emit_te(var_op, x_in, wv, bv, **kw, primfunc_name_hint=f"{name}_{kind}_var_first")
        return mean, var
    if joint:
        op = ops.conv2d_joint if conv else ops.dense_joint
        return _pair(bb, bb.emit_te(op, mean, var, wm, m2, wv, bm, bv, **kw, primfunc_name_hint=f"{name}_{kind}_joint"))
    mean_op, var_op = (ops.conv2d, ops.conv2d_var) if conv else (ops.dense, ops.dense_var)
    m_in, v_in = mean, var
    mean = bb.emit_te(mean_op, m_in, wm, bm, **kw, primfunc_name_hint=f"{name}_{kind}_mean")
    var = bb.emit_te(var_op, m_in, v_in, m2, wv, bv, **kw, primfunc_name_hint=f"{name}_{kind}_var")
    return mean, var


def _pfp_relu(layer, index: int, state, ctx: _Build):
    mean, var = state
    ctx.record(index, "relu", None, mean, var)
    if var is None:
        return ctx.bb.emit_te(ops.relu, mean, primfunc_name_hint=f"relu{index}"), None
    return _pair(ctx.bb, ctx.bb.emit_te(ops.relu_gaussian, mean, var, primfunc_name_hint=f"relu_gaussian{index}"))


def _pfp_maxpool(layer, index: int, state, ctx: _Build):
    mean, var = state
    if var is None:
        return ctx.bb.emit_te(ops.maxpool2x2, mean, primfunc_name_hint=f"maxpool{index}"), None
    rule = PoolRule(layer.rule)
    # Clark keeps its historical name (tuning records, profiles); another rule is in the name
    name = f"maxpool_gaussian{index}" if rule is PoolRule.CLARK else f"maxpool_{rule.value}{index}"
    return _pair(ctx.bb, ctx.bb.emit_te(ops.maxpool2x2_gaussian, mean, var, rule.value, primfunc_name_hint=name))


#: The probabilistic forward pass; state ``(mean, var)``, ``var`` None while deterministic.
PFP_TABLE = LayerTable("tvm.pfp", {"dense": _pfp_linear, "conv2d": _pfp_linear, "relu": _pfp_relu,
                                   "maxpool2d": _pfp_maxpool, "flatten": _pfp_flatten})


def _units(ctx: _Build, name: str, axis: int) -> int:
    """Output (``axis`` 0) or input (1) units of dense layer ``name`` (its weights may be padded)."""
    return int(ctx.weights.arrays[f"{name}_weight_mean"].shape[axis])


def _covariance_epilogue(var: relax.Expr, ctx: _Build) -> relax.Expr:
    """PFP's logit variance plus the block's dropped covariance (:mod:`pfp.backends.covariance`)."""
    bb, weights, records, batch = ctx.bb, ctx.weights, ctx.records, ctx.batch_size
    classes = int(var.ty.shape[1])
    slopes = {i: bb.emit_te(cov_ops.relu_slope, mean, v, primfunc_name_hint=f"covariance_slope{i}")
              for i, (kind, _, mean, v) in enumerate(records) if kind == "relu"}
    noise = {}
    for kind, name, mean, v in records:
        if kind == "dense" and name in ctx.block.noisy_dense:
            wv, bv = weights[f"{name}_weight_var"], weights[f"{name}_bias_var"]
            noise[name] = (bb.emit_te(ops.dense_var_first, mean, wv, bv, primfunc_name_hint=f"{name}_covariance_noise")
                           if v is None else
                           bb.emit_te(ops.dense_var, mean, v, wv, wv, bv, primfunc_name_hint=f"{name}_covariance_noise"))
    dense = [i for i, record in enumerate(records) if record[0] == "dense"]
    # independent: the linearised block as PFP propagates it (one vector per example)
    independent = records[0][3]
    for i in dense:
        name, slope = records[i][1], slopes.get(i + 1)
        if independent is None and name in noise:
            independent = bb.emit_te(cov_ops.covariance_noise, noise[name], slope, primfunc_name_hint=f"{name}_covariance_noise_out")
        elif independent is not None:
            independent = bb.emit_te(cov_ops.covariance_forward, independent, weights[f"{name}_weight_mean_sq_t"],
                                     noise.get(name), slope, _units(ctx, name, 0),
                                     primfunc_name_hint=f"{name}_covariance_forward")
    # exact: the logits' Jacobian rows backwards, every covariance kept
    last = records[dense[-1]][1]
    jacobian = (weights[f"{last}_weight_mean"], slopes.get(dense[-1] - 1))  # formed inside the first backward step
    exact = []
    for i in reversed(dense[:-1]):
        name, boundary = records[i][1], i == dense[0]
        if name in noise:
            exact.append(bb.emit_te(cov_ops.covariance_exact, jacobian, noise[name], classes,
                                    primfunc_name_hint=f"{name}_covariance_exact"))
        if boundary and records[i][3] is None:
            break  # deterministic block input: no boundary variance to carry
        jacobian = bb.emit_te(cov_ops.covariance_backprop, jacobian, weights[f"{name}_weight_mean_padded"],
                              slopes.get(i - 1), classes, batch, _units(ctx, name, 1),
                              primfunc_name_hint=f"{name}_covariance_backprop")
        if boundary:
            exact.append(bb.emit_te(cov_ops.covariance_exact, jacobian, records[i][3], classes,
                                    primfunc_name_hint=f"{name}_covariance_boundary"))
    return bb.emit_te(cov_ops.covariance_combine, var, independent, *exact, primfunc_name_hint="covariance_combine")


def _pfp_output(state, ctx: _Build) -> relax.Expr:
    mean, var = state
    if var is None:  # no parametric layer at all: deterministic output
        var = ctx.bb.emit_te(lambda t: tvm.te.compute(t.shape, lambda *i: tvm.tirx.const(0.0, DTYPE), name="zeros"),
                             mean, primfunc_name_hint="zeros")
    elif ctx.block is not None:
        var = _covariance_epilogue(var, ctx)
    return relax.Tuple([mean, var])


@dataclass(frozen=True)
class Head:
    """The uncertainty head appended to a PFP module: fixed draws (S, C) and the softmax temperature."""

    draws: np.ndarray
    temperature: float = 1.0


def _pfp_head_output(head: Head):
    """``[probs | logit_mean | logit_var | mi | sme]`` (B, 3C + 2): the head (:mod:`pfp.backends.tvm.ops.head`) after the PFP."""
    if not (math.isfinite(head.temperature) and head.temperature > 0):
        raise ValueError(f"head temperature must be a finite number > 0, got {head.temperature}")

    def output(state, ctx: _Build) -> relax.Expr:
        mean, var = _pfp_output(state, ctx).fields
        draws = relax.const(np.ascontiguousarray(head.draws, dtype=np.float32))
        return ctx.bb.emit_te(ops.uncertainty_head, mean, var, draws, 1.0 / head.temperature, packed=True,
                              primfunc_name_hint="uncertainty_head")

    return output


def build_pfp_module(spec: ModelSpec, params: Mapping, *, batch_size: int = 1, joint: bool = True,
                     weights_as_params: bool = False, variance_scale: float = 1.0, head: Head | None = None,
                     covariance_layers: int = 0) -> tvm.IRModule:
    """Relax IRModule of the probabilistic forward pass of ``spec``.

    ``main(x[, weights...]) -> (logit_mean, logit_var)``, each (batch_size, num_classes); with
    ``head``, one packed (batch_size, 3 C + 2) tensor ``[probs | logit_mean | logit_var | mi | sme]``
    (the deployed bundle's function, see :func:`pfp.backends.tvm.ops.head.uncertainty_head`).
    ``params[layer.name]`` is a :class:`~pfp.backends.torch_ref.GaussianLayerParams` (e.g.
    ``PFPModel.params``). ``joint`` selects the one-reduction mean+variance operators; False
    gives the separate-path ablation (two reductions per layer). With ``weights_as_params``
    the weights are function parameters in the order of :func:`pfp_weight_arrays` (Relax
    parameter names = its keys) instead of bound constants. ``covariance_layers`` > 1 builds the
    covariance-aware PFP (:mod:`pfp.backends.covariance`): the same walk, then the correction.
    """
    weights = _Weights(pfp_weight_arrays(spec, params, variance_scale=variance_scale,
                                         covariance_layers=covariance_layers), weights_as_params)
    context = _Build(relax.BlockBuilder(), weights, batch_size, joint=joint,
                     block=covariance_block(spec, covariance_layers))
    output = _pfp_output if head is None else _pfp_head_output(head)
    return _build(spec, PFP_TABLE, lambda x: (x, None), output, context)


# --------------------------------------------------------------------------- deterministic twin

def _det_flatten(layer, index: int, h, ctx: _Build):
    return _flatten(ctx.bb, h, ctx.batch_size)


def _det_dense(layer, index: int, h, ctx: _Build):
    h = _flatten(ctx.bb, h, ctx.batch_size)
    return ctx.bb.emit_te(ops.dense, h, ctx.weights[f"{layer.name}_weight"], ctx.weights[f"{layer.name}_bias"],
                          primfunc_name_hint=f"{layer.name}_dense")


def _det_conv2d(layer, index: int, h, ctx: _Build):
    (weight,), kw = _conv_layout(ctx.bb, layer, ctx.weights[f"{layer.name}_weight"])
    return ctx.bb.emit_te(ops.conv2d, h, weight, ctx.weights[f"{layer.name}_bias"], **kw,
                          primfunc_name_hint=f"{layer.name}_conv2d")


def _relu(layer, index: int, h, ctx: _Build):
    return ctx.bb.emit_te(ops.relu, h, primfunc_name_hint=f"relu{index}")


def _maxpool(layer, index: int, h, ctx: _Build):
    return ctx.bb.emit_te(ops.maxpool2x2, h, primfunc_name_hint=f"maxpool{index}")


#: The deterministic twin (the posterior means); state: the activation.
DETERMINISTIC_TABLE = LayerTable("tvm.deterministic", {"dense": _det_dense, "conv2d": _det_conv2d, "relu": _relu,
                                                       "maxpool2d": _maxpool, "flatten": _det_flatten})


def build_deterministic_module(spec: ModelSpec, weights: Mapping, *, batch_size: int = 1,
                               weights_as_params: bool = False) -> tvm.IRModule:
    """Relax IRModule of the deterministic twin: ``main(x[, weights...]) -> logits``.

    ``weights[layer.name]`` is ``(weight, bias)`` or a ``GaussianLayerParams`` (means used).
    """
    table = _Weights(deterministic_weight_arrays(spec, weights), weights_as_params)
    context = _Build(relax.BlockBuilder(), table, batch_size)
    return _build(spec, DETERMINISTIC_TABLE, lambda x: x, lambda h, ctx: h, context)


# --------------------------------------------------------------------------- S-member ensemble

def _ens_flatten(layer, index: int, state, ctx: _Build):
    h, rows = state
    return _flatten(ctx.bb, h, rows), rows


def _ens_dense(layer, index: int, state, ctx: _Build):
    h, rows = state
    h = _flatten(ctx.bb, h, rows)
    h = ctx.bb.emit_te(ops.dense_ensemble, h, ctx.weights[f"{layer.name}_weight"], ctx.weights[f"{layer.name}_bias"],
                       batch=ctx.batch_size, primfunc_name_hint=f"{layer.name}_dense_ensemble")
    return h, ctx.members * ctx.batch_size


def _ens_conv2d(layer, index: int, state, ctx: _Build):
    h, _ = state
    (weight,), kw = _conv_layout(ctx.bb, layer, ctx.weights[f"{layer.name}_weight"], stacked=True)
    h = ctx.bb.emit_te(ops.conv2d_ensemble, h, weight, ctx.weights[f"{layer.name}_bias"], batch=ctx.batch_size, **kw,
                       primfunc_name_hint=f"{layer.name}_conv2d_ensemble")
    return h, ctx.members * ctx.batch_size


def _ens_pointwise(handler):
    def apply(layer, index: int, state, ctx: _Build):
        h, rows = state
        return handler(layer, index, h, ctx), rows
    return apply


#: S weight draws in one batched pass; state: (activation, rows), rows B before the first
#: parametric layer (the shared input), S*B (member-major) after it.
ENSEMBLE_TABLE = LayerTable("tvm.ensemble", {"dense": _ens_dense, "conv2d": _ens_conv2d,
                                             "relu": _ens_pointwise(_relu), "maxpool2d": _ens_pointwise(_maxpool),
                                             "flatten": _ens_flatten})


def build_ensemble_module(spec: ModelSpec, stacked: Mapping, *, batch_size: int = 1,
                          weights_as_params: bool = False) -> tvm.IRModule:
    """Relax IRModule of an S-member ensemble (S posterior draws): ``main(x) -> logits (S, B, C)``.

    ``stacked[layer.name]`` is ``(weight, bias)`` with a leading member axis (e.g.
    :func:`pfp.tuning.sample_stacked_weights`). All members run in one batched pass: the first
    layer reads the shared input, later layers carry S*B rows (member-major).
    """
    arrays = ensemble_weight_arrays(spec, stacked)
    members = next(iter(arrays.values())).shape[0]
    table = _Weights(arrays, weights_as_params)
    context = _Build(relax.BlockBuilder(), table, batch_size, members=members)

    def output(state, ctx: _Build) -> relax.Expr:
        return ctx.bb.emit(relax.op.reshape(state[0], (members, batch_size, spec.num_outputs)))

    return _build(spec, ENSEMBLE_TABLE, lambda x: (x, batch_size), output, context)
