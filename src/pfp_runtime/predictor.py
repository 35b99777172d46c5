"""The bundle predictor: raw images in, class probabilities and uncertainty out.

Per call: the input is checked (shape, dtype, finite, in range; :class:`InputError` otherwise),
normalised into a preallocated input tensor and run by the compiled library of a suitable batch
size (larger batches in chunks, the rest padded); the library computes the PFP, the temperature
and the uncertainty head (probabilities, mutual information, softmax entropy) in one call.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfp_runtime import _tvm
from pfp_runtime._cpu import usable_cpus
from pfp_runtime.bundle import Bundle, BundleError, packed_columns, read_bundle

__all__ = ["DEFAULT_THREADS", "THREADS_ENV", "InputError", "Prediction", "Predictor", "check_images", "load_bundle",
           "normalise"]

#: TVM runtime threads unless the caller or $PFP_RUNTIME_THREADS says otherwise. One: a
#: request runs on one core, so a competing process on the other core does not stall it
#: (a parallel kernel waits for its slowest thread); see metrics/serving.json.
DEFAULT_THREADS = 1
THREADS_ENV = "PFP_RUNTIME_THREADS"
#: a call's fixed cost in images' worth of compute: LeNet's PFP runs 1 image in about the time
#: 100-image batches take for 4 images each (a rough figure; it only decides pad vs split)
CALL_COST = 4


class InputError(ValueError):
    """Images the predictor refuses: wrong shape or dtype, NaN/inf, out of range, an empty batch."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs microseconds per call
class Prediction:
    """Per image: probabilities (N, C), predicted class, Gaussian logits, MI, SME and the OOD flag."""

    probs: np.ndarray
    predicted: np.ndarray
    logit_mean: np.ndarray
    logit_var: np.ndarray
    mi: np.ndarray
    sme: np.ndarray
    ood: np.ndarray

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def to_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__slots__}

    def to_json(self) -> list[dict]:
        """One JSON-ready record per image."""
        rows = []
        for i in range(len(self)):
            rows.append({"predicted": int(self.predicted[i]), "probability": float(self.probs[i, self.predicted[i]]),
                         "mi": float(self.mi[i]), "sme": float(self.sme[i]), "ood": bool(self.ood[i]),
                         "probs": [float(p) for p in self.probs[i]],
                         "logit_mean": [float(v) for v in self.logit_mean[i]],
                         "logit_var": [float(v) for v in self.logit_var[i]]})
        return rows


class _Library:
    """One compiled batch size: its VM and its preallocated (aligned) input tensor."""

    def __init__(self, path: Path, batch_size: int, input_shape: tuple[int, ...]) -> None:
        try:
            self.machine = _tvm.Machine(path)
        except Exception as error:  # noqa: BLE001 - the FFI raises its own error types
            raise BundleError(f"{path}: cannot load the compiled library ({str(error).strip().splitlines()[-1]})") from None
        self.batch_size = batch_size
        self.buffer = _tvm.aligned_empty((batch_size, *input_shape))
        self.buffer.fill(0.0)
        self.tensor = _tvm.Machine.tensor(self.buffer)

    def __call__(self) -> np.ndarray:
        """The packed output of the images in :attr:`buffer`."""
        return np.from_dlpack(self.machine.main(self.tensor))


def _check_output(library: _Library, bundle: Bundle, size: int) -> None:
    """One run on the zero-filled input: a library whose input or packed output does not fit the metadata
    (batch size, input shape, classes) is refused at load, not met as wrong columns or an error per request."""
    path = bundle.libraries[size]
    width = 3 * bundle.classes + 2
    try:
        shape = library().shape
    except Exception as error:  # noqa: BLE001 - the FFI raises its own error types
        lines = str(error).strip().splitlines()
        raise BundleError(f"{path}: does not run as bundle.json describes it (batch size {size}, input "
                          f"{list(bundle.input_shape)}): {lines[-1] if lines else type(error).__name__}") from None
    if tuple(shape) != (size, width):
        raise BundleError(f"{path}: its output is {tuple(shape)}, but bundle.json (batch size {size}, "
                          f"{bundle.classes} classes) says {(size, width)}")


