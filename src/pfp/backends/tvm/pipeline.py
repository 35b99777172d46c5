"""Compiling a Relax module: legalisation and fusion, schedules, the VM lowering and our TIR pipeline.

* :func:`fuse_operators`: the CPU backend's library dispatch and legalisation passes
  (``tvm.relax.backend.cpu_generic.pipeline``), the module tuning tasks are extracted from;
* :func:`compile_scheduled`: then per TIR function the tuning database's schedule or the hand
  schedule (:mod:`pfp.backends.tvm.schedules`), the VM lowering
  (:func:`~pfp.backends.tvm.passes.vm.vm_lowering_passes`) and our TIR pipeline
  (:func:`~pfp.backends.tvm.passes.tir_pipeline.register_pipeline`);
* :func:`compile_module` by :class:`Schedule`, and :func:`compile_pfp` / :func:`compile_deterministic` /
  :func:`compile_ensemble`: a spec and its weights to a :mod:`~pfp.backends.tvm.runtime` model;
* :func:`memory_estimate`: planned activation memory plus weights.

Example::

    >>> runner = compile_pfp(model.spec, model.params, batch_size=8, target="host")
    >>> logit_mean, logit_var = runner.predict(images)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu

from pfp.backends.base import Schedule
from pfp.backends.tvm.graph import (
    build_deterministic_module,
    build_ensemble_module,
    build_pfp_module,
    deterministic_weight_arrays,
    ensemble_weight_arrays,
    pfp_weight_arrays,
)
from pfp.backends.tvm.passes import register_pipeline, vm_lowering_passes
from pfp.backends.tvm.runtime import CompiledDeterministic, CompiledEnsemble, CompiledPFP
from pfp.backends.tvm.schedules import HandSchedule
from pfp.backends.tvm.targets import TargetName, make_target
from pfp.spec import ModelSpec

__all__ = ["SELECTION_DIR", "Schedule", "compile_deterministic", "compile_ensemble", "compile_module", "compile_pfp",
           "compile_scheduled", "compile_tuned", "compiling_database", "fuse_operators", "memory_estimate"]

logger = logging.getLogger(__name__)

#: Sub-folder of a tuning work dir with the run-off's database (see :mod:`pfp.backends.tvm.tuning.runoff`).
SELECTION_DIR = "selection"


def fuse_operators(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Legalise and fuse a Relax module as the CPU pipeline does, ready for tuning or scheduling.

    Both the Meta Scheduler's task extraction and :func:`compile_scheduled` start from this
    module, so tuning records match the functions that are compiled. ``AnnotateTIROpPattern``'s
    ``op_pattern`` attribute is dropped afterwards: it is only needed by ``FuseOps``, and a
    function that keeps it no longer equals its tuning task.
    """
    target = make_target(target)
    with target:
        mod = tvm.transform.Sequential([*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target)])(mod)
    updates = {gvar: func.without_attr("op_pattern") for gvar, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc) and "op_pattern" in func.attrs}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def compile_scheduled(mod: tvm.IRModule, target, database=None, *, flush_denormals: bool = True) -> tvm.runtime.Executable:
    """Compile a Relax module with hand schedules (and the database's schedules where it has them).

    :func:`fuse_operators` first (the functions the tuning tasks were extracted from), then the
    database's best schedule per function, then the hand schedule for every function the
    database does not cover, then the VM lowering
    (:func:`~pfp.backends.tvm.passes.vm.vm_lowering_passes`). With ``flush_denormals`` every kernel
    computes with subnormal floats flushed to zero (see :mod:`pfp.backends.tvm.passes.denormals`).
    """
    target = make_target(target)
    lower = vm_lowering_passes(target)
    mod = fuse_operators(mod, target)
    tir_pipeline = register_pipeline(flush_denormals)

    @tvm.transform.module_pass(opt_level=3, name="PFPScheduledPipeline")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if database is not None:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            from_database = [gvar.name_hint for gvar, func in mod.functions_items()
                             if isinstance(func, tirx.PrimFunc) and func.attrs.get("tirx.is_scheduled", False)]
            logger.info("schedules from the database: %s", ", ".join(sorted(from_database)) or "none")
        mod = HandSchedule()(mod)
        return tvm.transform.Sequential(lower)(mod)

    with target, tvm.transform.PassContext(opt_level=3), (database if database is not None else contextlib.nullcontext()):
        return relax.build(mod, target=target, relax_pipeline=pipeline, tir_pipeline=tir_pipeline)


def compile_tuned(mod: tvm.IRModule, target, database) -> tvm.runtime.Executable:
    """Compile ``mod`` with the best schedules of ``database`` (a Meta Scheduler database), hand schedules elsewhere."""
    return compile_scheduled(mod, target, database)


def compile_module(mod: tvm.IRModule, target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST,
                   schedule: Schedule | str = Schedule.HAND, database=None) -> tvm.runtime.Executable:
    """Compile a Relax module for a named (or given) target with the chosen :class:`Schedule`.

    ``Schedule.TUNED`` needs ``database`` (a Meta Scheduler database or its work dir).
    """
    schedule = Schedule(schedule)
    target = make_target(target)
    if schedule is Schedule.DEFAULT:
        return tvm.compile(mod, target=target)
    if schedule is Schedule.HAND:
        return compile_scheduled(mod, target)
    if database is None:
        raise ValueError("Schedule.TUNED needs the tuning database (or its work dir)")
    if isinstance(database, (str, Path)):
        if not Path(database).is_dir():
            raise FileNotFoundError(f"{database}: tuning database folder not found")
        database = compiling_database(database)
    return compile_scheduled(mod, target, database)


def compiling_database(work_dir: str | os.PathLike):
    """The Meta Scheduler database modules tuned in ``work_dir`` compile with: the run-off's if there is one, else all records.

    (The tuning writes both; see :mod:`pfp.backends.tvm.tuning`.)
    """
    from tvm.s_tir import meta_schedule as ms

    selection = Path(work_dir) / SELECTION_DIR
    if (selection / "database_tuning_record.json").is_file():
        return ms.database.JSONDatabase(work_dir=str(selection), module_equality="structural")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")


def memory_estimate(mod: tvm.IRModule, target=TargetName.HOST) -> dict[str, int]:
    """Bytes a module needs: planned activation buffers (Relax static memory planning) + weights.

    Activations come from ``relax.analysis.estimate_memory_usage`` after the same lowering
    the compiler runs; weights are the bound constants and weight parameters of ``main``.
    """
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


def _compile(cls, spec: ModelSpec, mod: tvm.IRModule, batch_size: int, target, schedule, database,
             weights: Mapping[str, np.ndarray] | None):
    target = make_target(target)
    return cls(compile_module(mod, target, schedule, database), (batch_size, *spec.input_shape), target=target,
               weights=weights, model=spec.name)


def compile_pfp(spec: ModelSpec, params: Mapping, *, batch_size: int = 1,
                target: TargetName | str | Mapping | tvm.target.Target = TargetName.HOST, joint: bool = True,
                weights_as_params: bool = False, variance_scale: float = 1.0,
                schedule: Schedule | str = Schedule.HAND, database=None, covariance_layers: int = 0) -> CompiledPFP:
    """Build and compile the PFP module; see :func:`build_pfp_module` and :func:`compile_module`."""
    mod = build_pfp_module(spec, params, batch_size=batch_size, joint=joint, weights_as_params=weights_as_params,
                           variance_scale=variance_scale, covariance_layers=covariance_layers)
    weights = (pfp_weight_arrays(spec, params, variance_scale=variance_scale, covariance_layers=covariance_layers)
               if weights_as_params else None)
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
