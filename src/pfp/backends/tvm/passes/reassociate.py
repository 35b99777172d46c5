"""Reassociated accumulation: ``acc + (p + q)`` evaluated as ``(acc + p) + q`` in marked blocks.

Before TVM's lowering, while blocks exist: in blocks the hand schedule marked with
:data:`REASSOCIATE_ANNOTATION`, an accumulator update ``acc = acc + (p + q)`` becomes
``acc = (acc + p) + q``. LLVM may not reassociate floats itself, so ``acc + (x * y + z * w)``
compiles to a multiply, a multiply-add and an add, with the sum of products held in a register;
the new order is two multiply-adds into the accumulator. Only the order of the float32 additions
changes (the results stay within float32 summation error of the reference; tested against the
naive loops).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import ir, tirx
from tvm.s_tir.stmt import SBlock

__all__ = ["REASSOCIATE_ANNOTATION", "ReassociateAccumulation", "reassociate_accumulation"]

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
