"""Meta Scheduler tuning of a tiny PFP network: local runner, resume, RPC runner and RPC inference.

Real components throughout (Meta Scheduler, builder workers, RPC tracker and server
subprocesses started through infra/rpc/*.sh). The first tuning in the process pays the
one-time ``tvm.s_tir.tensor_intrin`` import (~60 s on 2 cores); budgets are a few trials.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import build as tb  # noqa: E402
from pfp.backends.tvm import tune  # noqa: E402
from pfp.spec import Dense, Flatten, ModelSpec, ReLU  # noqa: E402

from .helpers import (  # noqa: E402
    RPC_DIR,
    assert_close,
    free_port,
    random_params,
    start_process_group,
    start_tracker,
    stop_process_group,
    wait_for_key,
)

TRIALS = 2
SPEC = ModelSpec("tiny", (1, 4, 4), (Flatten(), Dense("fc1", 16, 8), ReLU(), Dense("fc2", 8, 3)))
TARGET = {"kind": "llvm", "num-cores": 1}


def fast_config(work_dir, **overrides) -> tune.TuneConfig:
    """A few trials, a small evolutionary population and short measurements: seconds per task."""
    settings = dict(trials_per_task=TRIALS, max_trials_global=3 * TRIALS, num_trials_per_iter=TRIALS,
                    target=TARGET, work_dir=str(work_dir), builder_workers=1, number=2, repeat=1,
                    min_repeat_ms=1, population_size=16, genetic_num_iters=1, init_min_unmeasured=4,
                    seed=0, session_timeout_sec=60, selection_rounds=2)  # run-off: one round each way
    settings.update(overrides)
    return tune.TuneConfig(**settings)


def run_local(executable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    mean, var = vm["main"](tvm.runtime.tensor(x))
    return mean.numpy(), var.numpy()


@pytest.fixture(scope="module")
def case():
    params = random_params(SPEC, seed=0)
    x = torch.randn(1, *SPEC.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(SPEC, params, x)
    mod = tb.build_pfp_module(SPEC, params, batch_size=1)
    return mod, x.numpy(), ref_mean, ref_var


@pytest.fixture(scope="module")
def local_tuning(case, tmp_path_factory):
    mod = case[0]
    config = fast_config(tmp_path_factory.mktemp("tune_local"))
    report = tune.TuneReport()
    database = tune.tune_module(mod, config=config, report=report)
    return config, database, report


# --------------------------------------------------------------------------- local runner

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
    assert set(report.other_source.values()) == {tune.ScheduleSource.META_SCHEDULE}, report.other_source
    kept = report.kept()
    assert kept["fused_relu_gaussian2"] is tune.ScheduleSource.HAND
    assert report.switch_margin == config.switch_margin == 0.03
    for name in report.tuned:
        faster = report.other_ms[name] < report.hand_ms[name] * (1 - report.switch_margin)
        assert kept[name] == ("meta_schedule" if faster else "hand")
    rows = {row["task"]: row for row in report.table()}
    assert rows["fused_relu_gaussian2"] == {"task": "fused_relu_gaussian2", "hand_ms": report.hand_ms["fused_relu_gaussian2"],
                                            "other_ms": None, "other_source": None, "kept": "hand",
                                            "side_by_side": False}
    json.dumps(report.table())  # what the tune stage writes
    records = tune.open_database(work_dir)  # every record; tune_module returns the run-off's database
    assert report.new_records == tune.count_records(records) > 0
    assert len(records.get_all_tuning_records()) == report.records_after
    successful = [r for r in records.get_all_tuning_records() if r.run_secs is not None and len(r.run_secs)]
    assert successful, "no candidate was measured successfully"


def _selected(database, task) -> tuple[tune.ScheduleSource, float]:
    """(source, seconds) of the record a compiled module takes for ``task``."""
    (record,) = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
    return tune.record_source(record.trace, tune._hand_trace_text(task)), float(record.run_secs[0])


def _assert_selection_follows_report(mod, selection, report: tune.TuneReport, finalists: int) -> None:
    """Per side-by-side task, the selection's best record is the report's choice, with its figure."""
    kept = report.kept()
    for task in tune.extract_tuning_tasks(mod, TARGET):
        if task.task_name not in report.side_by_side:
            continue
        kind, seconds = _selected(selection, task)
        assert kind == kept[task.task_name]
        expected = report.hand_ms[task.task_name] if kind == "hand" else report.other_ms[task.task_name]
        assert seconds * 1e3 == pytest.approx(expected)
        # one median each: the hand schedule's alone when it stays, else also up to `finalists` others
        count = tune.count_records(selection, task.dispatched[0])
        assert count == 1 if kind == "hand" else 2 <= count <= 1 + finalists


def test_run_off_decides_what_is_compiled(case, local_tuning):
    """Every task with a Meta Scheduler record is measured against its hand schedule side by side,
    and the database tune_module returns compiles the faster one."""
    config, database, report = local_tuning
    selection = Path(config.work_dir) / tune.SELECTION_DIR
    assert (selection / "database_tuning_record.json").stat().st_size > 0
    assert sorted(report.side_by_side) == sorted(report.tuned)  # the untunable ReLU has only its hand schedule
    _assert_selection_follows_report(case[0], database, report, config.finalists)
    assert tune.compiling_database(config.work_dir).get_all_tuning_records()  # what compile_module(TUNED) opens


def _planted_copy(mod, work_dir, tmp_path, task_name: str, make_trace):
    """A copy of ``work_dir`` whose database has one more record of ``task_name``, timed 1 ns (impossible):
    the trace ``make_trace(task, best_record)``. Returns (copy, task, workload)."""
    copy = tmp_path / "copy"
    shutil.copytree(work_dir, copy)
    records = tune.open_database(copy)
    task = next(t for t in tune.extract_tuning_tasks(mod, TARGET) if t.task_name == task_name)
    workload = records.commit_workload(task.dispatched[0])
    best = records.get_top_k(workload, 1)[0]
    records.commit_tuning_record(tune.ms.database.TuningRecord(make_trace(task, best), workload, [1e-9], best.target,
                                                               best.args_info))
    return copy, task, workload


def _hand_scheduled_another_way(task, _best):
    sch = tvm.s_tir.Schedule(task.dispatched[0])
    sch.parallel(sch.get_loops(sch.get_sblock("dense_joint_acc"))[0])
    return sch.trace


def test_a_stale_fast_record_is_measured_again(case, local_tuning, tmp_path):
    """A record timed when the host was quiet (here: 1 ns, impossible) does not win without a new measurement."""
    mod = case[0]
    config, _, _ = local_tuning
    copy, task, workload = _planted_copy(mod, config.work_dir, tmp_path, "fc1_dense_joint_first",
                                         lambda _task, best: best.trace)
    assert float(tune.open_database(copy).get_top_k(workload, 1)[0].run_secs[0]) == 1e-9  # the search's best now

    report = tune.TuneReport()
    selection = tune.tune_module(mod, config=fast_config(copy), report=report)
    assert report.tuned == [] and "fc1_dense_joint_first" in report.side_by_side
    kind, seconds = _selected(selection, task)
    assert seconds > 1e-8 and report.other_ms["fc1_dense_joint_first"] > 1e-5  # measured, not copied
    hand_ms, other_ms = report.hand_ms["fc1_dense_joint_first"], report.other_ms["fc1_dense_joint_first"]
    assert seconds * 1e3 == pytest.approx(other_ms if other_ms < hand_ms * (1 - report.switch_margin) else hand_ms)
    x = case[1]
    mean, var = run_local(tune.compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, case[2], what="run-off mean")
    assert_close(var, case[3], what="run-off var")


def test_record_source_tells_hand_earlier_hand_and_search_apart(case, local_tuning):
    """The current hand trace is "hand"; a search candidate's trace went through the Meta
    Scheduler's postprocessors; any other trace is an earlier version of the hand rules."""
    config, _, _ = local_tuning
    records = tune.open_database(config.work_dir)
    task = next(t for t in tune.extract_tuning_tasks(case[0], TARGET) if t.task_name == "fc1_dense_joint_first")
    hand = tune._hand_trace_text(task)
    sources = [tune.record_source(r.trace, hand) for r in records.get_top_k(records.commit_workload(task.dispatched[0]), 256)]
    assert sources.count(tune.ScheduleSource.HAND) == 1
    assert sources.count(tune.ScheduleSource.META_SCHEDULE) == len(sources) - 1 >= 1
    unscheduled = tvm.s_tir.Schedule(task.dispatched[0]).trace  # no decisions, no postprocessing
    assert tune.record_source(unscheduled, hand) is tune.ScheduleSource.EARLIER_HAND
    assert tune.record_source(unscheduled, None) is tune.ScheduleSource.EARLIER_HAND


