"""TVM tuning of every predictor of a model for a target, exported as shared libraries (the tune stage's work).

For each variant (:class:`~pfp.config.Variant`: PFP joint, PFP separate, deterministic twin,
SVI ensemble) and batch size, the Relax module is built from the one model description, its
tasks are measured with the hand schedules and tuned by the Meta Scheduler (local runner, or
the RPC board of ``tune.rpc``), and the module compiled with the faster schedule per task is
timed as a whole against the all-hand build, interleaved on the same runner (the guard,
:mod:`pfp.backends.tvm.tuning.guard`: per-task figures taken on a busy host can make a slower
model); the faster is exported to ``<out_dir>/<target>/<variant>_b<batch>.so`` (``info.guard``
of its metadata says which and both figures). The tuning database of each module lives next to
it (``<variant>_b<batch>/``) so an interrupted stage resumes where it stopped.

Layout (``out_dir`` = ``models/<model>/tvm``)::

    host/pfp_b1.so, host/pfp_b1.so.json        # library + metadata (variant, schedule, scale)
    host/pfp_b1/database_*.json                # Meta Scheduler database (+ pfp_tune_state.json)

Library code of :mod:`pfp.stages.tune` (which holds no TVM symbol): the search itself is TVM's
(:mod:`pfp.backends.tvm.tuning`); the tuned predictor is compiled, exported and loaded through
the backend interface (:mod:`pfp.backends.base`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pfp.backends import base
from pfp.backends.base import Backend, Predictor, Schedule
from pfp.bnn import Posterior
from pfp.config import CompileTarget, TuneParams, Variant
from pfp.convert import PFPModel
from pfp.data.idx import DataError

logger = logging.getLogger(__name__)

__all__ = ["TunedLibrary", "clean_leftovers", "guard_config", "library_path", "load_library", "schedule_sources", "tune_config",
           "tune_model"]


def library_path(out_dir: str | Path, target: CompileTarget | str, variant: Variant | str, batch_size: int) -> Path:
    return Path(out_dir) / CompileTarget(target).value / f"{Variant(variant).value}_b{batch_size}.so"


def schedule_sources() -> list[str]:
    """Every source a kept schedule can have (``kept`` in a task row of :attr:`TunedLibrary.report`)."""
    from pfp.backends.tvm.tuning.config import ScheduleSource

    return [source.value for source in ScheduleSource]


@dataclass
class TunedLibrary:
    variant: Variant
    batch_size: int
    path: Path
    report: dict

    def as_dict(self) -> dict:
        return {"variant": self.variant.value, "batch_size": self.batch_size, "library": str(self.path), **self.report}

    def kept_counts(self) -> dict[str, int]:
        """How many tasks kept a schedule of each source (every source listed, 0 included)."""
        return {source: sum(row["kept"] == source for row in self.report["tasks"]) for source in schedule_sources()}


def tune_config(params: TuneParams, work_dir: Path):
    """The Meta Scheduler settings of one module's tuning (:class:`pfp.backends.tvm.tuning.config.TuneConfig`)."""
    from pfp.backends.tvm.tuning.config import TuneConfig

    trials = max(params.trials_per_task, 1)
    return TuneConfig(trials_per_task=trials, max_trials_global=params.max_trials_global,
                      num_trials_per_iter=min(trials, params.max_trials_per_iter), target=params.target.value,
                      work_dir=str(work_dir), number=params.number, repeat=params.repeat,
                      min_repeat_ms=params.min_repeat_ms, population_size=params.population_size,
                      genetic_num_iters=params.genetic_num_iters,
                      init_min_unmeasured=min(params.max_init_unmeasured, params.population_size),
                      seed=params.search_seed, num_threads=params.search_threads,
                      builder_timeout_sec=params.builder_timeout_sec, builder_workers=params.builder_workers,
                      lean_builder=params.lean_builder, runner_timeout_sec=params.runner_timeout_sec,
                      session_timeout_sec=params.session_timeout_sec,
                      rpc_tracker=params.rpc.tracker, rpc_key=params.rpc.key, search=params.trials_per_task > 0,
                      finalists=params.finalists, selection_rounds=params.selection_rounds,
                      switch_margin=params.switch_margin)


def guard_config(params: TuneParams):
    """The whole-model guard's settings (:class:`pfp.backends.tvm.tuning.guard.GuardConfig`): on the runner that tuned."""
    from pfp.backends.tvm.tuning.guard import GuardConfig

    return GuardConfig(rounds=params.guard_rounds, margin=params.guard_margin, turn_ms=params.guard_turn_ms,
                       busy_fraction=params.guard_busy_fraction, busy_retries=params.guard_busy_retries,
                       busy_wait_sec=params.guard_busy_wait_sec, rpc_tracker=params.rpc.tracker, rpc_key=params.rpc.key,
                       session_timeout_sec=max(params.session_timeout_sec, 600.0))


