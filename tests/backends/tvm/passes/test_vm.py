"""The VM program no longer builds the (mean, variance) tuples that only their fields are read from."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from pfp.backends.tvm import ops  # noqa: E402
from pfp.backends.tvm.passes import remove_unused_tuples, vm_lowering_passes  # noqa: E402
from pfp.backends.tvm.pipeline import compile_scheduled  # noqa: E402


def _two_gaussian_relus() -> tvm.IRModule:
    """main(mean, var) -> ReLU(ReLU(.)) of a Gaussian: two kernels with (mean, variance) outputs."""
    shape = (2, 8)
    mean, var = (relax.Var(name, relax.TensorType(shape, "float32")) for name in ("mean", "var"))
    bb = relax.BlockBuilder()
    with bb.function("main", [mean, var]):
        with bb.dataflow():
            pair = (mean, var)
            for index in range(2):
                out = bb.emit_te(ops.relu_gaussian, *pair, primfunc_name_hint=f"relu_gaussian{index}")
                pair = (bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1)))
            output = bb.emit_output(relax.Tuple(list(pair)))
        bb.emit_func_output(output)
    return bb.get()


def _make_tuples(executable) -> int:
    return executable.mod["as_text"]().count("vm.builtin.make_tuple in:")


def test_the_vm_builds_only_the_tuple_it_returns(monkeypatch):
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from pfp.backends.tvm import pipeline

    target = tvm.target.Target({"kind": "llvm"})
    ours = compile_scheduled(_two_gaussian_relus(), target)
    monkeypatch.setattr(pipeline, "vm_lowering_passes",
                        lambda t: cpu.dataflow_lower_passes(t) + cpu.finalize_passes(t))  # TVM's own lowering
    stock = compile_scheduled(_two_gaussian_relus(), target)
    assert _make_tuples(stock) == 2  # the (fused) kernel's outputs, and the returned pair
    assert _make_tuples(ours) == 1
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(2, 8)).astype("float32"), rng.uniform(0.1, 2.0, size=(2, 8)).astype("float32")]
    results = []
    for executable in (stock, ours):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        results.append([out.numpy() for out in vm["main"](*[tvm.runtime.tensor(a) for a in inputs])])
    for expected, actual in zip(*results):
        np.testing.assert_array_equal(actual, expected)
    assert np.all(results[1][1] > 0)  # a real Gaussian output, not an empty one


def test_used_tuples_stay_and_a_function_without_unused_ones_is_unchanged():
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        unused = bb.emit(relax.Tuple([x, x]))
        used = bb.emit(relax.Tuple([x]))
        first = bb.emit(relax.TupleGetItem(used, 0))
        bb.emit_func_output(relax.Tuple([first, x]))
    func = bb.get()["main"]
    pruned = remove_unused_tuples(func)
    bound = [binding.var for block in pruned.body.blocks for binding in block.bindings]
    assert unused not in bound and used in bound and first in bound
    assert remove_unused_tuples(pruned).same_as(pruned)


def test_the_pass_runs_before_the_global_symbols_are_attached():
    names = [p.info.name for p in vm_lowering_passes(tvm.target.Target({"kind": "llvm"}))]
    assert names[-2:] == ["RemoveUnusedTuples", "AttachGlobalSymbol"]
    assert names.index("RemoveUnusedTuples") > names.index("KillAfterLastUse") > names.index("CallTIRRewrite")
