"""The hand schedule of a whole function: reductions first, their light consumers in their loops, then the rest."""

from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import s_tir, tirx

from pfp.backends.tvm.ops.covariance import GEMM_ANNOTATION
from pfp.backends.tvm.schedules.common import _COMM_REDUCE, HEAVY_BLOCK_NODES, _extent, _is_reduction, _iter_types
from pfp.backends.tvm.schedules.elementwise import _contiguous_lanes, _schedule_elementwise, _vectorise
from pfp.backends.tvm.schedules.reductions import _schedule_conv, _schedule_dense, _schedule_gemm
from pfp.backends.tvm.targets import simd_registers

__all__ = ["HandSchedule", "apply_hand_schedule", "schedule_prim_func"]

logger = logging.getLogger(__name__)


def schedule_prim_func(func: tirx.PrimFunc, *, lanes: int | None = None, target=None) -> tirx.PrimFunc:
    """``func`` with the hand-written CPU schedule applied (see the module docstring)."""
    sch = s_tir.Schedule(func)
    apply_hand_schedule(sch, lanes=lanes, target=target)
    return sch.mod["main"]


def apply_hand_schedule(sch: s_tir.Schedule, *, lanes: int | None = None, target=None) -> None:
    """Apply the hand-written schedule to the function ``main`` of ``sch`` (recorded in ``sch.trace``).

    ``target`` (default: the current target) sizes register tiles and, unless ``lanes`` is given,
    the dense reductions' partial sums (one SIMD register of them), see :func:`simd_registers`.
    """
    lanes = lanes if lanes is not None else simd_registers(target)[0]
    root = sch.get_sblock("root")
    names = [sch.get(block).name_hint for block in sch.get_child_blocks(root)]
    placed: set[str] = set()  # blocks moved under another block's loops
    for name in names:
        if name in placed:
            continue
        block = sch.get_sblock(name)
        if not _is_reduction(sch, block):
            continue
        types = _iter_types(sch, block)
        if GEMM_ANNOTATION in sch.get(block).annotations:
            scheduled = _schedule_gemm(sch, block, target)
        elif types.count(_COMM_REDUCE) == 1:
            scheduled = _schedule_dense(sch, block, lanes)
        else:
            scheduled = _schedule_conv(sch, block, lanes, target)
        if scheduled is None:
            continue
        # consumers (final lane sum, bias epilogue, ReLU) inside the same parallel loop
        outer, head = scheduled
        _attach_consumers(sch, head, outer)
        placed |= {sch.get(child).name_hint for child in sch.get_child_blocks(outer)}
    _schedule_elementwise(sch, [block for block in sch.get_child_blocks(root)
                                if sch.get(block).name_hint not in placed and not _is_reduction(sch, block)])


def _block_size(sch: s_tir.Schedule, block) -> int:
    """Nodes in a block's body: a measure of its work per element (a bias add ~30, a Gaussian ReLU ~240)."""
    count = 0

    def visit(_node) -> None:
        nonlocal count
        count += 1

    tvm_ffi.structural_walk(sch.get(block).body, visit)
    return count


def _attach_consumers(sch: s_tir.Schedule, producer, loop) -> None:
    """Move the chain of consumers of ``producer`` under ``loop`` where their indexing allows.

    Heavy consumers (more than :data:`HEAVY_BLOCK_NODES`, e.g. the Gaussian ReLU after a joint
    layer) stay at the root: under a register tile they would run a few lanes at a time and apart
    from their sibling, where :func:`_schedule_elementwise` merges mean and variance into one loop
    and vectorises whole rows.
    """
    frontier = [producer]
    seen = {sch.get(producer).name_hint}
    while frontier:
        block = frontier.pop(0)
        for consumer in sch.get_consumers(block):
            consumer_name = sch.get(consumer).name_hint
            if consumer_name in seen:
                continue
            seen.add(consumer_name)
            if _block_size(sch, consumer) > HEAVY_BLOCK_NODES:
                continue
            try:
                sch.reverse_compute_at(consumer, loop)
            except (s_tir.ScheduleError, tvm.error.InternalError, ValueError):  # its indexing does not match (a pooling window, a flat conv's rows): stays at root
                continue
            if not _is_reduction(sch, consumer):
                _vectorise_innermost(sch, consumer, below=loop)
            frontier.append(consumer)


def _vectorise_innermost(sch: s_tir.Schedule, block, below) -> None:
    """Vectorise the innermost loop of ``block`` if it is one of the loops under ``below`` (e.g. a bias epilogue row)."""
    loops = sch.get_loops(block)
    position = next((index for index, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(below))), None)
    if position is None or position == len(loops) - 1:
        return
    _vectorise(sch, loops[-1], _contiguous_lanes(_extent(sch, loops[-1])))


@tvm.transform.module_pass(opt_level=0, name="HandSchedule")
class HandSchedule:
    """Apply :func:`schedule_prim_func` to every TIR function not scheduled yet (e.g. by the database)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            try:
                scheduled = schedule_prim_func(func)
            except (s_tir.ScheduleError, tvm.error.InternalError) as error:  # keep the default loops rather than fail the build
                logger.warning("no hand schedule for %s (%s); default loops kept", gvar.name_hint,
                               str(error).strip().splitlines()[-1])
                continue
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod
