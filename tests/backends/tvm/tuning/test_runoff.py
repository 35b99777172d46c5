"""The run-off: each task's hand schedule and best other records measured side by side decide what is compiled."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from pfp.backends.tvm.pipeline import (  # noqa: E402
    SELECTION_DIR,
    compile_tuned,  # noqa: E402
    compiling_database,
)
from pfp.backends.tvm.tuning.config import ScheduleSource, TuneReport  # noqa: E402
from pfp.backends.tvm.tuning.records import count_records, open_database  # noqa: E402
from pfp.backends.tvm.tuning.search import extract_tuning_tasks, tune_module  # noqa: E402

from ..helpers import TARGET, assert_close, assert_selection_follows_report, fast_config, run_local, selected_record  # noqa: E402


def test_run_off_decides_what_is_compiled(case, local_tuning):
    """Every task with a Meta Scheduler record is measured against its hand schedule side by side,
    and the database tune_module returns compiles the faster one."""
    config, database, report = local_tuning
    selection = Path(config.work_dir) / SELECTION_DIR
    assert (selection / "database_tuning_record.json").stat().st_size > 0
    assert sorted(report.side_by_side) == sorted(report.tuned)  # the untunable ReLU has only its hand schedule
    assert_selection_follows_report(case[0], database, report, config.finalists)
    assert compiling_database(config.work_dir).get_all_tuning_records()  # what compile_module(TUNED) opens


def _planted_copy(mod, work_dir, tmp_path, task_name: str, make_trace):
    """A copy of ``work_dir`` whose database has one more record of ``task_name``, timed 1 ns (impossible):
    the trace ``make_trace(task, best_record)``. Returns (copy, task, workload)."""
    copy = tmp_path / "copy"
    shutil.copytree(work_dir, copy)
    records = open_database(copy)
    task = next(t for t in extract_tuning_tasks(mod, TARGET) if t.task_name == task_name)
    workload = records.commit_workload(task.dispatched[0])
    best = records.get_top_k(workload, 1)[0]
    records.commit_tuning_record(ms.database.TuningRecord(make_trace(task, best), workload, [1e-9], best.target,
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
    assert float(open_database(copy).get_top_k(workload, 1)[0].run_secs[0]) == 1e-9  # the search's best now

    report = TuneReport()
    selection = tune_module(mod, config=fast_config(copy), report=report)
    assert report.tuned == [] and "fc1_dense_joint_first" in report.side_by_side
    kind, seconds = selected_record(selection, task)
    assert seconds > 1e-8 and report.other_ms["fc1_dense_joint_first"] > 1e-5  # measured, not copied
    hand_ms, other_ms = report.hand_ms["fc1_dense_joint_first"], report.other_ms["fc1_dense_joint_first"]
    assert seconds * 1e3 == pytest.approx(other_ms if other_ms < hand_ms * (1 - report.switch_margin) else hand_ms)
    x = case[1]
    mean, var = run_local(compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, case[2], what="run-off mean")
    assert_close(var, case[3], what="run-off var")


def test_run_off_reports_an_earlier_hand_schedule_as_such(case, local_tuning, tmp_path):
    """A record that is neither the current hand schedule nor a search candidate (as earlier hand
    rules left in the database) competes in the run-off under its own name, never as a Meta Scheduler schedule."""
    mod = case[0]
    config, _, _ = local_tuning
    copy, task, _ = _planted_copy(mod, config.work_dir, tmp_path, "fc2_dense_joint", _hand_scheduled_another_way)
    report = TuneReport()
    selection = tune_module(mod, config=fast_config(copy, search=False, finalists=1), report=report)
    assert report.other_source["fc2_dense_joint"] is ScheduleSource.EARLIER_HAND
    row = next(row for row in report.table() if row["task"] == "fc2_dense_joint")
    assert row["other_source"] == "earlier_hand" and row["other_ms"] > 1e-5  # measured again
    assert row["kept"] == ("earlier_hand" if row["other_ms"] < row["hand_ms"] * (1 - report.switch_margin) else "hand")
    assert selected_record(selection, task)[0] == row["kept"]


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_switch_margin_decides_between_hand_and_other_records(case, local_tuning, tmp_path, margin):
    """With no margin the faster finalist is compiled; with a margin of 1 (100 % faster: impossible)
    every task keeps its hand schedule, and the selection holds nothing else, whatever the others ran."""
    mod, x, ref_mean, ref_var = case
    config, _, _ = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    report = TuneReport()
    selection = tune_module(mod, config=fast_config(copy, search=False, finalists=1, selection_rounds=1,
                                                         switch_margin=margin), report=report)
    assert report.switch_margin == margin and sorted(report.side_by_side) == sorted(report.other_ms)
    kept = report.kept()
    for task in extract_tuning_tasks(mod, TARGET):
        name = task.task_name
        if name not in report.side_by_side:
            continue
        hand_ms, other_ms = report.hand_ms[name], report.other_ms[name]
        assert kept[name] == (report.other_source[name] if margin == 0.0 and other_ms < hand_ms else "hand")
        kind, seconds = selected_record(selection, task)
        assert kind == kept[name] and seconds * 1e3 == pytest.approx(min(hand_ms, other_ms) if margin == 0.0 else hand_ms)
        assert count_records(selection, task.dispatched[0]) == (1 if kind == "hand" else 2)
    mean, var = run_local(compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, ref_mean, what="selected mean")
    assert_close(var, ref_var, what="selected var")


def test_finalists_that_fail_to_run_leave_the_hand_schedules(case, local_tuning, tmp_path, caplog):
    """A run-off whose runs all fail (here: a 1 ms runner timeout) selects nothing: every task then
    compiles with its hand schedule, and the report says so rather than quoting old records."""
    mod, x, ref_mean, ref_var = case
    config, _, _ = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    report = TuneReport()
    failing = fast_config(copy, search=False, runner_timeout_sec=1e-3, finalists=1, selection_rounds=1)  # few timeouts
    selection = tune_module(mod, config=failing, report=report)
    assert "finalist failed to run" in caplog.text
    assert report.side_by_side == [] and report.other_ms == {} and report.other_source == {}
    assert set(report.kept().values()) == {"hand"}
    assert len(selection.get_all_tuning_records()) == 0
    mean, var = run_local(compile_tuned(mod, TARGET, selection), x)
    assert_close(mean, ref_mean, what="hand-schedule mean")
    assert_close(var, ref_var, what="hand-schedule var")
