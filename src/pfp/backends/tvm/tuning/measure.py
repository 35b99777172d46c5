"""Building and measuring schedules: the builder (lean build, cross-linked ARM candidates), the runner (local or RPC).

:func:`measure_hand_schedules` measures each task's hand schedule with the tuning builder and
runner and records it; :func:`measure` builds candidates once and runs them in interleaved rounds.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import socket
import tempfile

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from pfp.backends.tvm.passes import register_pipeline
from pfp.backends.tvm.schedules import apply_hand_schedule
from pfp.backends.tvm.targets import ARM_CROSS_COMPILER, cross_compiler, runs_on_host, target_arch
from pfp.backends.tvm.tuning.boards import BoardRecorder, rpc_workers, runner_hooks
from pfp.backends.tvm.tuning.config import TuneConfig, parse_tracker

__all__ = ["TrackerError", "check_tracker", "export_aarch64_so", "lean_build", "make_builder", "make_runner",
           "measure", "measure_hand_schedules", "measurement_bound"]

logger = logging.getLogger(__name__)


class TrackerError(RuntimeError):
    """The RPC tracker is unreachable or has no server under the requested key."""


def lean_build(mod: tvm.IRModule, target: tvm.target.Target, _params=None) -> tvm.runtime.Module:
    """``default_build`` without importing ``tvm.s_tir.tensor_intrin`` (~60 s per builder worker here).

    Valid for schedules that use no tensor intrinsics (no tensorize), i.e. the llvm CPU
    targets PFP tunes for. Candidates are lowered like the compiled modules (our TIR pipeline,
    :func:`pfp.backends.tvm.passes.tir_pipeline.register_pipeline`), so what is measured is what ships.
    """
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=register_pipeline())  # what the deprecated tvm.driver.build calls


def export_aarch64_so(mod: tvm.runtime.Module, cc: str = ARM_CROSS_COMPILER) -> str:
    """Builder ``f_export`` for boards of another architecture: a ``.so`` cross-linked with ``cc`` (the board needs no compiler)."""
    path = os.path.join(tempfile.mkdtemp(prefix="pfp_ms_"), "candidate.so")
    mod.export_library(path, cc=cc)
    return path


def _f_export(target: tvm.target.Target, config: TuneConfig):
    if runs_on_host(target):
        return None  # default: tar archive, linked by the (host) RPC server or the local runner
    arch = target_arch(target)
    try:
        cross = cross_compiler(target)
    except RuntimeError:
        raise ValueError(f"no cross compiler known for {arch} targets") from None
    compiler = config.cross_compiler or shutil.which(cross)
    if compiler is None:
        raise RuntimeError(f"tuning for {arch} exports candidates linked with {cross}; install it "
                           "(Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu) or set TuneConfig.cross_compiler")
    if not config.uses_rpc:
        raise ValueError(f"candidates for {arch} cannot run on this {platform.machine()} machine: "
                         "set rpc_tracker and rpc_key to measure them on the board")
    return functools.partial(export_aarch64_so, cc=compiler)


def make_builder(target: tvm.target.Target, config: TuneConfig) -> ms.builder.LocalBuilder:
    return ms.builder.LocalBuilder(max_workers=config.builder_workers, timeout_sec=config.builder_timeout_sec,
                                   f_build=lean_build if config.lean_builder else None,
                                   f_export=_f_export(target, config))


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


def make_runner(config: TuneConfig, recorder: BoardRecorder | None = None) -> ms.runner.Runner:
    """The local runner, or the RPC runner measuring on every server under the key at once.

    With a ``recorder``, the RPC runner's sessions log which board measured each candidate
    (:mod:`~.boards`), and ``recorder.workers`` is set to the runner's parallelism.
    """
    evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=config.repeat,
                                          min_repeat_ms=config.min_repeat_ms, enable_cpu_cache_flush=False)
    if not config.uses_rpc:
        return ms.runner.LocalRunner(timeout_sec=config.runner_timeout_sec, evaluator_config=evaluator)
    check_tracker(config.rpc_tracker, config.rpc_key)
    host, port = parse_tracker(config.rpc_tracker)
    rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=config.rpc_key,
                                     session_timeout_sec=int(config.session_timeout_sec))
    workers = rpc_workers(rpc_config, config.rpc_workers)
    if recorder is not None:
        recorder.workers, recorder.remote = workers, True
    hooks = runner_hooks(recorder.log_path if recorder is not None else None, config.cooldown_ms)
    logger.info("RPC runner: %d measurement(s) at once on the servers under key %r at %s",
                workers, config.rpc_key, config.rpc_tracker)
    runner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator, max_workers=workers, **hooks)
    _bound_measurements(runner, workers, measurement_bound(config.session_timeout_sec))
    return runner


def measurement_bound(session_timeout_sec: float) -> float:
    """Seconds after which an RPC measurement's worker is killed: the session time-out and a grace.

    A live server ends an overlong session itself at ``session_timeout_sec`` (and the client gets an
    error); killing the client first would reset the connection under the server. The grace leaves
    the client-side kill to servers that no longer answer at all.
    """
    return session_timeout_sec + max(5.0, 0.25 * session_timeout_sec)


def _bound_measurements(runner: ms.runner.RPCRunner, workers: int, seconds: float) -> None:
    """Kill a measurement's worker after ``seconds`` (it fails with the runner's "Timeout" error).

    TVM 0.27's ``RPCRunner`` sends ``session_timeout_sec`` to the server only, and its worker pool has
    no time-out: a server that hangs (stopped, a frozen board, a dead network) never answers, and
    the tuning waited forever. Its future reports a ``TimeoutError`` of the pool as a failed
    measurement, so a pool with a time-out is all it takes.
    """
    from tvm.support.popen_pool import PopenPoolExecutor

    runner.pool.shutdown(wait=True)  # its worker only ran the runner's sanity check
    runner.pool = PopenPoolExecutor(max_workers=workers, timeout=seconds)


def measure(candidates: list[tuple[str, s_tir.Schedule]], target: tvm.target.Target, builder, runner,
             rounds: int = 1, *, recorder: BoardRecorder | None = None, phase: str = "measure",
             tasks: list[str] | None = None) -> list[tuple[list, list[float]]]:
    """Build every ``(label, schedule)`` once, then run them all ``rounds`` times.

    Every other round runs in reverse order, so a drift of the host does not favour one end.
    Returns, per candidate, its argument info and the seconds measured: empty when it failed to
    build or every run failed (each failure is logged under its label). A ``recorder`` gets every
    run under ``phase`` and the candidate's task name (``tasks``, default: the labels).
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
    try:
        for round_index in range(rounds):
            order = runnable[::-1] if round_index % 2 else runnable
            for (index, _), future in zip(order, runner.run([runner_input for _, runner_input in order])):
                result = future.result()
                if recorder is not None:
                    recorder.record(phase, (tasks or [label for label, _ in candidates])[index],
                                    built[index].artifact_path, result.run_secs, result.error_msg)
                if result.error_msg:
                    logger.warning("%s failed to run: %s", candidates[index][0], result.error_msg[-500:])
                    continue
                seconds[index] += [float(v) for v in result.run_secs]
    finally:
        # each build is a temp folder; the Meta Scheduler removes its own candidates' (these are ours)
        for result in built:
            if result.artifact_path:
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
    return list(zip(args_infos, seconds))


def measure_hand_schedules(tasks, target: tvm.target.Target, config: TuneConfig,
                           database: ms.database.Database, recorder: BoardRecorder | None = None,
                           runner: ms.runner.Runner | None = None) -> dict[str, float]:
    """Build and measure the hand schedule of every task with the tuning builder and runner.

    Each measurement is committed to ``database`` as a tuning record (the schedule's trace), so
    compiling from the database picks, per task, the faster of the hand schedule and the best
    Meta Scheduler candidate. Returns the median ms per task name (tasks that failed are left out).
    """
    builder = make_builder(target, config)
    runner = runner if runner is not None else make_runner(config, recorder)
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
    results = measure([(f"task {task.task_name}: hand schedule", sch) for task, sch in candidates], target,
                       builder, runner, recorder=recorder, phase="hand",
                       tasks=[task.task_name for task, _ in candidates])
    for (task, sch), (args_info, run_secs) in zip(candidates, results):
        if not run_secs:
            continue
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, target, args_info))
        measured[task.task_name] = float(np.median(run_secs)) * 1e3
        logger.info("task %s: hand schedule %.4f ms", task.task_name, measured[task.task_name])
    return measured
