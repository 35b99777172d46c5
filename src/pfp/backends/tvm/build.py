"""ModelSpec + PFP parameters -> Relax IRModule -> compiled executable -> runner (TVM 0.27).

Example::

    >>> from pfp.backends.tvm.build import compile_pfp
    >>> model = PFPModel.load("pfp_params.npz")
    >>> runner = compile_pfp(model.spec, model.params, batch_size=8, target="host")
    >>> logit_mean, logit_var = runner(images)          # images: (8, 1, 28, 28) float32
    >>> runner.export_library("lenet_host.so")          # + lenet_host.so.json (metadata)
    >>> runner = load_compiled("lenet_host.so")

The Relax function ``main`` takes ``x`` (batch, C, H, W) (followed by the weight arrays when
they are function parameters) and returns the tuple ``(logit_mean, logit_var)``; the
deterministic twin returns the logits. The batch size is fixed at build time (static shapes
are what the Meta Scheduler tunes best); :meth:`CompiledModel.predict` runs any number of
examples in chunks.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from pfp.backends.tvm import ops
from pfp.spec import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, ReLU

__all__ = [
    "ARM_CROSS_COMPILER",
    "CompiledDeterministic",
    "CompiledEnsemble",
    "CompiledModel",
    "CompiledPFP",
    "Schedule",
    "TargetName",
    "build_deterministic_module",
    "build_ensemble_module",
    "build_pfp_module",
    "compile_deterministic",
    "compile_ensemble",
    "compile_module",
    "compile_pfp",
    "deterministic_weight_arrays",
    "ensemble_weight_arrays",
    "load_compiled",
    "make_target",
    "memory_estimate",
    "pfp_weight_arrays",
]

DTYPE = "float32"
#: Debian/Ubuntu package gcc-aarch64-linux-gnu; used to link aarch64 shared libraries.
ARM_CROSS_COMPILER = "aarch64-linux-gnu-gcc"
_METADATA_FORMAT = 1


# --------------------------------------------------------------------------- targets

class TargetName(str, Enum):
    HOST = "host"
    RASP4B = "rasp4b"  # Raspberry Pi 4 Model B, Cortex-A72, 64-bit OS
    RASP5 = "rasp5"  # Raspberry Pi 5, Cortex-A76, 64-bit OS


_BOARDS = {
    TargetName.RASP4B: {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                        "mattr": ["+neon"], "num-cores": 4},
    TargetName.RASP5: {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                       "mattr": ["+neon"], "num-cores": 4},
}


def _host_cpu() -> str | None:
    try:
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # an LLVM-less runtime build, or an unknown host
        return None
    return cpu if cpu and cpu != "generic" else None


def make_target(name: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST,
                num_cores: int | None = None) -> tvm.target.Target:
    """Target by name: ``host`` (llvm with the host CPU), ``rasp4b`` or ``rasp5`` (aarch64).

    A ``Target`` or a target dict passes through (TVM 0.27 refuses CLI strings such as
    ``"llvm -mcpu=..."``). ``num_cores`` (the Meta Scheduler reads ``num-cores``) defaults to
    the host's physical cores for ``host`` and 4 for the boards.
    """
    if isinstance(name, tvm.target.Target):
        return name
    if isinstance(name, Mapping):
        return tvm.target.Target(dict(name))
    try:
        name = TargetName(name)
    except ValueError:
        choices = ", ".join(t.value for t in TargetName)
        raise ValueError(f"unknown target {name!r}; choose one of: {choices} (or pass a tvm Target / dict)") from None
    if name is TargetName.HOST:
        config: dict[str, Any] = {"kind": "llvm"}
        cpu = _host_cpu()
        if cpu:
            config["mcpu"] = cpu
        from pfp.backends.tvm import physical_cores

        config["num-cores"] = num_cores or physical_cores()  # the runtime's thread count (see pfp.backends.tvm)
    else:
        config = dict(_BOARDS[name])
        if num_cores:
            config["num-cores"] = num_cores
    return tvm.target.Target(config)


def _target_arch(target: tvm.target.Target) -> str:
    mtriple = target.attrs.get("mtriple")
    return str(mtriple).split("-")[0] if mtriple else platform.machine()


def _runs_on_host(target: tvm.target.Target) -> bool:
    return _target_arch(target) == platform.machine()


# --------------------------------------------------------------------------- weights

def _array(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(value, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"{what} has shape {array.shape}, the model spec says {tuple(shape)}")
    return array


def _layer_entry(table: Mapping, name: str):
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"no parameters for layer {name!r}; have {sorted(table)}") from None


def _first_parametric_index(spec: ModelSpec) -> int:
    for index, layer in enumerate(spec.layers):
        if isinstance(layer, (Dense, Conv2d)):
            return index
    return len(spec.layers)


def pfp_weight_arrays(spec: ModelSpec, params: Mapping, *, variance_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The weight arrays the PFP module uses, in its parameter order (float32, C-contiguous).

    Keys are ``<layer>_<field>``. The first parametric layer (deterministic input) needs
    ``weight_mean, weight_var, bias_mean, bias_var``; later ones also ``weight_m2`` (E[w^2]).
    ``variance_scale`` multiplies every weight/bias variance (E[w^2] recomputed, as in
    :func:`pfp.backends.torch_ref.scale_variance`).
    """
    if variance_scale < 0:
        raise ValueError(f"variance scale must be >= 0, got {variance_scale}")
    first = _first_parametric_index(spec)
    arrays: dict[str, np.ndarray] = {}
    for index, layer in enumerate(spec.layers):
        if not isinstance(layer, (Dense, Conv2d)):
            continue
        p = _layer_entry(params, layer.name)
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
    return arrays


