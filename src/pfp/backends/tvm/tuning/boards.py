"""Measuring on every board under a tracker key at once, and recording which board measured what.

The Meta Scheduler's ``RPCRunner`` measures up to ``max_workers`` candidates at a time, each in a
session the tracker hands out under the key (a server measures one session at a time);
:func:`rpc_workers` sets ``max_workers`` to the number of servers the tracker reports for the key
(``RPCConfig.count_num_servers``), so a second board halves the wait for measurements.

The runner returns times only. To know which board measured a candidate, its session and clean-up
hooks (``f_create_session`` / ``f_upload_module`` / ``f_cleanup``, which run in the runner's worker
processes) append one line per measurement to a board log: the artifact measured, the address the
tracker handed out, and when the session started and ended. :class:`BoardRecorder` joins those lines
with what was measured (search candidates through :meth:`BoardRecorder.callback`, a measure callback;
hand schedules and run-off finalists in :func:`~.measure.measure`) into ``TuneReport.measurements``.

This module is imported by the runner's worker processes (the hooks are pickled by reference):
it imports TVM's RPC modules only, and only inside the hooks.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["BoardRecorder", "LOCAL", "UNKNOWN", "busy_seconds", "concurrency", "rpc_workers",
           "run_evaluator_cooled", "runner_hooks"]

LOCAL = "local"  # the board of measurements by the local runner
#: the board of an RPC measurement killed before its session ended (a hung or dead server: no log line)
UNKNOWN = "unknown"


def rpc_workers(rpc_config, wanted: int | None = None) -> int:
    """The runner's parallelism: the servers the tracker reports under the key (at most ``wanted``, at least 1)."""
    boards = rpc_config.count_num_servers(allow_missing=True)
    return max(1, boards if wanted is None else min(wanted, boards))


# --------------------------------------------------------------------------- hooks (run in the runner's workers)

def create_session(rpc_config):
    """``RPCConfig.connect_server``, noting the address the tracker handed out (the board) on the session.

    ``TrackerSession.request`` connects through ``tvm.rpc.client.connect`` and keeps the address to
    itself; the hook wraps that function for the duration of the call (a worker runs one job at a time).
    """
    from tvm.rpc import client

    # fail now rather than wait in the tracker's queue for the session time-out: no server is left under the key
    if rpc_config.count_num_servers(allow_missing=True) == 0:
        raise RuntimeError(f"no RPC server is registered under key {rpc_config.tracker_key!r} at tracker "
                           f"{rpc_config.tracker_host}:{rpc_config.tracker_port} (all stopped or killed?)")
    connect, handed = client.connect, []

    def connect_and_note(url, port, *args, **kwargs):
        handed.append(f"{url}:{port}")
        return connect(url, port, *args, **kwargs)

    client.connect = connect_and_note
    try:
        session = rpc_config.connect_server()
    finally:
        client.connect = connect
    session.pfp_board, session.pfp_start = handed[-1], time.time()
    return session


def upload_module(session, local_path: str, remote_path: str):
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_upload_module

    session.pfp_artifact = local_path  # the builder's path: unique per candidate (the remote name is not)
    return default_upload_module(session, local_path, remote_path)


def cleanup(log_path: str, session, remote_path: str | None) -> None:
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_cleanup

    try:
        default_cleanup(session, remote_path)
    finally:
        if session is not None and hasattr(session, "pfp_artifact"):
            line = json.dumps({"artifact": session.pfp_artifact, "board": session.pfp_board,
                               "start": session.pfp_start, "end": time.time()})
            with open(log_path, "a") as log:  # one short append per line: whole lines from concurrent workers
                log.write(line + "\n")


def run_evaluator_cooled(cooldown_ms: int, session, rt_mod, device, evaluator_config, repeated_args) -> list[float]:
    """``run_evaluator_common`` with ``time_evaluator``'s cooldown between repeats (the board sleeps).

    A board that heats up (a Raspberry Pi throttles its clock at 80 C) measures slower with every
    repeat; TVM's evaluator can rest it between repeats, which the Meta Scheduler's
    ``EvaluatorConfig`` does not expose.
    """
    evaluator = rt_mod.time_evaluator(rt_mod.entry_name, device, number=evaluator_config.number,
                                      repeat=evaluator_config.repeat, min_repeat_ms=evaluator_config.min_repeat_ms,
                                      cooldown_interval_ms=cooldown_ms, repeats_to_cooldown=1)
    costs = []
    for args in repeated_args:
        device.sync()
        costs += [float(cost) for cost in evaluator(*args).results]
    return costs