def test_run_off_reports_an_earlier_hand_schedule_as_such(case, local_tuning, tmp_path):
    """A record that is neither the current hand schedule nor a search candidate (as earlier hand
    rules left in the database) competes in the run-off under its own name, never as a Meta Scheduler schedule."""
    mod = case[0]
    config, _, _ = local_tuning
    copy, task, _ = _planted_copy(mod, config.work_dir, tmp_path, "fc2_dense_joint", _hand_scheduled_another_way)
    report = tune.TuneReport()
    selection = tune.tune_module(mod, config=fast_config(copy, search=False, finalists=1), report=report)
    assert report.other_source["fc2_dense_joint"] is tune.ScheduleSource.EARLIER_HAND
    row = next(row for row in report.table() if row["task"] == "fc2_dense_joint")
    assert row["other_source"] == "earlier_hand" and row["other_ms"] > 1e-5  # measured again
    assert row["kept"] == ("earlier_hand" if row["other_ms"] < row["hand_ms"] * (1 - report.switch_margin) else "hand")
    assert _selected(selection, task)[0] == row["kept"]


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_switch_margin_decides_between_hand_and_other_records(case, local_tuning, tmp_path, margin):
    """With no margin the faster finalist is compiled; with a margin of 1 (100 % faster: impossible)
    every task keeps its hand schedule, and the selection holds nothing else, whatever the others ran."""
    mod, x, ref_mean, ref_var = case
    config, _, _ = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    report = tune.TuneReport()
    selection = tune.tune_module(mod, config=fast_config(copy, search=False, finalists=1, selection_rounds=1,
                                                         switch_margin=margin), report=report)
    assert report.switch_margin == margin and sorted(report.side_by_side) == sorted(report.other_ms)
    kept = report.kept()
    for task in tune.extract_tuning_tasks(mod, TARGET):
        name = task.task_name
        if name not in report.side_by_side:
            continue
        hand_ms, other_ms = report.hand_ms[name], report.other_ms[name]
        assert kept[name] == (report.other_source[name] if margin == 0.0 and other_ms < hand_ms else "hand")
        kind, seconds = _selected(selection, task)
        assert kind == kept[name] and seconds * 1e3 == pytest.approx(min(hand_ms, other_ms) if margin == 0.0 else hand_ms)
        assert tune.count_records(selection, task.dispatched[0]) == (1 if kind == "hand" else 2)
    mean, var = run_local(tune.compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, ref_mean, what="selected mean")
    assert_close(var, ref_var, what="selected var")