def _guard_summary(guard: dict) -> dict:
    """What a library's metadata keeps of the guard (its samples stay in the tune report)."""
    return {name: guard[name] for name in ("kept", "tuned_ms", "hand_ms", "ratio", "rounds", "margin", "identical",
                                           "runner", "host_busy", "reason")}


def _install_library(staged: dict[str, Path], guard: dict, path: Path) -> None:
    """Move the kept build's staged library (and weights) to ``path``, its metadata with the guard's
    summary written last (a library is only read with its metadata); drop the other build's files."""
    import json

    from pfp.io import atomic_write_json

    kept = staged[guard["kept"]]
    metadata = json.loads(Path(f"{kept}.json").read_text())
    metadata["info"]["guard"] = _guard_summary(guard)
    weights = Path(f"{kept}.weights.npz")
    if weights.is_file():
        weights.replace(f"{path}.weights.npz")
    kept.replace(path)
    atomic_write_json(f"{path}.json", metadata)
    for library in staged.values():
        for leftover in (library, Path(f"{library}.json"), Path(f"{library}.weights.npz")):
            leftover.unlink(missing_ok=True)


def _guard_line(guard: dict) -> str:
    if guard["identical"]:
        text = f"{guard['tuned_ms']:.4f} ms, every task kept its hand schedule ({guard['rounds']} rounds)"
    else:
        text = (f"tuned {guard['tuned_ms']:.4f} ms, hand {guard['hand_ms']:.4f} ms (x{guard['ratio']:.2f}, "
                f"{guard['rounds']} rounds) -> kept {guard['kept']}")
    if guard["host_busy"]:
        evidence = guard["busy_evidence"]
        text += (f"; HOST BUSY: other processes used {evidence['other_cpu_fraction']:.0%} of {evidence['cores']} cores"
                 f" ({len(guard['attempts'])} measurement(s))")
    return text


def tune_model(posterior: Posterior, pfp_model: PFPModel, params: TuneParams, out_dir: str | Path, *,
               variance_scale: float = 1.0, seed: int = 0, made_from: Mapping[str, str] | None = None) -> list[TunedLibrary]:
    """Tune and export every variant x batch size of ``params``; returns what was written.

    ``params.trials_per_task == 0`` measures and records the hand schedules only. Each report's
    ``guard`` holds the whole-model guard's figures (:func:`pfp.backends.tvm.tuning.guard.guard_modules`):
    ``kept`` is ``tuned`` or ``hand``, the build that was exported. ``made_from``
    (artifact kind -> sha256 of the file the libraries were built from) goes into each library's
    metadata, so a reader can tell a library made from other artifacts (:func:`check_made_from`).
    """
    from pfp.backends.tvm.predictor import build_variant_module
    from pfp.backends.tvm.tuning import boards, search
    from pfp.backends.tvm.tuning import config as tuning_config
    from pfp.backends.tvm.tuning.config import ScheduleSource
    from pfp.backends.tvm.tuning.guard import guard_modules

    out_dir = Path(out_dir)
    target_dir = out_dir / params.target.value
    clean_leftovers(out_dir)
    results = []
    jobs = [(variant, batch) for variant in params.variants for batch in params.batch_sizes]
    for index, (variant, batch) in enumerate(jobs, 1):
        start = time.perf_counter()
        print(f"[tune {index}/{len(jobs)}] {posterior.spec.name} {variant.value} batch {batch} "
              f"({params.target.value}, {params.trials_per_task} trials/task)", flush=True)
        options = {"batch_size": batch, "variance_scale": variance_scale, "svi_samples": params.svi_samples,
                   "seed": seed}
        mod = build_variant_module(variant, pfp_model, posterior, **options)
        work_dir = target_dir / f"{variant.value}_b{batch}"
        config = tune_config(params, work_dir)
        report = tuning_config.TuneReport()
        database = search.tune_module(mod, config=config, report=report)
        _drop_logs(work_dir)
        # the same module again (weights and ensemble draws are fixed by the options), compiled with the run-off's choice
        info = {"trials_per_task": params.trials_per_task, "made_from": dict(made_from or {})}
        compiled = base.create(Backend.TVM, variant, pfp_model, posterior, **options, schedule=Schedule.TUNED,
                               target=params.target.value, database=database, info=info)
        kept = report.kept()
        # whole-model guard: per-function run-off figures (possibly taken under load) do not promise a faster model
        identical = all(choice in (ScheduleSource.HAND, ScheduleSource.DEFAULT) for choice in kept.values())
        hand = None if identical else base.create(Backend.TVM, variant, pfp_model, posterior, **options,
                                                  schedule=Schedule.HAND, target=params.target.value, info=info)
        path = library_path(out_dir, params.target, variant, batch)
        # both builds are exported before the guard runs them: an executable exported after it ran
        # carries its memory scopes, and every load of the library then prints TVM warnings
        staged = {"tuned": compiled.export(path.parent / f".{path.stem}.tuned.so")}
        if hand is not None:
            staged["hand"] = hand.export(path.parent / f".{path.stem}.hand.so")
        guard = guard_modules(compiled, hand, guard_config(params), label=f"{variant.value} batch {batch}")
        _install_library(staged, guard, path)
        seconds = time.perf_counter() - start
        # which board measured what: the runner's parallelism, measurements per board, sessions open at
        # once, and each measurement (phase, task, board, median ms; None: failed, with its error)
        results.append(TunedLibrary(variant, batch, path, {
            "seconds": seconds, "tasks": report.table(), "untunable": report.untunable,
            "records": report.records_after, "rpc_workers": report.rpc_workers, "boards": report.boards(),
            "most_at_once": boards.concurrency(report.measurements),
            "measuring_seconds": boards.busy_seconds(report.measurements),
            "search_trials": report.search_trials, "search_seconds": report.search_seconds,
            "trials_per_second": report.trials_per_second, "guard": guard,
            "measurements": [{name: item[name] for name in ("phase", "task", "board", "ms", "error")}
                             for item in report.measurements]}))
        print(f"  guard: {_guard_line(guard)}", flush=True)
        print(f"  {seconds:.0f} s; schedules kept: "
              + ", ".join(f"{name}={choice.value}" for name, choice in sorted(kept.items())), flush=True)
        if report.trials_per_second:
            print(f"  search: {report.search_trials} trials, {report.trials_per_second:.2f}/s, "
                  f"{report.rpc_workers} at once on " + ", ".join(
                      f"{board} ({count})" for board, count in report.boards("search").items()), flush=True)
    return results