def chunk_plan(count: int, sizes: list[int]) -> list[int]:
    """The compiled batch sizes to run ``count`` images with, in order.

    Full chunks of the largest size; the rest either padded to the smallest size that holds it
    or split over smaller sizes, whichever costs less, counting a call as :data:`CALL_COST` images
    more than its rows (the VM's dispatch and the Python around it).
    """
    sizes = sorted(sizes)
    largest = sizes[-1]
    plan = [largest] * (count // largest)
    rest = count - largest * len(plan)
    if rest:
        padded = min(size for size in sizes if size >= rest)
        split, left = [], rest
        for size in reversed(sizes):
            while left >= size:
                split.append(size)
                left -= size
        if left:  # only when 1 is not compiled
            split.append(min(size for size in sizes if size >= left))
        plan += [padded] if padded + CALL_COST <= sum(split) + CALL_COST * len(split) else split
    return plan


def check_images(images, input_shape: tuple[int, ...]) -> np.ndarray:
    """``images`` as an (N, *input_shape) array of uint8 (or other integers 0-255) or floats 0-1; else InputError."""
    x = images if type(images) is np.ndarray else _as_array(images)
    kind = x.dtype.kind
    if kind not in "uif":  # bool is kind "b"
        raise InputError(f"images: dtype {x.dtype} not supported; give uint8 pixels 0-255 or floats 0-1")
    if x.ndim and x.shape[0] == 0:  # before the shape: [] (shape (0,)) is an empty batch too
        raise InputError("images: empty batch (0 images)")
    shape = tuple(input_shape)  # (1, 28, 28)
    if x.shape[1:] != shape:
        if x.shape == shape[1:]:
            x = x[None]  # one image (28, 28)
        if x.ndim == len(shape) and x.shape[1:] == shape[1:]:
            x = x.reshape((x.shape[0], *shape))
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
            raise InputError(f"images: shape {x.shape}, expected (N, {', '.join(map(str, shape[1:]))}) or "
                             f"(N, {', '.join(map(str, shape))})")
    if x.dtype.char == "B":  # uint8: every value is a pixel
        return x
    lowest, highest = x.min(), x.max()  # NaN propagates, so NaN fails the range check too
    top = 1.0 if kind == "f" else 255
    if not (lowest >= 0 and highest <= top):
        if kind == "f" and not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise InputError(f"images: {bad} pixel value(s) are NaN or infinite")
        hint = " (pixels 0-255? give them as integers)" if kind == "f" and highest <= 255 else ""
        raise InputError(f"images: values from {lowest} to {highest}, expected 0 to {top}{hint}")
    return x


def normalise(images, bundle: Bundle) -> np.ndarray:
    """``images`` checked and normalised as the bundle's libraries take them: float32 (N, *input_shape).

    The predictor does the same into its preallocated input tensors; this is for a caller that
    runs the libraries itself (e.g. over RPC on a board).
    """
    x = check_images(images, bundle.input_shape)
    out = np.empty(x.shape, np.float32)
    _normalise_into(x, out, *_normaliser(bundle))
    return out


def _normaliser(bundle: Bundle) -> tuple[np.ndarray, np.float32, np.float32]:
    """(table of the 256 integer pixels, factor, offset) of the bundle's ``(x - mean) / std``."""
    mean, std = float(bundle.metadata["input"]["mean"]), float(bundle.metadata["input"]["std"])
    table = ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)
    return table, np.float32(1.0 / std), np.float32(-mean / std)


def _normalise_into(x: np.ndarray, out: np.ndarray, table: np.ndarray, factor: np.float32, offset: np.float32) -> None:
    """Checked pixels ``x`` normalised into ``out`` (float32, same shape): integers by table lookup (one pass,
    no temporary; indices are checked 0-255, so no bounds check), floats by ``x * factor + offset``."""
    if x.dtype.kind != "f":
        np.take(table, x, out=out, mode="clip")
    else:
        np.multiply(x, factor, out=out, casting="unsafe")
        out += offset


