"""The tuning database and what is recorded beside it: the resume state file, the source of a record.

The JSON database of a work dir accumulates records of every run (the search's memory); the
run-off's database, ``work_dir/selection``, is what modules compile with (:func:`pfp.backends.tvm.pipeline.compiling_database`).
``work_dir/pfp_tune_state.json`` records the finished tasks, the hand schedules measured (per
version of the rules) and the runner setting the records were measured with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from pfp.backends.tvm.schedules import apply_hand_schedule
from pfp.backends.tvm.tuning.config import ScheduleSource, TuneConfig
from pfp.io import atomic_write_text

__all__ = ["RECORDS_FILE", "STATE_FILE", "WORKLOADS_FILE", "best_other_record", "check_measured",
           "clean_leftovers", "count_records", "discard_incomparable_records", "hand_trace_text", "load_state",
           "measurement_setting", "open_database", "record_source", "repair_database", "save_state", "task_key"]

logger = logging.getLogger(__name__)

STATE_FILE = "pfp_tune_state.json"
WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
_STATE_FORMAT = 1


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


def open_database(work_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The JSON database of ``work_dir`` (created if missing; existing records are kept, a torn tail is
    dropped first: :func:`repair_database`)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    repair_database(work_dir)
    return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []


def _parsed(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def repair_database(work_dir: str | os.PathLike) -> int:
    """Drop the lines of ``work_dir``'s JSON database that a killed writer left torn; returns how many.

    TVM appends one JSON line per workload and per record; a process killed mid-append leaves a
    partial last line, and ``JSONDatabase`` then refuses the whole database ("Unexpected token"), so
    every later tuning would fail until someone deletes it. Every whole line is kept; the records of
    a dropped workload go too (a record names its workload by line number, renumbered here). A file
    is rewritten (atomically) only when it changes, e.g. a whole last line without its newline: the
    next append would join two records on one line.
    """
    work_dir = Path(work_dir)
    workloads_path, records_path = work_dir / WORKLOADS_FILE, work_dir / RECORDS_FILE
    numbers: dict[int, int] = {}  # workload line number before -> after
    workloads, written = [], _lines(workloads_path)
    for old, line in enumerate(written):
        if _parsed(line) is not None:
            numbers[old] = len(workloads)
            workloads.append(line)
    records, torn_records, orphans = [], 0, 0
    for line in _lines(records_path):
        entry = _parsed(line)
        if entry is None:
            torn_records += 1
            continue
        index = entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], int) else None
        if index not in numbers:
            orphans += 1
            continue
        if numbers[index] != index:
            line = f"[{numbers[index]}," + line.split(",", 1)[1]
        records.append(line)
    torn_workloads = len(written) - len(workloads)
    for path, lines in ((workloads_path, workloads), (records_path, records)):
        text = "".join(f"{line}\n" for line in lines)
        if path.is_file() and path.read_text(errors="replace") != text:
            atomic_write_text(path, text)
    dropped = torn_workloads + torn_records + orphans
    if dropped:
        logger.warning("%s: dropped %d torn line(s) of the tuning database (a tuning killed while writing?): "
                       "%d workload(s), %d record(s), %d record(s) of a dropped workload; kept %d workload(s) "
                       "and %d record(s)", work_dir, torn_workloads + torn_records, torn_workloads, torn_records,
                       orphans, len(workloads), len(records))
    return dropped


def count_records(database: ms.database.Database, mod: tvm.IRModule | None = None) -> int:
    """Tuning records in ``database`` (of the workload ``mod`` if given)."""
    records = database.get_all_tuning_records()
    if mod is None:
        return len(records)
    return sum(1 for record in records if tvm_ffi.structural_equal(record.workload.mod, mod))


def task_key(task, target: tvm.target.Target) -> str:
    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0]):x}:{target}"


def load_state(work_dir: Path) -> dict:
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


def discard_incomparable_records(work_dir: Path, setting: str) -> None:
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


def save_state(work_dir: Path, state: dict) -> None:
    atomic_write_text(work_dir / STATE_FILE, json.dumps(state, indent=1))


def clean_leftovers(work_dir: str | os.PathLike) -> list[Path]:
    """Delete what a tuning killed in ``work_dir`` left behind; returns what was deleted.

    The run-off's staging databases (``.selection-*``), atomic writes' temp files (``.NAME.*.tmp*``,
    and ``pfp_tune_state.tmp`` of earlier versions) and the Meta Scheduler's ``logs``: none is read
    again, and a stage output folder would otherwise carry them into DVC's cache.
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    leftovers = [*work_dir.glob(".selection-*"), *work_dir.glob(".*.tmp*"), *work_dir.glob("*.tmp"), work_dir / "logs"]
    removed = []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    if removed:
        logger.info("%s: removed %d file(s) left by an interrupted tuning: %s", work_dir, len(removed),
                    ", ".join(path.name for path in removed))
    return removed


def hand_trace_text(task) -> str | None:
    sch = s_tir.Schedule(task.dispatched[0])
    try:
        apply_hand_schedule(sch, target=task.target)
    except (s_tir.ScheduleError, tvm.error.InternalError):
        return None
    return str(sch.trace)


def best_other_record(database: ms.database.Database, task) -> tuple[float, ScheduleSource] | None:
    """(ms, source) of the best measured record of ``task`` other than the current hand schedule, or None."""
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return None
    hand = hand_trace_text(task)
    best = None
    for record in database.get_top_k(database.commit_workload(mod), 256):
        source = record_source(record.trace, hand)
        if not record.run_secs or source is ScheduleSource.HAND:
            continue
        value = float(np.median([float(v) for v in record.run_secs])) * 1e3
        if best is None or value < best[0]:
            best = (value, source)
    return best


def check_measured(database: ms.database.Database, tasks) -> None:
    """Warn about tasks without any successful measurement (build or run errors for every trial)."""
    for task in tasks:
        mod = task.dispatched[0]
        if not database.has_workload(mod) or not database.get_top_k(database.commit_workload(mod), 1):
            logger.warning("task %s has no successful measurement; see the logs in the work dir "
                           "(builder timeout? unreachable RPC server?)", task.task_name)