def deterministic_weight_arrays(spec: ModelSpec, weights: Mapping) -> dict[str, np.ndarray]:
    """``<layer>_weight`` / ``<layer>_bias`` arrays of the deterministic twin, in parameter order.

    ``weights[name]`` is a ``(weight, bias)`` pair (as for
    :func:`pfp.backends.torch_ref.deterministic_forward`) or a ``GaussianLayerParams`` (its means).
    """
    arrays: dict[str, np.ndarray] = {}
    for layer in spec.parametric_layers():
        entry = _layer_entry(weights, layer.name)
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


# --------------------------------------------------------------------------- Relax builders

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


def build_pfp_module(spec: ModelSpec, params: Mapping, *, batch_size: int = 1, joint: bool = True,
                     weights_as_params: bool = False, variance_scale: float = 1.0) -> tvm.IRModule:
    """Relax IRModule of the probabilistic forward pass of ``spec``.

    ``main(x[, weights...]) -> (logit_mean, logit_var)``, each (batch_size, num_classes).
    ``params[layer.name]`` is a :class:`~pfp.backends.torch_ref.GaussianLayerParams` (e.g.
    ``PFPModel.params``). ``joint`` selects the one-reduction mean+variance operators; False
    gives the separate-path ablation (two reductions per layer). With ``weights_as_params``
    the weights are function parameters in the order of :func:`pfp_weight_arrays` (Relax
    parameter names = its keys) instead of bound constants.
    """
    weights = _Weights(pfp_weight_arrays(spec, params, variance_scale=variance_scale), weights_as_params)
    x = _input_var(spec, batch_size)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *weights.params]):
        with bb.dataflow():
            mean: relax.Expr = x
            var: relax.Expr | None = None  # None while the activation is deterministic
            for index, layer in enumerate(spec.layers):
                if isinstance(layer, Flatten):
                    mean = _flatten(bb, mean, batch_size)
                    var = None if var is None else _flatten(bb, var, batch_size)
                elif isinstance(layer, (Dense, Conv2d)):
                    name = layer.name
                    wm, wv = weights[f"{name}_weight_mean"], weights[f"{name}_weight_var"]
                    m2 = None if var is None else weights[f"{name}_weight_m2"]
                    bm, bv = weights[f"{name}_bias_mean"], weights[f"{name}_bias_var"]
                    conv = isinstance(layer, Conv2d)
                    kw = {}
                    if conv:  # m2 is None for a first layer
                        (wm, wv, m2), kw = _conv_layout(bb, layer, wm, wv, m2)
                    if not conv:
                        mean = _flatten(bb, mean, batch_size)
                        var = None if var is None else _flatten(bb, var, batch_size)
                    kind = "conv2d" if conv else "dense"
                    if var is None:
                        if joint:
                            op = ops.conv2d_joint_first if conv else ops.dense_joint_first
                            mean, var = _pair(bb, bb.emit_te(op, mean, wm, wv, bm, bv, **kw,
                                                             primfunc_name_hint=f"{name}_{kind}_joint_first"))
                        else:
                            mean_op, var_op = ((ops.conv2d, ops.conv2d_var_first) if conv
                                               else (ops.dense, ops.dense_var_first))
                            x_in = mean
                            mean = bb.emit_te(mean_op, x_in, wm, bm, **kw, primfunc_name_hint=f"{name}_{kind}_mean")
                            var = bb.emit_te(var_op, x_in, wv, bv, **kw, primfunc_name_hint=f"{name}_{kind}_var_first")
                    else:
                        if joint:
                            op = ops.conv2d_joint if conv else ops.dense_joint
                            mean, var = _pair(bb, bb.emit_te(op, mean, var, wm, m2, wv, bm, bv, **kw,
                                                             primfunc_name_hint=f"{name}_{kind}_joint"))
                        else:
                            mean_op, var_op = (ops.conv2d, ops.conv2d_var) if conv else (ops.dense, ops.dense_var)
                            m_in, v_in = mean, var
                            mean = bb.emit_te(mean_op, m_in, wm, bm, **kw, primfunc_name_hint=f"{name}_{kind}_mean")
                            var = bb.emit_te(var_op, m_in, v_in, m2, wv, bv, **kw,
                                             primfunc_name_hint=f"{name}_{kind}_var")
                elif isinstance(layer, ReLU):
                    if var is None:
                        mean = bb.emit_te(ops.relu, mean, primfunc_name_hint=f"relu{index}")
                    else:
                        mean, var = _pair(bb, bb.emit_te(ops.relu_gaussian, mean, var,
                                                         primfunc_name_hint=f"relu_gaussian{index}"))
                elif isinstance(layer, MaxPool2d):
                    if var is None:
                        mean = bb.emit_te(ops.maxpool2x2, mean, primfunc_name_hint=f"maxpool{index}")
                    else:
                        mean, var = _pair(bb, bb.emit_te(ops.maxpool2x2_gaussian, mean, var,
                                                         primfunc_name_hint=f"maxpool_gaussian{index}"))
                else:
                    raise TypeError(f"unsupported layer {layer!r}")
            if var is None:  # no parametric layer at all: deterministic output
                var = bb.emit_te(lambda t: tvm.te.compute(t.shape, lambda *i: tvm.tirx.const(0.0, DTYPE),
                                                          name="zeros"), mean, primfunc_name_hint="zeros")
            output = bb.emit_output(relax.Tuple([mean, var]))
        bb.emit_func_output(output)
    return bb.get()