class Predictor:
    """A loaded bundle: :meth:`predict` any number of raw images (thread-safe)."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        self.bundle = bundle
        threads = threads if threads is not None else int(os.environ.get(THREADS_ENV, DEFAULT_THREADS))
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = min(threads, usable_cpus())
        _tvm.configure_threads(self.threads)
        self.input_shape = bundle.input_shape
        self._libraries = {size: _Library(path, size, self.input_shape) for size, path in bundle.libraries.items()}
        for size, library in self._libraries.items():
            _check_output(library, bundle, size)
        self._largest = max(self._libraries)
        self._tails: dict[int, list[int]] = {}  # rest (< the largest size) -> its plan
        self._lock = threading.Lock()  # the libraries' input buffers are shared
        self._normaliser = _normaliser(bundle)
        self._threshold = bundle.ood_threshold
        self._score = bundle.ood_score
        self._columns = packed_columns(bundle.classes)
        self._width = max(c.stop if isinstance(c, slice) else c + 1 for c in self._columns.values())  # packed columns

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._libraries)

    def describe(self) -> dict:
        meta = self.bundle.metadata
        return {"model": meta["model"], "target": meta["target"].get("name"), "batch_sizes": self.batch_sizes,
                "threads": self.threads, "temperature": meta["calibration"]["temperature"],
                "ood_score": self._score, "ood_threshold": self._threshold, "folder": str(self.bundle.folder)}

    # -- input

    def _images(self, images) -> np.ndarray:
        return check_images(images, self.input_shape)

    # -- prediction

    def predict(self, images) -> Prediction:
        """Probabilities, predicted class, logit mean/variance, MI, SME and OOD flag of every image."""
        x = self._images(images)
        count = x.shape[0]
        plan = self._plan(count)
        with self._lock:
            if len(plan) == 1:  # one call (the common case: keep it lean)
                packed = self._run(self._libraries[plan[0]], x, count)
            else:  # each chunk's output copied out at once: the VM's tensors are freed (and reused) as it goes
                packed, start = np.empty((count, self._width), np.float32), 0
                for size in plan:
                    rows = min(size, count - start)
                    packed[start:start + rows] = self._run(self._libraries[size], x[start:start + rows], rows)
                    start += rows
        columns = self._columns
        probs, mi, sme = packed[:, columns["probs"]], packed[:, columns["mi"]], packed[:, columns["sme"]]
        return Prediction(probs, probs.argmax(axis=1), packed[:, columns["logit_mean"]], packed[:, columns["logit_var"]],
                          mi, sme, (mi if self._score == "mi" else sme) > self._threshold)

    def _plan(self, count: int) -> list[int]:
        """:func:`chunk_plan` of ``count``; the plans of the rests (fewer images than the largest size) are cached,
        so the cache stays small whatever batch sizes callers send (a plan per count leaked memory in a server)."""
        largest = self._largest
        full, rest = divmod(count, largest)
        tail = self._tails.get(rest)
        if tail is None:
            tail = self._tails.setdefault(rest, chunk_plan(rest, self.batch_sizes))
        return [largest] * full + tail if full else tail

    def _run(self, library: _Library, chunk: np.ndarray, rows: int) -> np.ndarray:
        """The packed output rows of ``chunk`` (at most the library's batch size), normalised into its input tensor."""
        _normalise_into(chunk, library.buffer[:rows], *self._normaliser)
        return library()[:rows]

    def __call__(self, images) -> Prediction:
        return self.predict(images)


def _as_array(images) -> np.ndarray:
    try:
        return np.asarray(images)
    except (ValueError, TypeError) as error:  # ragged nested lists
        raise InputError(f"images: not a rectangular array ({error})") from None


def load_bundle(path: str | Path, *, expected_model: str | None = None, threads: int | None = None) -> Predictor:
    """Load a bundle folder (or archive) for prediction; see :func:`~pfp_runtime.bundle.read_bundle` for what is refused.

    ``threads``: TVM runtime threads (default :data:`DEFAULT_THREADS`, or ``$PFP_RUNTIME_THREADS``).
    """
    return Predictor(read_bundle(path, expected_model=expected_model), threads=threads)
