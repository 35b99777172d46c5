"""The board registry: targets by name, architecture facts, CPU features of libraries and of the host."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from pfp.backends.tvm import targets as tt
from pfp.backends.tvm.targets import FloatControl, float_control

X86 = platform.machine() in ("x86_64", "AMD64")


def test_targets_is_a_leaf_that_imports_no_tvm():
    code = ("import sys, pfp.backends.tvm.targets as t; "
            "assert not any(m == 'tvm' or m.startswith(('tvm.', 'torch')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('tvm', 'torch')))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_board_names_a_known_architecture():
    for name, board in tt.BOARDS.items():
        assert board.name is name
        assert board.arch in tt.ARCHITECTURES
        assert tt.target_arch(board.target) == board.arch
    assert set(tt.BOARDS) | {tt.TargetName.HOST} == set(tt.TargetName)


pytest.importorskip("tvm")

import tvm  # noqa: E402


def test_make_target_names():
    host = tt.make_target("host")
    assert host.kind.name == "llvm"
    assert int(host.attrs["num-cores"]) >= 1
    for name, cpu in [(tt.TargetName.RASP4B, "cortex-a72"), (tt.TargetName.RASP5, "cortex-a76")]:
        target = tt.make_target(name)
        assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
        assert str(target.attrs["mcpu"]) == cpu
        assert list(target.attrs["mattr"]) == ["+neon"]
        assert int(target.attrs["num-cores"]) == 4
    assert tt.make_target({"kind": "llvm"}).kind.name == "llvm"
    given = tvm.target.Target({"kind": "llvm"})
    assert tt.make_target(given) is given
    with pytest.raises(ValueError, match="unknown target 'rasp3'"):
        tt.make_target("rasp3")


def test_float_control_by_target():
    assert float_control(tt.make_target(tt.TargetName.RASP4B)) is FloatControl.AARCH64_FPCR
    assert float_control(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})) is FloatControl.X86_MXCSR
    assert float_control(tvm.target.Target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})) is None
    assert float_control(tvm.target.Target("c")) is None
    if X86:
        assert float_control(tt.make_target("host")) is FloatControl.X86_MXCSR


def test_arch_host_and_cross_compiler():
    arm = tt.make_target("rasp4b")
    host = tt.make_target("host")
    assert tt.target_arch(arm) == "aarch64"
    assert tt.target_arch(host) == platform.machine()
    assert tt.runs_on_host(host)
    assert tt.cross_compiler(host) is None
    if platform.machine() != "aarch64":
        assert not tt.runs_on_host(arm)
        assert tt.cross_compiler(arm) == tt.ARM_CROSS_COMPILER
    with pytest.raises(RuntimeError, match="no cross compiler known for riscv64"):
        tt.cross_compiler(tvm.target.Target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"}))


def test_simd_registers_by_target():
    assert tt.simd_registers(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == (16, 32)
    assert tt.simd_registers(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})) == (8, 16)
    assert tt.simd_registers(tt.make_target("rasp5")) == (4, 32)
    assert tt.simd_registers(None) == (8, 16)


def test_library_cpu_features_are_cpuinfo_flags():
    haswell = tt.target_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                                          "mcpu": "haswell"}))
    assert {"avx2", "fma", "sse4_2", "pni"} <= set(haswell)
    assert "avx512f" not in haswell
    # the Pi 4 has no crypto extensions although LLVM's cortex-a72 has: they are not required
    assert tt.target_cpu_features(tt.make_target("rasp4b")) == ["asimd", "fp"]


def test_host_cpu_features_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse\n")
    assert tt.host_cpu_features(x86) == {"fpu", "sse", "sse2", "avx2", "fma"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n")
    assert tt.missing_cpu_features(["asimd", "fp", "asimddp"], arm) == ["asimddp"]
    assert tt.host_cpu_features(tmp_path / "missing") is None
    assert tt.missing_cpu_features(["anything"], tmp_path / "missing") == []
    if X86:
        assert set(tt.target_cpu_features(tt.make_target("host"))) <= tt.host_cpu_features()