def runner_hooks(log_path: str | os.PathLike | None, cooldown_ms: int = 0) -> dict:
    """The ``RPCRunner`` keyword arguments that log each measurement's board to ``log_path`` (if given)
    and rest the board ``cooldown_ms`` between repeats (if > 0)."""
    hooks = {"f_create_session": create_session}
    if log_path is not None:
        hooks.update({"f_upload_module": upload_module, "f_cleanup": functools.partial(cleanup, str(log_path))})
    if cooldown_ms:
        hooks["f_run_evaluator"] = functools.partial(run_evaluator_cooled, int(cooldown_ms))
    return hooks


# --------------------------------------------------------------------------- joining the log with what was measured

class BoardRecorder:
    """Collects ``{"phase", "task", "board", "ms", "start", "end", "error"}`` per measurement into ``measurements``.

    ``ms`` is the median of the run (None when it failed, ``error`` then its last line); ``start``/``end``
    are the session's wall-clock seconds on the board (None for the local runner, whose board is
    :data:`LOCAL`, and for an RPC measurement killed before its session ended, board :data:`UNKNOWN`).
    """

    def __init__(self, measurements: list[dict] | None = None) -> None:
        self.measurements = measurements if measurements is not None else []
        handle, path = tempfile.mkstemp(prefix="pfp_boards_", suffix=".jsonl")
        os.close(handle)
        self.log_path = Path(path)
        self._offset = 0
        self._entries: dict[str, dict] = {}
        self.workers = 1  # the runner's parallelism (set by measure.make_runner)
        self.remote = False  # an RPC runner (set by measure.make_runner): a measurement without a log line is UNKNOWN's

    def close(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BoardRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _entry(self, artifact: str) -> dict | None:
        if artifact not in self._entries:
            with self.log_path.open() as log:
                log.seek(self._offset)
                text = log.read()
            complete = text[:text.rfind("\n") + 1]  # a line being written is read next time
            self._offset += len(complete.encode())
            for line in complete.splitlines():
                entry = json.loads(line)
                self._entries[entry["artifact"]] = entry
        return self._entries.pop(artifact, None)

    def record(self, phase: str, task: str, artifact: str | None, run_secs, error: str | None) -> None:
        entry = self._entry(str(artifact)) if artifact else None
        median = 1e3 * statistics.median(float(v) for v in run_secs) if not error and run_secs else None
        board = entry["board"] if entry else UNKNOWN if self.remote else LOCAL
        lines = [line for line in str(error or "").splitlines() if line.strip()]
        self.measurements.append({"phase": phase, "task": task, "board": board,
                                  "ms": median, "start": entry["start"] if entry else None,
                                  "end": entry["end"] if entry else None, "error": lines[-1].strip() if lines else None})

    def callback(self, task_names: list[str]):
        """A measure callback recording every search candidate (``phase="search"``) of the tasks ``task_names``."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        recorder = self

        @derived_object
        class RecordBoards(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                for built, ran in zip(builder_results, runner_results):
                    recorder.record("search", task_names[task_id], built.artifact_path,
                                    ran.run_secs, built.error_msg or ran.error_msg)

        return RecordBoards()


def busy_seconds(measurements: list[dict]) -> float:
    """Wall-clock seconds during which at least one board was in a measuring session (the union of the sessions)."""
    total, reach = 0.0, None
    for start, end in sorted((m["start"], m["end"]) for m in measurements if m["start"] is not None):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def concurrency(measurements: list[dict]) -> int:
    """The most sessions that were open at the same moment (1: the boards measured one after another)."""
    events = sorted([(m["start"], 1) for m in measurements if m["start"] is not None]
                    + [(m["end"], -1) for m in measurements if m["start"] is not None])
    most = current = 0
    for _, step in events:  # at equal times the end (-1) sorts first: touching sessions do not overlap
        current += step
        most = max(most, current)
    return most
