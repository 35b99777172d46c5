"""The lowering of every PFP module: TVM's pipelines plus three passes of ours.

TIR (every kernel), TVM's S-TIR lowering with:

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

Relax (the VM program, :func:`vm_lowering_passes`), the CPU backend's passes with:

* :class:`RemoveUnusedTuples`: ``CallTIRRewrite`` binds every multi-output kernel call's outputs
  as a tuple ``lv = (alloc0, alloc1)``, and the VM builds it (``vm.builtin.make_tuple``) on every
  call even though the program only reads its fields, which are bound on their own. Every joint
  operator, Gaussian ReLU and max-pool returns a (mean, variance) pair, so PFP's LeNet built 9 such
  tuples per inference: dropping them took batch 1 from 55.7 to 51.9 us (median of 30 interleaved
  rounds, same kernels; the deterministic twin has none and is unchanged).
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import ir, relax, tirx
from tvm.s_tir.stmt import SBlock

__all__ = ["REASSOCIATE_ANNOTATION", "ReassociateAccumulation", "RemoveUnusedTuples", "reassociate_accumulation",
           "register_pipeline", "remove_unused_tuples", "vm_lowering_passes"]

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


def remove_unused_tuples(func: relax.Function) -> relax.Function:
    """``func`` without the bindings of its body that build a tuple nothing reads (see the module docstring).

    Only tuple construction is dropped: it has no effect besides the tuple, whose fields stay
    bound to their own variables. (``relax.analysis.remove_all_unused`` is documented for
    dataflow blocks only, and by now the VM program has none.)
    """
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func
    used = set(relax.analysis.free_vars(body.body))
    for block in body.blocks:
        for binding in block.bindings:
            used.update(relax.analysis.free_vars(binding.value))
    blocks, dropped = [], 0
    for block in body.blocks:
        kept = [binding for binding in block.bindings
                if not (isinstance(binding, relax.VarBinding) and isinstance(binding.value, relax.Tuple)
                        and binding.var not in used)]
        dropped += len(block.bindings) - len(kept)
        blocks.append(type(block)(kept))
    if not dropped:
        return func
    return relax.Function(func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure, func.attrs,
                          func.span)


@tvm.transform.module_pass(opt_level=0, name="RemoveUnusedTuples")
class RemoveUnusedTuples:
    """:func:`remove_unused_tuples` on every Relax function of a module."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {gvar: remove_unused_tuples(func) for gvar, func in mod.functions_items()
                   if isinstance(func, relax.Function)}
        for gvar, func in updates.items():
            if not func.same_as(mod[gvar]):
                mod[gvar] = func
        return mod


def vm_lowering_passes(target: tvm.target.Target) -> list:
    """The CPU backend's Relax lowering (dataflow lowering, then finalisation) with :class:`RemoveUnusedTuples`.

    It runs once ``CallTIRRewrite`` and the memory planning have made the tuples, just before
    ``AttachGlobalSymbol`` (the last pass in TVM 0.27; at the end if a later TVM drops it).
    """
    # the CPU backend's pass lists (tvm.relax.pipeline's dispatcher misses them in 0.27)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
    names = [p.info.name for p in passes]
    at = names.index("AttachGlobalSymbol") if "AttachGlobalSymbol" in names else len(passes)
    return passes[:at] + [RemoveUnusedTuples()] + passes[at:]
