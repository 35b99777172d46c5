"""The host's CPU: architecture and feature flags, read without TVM (a board checks a bundle before loading it)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

#: ``platform.machine()`` spellings of the architectures bundles are built for
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


#: AArch64 Linux AT_HWCAP bits, in order (the kernel's names, as /proc/cpuinfo's "Features" line spells them)
_AARCH64_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
                  "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_AT_HWCAP = 16


def _aarch64_hwcap_features() -> set[str] | None:
    """The CPU features from the ELF auxiliary vector (what the kernel's cpuinfo is made from; under
    qemu-user it describes the emulated CPU, where /proc/cpuinfo is the host's)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype, libc.getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        bits = int(libc.getauxval(_AT_HWCAP))
    except (OSError, AttributeError):
        return None
    return {name for i, name in enumerate(_AARCH64_HWCAP) if bits >> i & 1} if bits else None


def host_cpu_features(cpuinfo: str | Path | None = None) -> set[str] | None:
    """This CPU's feature flags: AT_HWCAP on AArch64 Linux, else ``/proc/cpuinfo`` (x86 ``flags``, ARM
    ``Features``); ``cpuinfo`` reads that file instead. None when unknown."""
    if cpuinfo is None:
        if host_arch() == "aarch64" and sys.platform.startswith("linux"):
            features = _aarch64_hwcap_features()
            if features is not None:
                return features
        cpuinfo = "/proc/cpuinfo"
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