def build_deterministic_module(spec: ModelSpec, weights: Mapping, *, batch_size: int = 1,
                               weights_as_params: bool = False) -> tvm.IRModule:
    """Relax IRModule of the deterministic twin: ``main(x[, weights...]) -> logits``.

    ``weights[layer.name]`` is ``(weight, bias)`` or a ``GaussianLayerParams`` (means used).
    """
    table = _Weights(deterministic_weight_arrays(spec, weights), weights_as_params)
    x = _input_var(spec, batch_size)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *table.params]):
        with bb.dataflow():
            h: relax.Expr = x
            for index, layer in enumerate(spec.layers):
                if isinstance(layer, Flatten):
                    h = _flatten(bb, h, batch_size)
                elif isinstance(layer, Dense):
                    h = _flatten(bb, h, batch_size)
                    h = bb.emit_te(ops.dense, h, table[f"{layer.name}_weight"], table[f"{layer.name}_bias"],
                                   primfunc_name_hint=f"{layer.name}_dense")
                elif isinstance(layer, Conv2d):
                    (weight,), kw = _conv_layout(bb, layer, table[f"{layer.name}_weight"])
                    h = bb.emit_te(ops.conv2d, h, weight, table[f"{layer.name}_bias"], **kw,
                                   primfunc_name_hint=f"{layer.name}_conv2d")
                elif isinstance(layer, ReLU):
                    h = bb.emit_te(ops.relu, h, primfunc_name_hint=f"relu{index}")
                elif isinstance(layer, MaxPool2d):
                    h = bb.emit_te(ops.maxpool2x2, h, primfunc_name_hint=f"maxpool{index}")
                else:
                    raise TypeError(f"unsupported layer {layer!r}")
            output = bb.emit_output(h)
        bb.emit_func_output(output)
    return bb.get()


