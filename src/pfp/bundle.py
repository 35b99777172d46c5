"""Deployable bundles: the PFP with its uncertainty head compiled per batch size, metadata and checksums.

A bundle (format: :mod:`pfp_runtime.bundle`) is what the torch-free runtime loads on a board or a
server. Each library computes ``[probs | logit_mean | logit_var | mi | sme]`` (one packed tensor)
from normalised images in one call: the PFP with the calibrated variance scale, then the temperature and the uncertainty
head (:mod:`pfp.backends.tvm.ops.head`) with fixed quasi-random draws (:func:`pfp.head.head_draws`).

The OOD threshold is chosen on in-distribution validation images, never on OOD data: the
``target_tpr`` quantile of the bundle's own score (MI or SME) on them, so that fraction of
in-distribution images is accepted (:func:`ood_threshold`).

Example::

    >>> built = build_bundle(pfp_model, "models/lenet/bundle/host", target="host", batch_sizes=(1, 100),
    ...                      temperature=1.2, variance_scale=0.5, validation_images=val_x)
    >>> pfp_runtime.load_bundle(built.folder).predict(images)
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pfp
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import MNIST_MEAN, MNIST_STD
from pfp.head import head_draws
from pfp_runtime.bundle import BUNDLE_FORMAT, HEAD_OUTPUTS, METADATA_FILE, Bundle, read_bundle, write_checksums
from pfp_runtime.predictor import Predictor

__all__ = ["BuiltBundle", "build_bundle", "library_name", "ood_threshold"]


def library_name(batch_size: int) -> str:
    return f"pfp_b{batch_size}.so"


def ood_threshold(scores: np.ndarray, target_tpr: float) -> float:
    """The score below which (inclusive) ``target_tpr`` of in-distribution ``scores`` fall."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("ood_threshold: needs finite in-distribution scores")
    if not 0 < target_tpr < 1:
        raise ValueError(f"target true-positive rate must be in (0, 1), got {target_tpr}")
    return float(np.quantile(scores, target_tpr, method="inverted_cdf"))  # the smallest score accepting >= target_tpr


@dataclass(frozen=True)
class BuiltBundle:
    folder: Path
    metadata: dict
    seconds: float


_RENAME_EXCHANGE = 2  # renameat2's flag: swap two paths atomically (Linux)
_AT_FDCWD = -100


def _swap_in(work: Path, folder: Path) -> None:
    """Put the finished bundle ``work`` in place of ``folder`` in one step (the previous bundle ends up at ``work``, or is removed).

    A reader (or a kill) sees the old bundle or the new one, never a half-deleted one: Linux's
    ``renameat2(RENAME_EXCHANGE)``; elsewhere (or on a file system without it) the old folder is
    renamed aside first, so a kill in between leaves no bundle (refused as missing) and never a torn one.
    """
    if folder.exists():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.renameat2(_AT_FDCWD, os.fsencode(work), _AT_FDCWD, os.fsencode(folder), _RENAME_EXCHANGE) == 0:
                return
        except (OSError, AttributeError):  # no renameat2 in this C library
            pass
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        folder.rename(aside / folder.name)
        work.rename(folder)
        shutil.rmtree(aside, ignore_errors=True)
        return
    work.rename(folder)


def _versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {"pfp": pfp.__version__, "tvm": str(tvm.__version__), "tvm_ffi": str(tvm_ffi.__version__),
            "numpy": np.__version__}