def test_switch_margin_must_be_a_fraction(tmp_path):
    with pytest.raises(ValueError, match="switch_margin must be a fraction in \\[0, 1\\], got 1.5"):
        fast_config(tmp_path, switch_margin=1.5)


def test_tuned_module_matches_untuned_and_reference(case, local_tuning):
    mod, x, ref_mean, ref_var = case
    config, database, _ = local_tuning
    tuned_mean, tuned_var = run_local(tune.compile_tuned(mod, TARGET, database), x)
    untuned_mean, untuned_var = run_local(tune.compile_untuned(mod, TARGET), x)
    np.testing.assert_allclose(tuned_mean, untuned_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tuned_var, untuned_var, rtol=1e-4, atol=1e-8)
    assert_close(tuned_mean, ref_mean, what="tuned mean")
    assert_close(tuned_var, ref_var, what="tuned var")


def test_compile_best_keeps_the_faster_module(case, local_tuning):
    mod, x, ref_mean, ref_var = case
    config, database, _ = local_tuning
    best = tune.compile_best(mod, database, config=config, number=5, repeat=3)
    assert best.kept in ("tuned", "untuned")
    assert best.tuned_ms > 0 and best.untuned_ms > 0
    assert (best.kept == "tuned") == (best.tuned_ms <= best.untuned_ms)
    mean, var = run_local(best.executable, x)
    assert_close(mean, ref_mean, what="best mean")
    assert_close(var, ref_var, what="best var")


