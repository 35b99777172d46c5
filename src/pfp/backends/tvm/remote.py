"""A deployed bundle on a board over TVM RPC: whole-model latency (and outputs) per compiled batch size.

The board is found through a tracker by key, as the tuning runner finds it
(:mod:`pfp.backends.tvm.tuning.measure`); each library of the bundle is uploaded, loaded into a
Relax VM on the board's CPU and its ``main`` timed end to end with the VM's ``time_evaluator``
(on the board: the RPC round trip is not in the figures). Example::

    >>> rows = bundle_latency_over_rpc("models/lenet/bundle/rasp4b", "127.0.0.1:9190", "rasp4b", emulated=False)
    >>> [(row["batch_size"], row["median_ms"]) for row in rows]

Command line: ``python -m pfp.board latency BUNDLE --tracker HOST:PORT --key KEY`` (:mod:`pfp.board`).
An emulated board's timings (``emulated: true``) are the emulator's, never a Raspberry Pi's.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from pfp.backends.tvm.tuning.config import parse_tracker
from pfp_runtime.bundle import Bundle, BundleError, packed_columns, read_bundle
from pfp_runtime.predictor import DEFAULT_THREADS, normalise

__all__ = ["DEFAULT_SESSION_TIMEOUT", "RemoteBundle", "RemoteError", "bundle_input", "bundle_latency_over_rpc"]

#: seconds a board session may last (an emulated board is ~10-50x slower than a Pi)
DEFAULT_SESSION_TIMEOUT = 600.0
#: runtime.config_threadpool's affinity mode kBig: threads on the fastest cores (all of a Pi 4's, which are alike)
_AFFINITY_BIG = 0


class RemoteError(RuntimeError):
    """The board could not run the bundle: no session, a library the board cannot load, a failed call."""


def bundle_input(bundle: Bundle, images: np.ndarray | None, batch_size: int, *, seed: int = 0) -> np.ndarray:
    """One batch of the library's input: ``images`` (cycled to ``batch_size`` rows) normalised as the runtime does.

    ``images``: uint8 pixels 0-255 or floats 0-1, (N, 28, 28) or (N, 1, 28, 28), checked and
    normalised by :func:`pfp_runtime.predictor.normalise`; None: seeded random pixels.
    """
    if images is None:
        images = np.random.default_rng(seed).integers(0, 256, (batch_size, *bundle.input_shape), dtype=np.uint8)
    x = normalise(images, bundle)
    return np.ascontiguousarray(x[np.arange(batch_size) % x.shape[0]])


@dataclass
class _RemoteLibrary:
    batch_size: int
    path: Path
    vm: relax.VirtualMachine


class RemoteBundle:
    """A bundle's libraries loaded on a board (one RPC session): :meth:`run` and :meth:`time` per batch size.

    Use as a context manager; the session ends on exit (a board serves one session at a time).
    """

    def __init__(self, bundle_dir: str | Path, tracker: str, key: str, *,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT) -> None:
        self.bundle = read_bundle(bundle_dir, check_host=False)  # checksums, format; the board is not this host
        self.tracker, self.key = tracker, key
        self.target = self.bundle.metadata["target"]
        host, port = parse_tracker(tracker)
        from pfp.backends.tvm.tuning.measure import check_tracker  # the tuning runner's check, same errors

        check_tracker(tracker, key)
        try:
            self.session = tvm.rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=session_timeout)
        except Exception as error:  # noqa: BLE001 - tvm raises bare TVMErrors here
            raise RemoteError(f"no session on a board under key {key!r} at tracker {tracker}: {_last_line(error)}") from None
        self.device = self.session.cpu()
        self._libraries: dict[int, _RemoteLibrary] = {}
        try:
            for batch_size, path in sorted(self.bundle.libraries.items()):
                self._libraries[batch_size] = self._load(batch_size, path)
        except BaseException:
            self.close()  # free the board now: the error's traceback would keep the session open until its timeout
            raise

    def _load(self, batch_size: int, path: Path) -> _RemoteLibrary:
        name = f"{self.bundle.model}_{self.target.get('name')}_{path.name}"  # unique in the server's work folder
        try:
            self.session.upload(str(path), name)
            vm = relax.VirtualMachine(self.session.load_module(name), self.device)
            arity = int(vm.module["get_function_arity"]("main"))
        except Exception as error:  # noqa: BLE001
            raise RemoteError(f"{path}: the board under key {self.key!r} cannot load it: the bundle is for target "
                              f"{self.target.get('name')} ({self.target.get('arch')}); is the board one? "
                              f"({_last_line(error)})") from None
        if arity != 1:
            del vm  # it holds the session
            raise RemoteError(f"{path}: main takes {arity} arguments; a bundle library takes the images only")
        return _RemoteLibrary(batch_size, path, vm)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._libraries)

    def _set_input(self, batch_size: int, x: np.ndarray) -> relax.VirtualMachine:
        if batch_size not in self._libraries:
            raise ValueError(f"batch size {batch_size} is not compiled in {self.bundle.folder} (compiled: {self.batch_sizes})")
        library = self._libraries[batch_size]
        expected = (batch_size, *self.bundle.input_shape)
        if x.shape != expected or x.dtype != np.float32:
            raise ValueError(f"input {x.shape} {x.dtype}, expected {expected} float32 (see bundle_input)")
        library.vm.set_input("main", tvm.runtime.tensor(np.ascontiguousarray(x), self.device))
        return library.vm

    def run(self, batch_size: int, x: np.ndarray) -> dict[str, np.ndarray]:
        """The library's outputs for one normalised batch: ``probs``, ``logit_mean``, ``logit_var``, ``mi``, ``sme``.

        (Unpacked from the library's packed output, :func:`pfp_runtime.bundle.packed_columns`.)
        """
        vm = self._set_input(batch_size, x)
        try:
            vm.invoke_stateful("main")
            packed = vm.get_outputs("main").numpy()
        except Exception as error:  # noqa: BLE001
            raise RemoteError(f"batch size {batch_size}: main failed on the board: {_last_line(error)}") from None
        columns = packed_columns(self.bundle.classes)
        width = max(c.stop if isinstance(c, slice) else c + 1 for c in columns.values())
        if packed.shape != (batch_size, width):
            raise RemoteError(f"batch size {batch_size}: main returned {packed.shape}, a bundle library returns "
                              f"({batch_size}, {width}) (packed [probs | logit_mean | logit_var | mi | sme])")
        return {name: packed[:, column] for name, column in columns.items()}

    def time(self, batch_size: int, x: np.ndarray, *, number: int = 10, repeat: int = 5,
             min_repeat_ms: int = 0) -> list[float]:
        """Milliseconds per call of ``main`` (each the mean of ``number`` calls), ``repeat`` of them, timed on the board."""
        vm = self._set_input(batch_size, x)
        try:
            timer = vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat,
                                      min_repeat_ms=min_repeat_ms)
            result = timer("main")
        except Exception as error:  # noqa: BLE001
            raise RemoteError(f"batch size {batch_size}: timing main failed on the board: {_last_line(error)}") from None
        return [float(seconds) * 1e3 for seconds in result.results]

    def configure_threads(self, threads: int) -> None:
        """Run the board's TVM thread pool on ``threads`` threads (``runtime.config_threadpool`` on the board)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        try:
            self.session.get_function("runtime.config_threadpool")(_AFFINITY_BIG, int(threads))
        except Exception as error:  # noqa: BLE001
            raise RemoteError(f"cannot set {threads} thread(s) on the board under key {self.key!r}: "
                              f"{_last_line(error)}") from None

    def close(self) -> None:
        """End the session: the server ends it when the client's last reference to it goes (the remote
        device holds one too), else only at its timeout, and the board serves one session at a time."""
        self._libraries.clear()
        self.device = None
        self.session = None
        gc.collect()  # the VMs' reference cycles hold remote objects, and those the session

    def __enter__(self) -> RemoteBundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def bundle_latency_over_rpc(bundle_dir: str | Path, tracker: str, key: str, *, emulated: bool, number: int = 10,
                            repeat: int = 5, threads: int | None = DEFAULT_THREADS, images: np.ndarray | None = None,
                            batch_sizes: list[int] | None = None, keep_outputs: bool = False,
                            session_timeout: float = DEFAULT_SESSION_TIMEOUT) -> list[dict]:
    """End-to-end latency of a deployed bundle on the board under ``key``, one row per compiled batch size.

    Each row: ``batch_size``, ``median_ms``, ``mean_ms``, ``std_ms``, ``min_ms``, ``per_image_ms`` (median
    / batch size), ``number``, ``repeat``, ``key``, ``tracker``, ``emulated``, ``model``, ``target``,
    ``library``, ``threads``; with ``keep_outputs`` also ``outputs`` (name -> array, the board's outputs for the
    timed input: ``images`` cycled to the batch size, see :func:`bundle_input`).
    ``emulated``: the board is an emulator (params ``tune.rpc.emulated``), recorded so its timings
    are never read as a board's. ``threads``: the board's TVM threads, by default the runtime's
    (:data:`pfp_runtime.DEFAULT_THREADS`, what ``load_bundle`` uses there); None leaves the RPC
    server's own pool (its ``TVM_NUM_THREADS``, else one thread per core).
    """
    if number < 1 or repeat < 1:
        raise ValueError(f"number and repeat must be >= 1, got {number}, {repeat}")
    rows = []
    with RemoteBundle(bundle_dir, tracker, key, session_timeout=session_timeout) as remote:
        sizes = remote.batch_sizes if batch_sizes is None else sorted(batch_sizes)
        missing = sorted(set(sizes) - set(remote.batch_sizes))
        if missing:
            raise BundleError(f"{remote.bundle.folder}: batch size(s) {missing} not compiled (compiled: {remote.batch_sizes})")
        if threads is not None:
            remote.configure_threads(threads)
        for batch_size in sizes:
            x = bundle_input(remote.bundle, images, batch_size)
            start = time.monotonic()
            outputs = remote.run(batch_size, x)  # also the warm-up call: the first call allocates the VM's storage
            runs = remote.time(batch_size, x, number=number, repeat=repeat)
            median = float(np.median(runs))
            row = {"batch_size": batch_size, "median_ms": median, "mean_ms": float(np.mean(runs)),
                   "std_ms": float(np.std(runs)), "min_ms": float(np.min(runs)), "per_image_ms": median / batch_size,
                   "number": number, "repeat": repeat, "threads": threads, "key": key, "tracker": tracker, "emulated": bool(emulated),
                   "model": remote.bundle.model, "target": remote.target.get("name"),
                   "library": remote.bundle.libraries[batch_size].name,
                   "wall_seconds": round(time.monotonic() - start, 3)}
            if keep_outputs:
                row["outputs"] = outputs
            rows.append(row)
    return rows