def build_bundle(pfp_model: PFPModel, folder: str | Path, *, target: str, batch_sizes: Sequence[int],
                 temperature: float, variance_scale: float, head_draw_count: int = 128, seed: int = 0,
                 ood_score: str = "mi", ood_target_tpr: float = 0.95, validation_images: np.ndarray | None = None,
                 validation_name: str = "in-distribution validation images", threshold: float | None = None, databases: Mapping[int, Path] | None = None,
                 made_from: Mapping[str, str] | None = None) -> BuiltBundle:
    """Compile and write the bundle of ``pfp_model`` for ``target`` into ``folder`` (replaced atomically).

    The bundle is built in a temporary folder beside ``folder`` and swapped in whole (:func:`_swap_in`);
    temporary folders of a build that was killed are removed first.

    The OOD threshold comes from ``validation_images`` (uint8 in-distribution images, host targets
    only: the bundle scores them itself) or is given (``threshold``, e.g. the host bundle's for a
    board's). ``databases`` (batch size -> tuning work dir) compiles those batch sizes with the
    tuned schedules, the others with the hand schedules.
    """
    from pfp.backends.base import Schedule
    from pfp.backends.tvm.graph import Head, build_pfp_module
    from pfp.backends.tvm.pipeline import compile_module
    from pfp.backends.tvm.runtime import export_library
    from pfp.backends.tvm.targets import make_target, runs_on_host, target_arch, target_cpu_features

    if (validation_images is None) == (threshold is None):
        raise ValueError("build_bundle: give validation_images (the threshold is chosen on them) or a threshold, not both")
    if ood_score not in ("mi", "sme"):
        raise ValueError(f"ood_score must be 'mi' or 'sme', got {ood_score!r}")
    start = time.perf_counter()
    folder = Path(folder)
    spec = pfp_model.spec
    tvm_target = make_target(target)
    if validation_images is not None and not runs_on_host(tvm_target):
        raise ValueError(f"build_bundle: the threshold is chosen by running the bundle; {target} does not run here")
    draws = head_draws(head_draw_count, spec.num_outputs, seed=seed)
    head = Head(draws=draws, temperature=float(temperature))
    folder.parent.mkdir(parents=True, exist_ok=True)
    for leftover in folder.parent.glob(f".{folder.name}.*"):  # of a build that was killed: never cached with the stage's output
        shutil.rmtree(leftover, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    work.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (a service account)
    try:
        libraries, schedules = {}, {}
        for batch in sorted(set(int(b) for b in batch_sizes)):
            mod = build_pfp_module(spec, pfp_model.params, batch_size=batch, variance_scale=variance_scale, head=head,
                                   covariance_layers=pfp_model.covariance_layers)
            database = (databases or {}).get(batch)
            schedule = Schedule.TUNED if database is not None else Schedule.HAND
            export_library(compile_module(mod, tvm_target, schedule, database), work / library_name(batch), tvm_target)
            libraries[str(batch)] = library_name(batch)
            schedules[str(batch)] = schedule.value
        metadata = {
            "format": BUNDLE_FORMAT,
            "model": spec.name,
            "spec": json.loads(spec.to_json()),
            "classes": spec.num_outputs,
            "target": {"name": str(target), "tvm": str(tvm_target), "arch": target_arch(tvm_target),
                       "cpu_features": target_cpu_features(tvm_target)},
            "libraries": libraries,
            "schedules": schedules,
            "input": {"shape": list(spec.input_shape), "mean": MNIST_MEAN, "std": MNIST_STD,
                      "accepts": "uint8 0-255 or float 0-1, (N, 28, 28) or (N, 1, 28, 28)"},
            "calibration": {"temperature": float(temperature), "variance_scale": float(variance_scale)},
            "covariance_layers": pfp_model.covariance_layers,
            "head": {"draws": head_draw_count, "sequence": "scrambled Sobol, normal quantile", "seed": seed,
                     "packed_output": [[name, width] for name, width in HEAD_OUTPUTS]},
            "ood": {"score": ood_score, "threshold": float("inf"), "target_tpr": ood_target_tpr},
            "versions": _versions(),
            "made_from": dict(made_from or {}),
        }
        if validation_images is not None:
            scores = getattr(Predictor(Bundle(work, metadata)).predict(validation_images), ood_score)
            threshold = ood_threshold(scores, ood_target_tpr)
            metadata["ood"].update(threshold=threshold, validation_tpr=float(np.mean(scores <= threshold)),
                                   validation_images=int(len(scores)), chosen_on=f"this bundle, {validation_name}")
        else:
            metadata["ood"].update(threshold=float(threshold), chosen_on="given (the host bundle's)")
        (work / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        write_checksums(work)
        read_bundle(work, expected_model=spec.name, check_host=False)
        _swap_in(work, folder)  # work now holds the previous bundle (if any), removed below
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuiltBundle(folder=folder, metadata=metadata, seconds=time.perf_counter() - start)
