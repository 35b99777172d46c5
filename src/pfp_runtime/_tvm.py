"""TVM's runtime through ``tvm_ffi`` alone: load a library, make its Relax VM, set the thread pool.

``import tvm`` would load TVM's whole compiler (and, through ``tvm_ffi``, torch when installed);
the runtime needs only ``libtvm_runtime.so`` from the ``apache-tvm`` wheel and ``tvm_ffi``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from pfp_runtime.library import private_copy

_DL_CPU = 1  # DLPack's kDLCPU
_ALIGNMENT = 64  # bytes; TVM's kernels may assume it of their buffers (an unaligned one segfaulted)
_POOLED_ALLOCATOR = 2  # the Relax VM's pooled allocator (what tvm.runtime.vm.VirtualMachine uses)
#: runtime.config_threadpool's kSpecifyThreadShareAllCore: the threads float over the given CPUs
_SHARE_ALL_CORES = -3

_ffi = None


def _runtime_library() -> Path:
    """``libtvm_runtime.so`` of the installed ``apache-tvm`` wheel (found without importing ``tvm``)."""
    explicit = os.environ.get("PFP_TVM_RUNTIME_LIBRARY")
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pfp_runtime needs TVM's runtime library: pip install apache-tvm (same version as the "
                          "bundle's), or set PFP_TVM_RUNTIME_LIBRARY to a libtvm_runtime.so")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "lib" / "libtvm_runtime.so"
        if candidate.is_file():
            return candidate
    raise ImportError(f"no lib/libtvm_runtime.so in the tvm package at {list(spec.submodule_search_locations)}")


def ffi():
    """``tvm_ffi`` with ``libtvm_runtime.so`` loaded (its VM builtins registered); imported once."""
    global _ffi
    if _ffi is None:
        # tvm_ffi imports torch eagerly when it can (a work-around of a symbol clash on Windows);
        # a process without torch loaded keeps it out: the runtime converts numpy arrays only
        keep_torch_out = "torch" not in sys.modules and "tvm_ffi" not in sys.modules
        if keep_torch_out:
            sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
        try:
            import tvm_ffi
        finally:
            if keep_torch_out and sys.modules.get("torch", False) is None:
                del sys.modules["torch"]
        ctypes.CDLL(str(_runtime_library()), ctypes.RTLD_GLOBAL)
        _ffi = tvm_ffi
    return _ffi


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary (a safe TVM input)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


class Machine:
    """One compiled library's Relax VM: ``main(x) -> tuple of tensors`` on the CPU."""

    def __init__(self, library: Path) -> None:
        tvm_ffi = ffi()
        self._module = tvm_ffi.load_module(str(private_copy(library)))  # this file's code, not an earlier one's
        self._vm = self._module["vm_load_executable"]()
        self._vm["vm_initialization"](_DL_CPU, 0, _POOLED_ALLOCATOR)
        self.main = self._vm["main"]

    @staticmethod
    def tensor(array):
        return ffi().from_dlpack(array)


def configure_threads(threads: int) -> None:
    """Run TVM's parallel loops on ``threads`` threads (floating over this process's CPUs, not pinned)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(os.cpu_count() or 1))
    os.environ["TVM_NUM_THREADS"] = str(threads)  # for a pool that has not started yet
    ffi().get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, int(threads), [str(c) for c in cpus])
