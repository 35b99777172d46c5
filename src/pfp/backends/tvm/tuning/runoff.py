"""The run-off: per task the hand schedule and the best other records, measured side by side.

Their medians make the database compiled modules use (``work_dir/selection``); another record
replaces the hand schedule only when it ran at least ``switch_margin`` faster.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from pfp.backends.tvm.pipeline import SELECTION_DIR, compiling_database
from pfp.backends.tvm.schedules import apply_hand_schedule
from pfp.backends.tvm.tuning.boards import BoardRecorder
from pfp.backends.tvm.tuning.config import ScheduleSource, TuneConfig, TuneReport, switches
from pfp.backends.tvm.tuning.measure import make_builder, make_runner, measure
from pfp.backends.tvm.tuning.records import record_source

__all__ = ["run_off"]

logger = logging.getLogger(__name__)


def _finalists(task, database: ms.database.Database, target: tvm.target.Target,
               count: int) -> list[tuple[ScheduleSource, s_tir.Schedule]]:
    """``[(HAND, schedule)]`` (if the hand rules apply) plus the ``count`` best distinct other records."""
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
            report: TuneReport | None = None, recorder: BoardRecorder | None = None,
            runner: ms.runner.Runner | None = None) -> ms.database.JSONDatabase:
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
        results = measure([(f"task {task.task_name}: a {source.value} finalist", sch)
                            for task, source, sch in entries], target,
                           make_builder(target, config), runner if runner is not None else make_runner(config, recorder),
                           config.selection_rounds,
                           recorder=recorder, phase="run_off", tasks=[task.task_name for task, _, _ in entries])
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
            if source is ScheduleSource.HAND or name not in hand_ms or switches(other[name][0], hand_ms[name],
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