def test_finalists_that_fail_to_run_leave_the_hand_schedules(case, local_tuning, tmp_path, caplog):
    """A run-off whose runs all fail (here: a 1 ms runner timeout) selects nothing: every task then
    compiles with its hand schedule, and the report says so rather than quoting old records."""
    mod, x, ref_mean, ref_var = case
    config, _, _ = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    report = tune.TuneReport()
    failing = fast_config(copy, search=False, runner_timeout_sec=1e-3, finalists=1, selection_rounds=1)  # few timeouts
    selection = tune.tune_module(mod, config=failing, report=report)
    assert "finalist failed to run" in caplog.text
    assert report.side_by_side == [] and report.other_ms == {} and report.other_source == {}
    assert set(report.kept().values()) == {"hand"}
    assert len(selection.get_all_tuning_records()) == 0
    mean, var = run_local(tune.compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, ref_mean, what="hand-schedule mean")
    assert_close(var, ref_var, what="hand-schedule var")


def test_second_call_reuses_the_database(case, local_tuning):
    mod = case[0]
    config, _, first = local_tuning
    before = tune.count_records(tune.open_database(config.work_dir))
    report = tune.TuneReport()
    again = tune.tune_module(mod, config=config, report=report)
    assert report.tuned == [] and sorted(report.skipped) == sorted(first.tuned)
    assert report.new_records == 0
    assert tune.count_records(tune.open_database(config.work_dir)) == before  # reloaded from the JSON files
    # a new run-off of the same tasks (its choices may differ: the host's noise decides near-ties)
    assert sorted(report.side_by_side) == sorted(first.side_by_side)
    _assert_selection_follows_report(mod, again, report, config.finalists)


def test_resume_from_records_without_state_file(case, local_tuning, tmp_path):
    """An interrupted run leaves records but no state entry: tasks with enough records are skipped."""
    mod = case[0]
    config, _, first = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    (copy / tune.STATE_FILE).unlink()
    database = tune.open_database(config.work_dir)  # every record (the fixture's is the run-off's)

    tasks = tune.extract_tuning_tasks(mod, TARGET)
    records = {t.task_name: tune.count_records(database, t.dispatched[0]) for t in tasks}
    assert sum(records.values()) == tune.count_records(database)
    records = {name: count for name, count in records.items() if name in first.tuned}
    report = tune.TuneReport()
    tune.tune_module(mod, config=fast_config(copy), report=report)
    assert report.records_before == tune.count_records(database)
    assert report.records_after >= report.records_before  # records are never dropped
    # tasks with trials_per_task records are finished and not measured again
    assert sorted(report.skipped) == sorted(name for name, count in records.items() if count >= TRIALS)
    if not report.tuned:  # only the hand schedules are measured again: the state that remembered them is gone
        assert report.new_records == len(report.hand_ms) == len(report.tasks)


def test_records_measured_with_other_threads_are_discarded(case, local_tuning, tmp_path, monkeypatch, caplog):
    """Timings taken on 1 thread do not compare with 2-thread ones: such a work dir starts over."""
    mod = case[0]
    config, database, first = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    state = json.loads((copy / tune.STATE_FILE).read_text())
    assert state["measured_with"] == "local:threads=1" == tune.measurement_setting(config)

    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    report = tune.TuneReport()
    tune.tune_module(mod, config=fast_config(copy, search=False), report=report)
    assert report.records_before == 0  # the 1-thread records were dropped ...
    assert "tuning starts over" in caplog.text
    assert json.loads((copy / tune.STATE_FILE).read_text())["measured_with"] == "local:threads=2"
    assert report.records_after == len(report.hand_ms) > 0  # ... and the hand schedules measured again

    again = tune.TuneReport()
    tune.tune_module(mod, config=fast_config(copy, search=False), report=again)
    assert again.records_before == report.records_after  # same setting: kept


# --------------------------------------------------------------------------- RPC

@pytest.fixture(scope="module")
def rpc_tracker(tmp_path_factory):
    """A real tracker and server (infra/rpc scripts) on 127.0.0.1; yields (address, key)."""
    logs = tmp_path_factory.mktemp("rpc_logs")
    port, server_port = free_port(), free_port()
    key = "pfp-test-cpu"
    env = dict(os.environ, PYTHON=sys.executable, TRACKER=f"127.0.0.1:{port}", RPC_KEY=key,
               SERVER_HOST="127.0.0.1", SERVER_PORT=str(server_port), SERVER_PORT_END=str(server_port + 1),
               TVM_NUM_THREADS="1")
    processes = []
    try:
        try:
            processes.append(start_tracker(env, port, logs / "tracker.log"))
            processes.append(start_process_group(["bash", str(RPC_DIR / "start-server.sh")], env, logs / "server.log"))
            wait_for_key(port, key, processes[1], logs / "server.log")
        except RuntimeError as error:
            pytest.fail(str(error))
        yield f"127.0.0.1:{port}", key
    finally:
        for process in reversed(processes):
            stop_process_group(process)


