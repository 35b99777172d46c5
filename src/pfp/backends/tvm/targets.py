"""The boards PFP compiles for, and everything the backend needs to know about a target's CPU.

One table, :data:`BOARDS`: per board its TVM target, its architecture (:data:`ARCHITECTURES`:
cross-compiler, floating-point control register, SIMD registers). Every other module asks this
one (``make_target``, ``target_arch``, ``runs_on_host``, ``float_control``, ``simd_registers``,
``cross_compiler``); adding a board (a Raspberry Pi 3, a Jetson's CPU) is one :class:`Board`
entry, a new architecture one :class:`Architecture` entry.

It also reads the CPU features a compiled library needs (:func:`target_cpu_features`, from the
LLVM target) and those the host has (:func:`host_cpu_features`, from ``/proc/cpuinfo``, no TVM).

This is a leaf module: it imports nothing from :mod:`pfp`, and TVM only inside the functions
that need it (a board's runtime-only Python can import it).

Example::

    >>> target = make_target("rasp4b")
    >>> target_arch(target), cross_compiler(target), simd_registers(target)
    ('aarch64', 'aarch64-linux-gnu-gcc', (4, 32))
"""

from __future__ import annotations

import enum
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "ARM_CROSS_COMPILER",
    "BOARDS",
    "Architecture",
    "Board",
    "FloatControl",
    "TargetName",
    "cross_compiler",
    "float_control",
    "host_cpu_features",
    "make_target",
    "missing_cpu_features",
    "physical_cores",
    "runs_on_host",
    "simd_registers",
    "target_arch",
    "target_cpu_features",
]

#: Debian/Ubuntu package gcc-aarch64-linux-gnu; used to link aarch64 shared libraries.
ARM_CROSS_COMPILER = "aarch64-linux-gnu-gcc"


class FloatControl(enum.Enum):
    """Which floating-point control register a target's CPU has (None: left alone)."""

    X86_MXCSR = "x86"  #: MXCSR, flush-to-zero bit 15 and denormals-are-zero bit 6
    AARCH64_FPCR = "aarch64"  #: FPCR, flush-to-zero bit 24


@dataclass(frozen=True)
class Architecture:
    """What the backend needs to know about an instruction set."""

    name: str  #: as ``platform.machine()`` and the first part of an LLVM triple name it
    triples: tuple[str, ...]  #: LLVM triple prefixes of this architecture
    float_control: FloatControl | None
    #: links shared libraries for it on another machine (None: only natively)
    cross_compiler: str | None = None
    #: LLVM feature name -> ``/proc/cpuinfo`` flag, for the features compiled code may use
    #: (vector / floating-point / scalar ALU extensions; not e.g. AES, which LLVM does not use
    #: for our kernels and which some boards lack although their core supports it: the Pi 4)
    cpu_flags: Mapping[str, str] = field(default_factory=dict)


_X86_FLAGS = {
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "popcnt": "popcnt", "lzcnt": "abm", "movbe": "movbe", "avx512f": "avx512f", "avx512dq": "avx512dq",
    "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
}
_AARCH64_FLAGS = {
    "fp-armv8": "fp", "neon": "asimd", "fullfp16": "fphp", "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2",
}

#: Architectures by name (``platform.machine()``).
ARCHITECTURES: dict[str, Architecture] = {
    "x86_64": Architecture("x86_64", ("x86_64", "i386", "i686"), FloatControl.X86_MXCSR, None, _X86_FLAGS),
    "aarch64": Architecture("aarch64", ("aarch64", "arm64"), FloatControl.AARCH64_FPCR, ARM_CROSS_COMPILER,
                            _AARCH64_FLAGS),
}


class TargetName(str, enum.Enum):
    """The boards (and the host) a model is compiled for; see :data:`BOARDS`."""

    HOST = "host"  #: this machine's CPU (llvm with the host CPU)
    RASP4B = "rasp4b"  #: Raspberry Pi 4 Model B, Cortex-A72, 64-bit OS
    RASP5 = "rasp5"  #: Raspberry Pi 5, Cortex-A76, 64-bit OS


@dataclass(frozen=True)
class Board:
    """A board PFP compiles for: its TVM target (an LLVM target dict) and its architecture."""

    name: TargetName
    target: Mapping[str, Any]
    arch: str

    def target_config(self, num_cores: int | None = None) -> dict[str, Any]:
        config = {key: list(value) if isinstance(value, list) else value for key, value in self.target.items()}
        if num_cores:
            config["num-cores"] = num_cores
        return config


#: The boards besides the host (the host's target is read from the machine, see :func:`make_target`).
BOARDS: dict[TargetName, Board] = {
    TargetName.RASP4B: Board(TargetName.RASP4B, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                                 "mattr": ["+neon"], "num-cores": 4}, "aarch64"),
    TargetName.RASP5: Board(TargetName.RASP5, {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                                               "mattr": ["+neon"], "num-cores": 4}, "aarch64"),
}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-thread siblings count once).

    TVM's runtime sizes its thread pool as *half* the logical CPUs on every x86 machine (it
    assumes 2-way hyper-threading). On VMs and other machines without SMT that leaves half of
    the cores idle: on our 2-vCPU machines every compiled module ran on one thread.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _host_cpu() -> str | None:
    try:
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:  # an LLVM-less runtime build, or an unknown host
        return None
    return cpu if cpu and cpu != "generic" else None


