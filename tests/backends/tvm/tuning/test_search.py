"""Meta Scheduler tuning of a tiny PFP network end to end: local runner, resume, RPC runner and RPC inference.

Real components throughout (Meta Scheduler, builder workers, RPC tracker and server
subprocesses started through infra/rpc/*.sh). The first tuning in the process pays the
one-time ``tvm.s_tir.tensor_intrin`` import (~60 s on 2 cores); budgets are a few trials.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from pfp.backends.tvm.pipeline import compile_module, compile_tuned  # noqa: E402
from pfp.backends.tvm.targets import ARM_CROSS_COMPILER, make_target, target_arch  # noqa: E402
from pfp.backends.tvm.tuning.config import (  # noqa: E402
    ScheduleSource,
    TuneConfig,
    TuneReport,
    parse_tracker,
)
from pfp.backends.tvm.tuning.measure import (
    TrackerError,
    check_tracker,
)
from pfp.backends.tvm.tuning.records import STATE_FILE, count_records, open_database  # noqa: E402
from pfp.backends.tvm.tuning.search import extract_tuning_tasks, tune_module  # noqa: E402

from ..helpers import (  # noqa: E402
    TARGET,
    TRIALS,
    assert_close,
    assert_selection_follows_report,
    fast_config,
    free_port,
    run_local,
)


def test_local_tuning_writes_database(local_tuning):
    config, database, report = local_tuning
    work_dir = Path(config.work_dir)
    assert (work_dir / "database_workload.json").stat().st_size > 0
    assert (work_dir / "database_tuning_record.json").stat().st_size > 0
    # tasks are the fused functions (the flatten became a TIR `reshape`)
    assert sorted(report.tuned) == ["fc1_dense_joint_first", "fc2_dense_joint", "reshape"]
    # the Gaussian ReLU uses tirx.Let, which the task scheduler's FLOP estimate rejects
    assert report.untunable == ["fused_relu_gaussian2"]
    # every task's hand schedule was measured and recorded, tunable or not
    assert sorted(report.hand_ms) == sorted(report.tasks) and all(v > 0 for v in report.hand_ms.values())
    assert sorted(report.other_ms) == sorted(report.tuned)
    # a fresh database holds no earlier hand schedules: every other record is a search candidate
    assert set(report.other_source.values()) == {ScheduleSource.META_SCHEDULE}, report.other_source
    kept = report.kept()
    assert kept["fused_relu_gaussian2"] is ScheduleSource.HAND
    assert report.switch_margin == config.switch_margin == 0.03
    for name in report.tuned:
        faster = report.other_ms[name] < report.hand_ms[name] * (1 - report.switch_margin)
        assert kept[name] == ("meta_schedule" if faster else "hand")
    rows = {row["task"]: row for row in report.table()}
    assert rows["fused_relu_gaussian2"] == {"task": "fused_relu_gaussian2", "hand_ms": report.hand_ms["fused_relu_gaussian2"],
                                            "other_ms": None, "other_source": None, "kept": "hand",
                                            "side_by_side": False}
    json.dumps(report.table())  # what the tune stage writes
    records = open_database(work_dir)  # every record; tune_module returns the run-off's database
    assert report.new_records == count_records(records) > 0
    assert len(records.get_all_tuning_records()) == report.records_after
    successful = [r for r in records.get_all_tuning_records() if r.run_secs is not None and len(r.run_secs)]
    assert successful, "no candidate was measured successfully"


def test_tuned_module_matches_untuned_and_reference(case, local_tuning):
    mod, x, ref_mean, ref_var = case
    config, database, _ = local_tuning
    tuned_mean, tuned_var = run_local(compile_tuned(mod, TARGET, database), x)
    untuned_mean, untuned_var = run_local(compile_module(mod, TARGET, "default"), x)
    np.testing.assert_allclose(tuned_mean, untuned_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tuned_var, untuned_var, rtol=1e-4, atol=1e-8)
    assert_close(tuned_mean, ref_mean, what="tuned mean")
    assert_close(tuned_var, ref_var, what="tuned var")


# --------------------------------------------------------------------------- compile_best (test-only)

logger = logging.getLogger(__name__)


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
        if target_arch(target) != platform.machine():
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
    untuned = compile_module(mod, target, "default")
    if target_arch(target) == platform.machine() and not config.uses_rpc:
        tuned_ms = _time_local(tuned, mod, number, repeat)
        untuned_ms = _time_local(untuned, mod, number, repeat)
    elif config.uses_rpc:
        tuned_ms = _time_remote(tuned, mod, target, config, number, repeat)
        untuned_ms = _time_remote(untuned, mod, target, config, number, repeat)
    else:
        raise ValueError(f"cannot time a {target_arch(target)} module on this {platform.machine()} machine: "
                         "set rpc_tracker and rpc_key in the config")
    kept = "tuned" if tuned_ms <= untuned_ms else "untuned"
    logger.info("tuned %.4f ms vs untuned %.4f ms: keeping the %s module", tuned_ms, untuned_ms, kept)
    return BestModule(tuned if kept == "tuned" else untuned, kept, tuned_ms, untuned_ms)


def test_compile_best_keeps_the_faster_module(case, local_tuning):
    mod, x, ref_mean, ref_var = case
    config, database, _ = local_tuning
    best = compile_best(mod, database, config=config, number=5, repeat=3)
    assert best.kept in ("tuned", "untuned")
    assert best.tuned_ms > 0 and best.untuned_ms > 0
    assert (best.kept == "tuned") == (best.tuned_ms <= best.untuned_ms)
    mean, var = run_local(best.executable, x)
    assert_close(mean, ref_mean, what="best mean")
    assert_close(var, ref_var, what="best var")


def test_second_call_reuses_the_database(case, local_tuning):
    mod = case[0]
    config, _, first = local_tuning
    before = count_records(open_database(config.work_dir))
    report = TuneReport()
    again = tune_module(mod, config=config, report=report)
    assert report.tuned == [] and sorted(report.skipped) == sorted(first.tuned)
    assert report.new_records == 0
    assert count_records(open_database(config.work_dir)) == before  # reloaded from the JSON files
    # a new run-off of the same tasks (its choices may differ: the host's noise decides near-ties)
    assert sorted(report.side_by_side) == sorted(first.side_by_side)
    assert_selection_follows_report(mod, again, report, config.finalists)


def test_resume_from_records_without_state_file(case, local_tuning, tmp_path):
    """An interrupted run leaves records but no state entry: tasks with enough records are skipped."""
    mod = case[0]
    config, _, first = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    (copy / STATE_FILE).unlink()
    database = open_database(config.work_dir)  # every record (the fixture's is the run-off's)

    tasks = extract_tuning_tasks(mod, TARGET)
    records = {t.task_name: count_records(database, t.dispatched[0]) for t in tasks}
    assert sum(records.values()) == count_records(database)
    records = {name: count for name, count in records.items() if name in first.tuned}
    report = TuneReport()
    tune_module(mod, config=fast_config(copy), report=report)
    assert report.records_before == count_records(database)
    assert report.records_after >= report.records_before  # records are never dropped
    # tasks with trials_per_task records are finished and not measured again
    assert sorted(report.skipped) == sorted(name for name, count in records.items() if count >= TRIALS)
    if not report.tuned:  # only the hand schedules are measured again: the state that remembered them is gone
        assert report.new_records == len(report.hand_ms) == len(report.tasks)


def test_rpc_tuning_and_inference(case, local_tuning, rpc_tracker, tmp_path):
    mod, x, ref_mean, ref_var = case
    address, key = rpc_tracker
    config = fast_config(tmp_path / "tune_rpc", rpc_tracker=address, rpc_key=key, trials_per_task=2,
                         num_trials_per_iter=2, max_trials_global=4)
    report = TuneReport()
    database = tune_module(mod, config=config, report=report)
    assert sorted(report.tuned) == ["fc1_dense_joint_first", "fc2_dense_joint", "reshape"]
    measured = [r for r in database.get_all_tuning_records() if r.run_secs is not None and len(r.run_secs)
                and all(float(s) < 1e9 for s in r.run_secs)]
    assert measured, "no candidate ran successfully on the RPC server"

    executable = compile_tuned(mod, TARGET, database)
    local_mean, local_var = run_local(executable, x)
    path = tmp_path / "tuned.so"
    executable.export_library(str(path))
    host, port = parse_tracker(address)
    remote = tvm.rpc.connect_tracker(host, port).request(key, session_timeout=60)
    remote.upload(str(path))
    rexec = remote.load_module("tuned.so")
    device = remote.cpu()
    vm = relax.VirtualMachine(rexec, device)
    vm.set_input("main", tvm.runtime.tensor(x, device))
    vm.invoke_stateful("main")
    mean, var = (out.numpy() for out in vm.get_outputs("main"))
    np.testing.assert_allclose(mean, local_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, local_var, rtol=1e-4, atol=1e-8)
    assert_close(mean, ref_mean, what="remote mean")


def test_unknown_key_is_a_clear_error(case, rpc_tracker, tmp_path):
    address, _ = rpc_tracker
    config = fast_config(tmp_path, rpc_tracker=address, rpc_key="no-such-board")
    with pytest.raises(TrackerError, match=rf"{address}.*no server registered under key 'no-such-board'"):
        tune_module(case[0], config=config)


def test_unreachable_tracker_is_a_clear_error(case, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = fast_config(tmp_path, rpc_tracker=address, rpc_key="rasp4b")
    start = time.monotonic()
    with pytest.raises(TrackerError, match=rf"RPC tracker {address} \(key 'rasp4b'\) is unreachable"):
        tune_module(case[0], config=config)
    assert time.monotonic() - start < 30