def clean_leftovers(out_dir: str | Path) -> list[Path]:
    """Delete what a killed tune stage left in ``out_dir`` (DVC would cache it with the stage's output).

    Per target: the staged builds (``.VARIANT_bB.tuned.so``, ``.hand.so`` and their metadata), atomic
    writes' temp files, and per tuning work dir the files :func:`pfp.backends.tvm.tuning.records.clean_leftovers`
    names. Returns what was deleted.
    """
    from pfp.backends.tvm.tuning import records

    removed = []
    for target_dir in (path for path in Path(out_dir).glob("*") if path.is_dir()):
        for pattern in (".*.tuned.so*", ".*.hand.so*", ".*.tmp*"):
            for path in target_dir.glob(pattern):
                path.unlink(missing_ok=True)
                removed.append(path)
        for work_dir in (path for path in target_dir.iterdir() if path.is_dir()):
            removed += records.clean_leftovers(work_dir)
    if removed:
        logger.warning("%s: removed %d file(s) left by an interrupted tune stage", out_dir, len(removed))
    return removed


def _drop_logs(work_dir: Path) -> None:
    """The Meta Scheduler's per-task logs: large, only useful while debugging a run."""
    shutil.rmtree(work_dir / "logs", ignore_errors=True)


def load_library(out_dir: str | Path, target: CompileTarget | str, variant: Variant | str, batch_size: int, *,
                 model: str, made_from: Mapping[str, str] | None = None) -> Predictor:
    """Load a library written by :func:`tune_model` (host target only: it runs here).

    Refused (:class:`~pfp.data.idx.DataError`) when it holds another model than ``model``, or was
    built from other artifacts than ``made_from`` says (kind -> sha256; e.g. a retrained posterior).
    """
    path = library_path(out_dir, target, variant, batch_size)
    if not path.is_file():
        raise DataError(f"{path}: compiled library not found; run the tune stage first (dvc repro tune)")
    library = base.load(path, Backend.TVM)
    described = library.describe()
    if described.get("model") != model:
        raise DataError(f"{path}: a compiled library of model {described.get('model')!r}, expected {model!r} "
                        f"(a library copied into the wrong slot?); re-run the tune@{model} stage")
    recorded = described.get("made_from") or {}
    stale = sorted(kind for kind, digest in (made_from or {}).items() if recorded.get(kind) != digest)
    if stale:
        raise DataError(f"{path}: compiled from other {', '.join(stale)} than the workspace holds (stale library); "
                        f"re-run the tune@{model} stage")
    return library