def make_target(name: TargetName | str | Mapping | Any = TargetName.HOST, num_cores: int | None = None):
    """``tvm.target.Target`` by name: ``host`` (llvm with the host CPU) or a board of :data:`BOARDS`.

    A ``Target`` or a target dict passes through (TVM 0.27 refuses CLI strings such as
    ``"llvm -mcpu=..."``). ``num_cores`` (the Meta Scheduler reads ``num-cores``) defaults to
    the host's physical cores for ``host`` and the board's cores otherwise.
    """
    import tvm

    if isinstance(name, tvm.target.Target):
        return name
    if isinstance(name, Mapping):
        return tvm.target.Target(dict(name))
    try:
        name = TargetName(name)
    except ValueError:
        choices = ", ".join(t.value for t in TargetName)
        raise ValueError(f"unknown target {name!r}; choose one of: {choices} (or pass a tvm Target / dict)") from None
    if name is TargetName.HOST:
        config: dict[str, Any] = {"kind": "llvm"}
        cpu = _host_cpu()
        if cpu:
            config["mcpu"] = cpu
        config["num-cores"] = num_cores or physical_cores()  # the runtime's thread count (see pfp.backends.tvm)
    else:
        config = BOARDS[name].target_config(num_cores)
    return tvm.target.Target(config)


def _triple(target) -> str:
    """The LLVM triple of ``target`` (a Target or a target dict); empty when unset."""
    attrs = target if isinstance(target, Mapping) else target.attrs
    return str(attrs.get("mtriple", "") or "")


def target_arch(target) -> str:
    """Architecture of a target (a Target or a target dict): its triple's, else the host's."""
    triple = _triple(target)
    return triple.split("-")[0] if triple else platform.machine()


def runs_on_host(target) -> bool:
    """Whether code compiled for ``target`` runs on this machine's architecture."""
    return target_arch(target) == platform.machine()


def _architecture_of_triple(triple: str) -> Architecture | None:
    return next((arch for arch in ARCHITECTURES.values() if triple.startswith(arch.triples)), None)


def cross_compiler(target) -> str | None:
    """The cross-linker of ``target``'s architecture when it is not the host's (None: link natively).

    Raises RuntimeError when the architecture is foreign and no cross compiler is known for it.
    """
    arch = target_arch(target)
    if arch == platform.machine():
        return None
    known = ARCHITECTURES.get(arch)
    if known is None or known.cross_compiler is None:
        raise RuntimeError(f"no cross compiler known for {arch}")
    return known.cross_compiler


def float_control(target) -> FloatControl | None:
    """The floating-point control register of an LLVM target's CPU, from its triple (the host's when unset)."""
    if target.kind.name != "llvm":
        return None
    triple = _triple(target)
    if not triple:
        from tvm.target import codegen

        triple = str(codegen.llvm_get_system_triple())
    arch = _architecture_of_triple(triple)
    return arch.float_control if arch is not None else None


def simd_registers(target=None) -> tuple[int, int]:
    """(float32 lanes per SIMD register, SIMD registers) of ``target``'s CPU (default: the current target).

    AVX-512: 16 x 32, AVX/AVX2: 8 x 16, NEON: 4 x 32. Without a target, AVX2's (our CI hosts).
    """
    import tvm

    target = target if target is not None else tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 8, 16
    from tvm.target.codegen import target_has_features

    if target_has_features("avx512f", target):
        return 16, 32
    if target_has_features("avx", target):
        return 8, 16
    if target_has_features("neon", target) or "aarch64" in _triple(target):
        return 4, 32
    return 4, 16


def target_cpu_features(target) -> list[str]:
    """CPU features code compiled for ``target`` may use, as ``/proc/cpuinfo`` flag names (sorted).

    From LLVM's feature list of the target's triple, CPU and attributes, limited to the features
    of :attr:`Architecture.cpu_flags` (what loading checks the host for). Needs TVM's compiler.
    """
    if target.kind.name != "llvm":
        return []
    from tvm.target import codegen

    arch = ARCHITECTURES.get(target_arch(target))
    if arch is None:
        return []
    llvm_features = {str(feature) for feature in codegen.llvm_get_cpu_features(target)}
    return sorted({flag for feature, flag in arch.cpu_flags.items() if feature in llvm_features})


def host_cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The host CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); None if unknown.

    Needs no TVM: a board's runtime reads it before loading a library.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def missing_cpu_features(required, cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The features of ``required`` the host lacks (empty when the host's are unknown)."""
    have = host_cpu_features(cpuinfo)
    if have is None:
        return []
    return sorted(set(required) - have)
