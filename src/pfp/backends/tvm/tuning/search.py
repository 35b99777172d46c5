"""The tuning entry point: :func:`tune_module` wires tasks, builder, runner, database and run-off.

Like TVM's ``s_tir/meta_schedule/tune.py``: the pieces live in their own modules
(:mod:`~.measure`, :mod:`~.records`, :mod:`~.runoff`, :mod:`~._compat`); this one decides what
to tune (resuming from the state file) and in which order the pieces run.
"""

from __future__ import annotations

import logging
import time

import tvm
from tvm.s_tir import meta_schedule as ms

from pfp.backends.tvm.pipeline import fuse_operators
from pfp.backends.tvm.schedules import HAND_SCHEDULE_VERSION
from pfp.backends.tvm.targets import make_target
from pfp.backends.tvm.tuning._compat import import_tensor_intrinsics, unnamed_handlers_detached, untunable
from pfp.backends.tvm.tuning.boards import BoardRecorder
from pfp.backends.tvm.tuning.config import TuneConfig, TuneReport, parse_tracker
from pfp.backends.tvm.tuning.measure import (
    TrackerError,
    check_tracker,
    make_builder,
    make_runner,
    measure_hand_schedules,
)
from pfp.backends.tvm.tuning.records import (
    best_other_record,
    check_measured,
    clean_leftovers,
    count_records,
    discard_incomparable_records,
    load_state,
    measurement_setting,
    open_database,
    save_state,
    task_key,
)
from pfp.backends.tvm.tuning.runoff import run_off

__all__ = ["extract_tuning_tasks", "tune_module"]

logger = logging.getLogger(__name__)


def extract_tuning_tasks(mod: tvm.IRModule, target) -> list:
    """The Meta Scheduler tasks of ``mod``: the fused TIR functions :func:`pfp.backends.tvm.pipeline.compile_tuned` compiles."""
    target = make_target(target)
    return list(ms.relax_integration.extract_tasks(fuse_operators(mod, target), target, module_equality="structural"))


def tune_module(mod: tvm.IRModule, target=None, config: TuneConfig | None = None,
                *, report: TuneReport | None = None) -> ms.database.JSONDatabase:
    """Meta Scheduler tuning of every task (fused TIR function) of the Relax module ``mod``.

    ``target`` defaults to ``make_target(config.target)``. Returns the database to compile with:
    the run-off's (:func:`~.runoff.run_off`), or with ``config.finalists == 0`` the JSON database of
    ``config.work_dir``. Tasks finished by an earlier call with the same work_dir (and at least
    the same ``trials_per_task``) are skipped; pass a :class:`TuneReport` to learn what ran.
    """
    config = config or TuneConfig()
    target = make_target(config.target if target is None else target)
    report = report if report is not None else TuneReport()
    with BoardRecorder(report.measurements) as recorder:
        selection = _tune(mod, target, config, report, recorder)
    report.rpc_workers = recorder.workers
    logger.info("tuning done in %.1f s: %d task(s) tuned, %d skipped, %d new record(s), %d in %s%s",
                report.seconds, len(report.tuned), len(report.skipped), report.new_records,
                report.records_after, config.work_path,
                f"; measured on {report.boards()}" if config.uses_rpc else "")
    return selection


