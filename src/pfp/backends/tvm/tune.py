"""Meta Scheduler tuning of PFP Relax modules (TVM 0.27, ``tvm.s_tir.meta_schedule``).

Example::

    >>> from pfp.backends.tvm.build import build_pfp_module
    >>> from pfp.backends.tvm.tune import TuneConfig, tune_module, compile_best
    >>> mod = build_pfp_module(spec, params, batch_size=1)
    >>> config = TuneConfig(work_dir="tuning/mlp_host", trials_per_task=64, max_trials_global=512)
    >>> database = tune_module(mod, config=config)              # resumable: same work_dir
    >>> choice = compile_best(mod, database, config=config)     # tuned unless it is slower
    >>> choice.kept, choice.tuned_ms, choice.untuned_ms

Measurements run locally by default; with ``rpc_tracker="host:port"`` and ``rpc_key`` they
run on the board registered at that tracker (see ``infra/rpc/README.md``). For aarch64
targets the candidates are linked with ``aarch64-linux-gnu-gcc`` by the builder
(:func:`export_aarch64_so`), so the board needs no compiler.

Resuming: the JSON database (``work_dir/database_workload.json`` and
``database_tuning_record.json``) is never deleted. Tasks already finished (recorded in
``work_dir/pfp_tune_state.json``, or with at least ``trials_per_task`` records) are skipped;
unfinished tasks are tuned again with the records already measured as the search's warm start.

Choosing per task: the database accumulates records measured at different times, and on a
shared host a record's time depends on when it was taken. So every run ends with a run-off
(:func:`run_off`): per task the hand schedule and the ``finalists`` best other records
are built again and measured side by side, in ``selection_rounds`` interleaved rounds. Their
medians go to a fresh database, ``work_dir/selection``, which is what compiled modules use
(:func:`compiling_database`); the cumulative database stays the search's memory. The report
names where each kept schedule came from (:class:`ScheduleSource`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import linecache
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms

from pfp.backends.tvm.build import ARM_CROSS_COMPILER, TargetName, make_target
from pfp.backends.tvm.schedules import HAND_SCHEDULE_VERSION

__all__ = [
    "BestModule",
    "ScheduleSource",
    "TrackerError",
    "TuneConfig",
    "TuneReport",
    "check_tracker",
    "compile_best",
    "compile_tuned",
    "compile_untuned",
    "count_records",
    "export_aarch64_so",
    "extract_tuning_tasks",
    "lean_build",
    "measure_hand_schedules",
    "compiling_database",
    "open_database",
    "parse_tracker",
    "record_source",
    "run_off",
    "tune_module",
]

logger = logging.getLogger(__name__)

STATE_FILE = "pfp_tune_state.json"
#: Sub-folder of a work dir with the run-off's database (see :func:`run_off`).
SELECTION_DIR = "selection"
_STATE_FORMAT = 1


class TrackerError(RuntimeError):
    """The RPC tracker is unreachable or has no server under the requested key."""


class ScheduleSource(str, Enum):
    """Where a task's schedule comes from (the ``kept`` / ``other_source`` of :class:`TuneReport`)."""

    HAND = "hand"  # the current hand rules (pfp.backends.tvm.schedules)
    #: an earlier version of the hand rules (databases keep every record)
    EARLIER_HAND = "earlier_hand"
    META_SCHEDULE = "meta_schedule"  # a Meta Scheduler search candidate
    DEFAULT = "default"  # no measured schedule: TVM's default lowering


def _switches(other_ms: float, hand_ms: float, margin: float) -> bool:
    """Whether a record measured at ``other_ms`` replaces a hand schedule measured at ``hand_ms``."""
    return other_ms < hand_ms * (1.0 - margin)


def record_source(trace, hand_trace: str | None) -> ScheduleSource:
    """The source of a database record's ``trace``, given the current hand schedule's trace text.

    Every search candidate went through the Meta Scheduler's postprocessors, which its trace
    records (``EnterPostproc``); the hand rules use none. Sampling decisions are no sign: with
    one core a candidate may have none.
    """
    if hand_trace is not None and str(trace) == hand_trace:
        return ScheduleSource.HAND
    if any(inst.kind.name == "EnterPostproc" for inst in trace.insts):
        return ScheduleSource.META_SCHEDULE
    return ScheduleSource.EARLIER_HAND


