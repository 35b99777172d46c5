"""Compiled models: run, time, profile, export and load (the :class:`~pfp.backends.base.Predictor` of TVM).

Example::

    >>> runner = compile_pfp(spec, params, batch_size=8, target="host")   # pfp.backends.tvm.pipeline
    >>> logit_mean, logit_var = runner.predict(images)                      # any number of examples
    >>> runner.export("lenet_host.so")                                      # + lenet_host.so.json (metadata)
    >>> runner = load("lenet_host.so", expected_model="lenet")

The Relax function ``main`` takes ``x`` (batch, C, H, W) (followed by the weight arrays when they
are function parameters) and returns the tuple ``(logit_mean, logit_var)``; the deterministic
twin returns the logits, the ensemble the logits of every member (S, batch, C). The batch size
is fixed at build time; :meth:`CompiledModel.predict` runs any number of examples in chunks.

This module imports neither torch nor TVM's compiler passes: a board's Python with TVM's runtime
and numpy loads and runs a library. A library records the CPU features it was compiled for
(from its LLVM target, see :func:`pfp.backends.tvm.targets.target_cpu_features`); loading it on
a CPU that lacks one of them is refused before any of its code is loaded.

A library's files (``path``, ``path.weights.npz``, ``path.json``) are written one by one, each
atomically, the metadata last; the metadata records the size and sha256 of the others. A library
is loaded only when they match (and its ELF structure is whole: :mod:`pfp_runtime.library`), so a
truncated or corrupt file, or a set torn by an interrupted export (a new library beside the
previous export's metadata), is refused with a :class:`LibraryError` naming the file.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import sys
import time as _time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pfp.backends.base import PredictorKind
from pfp.backends.tvm.targets import (
    TargetName,
    cross_compiler,
    make_target,
    missing_cpu_features,
    physical_cores,
    runs_on_host,
    target_arch,
    target_cpu_features,
)
from pfp.data.idx import DataError
from pfp.io import atomic_path, atomic_savez, atomic_write_json
from pfp_runtime.library import LibraryError as _UnsafeLibrary
from pfp_runtime.library import check_library, library_record, private_copy

# tvm_ffi imports torch eagerly when it is installed (a work-around of a symbol clash on Windows);
# a process that has not imported torch (a board, a serving process) keeps it out: TVM's runtime
# only uses torch to convert torch tensors, and this module hands it numpy arrays.
_KEEP_TORCH_OUT = "torch" not in sys.modules and "tvm_ffi" not in sys.modules
if _KEEP_TORCH_OUT:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
try:
    import tvm.runtime
    from tvm.runtime.vm import VirtualMachine
finally:
    if _KEEP_TORCH_OUT and sys.modules.get("torch", False) is None:
        del sys.modules["torch"]

__all__ = ["CompiledDeterministic", "CompiledEnsemble", "CompiledModel", "CompiledPFP", "IncompatibleLibraryError",
           "LibraryError", "export_library", "load"]

#: 2 added ``model`` and ``cpu_features``; 3 ``files``: the size and sha256 of the library and its weights.
#: Older libraries are refused: nothing shows whether their files are whole and belong together.
_METADATA_FORMAT = 3


class LibraryError(DataError):
    """A compiled library or its metadata refused before loading: missing, unreadable, truncated, corrupt,
    or files of different exports. A ``DataError``: the stages print its one line and exit with code 2."""


class IncompatibleLibraryError(LibraryError, RuntimeError):
    """A compiled library that cannot run here (another architecture, missing CPU features) or is not the model asked for."""


class LibraryNotFoundError(LibraryError, FileNotFoundError):
    """A compiled library or its metadata file is missing."""


class CompiledModel:
    """A compiled model with a fixed input shape, run by the Relax VM on the CPU.

    ``weights`` (name -> array) are passed after ``x`` on every call when the module takes its
    weights as parameters; they are matched to the function's parameter names. ``model`` is the
    model spec's name (recorded in the metadata, checked by :func:`load`); ``info`` free-form
    provenance (variant, schedule, variance scale, ...).
    """

    kind: PredictorKind

    def __init__(self, module, input_shape, *, target=None, weights: Mapping[str, np.ndarray] | None = None,
                 info: Mapping | None = None, model: str | None = None,
                 cpu_features: list[str] | None = None) -> None:
        self.module = module
        self.info = dict(info or {})
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.target = make_target(target) if target is not None else make_target(TargetName.HOST)
        self.weights = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in (weights or {}).items()}
        self._cpu_features = None if cpu_features is None else sorted(cpu_features)
        self._vm: VirtualMachine | None = None
        self._weight_args: list | None = None

    @property
    def batch_size(self) -> int:
        return self.input_shape[0]

    @property
    def cpu_features(self) -> list[str]:
        """The CPU features (``/proc/cpuinfo`` names) the code was compiled for."""
        if self._cpu_features is None:
            self._cpu_features = target_cpu_features(self.target)
        return self._cpu_features

    # -- execution

    def _machine(self) -> VirtualMachine:
        if self._vm is None:
            if not runs_on_host(self.target):
                raise RuntimeError(f"this module was compiled for {target_arch(self.target)}, the host is "
                                   f"{platform.machine()}: export() it and run it on the board")
            device = tvm.runtime.cpu()
            vm = VirtualMachine(self.module, device)
            arity = int(vm.module["get_function_arity"]("main"))
            names = [str(vm.module["get_function_param_name"]("main", i)) for i in range(1, arity)]
            missing = [name for name in names if name not in self.weights]
            if missing:
                raise ValueError(f"the module takes its weights as parameters; missing {missing}")
            self._weight_args = [tvm.runtime.tensor(self.weights[name], device) for name in names]
            self._vm = vm
        return self._vm

    def _check_input(self, x) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.input_shape:
            if x.shape[1:] == self.input_shape[1:]:
                raise ValueError(f"batch-size mismatch: the module was compiled for batch size {self.batch_size}, "
                                 f"got {x.shape[0]} (input {x.shape}); use predict() for other sizes")
            raise ValueError(f"wrong input shape: expected {self.input_shape} (batch, C, H, W), got {x.shape}")
        return x

    def run(self, x) -> tuple[np.ndarray, ...]:
        """All outputs of ``main`` for one batch of exactly ``input_shape``, as numpy arrays."""
        vm = self._machine()
        result = vm["main"](tvm.runtime.tensor(self._check_input(x)), *self._weight_args)
        if isinstance(result, tvm.runtime.Tensor):
            return (result.numpy(),)
        return tuple(item.numpy() for item in result)

    #: the axis of the examples in the outputs (the ensemble's outputs are (members, examples, classes))
    example_axis = 0

    def predict(self, x) -> tuple[np.ndarray, ...]:
        """All outputs for any number of examples (N, C, H, W), run in batches of ``batch_size`` (the last padded)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"wrong input shape: expected (N, {', '.join(map(str, self.input_shape[1:]))}), got {x.shape}")
        chunks: list[tuple[np.ndarray, ...]] = []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - count, *batch.shape[1:]), np.float32)])
            chunks.append(tuple(out.take(np.arange(count), axis=self.example_axis) for out in self.run(batch)))
        if not chunks:
            raise ValueError("predict() needs at least one example")
        return tuple(np.concatenate(parts, axis=self.example_axis) for parts in zip(*chunks))

    def time(self, *, number: int = 10, repeat: int = 3, x=None) -> dict[str, float]:
        """Latency of one batch in milliseconds (TVM's time_evaluator, first call discarded)."""
        vm = self._machine()
        if x is None:
            x = np.zeros(self.input_shape, np.float32)
        device = tvm.runtime.cpu()
        vm.set_input("main", tvm.runtime.tensor(self._check_input(x), device), *self._weight_args)
        timer = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)
        result = timer("main")
        results_ms = [r * 1e3 for r in result.results]
        return {"mean_ms": float(np.mean(results_ms)), "median_ms": float(np.median(results_ms)),
                "std_ms": float(np.std(results_ms)), "number": number, "repeat": repeat}

    def profile(self, *, number: int = 20, x=None) -> list[dict]:
        """Per-operator latency: each TIR function the VM calls, timed ``number`` times in place.

        Returns ``[{"operator", "calls", "ms"}]`` (ms per pass, all calls of that function),
        slowest first. The VM's own builtins (allocation, shape checks) are not listed.
        """
        vm = self._machine()
        if x is None:
            x = np.zeros(self.input_shape, np.float32)
        samples: dict[str, list[float]] = collections.defaultdict(list)
        calls: collections.Counter = collections.Counter()

        def instrument(func, name, before_run, _ret, *args):
            if before_run and not str(name).startswith("vm.builtin"):
                func(*args)  # warm
                start = _time.perf_counter()
                for _ in range(number):
                    func(*args)
                samples[str(name)].append((_time.perf_counter() - start) / number * 1e3)
                calls[str(name)] += 1
            return 0

        vm.set_instrument(tvm.runtime.convert(instrument))
        try:
            vm["main"](tvm.runtime.tensor(self._check_input(x)), *self._weight_args)
        finally:
            # None, not a no-op function: the VM would still call into Python around every kernel
            # (LeNet at batch 1 then ran 6x slower after a profile)
            vm.set_instrument(None)
        rows = [{"operator": name, "calls": calls[name], "ms": float(sum(values))} for name, values in samples.items()]
        return sorted(rows, key=lambda row: -row["ms"])

    # -- provenance, export / load

    def describe(self) -> dict[str, Any]:
        """Backend, kind, model, target, batch size, input shape, threads, CPU features and the provenance info."""
        # the thread count as the runtime reads it (pfp.backends.tvm sets TVM_NUM_THREADS); not
        # runtime.NumThreads, which starts the thread pool and pins the calling thread to one CPU
        threads = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or physical_cores()
        return {"backend": "tvm", "kind": self.kind.value, "model": self.model, "target": str(self.target),
                "batch_size": self.batch_size, "input_shape": list(self.input_shape), "threads": int(threads),
                "cpu_features": list(self.cpu_features), **self.info}

    def export(self, path: str | Path) -> Path:
        """Write a shared library (``path``) and its metadata (``path + '.json'``).

        Weights that are function parameters go to ``path + '.weights.npz'``. Libraries for another
        architecture are cross-linked (aarch64: ``aarch64-linux-gnu-gcc``, package gcc-aarch64-linux-gnu).
        """
        if not isinstance(self.module, tvm.runtime.Executable):
            raise RuntimeError("only a freshly compiled module (tvm.runtime.Executable) can be exported; "
                               "this one was loaded from a library")
        path = export_library(self.module, path, self.target)
        files = {"library": library_record(path)}
        if self.weights:
            atomic_savez(str(path) + ".weights.npz", self.weights)
            files["weights"] = library_record(str(path) + ".weights.npz")
        metadata = {"format": _METADATA_FORMAT, "kind": self.kind.value, "model": self.model,
                    "input_shape": list(self.input_shape), "target": str(self.target),
                    "cpu_features": list(self.cpu_features), "weights": list(self.weights), "files": files,
                    "info": self.info}
        # last, with the others' checksums: a kill before this leaves the previous metadata, which
        # refuses the new files (a mismatched set is never loaded)
        atomic_write_json(str(path) + ".json", metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, *, expected_model: str | None = None) -> CompiledModel:
        """Load a library written by :meth:`export` (metadata next to it); see :func:`load`."""
        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.is_file():
            raise LibraryNotFoundError(f"{path}: compiled library not found")
        if not meta_path.is_file():
            raise LibraryNotFoundError(f"{meta_path}: metadata of the compiled library not found")
        metadata = _read_metadata(meta_path)
        subclass = _compiled_kinds()[metadata["kind"]]
        if cls is not CompiledModel and subclass is not cls:
            raise LibraryError(f"{path} holds a {metadata['kind']} model, not a {cls.kind.value} model")
        model = metadata["model"]
        if expected_model is not None and model != expected_model:
            raise IncompatibleLibraryError(f"{path} holds a compiled {model or 'unrecorded'!r} model, not the "
                                           f"{expected_model!r} model asked for")
        target_config = metadata["target"]
        if not runs_on_host(target_config):
            raise IncompatibleLibraryError(f"{path} was compiled for {target_arch(target_config)}; "
                                           "load it on that machine")
        required = metadata["cpu_features"]
        missing = missing_cpu_features(required)
        if missing:
            raise IncompatibleLibraryError(
                f"{path} was compiled for CPU features this host lacks: {', '.join(missing)} (target "
                f"{target_config.get('mcpu', 'generic')}); rebuild it for this host: re-run the tune stage here "
                "(dvc repro tune) or compile it with target='host' on this machine")
        try:  # before any of its code is mapped: a truncated library would end the process with SIGBUS
            check_library(path, arch=platform.machine(), recorded_in=meta_path.name, **metadata["files"]["library"])
        except _UnsafeLibrary as error:
            raise LibraryError(str(error)) from None
        weights = _read_weights(path, meta_path, metadata) if metadata["weights"] else {}
        try:
            module = tvm.runtime.load_module(str(private_copy(path, metadata["files"]["library"]["sha256"])))
        except Exception as error:  # noqa: BLE001 - the FFI raises its own error types
            lines = str(error).strip().splitlines()
            raise LibraryError(f"{path}: cannot load the compiled library ({lines[-1] if lines else type(error).__name__})") from None
        return subclass(module, metadata["input_shape"], target=target_config,
                        weights=weights, info=metadata["info"], model=model, cpu_features=required)