def _tune(mod: tvm.IRModule, target, config: TuneConfig, report: TuneReport,
          recorder: BoardRecorder) -> ms.database.JSONDatabase:
    start = time.perf_counter()
    work_dir = config.work_path
    measured_with = measurement_setting(config)
    clean_leftovers(work_dir)
    discard_incomparable_records(work_dir, measured_with)
    database = open_database(work_dir)
    report.records_before = count_records(database)

    tasks = extract_tuning_tasks(mod, target)
    tasks = [task for task in tasks if not task.mod.attrs.get("tirx.is_scheduled", False)]
    if not tasks:
        raise ValueError("the module has no TIR functions to tune")
    state = load_state(work_dir)
    state["measured_with"] = measured_with
    finished: dict[str, int] = state.setdefault("finished", {})
    pending = []
    for task in tasks:
        key = task_key(task, target)
        report.tasks.append(task.task_name)
        reason = untunable(task)
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
        return f"{task_key(task, target)}:v{HAND_SCHEDULE_VERSION}"

    runner = None  # one runner for every phase: its worker processes start once (seconds each)

    def shared_runner() -> ms.runner.Runner:
        nonlocal runner
        if runner is None:
            runner = make_runner(config, recorder)
        return runner

    missing_hand = [task for task in tasks if hand_key(task) not in hand_done]
    if missing_hand:
        measured = measure_hand_schedules(missing_hand, target, config, database, recorder, shared_runner())
        _check_boards_left(config, recorder, "hand")
        for task in missing_hand:
            if task.task_name in measured:
                hand_done[hand_key(task)] = measured[task.task_name]
        save_state(work_dir, state)
    for task in tasks:
        if hand_key(task) in hand_done:
            report.hand_ms[task.task_name] = hand_done[hand_key(task)]
    if not pending:
        logger.info("nothing to tune: every tunable task is finished")
    else:
        shared_runner()  # first: a dead tracker fails before anything else starts
        builder = make_builder(target, config)
        budget = min(config.max_trials_global, config.trials_per_task * len(pending))
        logger.info("tuning %d task(s) (%s) for %s: %d trials/task, %d in all, %s runner; work dir %s",
                    len(pending), ", ".join(t.task_name for _, t in pending), target, config.trials_per_task,
                    budget, f"RPC {config.rpc_tracker} key {config.rpc_key} ({recorder.workers} at once)"
                    if config.uses_rpc else "local", work_dir)
        import_tensor_intrinsics()
        with unnamed_handlers_detached():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task for _, task in pending], work_dir=str(work_dir), num_threads=config.num_threads,
                seed=config.seed, strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=config.population_size, genetic_num_iters=config.genetic_num_iters,
                    init_min_unmeasured=config.init_min_unmeasured))
        callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                     recorder.callback([context.task_name for context in contexts])]
        search_start = time.perf_counter()
        with unnamed_handlers_detached():
            ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                               max_trials_global=budget, max_trials_per_task=config.trials_per_task,
                               num_trials_per_iter=min(config.num_trials_per_iter, config.trials_per_task),
                               builder=builder, runner=runner, database=database, module_equality="structural",
                               measure_callbacks=callbacks)
        report.search_seconds = time.perf_counter() - search_start
        _check_boards_left(config, recorder, "search")
        full_budget = budget >= config.trials_per_task * len(pending)
        for key, task in pending:
            # a task may end early (search space exhausted): it is finished when the budget covered
            # it; with a smaller global budget only its measured records count
            done = config.trials_per_task if full_budget else count_records(database, task.dispatched[0])
            finished[key] = max(finished.get(key, 0), done)
            report.tuned.append(task.task_name)
        save_state(work_dir, state)
        check_measured(database, [task for _, task in pending])
    report.records_after = count_records(database)
    if config.finalists:  # the run-off's side-by-side figures are the report's
        selection = run_off(tasks, database, target, config, report, recorder, shared_runner())
        _check_boards_left(config, recorder, "run_off")
    else:
        selection = database
        for task in tasks:
            if task.task_name not in report.untunable:
                best = best_other_record(database, task)
                if best is not None:
                    report.other_ms[task.task_name], report.other_source[task.task_name] = best
    report.seconds = time.perf_counter() - start
    return selection


def _check_boards_left(config: TuneConfig, recorder: BoardRecorder, phase: str) -> None:
    """Stop with a clear error when measurements of ``phase`` failed and no server is left under the key.

    A failed measurement is recorded (``ms`` None) and the search goes on with the servers left (a
    hung one is killed at :func:`~.measure.measurement_bound`); with none left, every later measurement
    would fail, and a tuning that "succeeds" on hand schedules alone would hide it.
    """
    failed = sum(item["ms"] is None for item in recorder.measurements if item["phase"] == phase)
    if not config.uses_rpc or not failed:
        return
    try:
        check_tracker(config.rpc_tracker, config.rpc_key)
        # the tracker keeps a key's queue after its last server left: count the servers themselves
        host, port = parse_tracker(config.rpc_tracker)
        rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=config.rpc_key)
        if rpc_config.count_num_servers(allow_missing=True) == 0:
            raise TrackerError(f"RPC tracker {config.rpc_tracker} has no server registered under key "
                               f"{config.rpc_key!r} any more (killed or disconnected?); start one with "
                               "infra/rpc/start-server.sh and run the tuning again: it resumes from its database")
    except TrackerError as error:
        raise TrackerError(f"tuning stopped: {failed} measurement(s) of the {phase} phase failed and {error}") from None
    logger.warning("%d measurement(s) of the %s phase failed (timed out or lost their RPC server); tuning goes on "
                   "with the servers left under key %r", failed, phase, config.rpc_key)
