"""Flush-to-zero for compiled kernels: subnormal floats are treated and produced as 0 inside them.

The Gaussian ReLU / max-pool kernels evaluate phi(a) and Phi(a) far into the tails, where
products of small probabilities (phi^2, var * Phi) fall below float32's normal range
(1.2e-38). x86 and ARM cores handle such subnormal operands and results in a slow microcode
path: with LeNet's trained weights, 0.3 % subnormal activations made the first Gaussian
ReLU + max-pool kernel 1.7x slower than on random inputs. Their contribution to any result is
below 1e-38, so the kernels flush them: each compiled function sets the CPU's flush-to-zero
and denormals-are-zero bits (x86 MXCSR FTZ | DAZ, AArch64 FPCR.FZ) on entry and restores the
caller's control word on exit. The worker threads of a parallel loop do the same around their
share of the loop, each with its own saved word, so no thread is left in a changed mode.

This runs after the TIR lowering pipeline, where parallel loops are still ``For`` nodes and the
compute body is the ``compute_scope`` attribute that ``MakePackedAPI`` adds (see
:func:`pfp.backends.tvm.passes.tir_pipeline.register_pipeline`).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from pfp.backends.tvm.targets import FloatControl, float_control

__all__ = ["FlushDenormals", "flush_denormals"]


_MXCSR_FTZ_DAZ = 0x8040  # bit 15 flush-to-zero, bit 6 denormals-are-zero
_FPCR_FZ = 1 << 24  # AArch64: flush denormal inputs and results to zero (single and double)


class _Control:
    """Statements that save the control word to ``saved[slot]`` and load the flushing (or a saved) one."""

    def __init__(self, control: FloatControl) -> None:
        self.control = control
        self.dtype = "int32" if control is FloatControl.X86_MXCSR else "int64"

    def buffer(self, name: str, words: int) -> tirx.Buffer:
        return tirx.decl_buffer((words,), self.dtype, name=name, scope="local")

    def save(self, buffer: tirx.Buffer, slot: int) -> tirx.Stmt:
        if self.control is FloatControl.X86_MXCSR:
            return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.x86.sse.stmxcsr",
                                                       tirx.address_of(tirx.BufferLoad(buffer, [slot]))))
        return tirx.BufferStore(buffer, tirx.call_llvm_intrin("int64", "llvm.aarch64.get.fpcr"), [slot])

    def load(self, buffer: tirx.Buffer, slot: int) -> tirx.Stmt:
        if self.control is FloatControl.X86_MXCSR:
            return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.x86.sse.ldmxcsr",
                                                       tirx.address_of(tirx.BufferLoad(buffer, [slot]))))
        return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.aarch64.set.fpcr", tirx.BufferLoad(buffer, [slot])))

    def flushing(self, buffer: tirx.Buffer, source: int, slot: int) -> tirx.Stmt:
        bits = _MXCSR_FTZ_DAZ if self.control is FloatControl.X86_MXCSR else _FPCR_FZ
        return tirx.BufferStore(buffer, tirx.BufferLoad(buffer, [source]) | tirx.const(bits, self.dtype), [slot])


def _map_children(stmt: tirx.Stmt, visit) -> tirx.Stmt:
    """``stmt`` rebuilt with ``visit`` applied to its child statements (loops, sequences, attributes, branches)."""
    if isinstance(stmt, tirx.For):
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, visit(stmt.body), stmt.thread_binding,
                        stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([visit(child) for child in stmt.seq])
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, visit(stmt.body))
    if isinstance(stmt, tirx.IfThenElse):
        return tirx.IfThenElse(stmt.condition, visit(stmt.then_case),
                               None if stmt.else_case is None else visit(stmt.else_case))
    return stmt


def _wrap_parallel(stmt: tirx.Stmt, control: _Control, modes: tirx.Buffer) -> tirx.Stmt:
    """``stmt`` with every parallel loop run by workers in the flushing mode (each worker's own word restored after).

    The loop goes under a parallel launch point: every task of the launch runs the statements
    around the loop once and its share of the iterations in between. (Switching per iteration
    cost more than it saved: LDMXCSR drains the pipeline, LeNet's fc1 at batch 100 ran 30 % slower.)
    """
    if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL:
        own = control.buffer("worker_fp_control", 1)
        body = tirx.SeqStmt([tirx.AllocBuffer(own), control.save(own, 0), control.load(modes, 1), stmt,
                             control.load(own, 0)])
        return tirx.AttrStmt(tirx.const(0, "int32"), "pragma_parallel_launch_point", tirx.const(0, "int32"), body)
    return _map_children(stmt, lambda child: _wrap_parallel(child, control, modes))


def _wrap_compute_scope(stmt: tirx.Stmt, control: _Control) -> tirx.Stmt:
    """``stmt`` with the body of its ``compute_scope`` attribute (below the argument checks) in the flushing mode."""
    if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "compute_scope":
        modes = control.buffer("fp_control", 2)  # [caller's word, flushing word]
        body = tirx.SeqStmt([tirx.AllocBuffer(modes), control.save(modes, 0), control.flushing(modes, 0, 1),
                             control.load(modes, 1), _wrap_parallel(stmt.body, control, modes), control.load(modes, 0)])
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    return _map_children(stmt, lambda child: _wrap_compute_scope(child, control))


def flush_denormals(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """``func`` (lowered, after ``MakePackedAPI``) computing with subnormals flushed to zero on ``target``'s CPU."""
    control = float_control(target)
    return func if control is None else func.with_body(_wrap_compute_scope(func.body, _Control(control)))


@tvm.tirx.transform.prim_func_pass(opt_level=0, name="FlushDenormals")
class FlushDenormals:
    """:func:`flush_denormals` on every host function of a module (targets from the functions' ``target`` attribute)."""

    def transform_function(self, func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        target = func.attrs.get("target") if func.attrs is not None else None
        return func if target is None else flush_denormals(func, target)