def _compiled_kinds() -> dict[str, type[CompiledModel]]:
    return {sub.kind.value: sub for sub in (CompiledPFP, CompiledDeterministic, CompiledEnsemble)}


def _read_metadata(meta_path: Path) -> dict[str, Any]:
    """A library's metadata, every field :meth:`CompiledModel.load` reads checked (``target`` parsed);
    :class:`LibraryError` naming the file and the key otherwise."""
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LibraryError(f"{meta_path}: not readable library metadata ({error})") from None
    if not isinstance(metadata, dict):
        raise LibraryError(f"{meta_path}: library metadata must be a JSON object, got {type(metadata).__name__}")
    fmt = metadata.get("format")
    if fmt != _METADATA_FORMAT:
        hint = ("written before libraries recorded their checksums; re-export it (dvc repro tune)"
                if fmt in (1, 2) else f"this code reads format {_METADATA_FORMAT}")
        raise LibraryError(f"{meta_path}: metadata format {fmt!r}: {hint}")

    def bad(key: str, expected: str) -> LibraryError:
        return LibraryError(f"{meta_path}: {key} must be {expected}, got {metadata.get(key)!r}")

    missing = [key for key in ("kind", "model", "input_shape", "target", "cpu_features", "weights", "files")
               if key not in metadata]
    if missing:
        raise LibraryError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    kinds = list(_compiled_kinds())
    if metadata["kind"] not in kinds:
        raise LibraryError(f"{meta_path}: unknown compiled model kind {metadata['kind']!r} (one of {', '.join(kinds)})")
    if metadata["model"] is not None and not (isinstance(metadata["model"], str) and metadata["model"]):
        raise bad("model", "a model name")
    shape = metadata["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape)):
        raise bad("input_shape", "4 positive integers (batch, C, H, W)")
    try:
        target = json.loads(metadata["target"]) if isinstance(metadata["target"], str) else None
    except json.JSONDecodeError:
        target = None
    if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
        raise bad("target", "a TVM target as JSON text (an object with its kind)")
    metadata["target"] = target
    for key in ("cpu_features", "weights"):
        if not (isinstance(metadata[key], list) and all(isinstance(item, str) for item in metadata[key])):
            raise bad(key, "a list of names")
    info = metadata.setdefault("info", {})
    if not isinstance(info, dict):
        raise bad("info", "an object")
    files = metadata["files"]
    needed = ["library", "weights"] if metadata["weights"] else ["library"]
    for name in needed:
        record = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(record, dict) and set(record) == {"size", "sha256"} and type(record["size"]) is int
                and isinstance(record["sha256"], str) and len(record["sha256"]) == 64):
            raise LibraryError(f"{meta_path}: files.{name} must record the file's size and sha256, got {record!r}")
    return metadata


