"""The host's CPU: architecture and feature flags, read without TVM (a board checks a bundle before loading it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: ``platform.machine()`` spellings of the architectures bundles are built for
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def host_cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """Feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); None when unknown."""
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
