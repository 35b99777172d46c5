"""The VM program's lowering: the CPU backend's Relax passes with :class:`RemoveUnusedTuples`.

``CallTIRRewrite`` binds every multi-output kernel call's outputs as a tuple
``lv = (alloc0, alloc1)``, and the VM builds it (``vm.builtin.make_tuple``) on every call even
though the program only reads its fields, which are bound on their own. Every joint operator,
Gaussian ReLU and max-pool returns a (mean, variance) pair, so PFP's LeNet built 9 such tuples per
inference: dropping them took batch 1 from 55.7 to 51.9 us (median of 30 interleaved rounds, same
kernels; the deterministic twin has none and is unchanged).
"""

from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["RemoveUnusedTuples", "remove_unused_tuples", "vm_lowering_passes"]


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
