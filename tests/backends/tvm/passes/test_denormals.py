"""Flush-to-zero kernels: subnormal floats are 0 inside compiled kernels, on the calling thread and on
the workers of parallel loops, and every thread's own floating-point mode is back afterwards."""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import s_tir, te  # noqa: E402

from pfp.backends.tvm import graph  # noqa: E402
from pfp.backends.tvm.passes import register_pipeline  # noqa: E402
from pfp.backends.tvm.targets import TargetName, make_target  # noqa: E402
from pfp.spec import Architecture, build_spec  # noqa: E402

from ..helpers import random_params  # noqa: E402

X86 = platform.machine() in ("x86_64", "AMD64")
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)  # 1.2e-38
N = 4096


def _kernel(fcompute, parallel: bool) -> tvm.tirx.PrimFunc:
    """y[i] = fcompute(x[i]) over N floats, optionally as a parallel loop of 8 chunks."""
    x = te.placeholder((N,), name="x")
    y = te.compute((N,), lambda i: fcompute(x[i]), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    if parallel:
        outer, _ = sch.split(sch.get_loops(sch.get_sblock("y"))[0], [8, None])
        sch.parallel(outer)
    return sch.mod["main"]


def _build(func, target, flush: bool):
    return tvm.tirx.build(tvm.IRModule({"main": func}), target=target, pipeline=register_pipeline(flush))


def _run(lib, x: np.ndarray) -> np.ndarray:
    out = tvm.runtime.empty(x.shape, "float32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(x, tvm.cpu()), out)
    return out.numpy()


def _square(value):
    return value * value


def _scale_up(value):
    return value * tvm.tirx.const(1e30, "float32")


@pytest.mark.skipif(not X86, reason="runs x86 code on this host")
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_subnormal_results_and_inputs_flush_to_zero(parallel):
    host = make_target("host")
    x = np.full(N, 1e-20, np.float32)
    x[::2] = 1e-10  # normal squares stay exact
    plain, flushing = (_build(_kernel(_square, parallel), host, flush) for flush in (False, True))
    want = x * x  # numpy: the 1e-40 squares are subnormal
    assert np.all(want[1::2] > 0) and np.all(want[1::2] < SMALLEST_NORMAL)
    np.testing.assert_array_equal(_run(plain, x), want)
    flushed = _run(flushing, x)
    np.testing.assert_array_equal(flushed[::2], want[::2])
    assert np.all(flushed[1::2] == 0.0)
    # denormals-are-zero: a subnormal input counts as 0 (1e-40 * 1e30 would be 1e-10)
    tiny = np.full(N, 1e-40, np.float32)
    assert np.all(_run(_build(_kernel(_scale_up, parallel), host, False), tiny) > 1e-11)
    assert np.all(_run(_build(_kernel(_scale_up, parallel), host, True), tiny) == 0.0)


@pytest.mark.skipif(not X86, reason="runs x86 code on this host")
def test_threads_get_their_own_mode_back():
    """After a flushing kernel, the caller (numpy here) and the pool's workers compute subnormals again."""
    host = make_target("host")
    x = np.full(N, 1e-20, np.float32)
    flushing = _build(_kernel(_square, True), host, True)
    plain = _build(_kernel(_square, True), host, False)
    for _ in range(3):
        assert np.all(_run(flushing, x) == 0.0)
        assert np.all(_run(plain, x) > 0.0)  # every chunk, whichever worker ran it
        assert np.float32(1e-20) * np.float32(1e-20) > 0.0  # this thread
    assert np.all(_run(_build(_kernel(_square, False), host, False), x) > 0.0)


def test_arm_kernels_set_and_restore_fpcr():
    """AArch64: FPCR.FZ is set on entry and in every parallel iteration, and the saved word written back."""
    arm = make_target(TargetName.RASP4B)
    flushing = _build(_kernel(_square, True), arm, True).inspect_source("asm").lower()
    plain = _build(_kernel(_square, True), arm, False).inspect_source("asm").lower()
    assert "fpcr" not in plain
    # entry: read, set; exit: restore; each parallel iteration: read the worker's own, set, restore
    assert len(re.findall(r"mrs\s+x\d+, fpcr", flushing)) == 2
    assert len(re.findall(r"msr\s+fpcr, x\d+", flushing)) == 4
    assert re.search(r"orr\s+x\d+, x\d+, #0x1000000", flushing)  # FZ, bit 24


@pytest.mark.skipif(not X86, reason="inspects x86 code")
def test_compiled_models_flush_unless_asked_not_to():
    spec = build_spec(Architecture.MLP)
    mod = graph.build_pfp_module(spec, random_params(spec), batch_size=2)
    from pfp.backends.tvm.pipeline import compile_scheduled

    def assembly(executable) -> str:
        return "".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")

    assert "ldmxcsr" in assembly(compile_scheduled(mod, "host"))
    assert "ldmxcsr" not in assembly(compile_scheduled(mod, "host", flush_denormals=False))