def ensemble_weight_arrays(spec: ModelSpec, stacked: Mapping) -> dict[str, np.ndarray]:
    """``<layer>_weight`` (S, *weight_shape) / ``<layer>_bias`` (S, *bias_shape): S weight draws."""
    arrays: dict[str, np.ndarray] = {}
    members = None
    for layer in spec.parametric_layers():
        weight, bias = _layer_entry(stacked, layer.name)
        weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
        members = weight.shape[0] if members is None else members
        arrays[f"{layer.name}_weight"] = _array(weight, f"{layer.name} weight", (members, *layer.weight_shape))
        arrays[f"{layer.name}_bias"] = _array(bias, f"{layer.name} bias", (members, *layer.bias_shape))
    return arrays


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
    x = _input_var(spec, batch_size)
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *table.params]):
        with bb.dataflow():
            h: relax.Expr = x
            rows = batch_size
            for index, layer in enumerate(spec.layers):
                if isinstance(layer, (Flatten, Dense)):
                    h = _flatten(bb, h, rows)
                if isinstance(layer, Dense):
                    h = bb.emit_te(ops.dense_ensemble, h, table[f"{layer.name}_weight"], table[f"{layer.name}_bias"],
                                   batch=batch_size, primfunc_name_hint=f"{layer.name}_dense_ensemble")
                elif isinstance(layer, Conv2d):
                    (weight,), kw = _conv_layout(bb, layer, table[f"{layer.name}_weight"], stacked=True)
                    h = bb.emit_te(ops.conv2d_ensemble, h, weight, table[f"{layer.name}_bias"], batch=batch_size, **kw,
                                   primfunc_name_hint=f"{layer.name}_conv2d_ensemble")
                elif isinstance(layer, ReLU):
                    h = bb.emit_te(ops.relu, h, primfunc_name_hint=f"relu{index}")
                elif isinstance(layer, MaxPool2d):
                    h = bb.emit_te(ops.maxpool2x2, h, primfunc_name_hint=f"maxpool{index}")
                elif not isinstance(layer, Flatten):
                    raise TypeError(f"unsupported layer {layer!r}")
                if isinstance(layer, (Dense, Conv2d)):
                    rows = members * batch_size
            output = bb.emit_output(bb.emit(relax.op.reshape(h, (members, batch_size, spec.num_outputs))))
        bb.emit_func_output(output)
    return bb.get()


