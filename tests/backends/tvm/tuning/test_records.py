"""Tuning records: where a record comes from, and records measured under another runner setting."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends.tvm.tuning.config import ScheduleSource, TuneReport  # noqa: E402
from pfp.backends.tvm.tuning.records import STATE_FILE, hand_trace_text, measurement_setting, open_database, record_source  # noqa: E402
from pfp.backends.tvm.tuning.search import extract_tuning_tasks, tune_module  # noqa: E402

from ..helpers import TARGET, fast_config  # noqa: E402


def test_record_source_tells_hand_earlier_hand_and_search_apart(case, local_tuning):
    """The current hand trace is "hand"; a search candidate's trace went through the Meta
    Scheduler's postprocessors; any other trace is an earlier version of the hand rules."""
    config, _, _ = local_tuning
    records = open_database(config.work_dir)
    task = next(t for t in extract_tuning_tasks(case[0], TARGET) if t.task_name == "fc1_dense_joint_first")
    hand = hand_trace_text(task)
    sources = [record_source(r.trace, hand) for r in records.get_top_k(records.commit_workload(task.dispatched[0]), 256)]
    assert sources.count(ScheduleSource.HAND) == 1
    assert sources.count(ScheduleSource.META_SCHEDULE) == len(sources) - 1 >= 1
    unscheduled = tvm.s_tir.Schedule(task.dispatched[0]).trace  # no decisions, no postprocessing
    assert record_source(unscheduled, hand) is ScheduleSource.EARLIER_HAND
    assert record_source(unscheduled, None) is ScheduleSource.EARLIER_HAND


def test_records_measured_with_other_threads_are_discarded(case, local_tuning, tmp_path, monkeypatch, caplog):
    """Timings taken on 1 thread do not compare with 2-thread ones: such a work dir starts over."""
    mod = case[0]
    config, database, first = local_tuning
    copy = tmp_path / "copy"
    shutil.copytree(config.work_dir, copy)
    state = json.loads((copy / STATE_FILE).read_text())
    assert state["measured_with"] == "local:threads=1" == measurement_setting(config)

    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    report = TuneReport()
    tune_module(mod, config=fast_config(copy, search=False), report=report)
    assert report.records_before == 0  # the 1-thread records were dropped ...
    assert "tuning starts over" in caplog.text
    assert json.loads((copy / STATE_FILE).read_text())["measured_with"] == "local:threads=2"
    assert report.records_after == len(report.hand_ms) > 0  # ... and the hand schedules measured again

    again = TuneReport()
    tune_module(mod, config=fast_config(copy, search=False), report=again)
    assert again.records_before == report.records_after  # same setting: kept