def _read_weights(path: Path, meta_path: Path, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    """The weight parameters (``path.weights.npz``), checked against the metadata's record and names."""
    weights_path = Path(str(path) + ".weights.npz")
    if not weights_path.is_file():
        raise LibraryNotFoundError(f"{weights_path}: weights of the compiled library not found")
    record = metadata["files"]["weights"]
    if library_record(weights_path) != record:
        raise LibraryError(f"{weights_path}: size or checksum differs from {meta_path.name}'s record: corrupt, or "
                           "from another export (an interrupted export?); re-export it")
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in metadata["weights"] if name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise LibraryError(f"{weights_path}: not readable ({error})") from None
    missing = [name for name in metadata["weights"] if name not in arrays]
    if missing:
        raise LibraryError(f"{weights_path}: missing weight(s) {', '.join(missing)} named in {meta_path.name}")
    return arrays


def export_library(executable, path: str | Path, target) -> Path:
    """Link a compiled executable into the shared library ``path`` for ``target`` (atomically).

    Libraries for another architecture are cross-linked (aarch64: ``aarch64-linux-gnu-gcc``,
    package gcc-aarch64-linux-gnu).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    cross = cross_compiler(target)
    if cross is not None:
        compiler = shutil.which(cross)
        if compiler is None:
            raise RuntimeError(f"cross-linking for {target_arch(target)} needs {cross} on PATH "
                               "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)")
        kwargs["cc"] = compiler
    for leftover in path.parent.glob(f".{path.name}.*.tmp*"):  # temp files of an export that was killed
        leftover.unlink(missing_ok=True)
    with atomic_path(path) as tmp:  # no half-written library if linking fails
        executable.export_library(str(tmp), **kwargs)
    return path


class CompiledPFP(CompiledModel):
    """Compiled probabilistic forward pass: ``runner(x) -> (logit_mean, logit_var)``."""

    kind = PredictorKind.PFP

    def __call__(self, x) -> tuple[np.ndarray, np.ndarray]:
        mean, var = self.run(x)
        return mean, var


class CompiledDeterministic(CompiledModel):
    """Compiled deterministic twin: ``runner(x) -> logits``."""

    kind = PredictorKind.DETERMINISTIC

    def __call__(self, x) -> np.ndarray:
        return self.run(x)[0]


class CompiledEnsemble(CompiledModel):
    """Compiled S-member ensemble (SVI with pre-drawn weights): ``runner(x) -> logits (S, B, C)``."""

    kind = PredictorKind.ENSEMBLE
    example_axis = 1

    def __call__(self, x) -> np.ndarray:
        return self.run(x)[0]


def load(path: str | Path, *, expected_model: str | None = None) -> CompiledModel:
    """Load a :class:`CompiledPFP`, :class:`CompiledDeterministic` or :class:`CompiledEnsemble` library.

    Refused before any of its code is loaded: :class:`IncompatibleLibraryError` when it was
    compiled for another architecture or for CPU features this host lacks, or, with
    ``expected_model``, when it holds another model; :class:`LibraryError` (both are ``DataError``)
    when a file is missing, its metadata malformed, or the library or weights differ from the
    metadata's record (truncated, corrupt, an interrupted export) or are not a whole ELF library.
    """
    return CompiledModel.load(path, expected_model=expected_model)