def memory_estimate(mod: tvm.IRModule, target=TargetName.HOST) -> dict[str, int]:
    """Bytes a module needs: planned activation buffers (Relax static memory planning) + weights.

    Activations come from ``relax.analysis.estimate_memory_usage`` after the same lowering
    the compiler runs; weights are the bound constants and weight parameters of ``main``.
    """
    import re

    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from pfp.backends.tvm.schedules import fuse_operators

    target = make_target(target)
    lowered = fuse_operators(mod, target)
    with target:
        lowered = tvm.transform.Sequential(cpu.dataflow_lower_passes(target)
                                           + [relax.transform.StaticPlanBlockMemory()])(lowered)
    text = str(relax.analysis.estimate_memory_usage(lowered))
    match = re.search(r"With memory planning, there are \d+ constant-size memory allocation\(s\) with total size "
                      r"([0-9.e+-]+) GB", text)
    activations = int(round(float(match.group(1)) * 1e9)) if match else 0
    weights = 0
    for constant in _constants(mod["main"]):
        value = constant.value  # a tvm.runtime.Tensor
        weights += int(np.prod([int(d) for d in value.shape])) * np.dtype(str(value.dtype)).itemsize
    for param in list(mod["main"].params)[1:]:
        weights += int(np.prod([int(d) for d in param.ty.shape])) * np.dtype(str(param.ty.dtype)).itemsize
    return {"activation_bytes": activations, "weight_bytes": weights, "total_bytes": activations + weights}


def _constants(func: relax.Function) -> list:
    found: list = []

    def visit(node) -> None:
        if (isinstance(node, tvm.ir.expr.Constant) and isinstance(getattr(node, "value", None), tvm.runtime.Tensor)
                and not any(node.same_as(seen) for seen in found)):  # a constant used twice is stored once
            found.append(node)

    relax.analysis.post_order_visit(func, visit)
    return found


class Schedule(str, Enum):
    """How the TIR functions of a module are scheduled when it is compiled."""

    DEFAULT = "default"  # TVM's default lowering: naive serial loops (the 'untuned' baseline)
    HAND = "hand"  # pfp.backends.tvm.schedules: parallel + SIMD rules per operator kind
    TUNED = "tuned"  # the tuning database's best schedule per function, hand schedules elsewhere


def compile_module(mod: tvm.IRModule, target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST,
                   schedule: Schedule | str = Schedule.HAND, database=None) -> tvm.runtime.Executable:
    """Compile a Relax module for a named (or given) target with the chosen :class:`Schedule`.

    ``Schedule.TUNED`` needs ``database`` (a Meta Scheduler database or its work dir).
    """
    from pfp.backends.tvm.schedules import compile_scheduled

    schedule = Schedule(schedule)
    target = make_target(target)
    if schedule is Schedule.DEFAULT:
        return tvm.compile(mod, target=target)
    if schedule is Schedule.HAND:
        return compile_scheduled(mod, target)
    if database is None:
        raise ValueError("Schedule.TUNED needs the tuning database (or its work dir)")
    if isinstance(database, (str, Path)):
        from pfp.backends.tvm.tune import compiling_database

        if not Path(database).is_dir():
            raise FileNotFoundError(f"{database}: tuning database folder not found")
        database = compiling_database(database)
    return compile_scheduled(mod, target, database)


# --------------------------------------------------------------------------- runners

