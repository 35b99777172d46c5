"""The TIR lowering pipeline of every PFP kernel: TVM's S-TIR lowering plus two passes of ours.

* :class:`ReassociateAccumulation` (before lowering, while blocks exist): in blocks the hand
  schedule marked with :data:`REASSOCIATE_ANNOTATION`, an accumulator update
  ``acc = acc + (p + q)`` becomes ``acc = (acc + p) + q``. LLVM may not reassociate floats
  itself, so ``acc + (x * y + z * w)`` compiles to a multiply, a multiply-add and an add, with
  the sum of products held in a register; the new order is two multiply-adds into the
  accumulator. Only the order of the float32 additions changes (the results stay within
  float32 summation error of the reference; tested against the naive loops).
* :class:`~pfp.backends.tvm.denormals.FlushDenormals` (after lowering, optional): subnormals
  flushed to zero inside every kernel.

Tuning candidates (:func:`pfp.backends.tvm.tune.lean_build`) and compiled modules
(:func:`pfp.backends.tvm.schedules.compile_scheduled`) are lowered alike, so what the tuner
measures is what ships.
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import ir, tirx
from tvm.s_tir.stmt import SBlock

__all__ = ["REASSOCIATE_ANNOTATION", "ReassociateAccumulation", "reassociate_accumulation", "register_pipeline"]

#: Block annotation: evaluate this block's accumulator updates ``acc + (p + q)`` as ``(acc + p) + q``.
REASSOCIATE_ANNOTATION = "pfp.reassociate_accumulation"


def _split_update(value, written: list) -> object:
    """``(acc + p) + q`` for ``value = acc + (p + q)`` with ``acc`` a load of a ``written`` buffer, else ``value``."""
    if not (isinstance(value, tirx.Add) and isinstance(value.a, ir.TensorLoad) and isinstance(value.b, tirx.Add)):
        return value
    if not str(value.ty).startswith("float") or not any(value.a.source.same_as(buffer) for buffer in written):
        return value
    return tirx.Add(tirx.Add(value.a, value.b.a), value.b.b)


def reassociate_accumulation(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with the accumulator updates of its marked blocks reassociated (see the module docstring).

    Raises ValueError when blocks are marked but none of them has such an update (the schedule's
    mark and the operator disagree, and nothing would change).
    """
    marked, rewritten = [], 0

    def on_block(block: SBlock, mutator) -> SBlock:
        block = mutator.default_mutate(block)
        if REASSOCIATE_ANNOTATION not in block.annotations:
            return block
        marked.append(block.name_hint)
        written = [region.source for region in block.writes]

        def on_add(node, add_mutator):
            nonlocal rewritten
            node = add_mutator.default_mutate(node)
            split = _split_update(node, written)
            rewritten += split is not node
            return split

        body = tvm_ffi.structural_mutate(block.body, [(tirx.Add, on_add)])
        return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init,
                      block.alloc_buffers, block.match_buffers, block.annotations)

    func = tvm_ffi.structural_mutate(func, [(SBlock, on_block)])
    if marked and not rewritten:
        raise ValueError(f"blocks {marked} are marked {REASSOCIATE_ANNOTATION!r} but none has an update "
                         "acc + (p + q) to reassociate")
    return func


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="ReassociateAccumulation")
class ReassociateAccumulation:
    """:func:`reassociate_accumulation` on every function of a module."""

    def transform_function(self, func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        return reassociate_accumulation(func)


@functools.cache
def register_pipeline(flush_denormals: bool = True) -> str:
    """Register our TIR pipeline (once per process) and return its name for ``tvm.tirx.build``/``relax.build``."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    from pfp.backends.tvm.denormals import FlushDenormals

    name = "pfp_lowering" + ("_flush_denormals" if flush_denormals else "")

    def factory():
        lower, finalize_host, finalize_device = default_s_tir_pipeline()
        passes = [ReassociateAccumulation(), lower] + ([FlushDenormals()] if flush_denormals else [])
        return tvm.transform.Sequential(passes, name=name), finalize_host, finalize_device

    tvm.tirx.compilation_pipeline.register_tir_pipeline(name, factory)
    return name