@dataclass
class TuneConfig:
    """Settings of one tuning run.

    ``rpc_tracker`` ("host:port") and ``rpc_key`` together select the RPC runner; with both
    unset the candidates run on this machine. ``builder_timeout_sec`` must cover a builder
    worker's start: the default build function imports ``tvm.s_tir.tensor_intrin`` (~60 s on
    2 cores); ``lean_builder=True`` (default) uses :func:`lean_build`, which does not.
    """

    trials_per_task: int = 64
    max_trials_global: int = 512
    num_trials_per_iter: int = 64
    target: str | Mapping | Any = TargetName.HOST.value
    work_dir: str | os.PathLike = "tuning"
    builder_timeout_sec: float = 300.0
    builder_workers: int | None = None  # None: one per logical CPU
    lean_builder: bool = True
    runner_timeout_sec: float = 60.0
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    session_timeout_sec: float = 60.0
    number: int = 3  # measurements of each candidate: number x repeat, at least min_repeat_ms each
    repeat: int = 1
    min_repeat_ms: int = 100
    seed: int | None = 0
    population_size: int = 512  # evolutionary search; smaller = faster candidate generation
    genetic_num_iters: int = 4
    init_min_unmeasured: int = 50
    num_threads: int | str = "physical"  # threads of the search (cost model, evolution)
    cross_compiler: str | None = None  # None: aarch64-linux-gnu-gcc for aarch64 targets
    search: bool = True  # False: only measure and record the hand schedules (no Meta Scheduler search)
    finalists: int = 2  # best other records per task re-measured beside the hand schedule; 0: no run-off
    selection_rounds: int = 3  # interleaved rounds of the run-off
    #: another record replaces the hand schedule only when its run-off median is at least this
    #: fraction faster: near-ties are noise, and the current hand rules then make the same choice every run
    switch_margin: float = 0.03

    def __post_init__(self) -> None:
        for name in ("trials_per_task", "max_trials_global", "num_trials_per_iter", "selection_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TuneConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.finalists, int) or self.finalists < 0:
            raise ValueError(f"TuneConfig.finalists must be an int >= 0, got {self.finalists!r}")
        if not 0.0 <= self.switch_margin <= 1.0:
            raise ValueError(f"TuneConfig.switch_margin must be a fraction in [0, 1], got {self.switch_margin!r}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError("set both rpc_tracker ('host:port') and rpc_key for the RPC runner, or neither "
                             f"(got rpc_tracker={self.rpc_tracker!r}, rpc_key={self.rpc_key!r})")
        if self.rpc_tracker is not None:
            parse_tracker(self.rpc_tracker)

    @property
    def uses_rpc(self) -> bool:
        return self.rpc_tracker is not None

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


@dataclass
class TuneReport:
    """What :func:`tune_module` did: tasks tuned or skipped, records before and after, seconds."""

    tasks: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    untunable: list[str] = field(default_factory=list)
    records_before: int = 0
    records_after: int = 0
    seconds: float = 0.0
    #: per task: the current hand schedule's measured ms, and the best other record's ms and
    #: source (side by side for the tasks in ``side_by_side``, see :func:`run_off`)
    hand_ms: dict[str, float] = field(default_factory=dict)
    other_ms: dict[str, float] = field(default_factory=dict)
    other_source: dict[str, ScheduleSource] = field(default_factory=dict)
    side_by_side: list[str] = field(default_factory=list)
    #: the run-off's :attr:`TuneConfig.switch_margin` (0 without a run-off)
    switch_margin: float = 0.0

    def kept(self) -> dict[str, ScheduleSource]:
        """Per task, the source of the schedule the compiled module uses: the other record when it
        is faster than the hand schedule by ``switch_margin``, else the hand schedule."""
        choice = {}
        for name in self.tasks:
            hand, other = self.hand_ms.get(name), self.other_ms.get(name)
            if other is not None and (hand is None or _switches(other, hand, self.switch_margin)):
                choice[name] = self.other_source[name]
            elif hand is not None:
                choice[name] = ScheduleSource.HAND
            else:
                choice[name] = ScheduleSource.DEFAULT
        return choice

    def table(self) -> list[dict]:
        kept = self.kept()
        return [{"task": name, "hand_ms": self.hand_ms.get(name), "other_ms": self.other_ms.get(name),
                 "other_source": self.other_source[name].value if name in self.other_source else None,
                 "kept": kept[name].value, "side_by_side": name in self.side_by_side} for name in self.tasks]

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before


# --------------------------------------------------------------------------- builder hooks

def lean_build(mod: tvm.IRModule, target: tvm.target.Target, _params=None) -> tvm.runtime.Module:
    """``default_build`` without importing ``tvm.s_tir.tensor_intrin`` (~60 s per builder worker here).

    Valid for schedules that use no tensor intrinsics (no tensorize), i.e. the llvm CPU
    targets PFP tunes for. Candidates are lowered like the compiled modules (our TIR pipeline,
    :func:`pfp.backends.tvm.lowering.register_pipeline`), so what is measured is what ships.
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from pfp.backends.tvm.lowering import register_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=register_pipeline())  # what the deprecated tvm.driver.build calls


def export_aarch64_so(mod: tvm.runtime.Module, cc: str = ARM_CROSS_COMPILER) -> str:
    """Builder ``f_export`` for ARM boards: a cross-linked ``.so`` (the board needs no compiler)."""
    path = os.path.join(tempfile.mkdtemp(prefix="pfp_ms_"), "candidate.so")
    mod.export_library(path, cc=cc)
    return path


def _target_arch(target: tvm.target.Target) -> str:
    mtriple = target.attrs.get("mtriple")
    return str(mtriple).split("-")[0] if mtriple else platform.machine()


def _f_export(target: tvm.target.Target, config: TuneConfig):
    arch = _target_arch(target)
    if arch == platform.machine():
        return None  # default: tar archive, linked by the (host) RPC server or the local runner
    if arch != "aarch64":
        raise ValueError(f"no cross compiler known for {arch} targets")
    compiler = config.cross_compiler or shutil.which(ARM_CROSS_COMPILER)
    if compiler is None:
        raise RuntimeError(f"tuning for {arch} exports candidates linked with {ARM_CROSS_COMPILER}; install it "
                           "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu) or set TuneConfig.cross_compiler")
    if not config.uses_rpc:
        raise ValueError(f"candidates for {arch} cannot run on this {platform.machine()} machine: "
                         "set rpc_tracker and rpc_key to measure them on the board")
    return functools.partial(export_aarch64_so, cc=compiler)


def make_builder(target: tvm.target.Target, config: TuneConfig) -> ms.builder.LocalBuilder:
    return ms.builder.LocalBuilder(max_workers=config.builder_workers, timeout_sec=config.builder_timeout_sec,
                                   f_build=lean_build if config.lean_builder else None,
                                   f_export=_f_export(target, config))


# --------------------------------------------------------------------------- RPC

def parse_tracker(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker must be 'host:port', got {address!r}")
    return host, int(port)


def check_tracker(address: str, key: str, timeout_sec: float = 5.0) -> dict:
    """Check the tracker answers and has a server under ``key``; returns the tracker summary.

    Raises :class:`TrackerError` naming the address and key otherwise.
    """
    host, port = parse_tracker(address)
    hint = f"check it with: python -m tvm.exec.query_rpc_tracker --host {host} --port {port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_sec):
            pass
    except OSError as error:
        raise TrackerError(f"RPC tracker {host}:{port} (key {key!r}) is unreachable: {error}; is it running? "
                           f"(infra/rpc/start-tracker.sh); {hint}") from error
    try:
        tracker = tvm.rpc.connect_tracker(host, port)
        summary = tracker.summary()
        tracker.close()
    except Exception as error:  # a port that is not a tracker
        raise TrackerError(f"RPC tracker {host}:{port} (key {key!r}) did not answer as a TVM tracker: "
                           f"{error}; {hint}") from error
    keys = sorted(str(k) for k in summary.get("queue_info", {}))
    servers = [str(item.get("key", "")).split(":", 1)[-1] for item in summary.get("server_info", [])]
    if key not in keys and key not in servers:
        raise TrackerError(f"RPC tracker {host}:{port} has no server registered under key {key!r} "
                           f"(keys: {sorted(set(keys + servers)) or 'none'}); start one with "
                           f"infra/rpc/start-server.sh or check the key; {hint}")
    return summary


def make_runner(config: TuneConfig) -> ms.runner.Runner:
    evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=config.repeat,
                                          min_repeat_ms=config.min_repeat_ms, enable_cpu_cache_flush=False)
    if not config.uses_rpc:
        return ms.runner.LocalRunner(timeout_sec=config.runner_timeout_sec, evaluator_config=evaluator)
    check_tracker(config.rpc_tracker, config.rpc_key)
    host, port = parse_tracker(config.rpc_tracker)
    rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=config.rpc_key,
                                     session_timeout_sec=int(config.session_timeout_sec))
    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator, max_workers=1)


# --------------------------------------------------------------------------- database

def open_database(work_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The JSON database of ``work_dir`` (created if missing; existing records are kept)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")


def count_records(database: ms.database.Database, mod: tvm.IRModule | None = None) -> int:
    """Tuning records in ``database`` (of the workload ``mod`` if given)."""
    records = database.get_all_tuning_records()
    if mod is None:
        return len(records)
    return sum(1 for record in records if tvm_ffi.structural_equal(record.workload.mod, mod))


def _task_key(task, target: tvm.target.Target) -> str:
    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0]):x}:{target}"


def _load_state(work_dir: Path) -> dict:
    path = work_dir / STATE_FILE
    if not path.is_file():
        return {"format": _STATE_FORMAT, "finished": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is corrupt; resuming from the database records only", path)
        return {"format": _STATE_FORMAT, "finished": {}}
    if state.get("format") != _STATE_FORMAT:
        return {"format": _STATE_FORMAT, "finished": {}}
    return state


def measurement_setting(config: TuneConfig) -> str:
    """What the runner's timings depend on besides the schedule: where they run and on how many threads.

    Records measured under another setting are not comparable (a parallel schedule measured on
    one thread looks slower than it is), so a work dir measured differently starts over.
    """
    if config.uses_rpc:
        return f"rpc:{config.rpc_key}"
    return f"local:threads={os.environ.get('TVM_NUM_THREADS') or os.environ.get('OMP_NUM_THREADS') or 'default'}"


def _discard_incomparable_records(work_dir: Path, setting: str) -> None:
    """Delete the database and state of ``work_dir`` when they were measured under another setting."""
    state_path = work_dir / STATE_FILE
    if not state_path.is_file():
        return
    try:
        previous = json.loads(state_path.read_text()).get("measured_with")
    except json.JSONDecodeError:
        previous = None
    if previous == setting:
        return
    for path in [state_path, *work_dir.glob("database_*.json")]:
        path.unlink()
    logger.warning("%s: the records were measured with %s, the runner now uses %s; tuning starts over",
                   work_dir, previous or "an unrecorded setting", setting)


def _save_state(work_dir: Path, state: dict) -> None:
    path = work_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------- tuning

def extract_tuning_tasks(mod: tvm.IRModule, target) -> list:
    """The Meta Scheduler tasks of ``mod``: the fused TIR functions :func:`compile_tuned` compiles."""
    from pfp.backends.tvm.schedules import fuse_operators

    target = make_target(target)
    return list(ms.relax_integration.extract_tasks(fuse_operators(mod, target), target, module_equality="structural"))


def tune_module(mod: tvm.IRModule, target=None, config: TuneConfig | None = None,
                *, report: TuneReport | None = None) -> ms.database.JSONDatabase:
    """Meta Scheduler tuning of every task (fused TIR function) of the Relax module ``mod``.

    ``target`` defaults to ``make_target(config.target)``. Returns the database to compile with:
    the run-off's (:func:`run_off`), or with ``config.finalists == 0`` the JSON database of
    ``config.work_dir``. Tasks finished by an earlier call with the same work_dir (and at least
    the same ``trials_per_task``) are skipped; pass a :class:`TuneReport` to learn what ran.
    """
    config = config or TuneConfig()
    target = make_target(config.target if target is None else target)
    report = report if report is not None else TuneReport()
    start = time.perf_counter()
    work_dir = config.work_path
    measured_with = measurement_setting(config)
    _discard_incomparable_records(work_dir, measured_with)
    database = open_database(work_dir)
    report.records_before = count_records(database)

    tasks = extract_tuning_tasks(mod, target)
    tasks = [task for task in tasks if not task.mod.attrs.get("tirx.is_scheduled", False)]
    if not tasks:
        raise ValueError("the module has no TIR functions to tune")
    state = _load_state(work_dir)
    state["measured_with"] = measured_with
    finished: dict[str, int] = state.setdefault("finished", {})
    pending = []
    for task in tasks:
        key = _task_key(task, target)
        report.tasks.append(task.task_name)
        reason = _untunable(task)
        if not config.search:
            continue
        if reason:
            logger.warning("task %s cannot be tuned by the Meta Scheduler (%s); it keeps its hand schedule", task.task_name, reason)
            report.untunable.append(task.task_name)
            continue
        done = max(finished.get(key, 0), count_records(database, task.dispatched[0]))
        if done >= config.trials_per_task or (key in finished and finished[key] >= config.trials_per_task):
            logger.info("task %s: already tuned (%d trials recorded), skipped", task.task_name, done)
            report.skipped.append(task.task_name)
        else:
            pending.append((key, task))
    # the hand schedules are measured (and recorded) once per task, after the resume decision above
    # keyed by the hand schedules' version too: changed rules are measured (and recorded) again
    hand_done: dict[str, float] = state.setdefault("hand", {})

    def hand_key(task) -> str:
        return f"{_task_key(task, target)}:v{HAND_SCHEDULE_VERSION}"

    missing_hand = [task for task in tasks if hand_key(task) not in hand_done]
    if missing_hand:
        measured = measure_hand_schedules(missing_hand, target, config, database)
        for task in missing_hand:
            if task.task_name in measured:
                hand_done[hand_key(task)] = measured[task.task_name]
        _save_state(work_dir, state)
    for task in tasks:
        if hand_key(task) in hand_done:
            report.hand_ms[task.task_name] = hand_done[hand_key(task)]
    if not pending:
        logger.info("nothing to tune: every tunable task is finished")
    else:
        runner = make_runner(config)  # first: a dead tracker fails before anything else starts
        builder = make_builder(target, config)
        budget = min(config.max_trials_global, config.trials_per_task * len(pending))
        logger.info("tuning %d task(s) (%s) for %s: %d trials/task, %d in all, %s runner; work dir %s",
                    len(pending), ", ".join(t.task_name for _, t in pending), target, config.trials_per_task,
                    budget, f"RPC {config.rpc_tracker} key {config.rpc_key}" if config.uses_rpc else "local",
                    work_dir)
        import_tensor_intrinsics()
        with _unnamed_handlers_detached():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task for _, task in pending], work_dir=str(work_dir), num_threads=config.num_threads,
                seed=config.seed, strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=config.population_size, genetic_num_iters=config.genetic_num_iters,
                    init_min_unmeasured=config.init_min_unmeasured))
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                           max_trials_global=budget, max_trials_per_task=config.trials_per_task,
                           num_trials_per_iter=min(config.num_trials_per_iter, config.trials_per_task),
                           builder=builder, runner=runner, database=database, module_equality="structural")
        full_budget = budget >= config.trials_per_task * len(pending)
        for key, task in pending:
            # a task may end early (search space exhausted): it is finished when the budget covered
            # it; with a smaller global budget only its measured records count
            done = config.trials_per_task if full_budget else count_records(database, task.dispatched[0])
            finished[key] = max(finished.get(key, 0), done)
            report.tuned.append(task.task_name)
        _save_state(work_dir, state)
        _check_measured(database, [task for _, task in pending])
    report.records_after = count_records(database)
    if config.finalists:  # the run-off's side-by-side figures are the report's
        selection = run_off(tasks, database, target, config, report)
    else:
        selection = database
        for task in tasks:
            if task.task_name not in report.untunable:
                best = _best_other_record(database, task)
                if best is not None:
                    report.other_ms[task.task_name], report.other_source[task.task_name] = best
    report.seconds = time.perf_counter() - start
    logger.info("tuning done in %.1f s: %d task(s) tuned, %d skipped, %d new record(s), %d in %s",
                report.seconds, len(report.tuned), len(report.skipped), report.new_records,
                report.records_after, work_dir)
    return selection


def _measure(candidates: list[tuple[str, s_tir.Schedule]], target: tvm.target.Target, builder, runner,
             rounds: int = 1) -> list[tuple[list, list[float]]]:
    """Build every ``(label, schedule)`` once, then run them all ``rounds`` times.

    Every other round runs in reverse order, so a drift of the host does not favour one end.
    Returns, per candidate, its argument info and the seconds measured: empty when it failed to
    build or every run failed (each failure is logged under its label).
    """
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in candidates])
    args_infos = [ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]) for _, sch in candidates]
    runnable = []
    for index, ((label, _), result) in enumerate(zip(candidates, built)):
        if result.error_msg:
            logger.warning("%s failed to build: %s", label, result.error_msg[-500:])
            continue
        runnable.append((index, ms.runner.RunnerInput(result.artifact_path, "cpu", args_infos[index])))
    seconds: list[list[float]] = [[] for _ in candidates]
    for round_index in range(rounds):
        order = runnable[::-1] if round_index % 2 else runnable
        for (index, _), future in zip(order, runner.run([runner_input for _, runner_input in order])):
            result = future.result()
            if result.error_msg:
                logger.warning("%s failed to run: %s", candidates[index][0], result.error_msg[-500:])
                continue
            seconds[index] += [float(v) for v in result.run_secs]
    return list(zip(args_infos, seconds))


def measure_hand_schedules(tasks, target: tvm.target.Target, config: TuneConfig,
                           database: ms.database.Database) -> dict[str, float]:
    """Build and measure the hand schedule of every task with the tuning builder and runner.

    Each measurement is committed to ``database`` as a tuning record (the schedule's trace), so
    compiling from the database picks, per task, the faster of the hand schedule and the best
    Meta Scheduler candidate. Returns the median ms per task name (tasks that failed are left out).
    """
    from pfp.backends.tvm.schedules import apply_hand_schedule

    builder, runner = make_builder(target, config), make_runner(config)
    candidates = []
    for task in tasks:
        sch = s_tir.Schedule(task.dispatched[0])
        try:
            apply_hand_schedule(sch, target=target)
        except (s_tir.ScheduleError, tvm.error.InternalError) as error:
            logger.warning("task %s: no hand schedule (%s)", task.task_name, str(error).strip().splitlines()[-1])
            continue
        candidates.append((task, sch))
    if not candidates:
        return {}
    measured: dict[str, float] = {}
    results = _measure([(f"task {task.task_name}: hand schedule", sch) for task, sch in candidates], target,
                       builder, runner)
    for (task, sch), (args_info, run_secs) in zip(candidates, results):
        if not run_secs:
            continue
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, target, args_info))
        measured[task.task_name] = float(np.median(run_secs)) * 1e3
        logger.info("task %s: hand schedule %.4f ms", task.task_name, measured[task.task_name])
    return measured


def _hand_trace_text(task) -> str | None:
    from pfp.backends.tvm.schedules import apply_hand_schedule

    sch = s_tir.Schedule(task.dispatched[0])
    try:
        apply_hand_schedule(sch, target=task.target)
    except (s_tir.ScheduleError, tvm.error.InternalError):
        return None
    return str(sch.trace)


def _best_other_record(database: ms.database.Database, task) -> tuple[float, ScheduleSource] | None:
    """(ms, source) of the best measured record of ``task`` other than the current hand schedule, or None."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return None
    hand = _hand_trace_text(task)
    best = None
    for record in database.get_top_k(database.commit_workload(mod), 256):
        source = record_source(record.trace, hand)
        if not record.run_secs or source is ScheduleSource.HAND:
            continue
        value = float(np.median([float(v) for v in record.run_secs])) * 1e3
        if best is None or value < best[0]:
            best = (value, source)
    return best


def _finalists(task, database: ms.database.Database, target: tvm.target.Target,
               count: int) -> list[tuple[ScheduleSource, s_tir.Schedule]]:
    """``[(HAND, schedule)]`` (if the hand rules apply) plus the ``count`` best distinct other records."""
    from pfp.backends.tvm.schedules import apply_hand_schedule

    mod = task.dispatched[0]
    finalists = []
    sch = s_tir.Schedule(mod)
    try:
        apply_hand_schedule(sch, target=target)
        finalists.append((ScheduleSource.HAND, sch))
    except (s_tir.ScheduleError, tvm.error.InternalError):
        pass
    if not count or not database.has_workload(mod):
        return finalists
    hand = str(finalists[0][1].trace) if finalists else None
    seen = {hand}
    for record in database.get_top_k(database.commit_workload(mod), 256):
        trace = str(record.trace)
        if not record.run_secs or trace in seen:
            continue
        seen.add(trace)
        sch = s_tir.Schedule(mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        finalists.append((record_source(record.trace, hand), sch))
        if len(finalists) - (hand is not None) == count:
            break
    return finalists


def run_off(tasks, database: ms.database.Database, target: tvm.target.Target, config: TuneConfig,
            report: TuneReport | None = None) -> ms.database.JSONDatabase:
    """Measure each task's finalists side by side; their medians make the database modules compile with.

    Finalists: the hand schedule and the ``config.finalists`` best other records of ``database``
    (Meta Scheduler candidates or earlier hand schedules; best as recorded, possibly in an earlier
    run). All are built, then measured in ``config.selection_rounds`` rounds, each running every candidate once (every other round in
    reverse order, so a drift of the host does not favour one end). The median of each
    candidate's times is committed to a new JSON database in ``work_dir/selection`` (replacing
    the last run-off's), whose best record per task is the compiled one: the fastest other
    finalist if it beat the hand schedule by ``config.switch_margin``, else the hand schedule
    (the other finalists' records are then left out). A task with
    only its hand schedule needs no run-off: compiling gives it that schedule anyway. The report's
    ``hand_ms`` / ``other_ms`` / ``other_source`` get the side-by-side figures.
    """
    report = report if report is not None else TuneReport()
    report.switch_margin = config.switch_margin
    entries = []  # (task, source, schedule)
    for task in tasks:
        finalists = _finalists(task, database, target, config.finalists)
        if any(source is not ScheduleSource.HAND for source, _ in finalists):
            entries += [(task, source, sch) for source, sch in finalists]
    measured = []  # (task, source, trace, args_info, median seconds) of the finalists that ran
    if entries:
        results = _measure([(f"task {task.task_name}: a {source.value} finalist", sch)
                            for task, source, sch in entries], target,
                           make_builder(target, config), make_runner(config), config.selection_rounds)
        measured = [(task, source, sch.trace, args_info, float(np.median(seconds)))
                    for (task, source, sch), (args_info, seconds) in zip(entries, results) if seconds]
    path = Path(config.work_dir) / SELECTION_DIR
    staging = Path(tempfile.mkdtemp(prefix=".selection-", dir=config.work_dir))
    try:
        selection = ms.database.JSONDatabase(work_dir=str(staging), module_equality="structural")
        hand_ms: dict[str, float] = {}
        other: dict[str, tuple[float, ScheduleSource]] = {}  # the fastest other finalist
        for task, source, _, _, median in measured:
            median_ms = median * 1e3
            if source is ScheduleSource.HAND:
                hand_ms[task.task_name] = median_ms
            elif task.task_name not in other or median_ms < other[task.task_name][0]:
                other[task.task_name] = (median_ms, source)
        for task, source, trace, args_info, median in measured:
            name = task.task_name
            if source is ScheduleSource.HAND or name not in hand_ms or _switches(other[name][0], hand_ms[name],
                                                                                config.switch_margin):
                workload = selection.commit_workload(task.dispatched[0])
                selection.commit_tuning_record(ms.database.TuningRecord(trace, workload, [median], target, args_info))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in dict.fromkeys(task.task_name for task, _, _ in entries):
        # the report states what is compiled: a finalist that failed has no figure; a task with no
        # figure at all is not in the selection and compiles with its hand schedule
        if name in other:
            report.other_ms[name], report.other_source[name] = other[name]
        else:
            report.other_ms.pop(name, None)
            report.other_source.pop(name, None)
        if name in hand_ms:
            report.hand_ms[name] = hand_ms[name]
        elif name in other:
            report.hand_ms.pop(name, None)
        if name in hand_ms or name in other:
            report.side_by_side.append(name)
        logger.info("task %s side by side: hand %s ms, best other record %s", name,
                    f"{hand_ms[name]:.4f}" if name in hand_ms else "-",
                    f"{other[name][0]:.4f} ms ({other[name][1].value})" if name in other else "-")
    return compiling_database(config.work_dir)


def compiling_database(work_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The database modules tuned in ``work_dir`` compile with: the run-off's if there is one, else all records."""
    selection = Path(work_dir) / SELECTION_DIR
    if (selection / "database_tuning_record.json").is_file():
        return ms.database.JSONDatabase(work_dir=str(selection), module_equality="structural")
    return open_database(work_dir)


def _light_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without ``inspect.getmodule``: source lines straight from ``linecache``."""
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno or 1
        lines = linecache.getlines(filename, frame.f_globals)
        start = max(0, min(lineno - 1 - context // 2, len(lines) - context))
        code_context = lines[start:start + context] if lines and context > 0 else None
        index = lineno - 1 - start if code_context else None
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name, code_context, index))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (the Meta Scheduler needs it) in seconds, not minutes.

    Its modules define some 250 TVMScript functions, and the parser calls ``inspect.stack()``
    for each one. That looks up every frame's module by scanning ``sys.modules``, which is slow
    when torch and pyro are loaded: the first tuning in a stage or test process took 80-120 s
    here, nearly all of it in this import. The same frames and source lines are handed to the
    parser from ``linecache`` while the import runs.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _light_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


@contextlib.contextmanager
def _unnamed_handlers_detached():
    """Work around the Meta Scheduler's logger setup failing on a second tuning run in a process.

    ``ms.logging.create_loggers`` lists the handlers of the ``tvm.s_tir.meta_schedule`` logger
    by name in a ``dictConfig``; an unnamed handler (pytest's log capture adds some) makes it
    crash (``'NoneType' object has no attribute 'format'``). They are detached while the
    loggers are created and attached again afterwards.
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [handler for handler in ms_logger.handlers if handler.get_name() is None]
    for handler in unnamed:
        ms_logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            ms_logger.addHandler(handler)


def _untunable(task) -> str | None:
    """Why the Meta Scheduler cannot tune ``task``, or None.

    The task scheduler estimates each task's FLOPs first, and that analysis has no rule for
    ``tirx.Let`` expressions, which the Gaussian ReLU / max-pool operators use (scalars
    computed once per element): it would abort the whole tuning run. Such tasks are
    elementwise or pooling kernels that gain little from tuning; they keep the default
    schedule in :func:`compile_tuned`.
    """
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        estimate_tir_flops(task.dispatched[0])
    except Exception as error:  # tvm.error.InternalError: Do not have a default for prim.Let
        return f"FLOP estimation fails: {str(error).strip().splitlines()[-1]}"
    return None


def _check_measured(database: ms.database.Database, tasks) -> None:
    """Warn about tasks without any successful measurement (build or run errors for every trial)."""
    for task in tasks:
        mod = task.dispatched[0]
        if not database.has_workload(mod) or not database.get_top_k(database.commit_workload(mod), 1):
            logger.warning("task %s has no successful measurement; see the logs in the work dir "
                           "(builder timeout? unreachable RPC server?)", task.task_name)


# --------------------------------------------------------------------------- compilation

def compile_tuned(mod: tvm.IRModule, target, database: ms.database.Database) -> tvm.runtime.Executable:
    """Compile ``mod`` with the best schedules of ``database`` (untuned functions: default schedules)."""
    from pfp.backends.tvm.schedules import compile_scheduled

    return compile_scheduled(mod, target, database)


def compile_untuned(mod: tvm.IRModule, target) -> tvm.runtime.Executable:
    """TVM's default lowering: no schedule at all (naive loops), the 'untuned' baseline."""
    return tvm.compile(mod, target=make_target(target))


@dataclass
class BestModule:
    """Result of :func:`compile_best`: the kept executable and why."""

    executable: tvm.runtime.Executable
    kept: str  # "tuned" or "untuned"
    tuned_ms: float | None
    untuned_ms: float | None

    def as_dict(self) -> dict:
        return {"kept": self.kept, "tuned_ms": self.tuned_ms, "untuned_ms": self.untuned_ms}


def _zero_inputs(mod: tvm.IRModule, device) -> list:
    arrays = []
    for param in mod["main"].params:
        ty = param.ty
        shape = [int(d) for d in ty.shape]
        arrays.append(tvm.runtime.tensor(np.zeros(shape, dtype=str(ty.dtype)), device))
    return arrays


def _time_local(executable, mod, number: int, repeat: int) -> float:
    device = tvm.cpu()
    vm = relax.VirtualMachine(executable, device)
    vm.set_input("main", *_zero_inputs(mod, device))
    vm.invoke_stateful("main")  # warm-up
    result = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)("main")
    return float(np.median(result.results)) * 1e3


def _time_remote(executable, mod, target, config: TuneConfig, number: int, repeat: int) -> float:
    host, port = parse_tracker(config.rpc_tracker)
    check_tracker(config.rpc_tracker, config.rpc_key)
    remote = tvm.rpc.connect_tracker(host, port).request(config.rpc_key,
                                                         session_timeout=config.session_timeout_sec)
    with tempfile.TemporaryDirectory(prefix="pfp_tune_") as tmp:
        path = os.path.join(tmp, "module.so")
        kwargs = {}
        if _target_arch(target) != platform.machine():
            kwargs["cc"] = config.cross_compiler or shutil.which(ARM_CROSS_COMPILER) or ARM_CROSS_COMPILER
        executable.export_library(path, **kwargs)
        remote.upload(path)
    rexec = remote.load_module("module.so")
    device = remote.cpu()
    vm = relax.VirtualMachine(rexec, device)
    vm.set_input("main", *_zero_inputs(mod, device))
    vm.invoke_stateful("main")
    result = vm.time_evaluator("invoke_stateful", device, number=number, repeat=repeat)("main")
    return float(np.median(result.results)) * 1e3


def compile_best(mod: tvm.IRModule, database: ms.database.Database, target=None, *,
                 config: TuneConfig | None = None, number: int = 20, repeat: int = 5) -> BestModule:
    """Compile ``mod`` tuned and untuned, time both (zero inputs) and keep the faster.

    Timing runs on this machine when the target is the host, else on the RPC server of
    ``config`` (required then). Tuning a tiny model can lose to the untuned build (thread-pool
    overhead), which is why the untuned build is the fallback.
    """
    config = config or TuneConfig()
    target = make_target(config.target if target is None else target)
    tuned = compile_tuned(mod, target, database)
    untuned = compile_untuned(mod, target)
    if _target_arch(target) == platform.machine() and not config.uses_rpc:
        tuned_ms = _time_local(tuned, mod, number, repeat)
        untuned_ms = _time_local(untuned, mod, number, repeat)
    elif config.uses_rpc:
        tuned_ms = _time_remote(tuned, mod, target, config, number, repeat)
        untuned_ms = _time_remote(untuned, mod, target, config, number, repeat)
    else:
        raise ValueError(f"cannot time a {_target_arch(target)} module on this {platform.machine()} machine: "
                         "set rpc_tracker and rpc_key in the config")
    kept = "tuned" if tuned_ms <= untuned_ms else "untuned"
    logger.info("tuned %.4f ms vs untuned %.4f ms: keeping the %s module", tuned_ms, untuned_ms, kept)
    return BestModule(tuned if kept == "tuned" else untuned, kept, tuned_ms, untuned_ms)