def test_rpc_tuning_and_inference(case, local_tuning, rpc_tracker, tmp_path):
    mod, x, ref_mean, ref_var = case
    address, key = rpc_tracker
    config = fast_config(tmp_path / "tune_rpc", rpc_tracker=address, rpc_key=key, trials_per_task=2,
                         num_trials_per_iter=2, max_trials_global=4)
    report = tune.TuneReport()
    database = tune.tune_module(mod, config=config, report=report)
    assert sorted(report.tuned) == ["fc1_dense_joint_first", "fc2_dense_joint", "reshape"]
    measured = [r for r in database.get_all_tuning_records() if r.run_secs is not None and len(r.run_secs)
                and all(float(s) < 1e9 for s in r.run_secs)]
    assert measured, "no candidate ran successfully on the RPC server"

    executable = tune.compile_tuned(mod, TARGET, database)
    local_mean, local_var = run_local(executable, x)
    path = tmp_path / "tuned.so"
    executable.export_library(str(path))
    host, port = tune.parse_tracker(address)
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
    with pytest.raises(tune.TrackerError, match=rf"{address}.*no server registered under key 'no-such-board'"):
        tune.tune_module(case[0], config=config)


def test_unreachable_tracker_is_a_clear_error(case, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = fast_config(tmp_path, rpc_tracker=address, rpc_key="rasp4b")
    start = time.monotonic()
    with pytest.raises(tune.TrackerError, match=rf"RPC tracker {address} \(key 'rasp4b'\) is unreachable"):
        tune.tune_module(case[0], config=config)
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- config / ARM

def test_config_validation():
    with pytest.raises(ValueError, match="set both rpc_tracker"):
        tune.TuneConfig(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(ValueError, match="host:port"):
        tune.TuneConfig(rpc_tracker="localhost", rpc_key="x")
    with pytest.raises(ValueError, match="trials_per_task"):
        tune.TuneConfig(trials_per_task=0)
    assert tune.parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)


def test_arm_target_needs_rpc(tmp_path):
    target = tb.make_target("rasp4b")
    if shutil.which(tb.ARM_CROSS_COMPILER) is None:
        with pytest.raises(RuntimeError, match="aarch64-linux-gnu-gcc"):
            tune.make_builder(target, fast_config(tmp_path))
    else:
        with pytest.raises(ValueError, match="rpc_tracker"):
            tune.make_builder(target, fast_config(tmp_path))


@pytest.mark.skipif(shutil.which(tb.ARM_CROSS_COMPILER) is None, reason="needs aarch64-linux-gnu-gcc")
def test_arm_export_hook_cross_links():
    a = tvm.te.placeholder((8,), name="a")
    b = tvm.te.compute((8,), lambda i: a[i] * 2.0, name="b")
    mod = tvm.IRModule({"main": tvm.te.create_prim_func([a, b])})
    rt_mod = tune.lean_build(mod, tb.make_target("rasp4b"))
    path = tune.export_aarch64_so(rt_mod, cc=shutil.which(tb.ARM_CROSS_COMPILER))
    header = Path(path).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


# --------------------------------------------------------------------------- tensor intrinsics import

def test_light_stack_gives_the_frames_and_lines_of_inspect_stack():
    def where():
        return tune._light_stack(), __import__("inspect").stack()

    light, full = where()
    assert len(light) == len(full)
    for mine, theirs in zip(light, full):
        assert mine.frame is theirs.frame
        assert (mine.filename, mine.lineno, mine.function) == (theirs.filename, theirs.lineno, theirs.function)
        assert mine.code_context == theirs.code_context and mine.index == theirs.index


def test_tensor_intrinsics_import_with_torch_loaded_restores_inspect():
    """In a fresh process with torch and pyro loaded (as in a stage): the intrinsics the Meta
    Scheduler looks up are registered, and ``inspect.stack`` is the standard one again."""
    import subprocess

    code = ("import inspect, sys, torch, pyro\n"
            "original = inspect.stack\n"
            "from pfp.backends.tvm import tune\n"
            "tune.import_tensor_intrinsics()\n"
            "import tvm\n"
            "assert 'tvm.s_tir.tensor_intrin' in sys.modules and inspect.stack is original\n"
            "from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN\n"
            "tvm.s_tir.TensorIntrin.get(VNNI_DOT_16x4_INTRIN)\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