class CompiledModel:
    """A compiled model with a fixed input shape, run by the Relax VM on the CPU.

    ``weights`` (name -> array) are passed after ``x`` on every call when the module takes its
    weights as parameters; they are matched to the function's parameter names.
    """

    kind = "model"

    def __init__(self, module: tvm.runtime.Executable | tvm.runtime.Module, input_shape, *,
                 target: tvm.target.Target | Mapping | str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None, info: Mapping | None = None) -> None:
        self.module = module
        self.info = dict(info or {})  # free-form provenance (variant, schedule, variance scale, ...)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.target = make_target(target) if target is not None else make_target(TargetName.HOST)
        self.weights = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in (weights or {}).items()}
        self._vm: relax.VirtualMachine | None = None
        self._weight_args: list | None = None

    @property
    def batch_size(self) -> int:
        return self.input_shape[0]

    # -- execution

    def _machine(self) -> relax.VirtualMachine:
        if self._vm is None:
            if not _runs_on_host(self.target):
                raise RuntimeError(f"this module was compiled for {_target_arch(self.target)}, the host is "
                                   f"{platform.machine()}: export_library() it and run it on the board")
            device = tvm.cpu()
            vm = relax.VirtualMachine(self.module, device)
            arity = int(vm.module["get_function_arity"]("main"))
            names = [str(vm.module["get_function_param_name"]("main", i)) for i in range(1, arity)]
            missing = [name for name in names if name not in self.weights]
            if missing:
                raise ValueError(f"the module takes its weights as parameters; missing {missing}")
            self._weight_args = [tvm.runtime.tensor(self.weights[name], device) for name in names]
            self._vm = vm
        return self._vm

    def _check_input(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.input_shape:
            if x.shape[1:] == self.input_shape[1:]:
                raise ValueError(f"batch-size mismatch: the module was compiled for batch size {self.batch_size}, "
                                 f"got {x.shape[0]} (input {x.shape}); use predict() for other sizes")
            raise ValueError(f"wrong input shape: expected {self.input_shape} (batch, C, H, W), got {x.shape}")
        return x

    def run(self, x) -> tuple[np.ndarray, ...]:
        """All outputs of ``main`` for one batch of exactly ``input_shape``, as numpy arrays."""
        vm = self._machine()
        result = vm["main"](tvm.runtime.tensor(self._check_input(x)), *self._weight_args)
        if isinstance(result, tvm.runtime.Tensor):
            return (result.numpy(),)
        return tuple(item.numpy() for item in result)

    def predict_outputs(self, x) -> tuple[np.ndarray, ...]:
        """Run any number of examples (N, C, H, W) in batches of ``batch_size`` (the last one padded)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"wrong input shape: expected (N, {', '.join(map(str, self.input_shape[1:]))}), got {x.shape}")
        chunks: list[tuple[np.ndarray, ...]] = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - count, *batch.shape[1:]), np.float32)])
            chunks.append(tuple(out[:count] for out in self.run(batch)))
        if not chunks:
            raise ValueError("predict() needs at least one example")
        return tuple(np.concatenate(parts) for parts in zip(*chunks))

    def benchmark(self, number: int = 10, repeat: int = 3, x=None) -> dict[str, float]:
        """Latency of one batch in milliseconds (TVM's time_evaluator, first call discarded)."""
        vm = self._machine()
        if x is None:
            x = np.zeros(self.input_shape, np.float32)
        device = tvm.cpu()
        vm.set_input("main", tvm.runtime.tensor(self._check_input(x), device), *self._weight_args)
        timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
        result = timer("main")
        results_ms = [r * 1e3 for r in result.results]
        return {"mean_ms": float(np.mean(results_ms)), "median_ms": float(np.median(results_ms)),
                "std_ms": float(np.std(results_ms)), "number": number, "repeat": repeat}

    def profile(self, number: int = 20, x=None) -> list[dict]:
        """Per-operator latency: each TIR function the VM calls, timed ``number`` times in place.

        Returns ``[{"operator", "calls", "ms"}]`` (ms per pass, all calls of that function),
        slowest first. The VM's own builtins (allocation, shape checks) are not listed.
        """
        import collections
        import time

        vm = self._machine()
        if x is None:
            x = np.zeros(self.input_shape, np.float32)
        samples: dict[str, list[float]] = collections.defaultdict(list)
        calls: collections.Counter = collections.Counter()

        def instrument(func, name, before_run, _ret, *args):
            if before_run and not str(name).startswith("vm.builtin"):
                func(*args)  # warm
                start = time.perf_counter()
                for _ in range(number):
                    func(*args)
                samples[str(name)].append((time.perf_counter() - start) / number * 1e3)
                calls[str(name)] += 1
            return 0

        vm.set_instrument(tvm.runtime.convert(instrument))
        try:
            vm["main"](tvm.runtime.tensor(self._check_input(x)), *self._weight_args)
        finally:
            # None, not a no-op function: the VM would still call into Python around every kernel
            # (LeNet at batch 1 then ran 6x slower after a profile)
            vm.set_instrument(None)
        rows = [{"operator": name, "calls": calls[name], "ms": float(sum(values))} for name, values in samples.items()]
        return sorted(rows, key=lambda row: -row["ms"])

    # -- pfp.backends.base.Predictor (protocol shims, superseded by runtime.py)

    def predict(self, x) -> tuple[np.ndarray, ...]:
        return self.predict_outputs(x)

    def time(self, *, number: int = 10, repeat: int = 3, x=None) -> dict[str, float]:
        return self.benchmark(number=number, repeat=repeat, x=x)

    def export(self, path: str | Path) -> Path:
        return self.export_library(path)

    def describe(self) -> dict[str, Any]:
        # the runtime's thread count as it reads it (pfp.backends.tvm sets TVM_NUM_THREADS); not
        # runtime.NumThreads, which starts the thread pool and pins the calling thread to one CPU
        import os

        from pfp.backends.tvm import physical_cores

        threads = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or physical_cores()
        return {"backend": "tvm", "kind": self.kind, "target": str(self.target), "batch_size": self.batch_size,
                "input_shape": list(self.input_shape), "threads": int(threads), **self.info}

    # -- export / load

    def export_library(self, path: str | Path) -> Path:
        """Write a shared library (``path``) and its metadata (``path + '.json'``).

        Weights that are function parameters go to ``path + '.weights.npz'``. aarch64 targets
        are cross-linked with ``aarch64-linux-gnu-gcc`` (package gcc-aarch64-linux-gnu).
        """
        if not isinstance(self.module, tvm.runtime.Executable):
            raise RuntimeError("only a freshly compiled module (tvm.runtime.Executable) can be exported; "
                               "this one was loaded from a library")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        arch = _target_arch(self.target)
        if arch != platform.machine():
            if arch != "aarch64":
                raise RuntimeError(f"no cross compiler known for {arch}")
            compiler = shutil.which(ARM_CROSS_COMPILER)
            if compiler is None:
                raise RuntimeError(f"cross-linking for {arch} needs {ARM_CROSS_COMPILER} on PATH "
                                   "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)")
            kwargs["cc"] = compiler
        from pfp.io import atomic_path, atomic_savez, atomic_write_json

        with atomic_path(path) as tmp:  # no half-written library if linking fails
            self.module.export_library(str(tmp), **kwargs)
        metadata = {"format": _METADATA_FORMAT, "kind": self.kind, "input_shape": list(self.input_shape),
                    "target": str(self.target), "weights": list(self.weights), "info": self.info}
        if self.weights:
            atomic_savez(str(path) + ".weights.npz", self.weights)
        atomic_write_json(str(path) + ".json", metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompiledModel:
        """Load a library written by :meth:`export_library` (metadata next to it)."""
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: compiled library not found")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: metadata of the compiled library not found")
        metadata = json.loads(meta_path.read_text())
        if metadata.get("format") != _METADATA_FORMAT:
            raise ValueError(f"{meta_path}: unsupported metadata format {metadata.get('format')!r}")
        kind = metadata.get("kind")
        subclass = {sub.kind: sub for sub in (CompiledPFP, CompiledDeterministic, CompiledEnsemble)}.get(kind)
        if subclass is None:
            raise ValueError(f"{meta_path}: unknown compiled model kind {kind!r}")
        if cls is not CompiledModel and subclass is not cls:
            raise ValueError(f"{path} holds a {kind} model, not a {cls.kind} model")
        weights = {}
        if metadata.get("weights"):
            with np.load(str(path) + ".weights.npz") as archive:
                weights = {name: archive[name] for name in metadata["weights"]}
        target = tvm.target.Target(json.loads(metadata["target"]))
        if not _runs_on_host(target):
            raise RuntimeError(f"{path} was compiled for {_target_arch(target)}; load it on that machine")
        return subclass(tvm.runtime.load_module(str(path)), metadata["input_shape"], target=target, weights=weights,
                        info=metadata.get("info"))


class CompiledPFP(CompiledModel):
    """Compiled probabilistic forward pass: ``runner(x) -> (logit_mean, logit_var)``."""

    kind = "pfp"

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray]:
        mean, var = self.run(x)
        return mean, var


class CompiledDeterministic(CompiledModel):
    """Compiled deterministic twin: ``runner(x) -> logits``."""

    kind = "deterministic"

    def __call__(self, x) -> np.ndarray:
        return self.run(x)[0]


class CompiledEnsemble(CompiledModel):
    """Compiled S-member ensemble (SVI with pre-drawn weights): ``runner(x) -> logits (S, B, C)``."""

    kind = "ensemble"

    def __call__(self, x) -> np.ndarray:
        return self.run(x)[0]

    def predict(self, x) -> tuple[np.ndarray, ...]:
        """Any number of examples: ``(logits (S, N, C),)``; batches join on the example axis (1), not the members'."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape[1:] or x.shape[0] == 0:
            return self.predict_outputs(x)  # its error message
        chunks = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - count, *batch.shape[1:]), np.float32)])
            chunks.append(self.run(batch)[0][:, :count])
        return (np.concatenate(chunks, axis=1),)


def load_compiled(path: str | Path) -> CompiledModel:
    """Load a :class:`CompiledPFP` or :class:`CompiledDeterministic` from its exported library."""
    return CompiledModel.load(path)


def _compile(cls, spec: ModelSpec, mod: tvm.IRModule, batch_size: int, target, schedule, database,
             weights: Mapping[str, np.ndarray] | None):
    target = make_target(target)
    return cls(compile_module(mod, target, schedule, database), (batch_size, *spec.input_shape), target=target,
               weights=weights)


def compile_pfp(spec: ModelSpec, params: Mapping, *, batch_size: int = 1,
                target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST, joint: bool = True,
                weights_as_params: bool = False, variance_scale: float = 1.0,
                schedule: Schedule | str = Schedule.HAND, database=None) -> CompiledPFP:
    """Build and compile the PFP module; see :func:`build_pfp_module` and :func:`compile_module`."""
    mod = build_pfp_module(spec, params, batch_size=batch_size, joint=joint,
                           weights_as_params=weights_as_params, variance_scale=variance_scale)
    weights = pfp_weight_arrays(spec, params, variance_scale=variance_scale) if weights_as_params else None
    return _compile(CompiledPFP, spec, mod, batch_size, target, schedule, database, weights)


def compile_deterministic(spec: ModelSpec, weights: Mapping, *, batch_size: int = 1,
                          target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST,
                          weights_as_params: bool = False, schedule: Schedule | str = Schedule.HAND,
                          database=None) -> CompiledDeterministic:
    """Build and compile the deterministic twin; see :func:`build_deterministic_module`."""
    mod = build_deterministic_module(spec, weights, batch_size=batch_size, weights_as_params=weights_as_params)
    arrays = deterministic_weight_arrays(spec, weights) if weights_as_params else None
    return _compile(CompiledDeterministic, spec, mod, batch_size, target, schedule, database, arrays)


def compile_ensemble(spec: ModelSpec, stacked: Mapping, *, batch_size: int = 1,
                     target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST,
                     weights_as_params: bool = False, schedule: Schedule | str = Schedule.HAND,
                     database=None) -> CompiledEnsemble:
    """Build and compile the S-member ensemble; see :func:`build_ensemble_module`."""
    mod = build_ensemble_module(spec, stacked, batch_size=batch_size, weights_as_params=weights_as_params)
    arrays = ensemble_weight_arrays(spec, stacked) if weights_as_params else None
    return _compile(CompiledEnsemble, spec, mod, batch_size, target, schedule, database, arrays)
