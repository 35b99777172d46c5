"""The whole-model guard's parts: the host-load sampler under real busy loops, the decision rule, and the
guard on compiled modules (its busy re-measurement and hand fallback)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("tvm")

from pfp.backends.base import Schedule  # noqa: E402
from pfp.backends.tvm.pipeline import compile_pfp  # noqa: E402
from pfp.backends.tvm.tuning.guard import GuardConfig, HostLoad, choose, guard_modules  # noqa: E402
from pfp.serving_bench import BusyLoad  # noqa: E402
from pfp.spec import Dense, Flatten, ModelSpec, ReLU  # noqa: E402

from ..helpers import SPEC, random_params  # noqa: E402


def _spin(cpu_seconds: float) -> None:
    """Use this much CPU time (a shared host may give less than a core: wall time is bounded at 20x)."""
    start, deadline = time.process_time(), time.perf_counter() + 20 * cpu_seconds
    while time.process_time() - start < cpu_seconds and time.perf_counter() < deadline:
        pass


def test_busy_host_is_detected_with_a_busy_loop_on_every_core():
    with BusyLoad(2) as load, HostLoad(busy_fraction=0.25) as host:
        time.sleep(1.5)  # this process idle: the busy loops have both cores
    evidence = host.evidence
    assert evidence["busy"] and evidence["cores"] >= 2
    # two spinning processes on two cores: well above the threshold, whatever else runs
    assert evidence["other_cpu_fraction"] > 0.6 and evidence["other_cpu_seconds"] > 1.5
    # the evidence lists the processes that used the most CPU meanwhile, heaviest first (on a shared host the busy
    # loops may be outnumbered: only the list's consistency is asserted)
    used = [p["cpu_seconds"] for p in evidence["top_processes"]]
    assert used == sorted(used, reverse=True) and 0 < sum(used) <= evidence["other_cpu_seconds"] + 0.5
    assert all("while True" in p["command"] for p in evidence["top_processes"] if p["pid"] in load.report["pids"])


def test_own_cpu_is_not_counted_as_another_process():
    """Quiet or not (a shared host), this process's own spinning is its own: the other processes' share is
    what remains of the host's busy time, and never more than all cores."""
    with HostLoad(busy_fraction=0.25) as host:
        _spin(0.5)
    evidence = host.evidence
    assert evidence["own_cpu_seconds"] >= 0.45
    assert 0.0 <= evidence["other_cpu_fraction"] <= 1.0
    # what this process used is not the others': together at most all cores (ticks of slack)
    assert evidence["other_cpu_seconds"] + evidence["own_cpu_seconds"] <= evidence["seconds"] * evidence["cores"] + 0.1
    assert evidence["busy"] == (evidence["other_cpu_fraction"] > 0.25)


def test_choose_keeps_tuned_within_the_margin_else_hand():
    assert choose(1.0, 1.0, 0.03) == "tuned" and choose(1.02, 1.0, 0.03) == "tuned" and choose(0.5, 1.0, 0.0) == "tuned"
    assert choose(1.04, 1.0, 0.03) == "hand" and choose(3.9, 1.0, 0.03) == "hand"
    assert choose(0.5, 1.0, 0.03, busy=True) == "hand"  # figures from a busy host are not trusted


@pytest.fixture(scope="module")
def modules():
    params = random_params(SPEC, seed=0)
    return compile_pfp(SPEC, params, batch_size=4), compile_pfp(SPEC, params, batch_size=4)


def test_a_host_that_stays_busy_is_measured_again_then_keeps_hand(modules):
    tuned, hand = modules
    config = GuardConfig(rounds=3, turn_ms=5, busy_retries=1, busy_wait_sec=0.0)
    with BusyLoad(2):
        guard = guard_modules(tuned, hand, config)
    assert guard["host_busy"] is True and len(guard["attempts"]) == 2 and guard["kept"] == "hand"
    assert all(attempt["host"]["busy"] for attempt in guard["attempts"]) and "busy" in guard["reason"]
    assert guard["tuned_ms"] > 0 and guard["hand_ms"] > 0 and len(guard["attempts"][0]["samples_ms"]["tuned"]) == 3


def test_identical_builds_are_timed_once(modules):
    tuned, _ = modules
    guard = guard_modules(tuned, None, GuardConfig(rounds=2, turn_ms=5, busy_retries=3, busy_wait_sec=30.0))
    assert guard["identical"] and guard["kept"] == "tuned" and guard["tuned_ms"] == guard["hand_ms"] > 0
    assert len(guard["attempts"]) == 1 and guard["ratio"] == 1.0  # never re-measured, even on a busy host


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="rounds"):
        GuardConfig(rounds=0)
    with pytest.raises(ValueError, match="margin"):
        GuardConfig(margin=1.5)


#: a first layer large enough that a bad schedule of it shows in the whole model's time
WIDE = ModelSpec("wide", (1, 28, 28), (Flatten(), Dense("fc1", 784, 100), ReLU(), Dense("fc2", 100, 10)))


@pytest.fixture(scope="module")
def slow_and_hand(tmp_path_factory):
    """The same PFP module twice: with a deliberately bad schedule of its first layer from a database record
    (reduction loop outermost: strided, serial, scalar), and all-hand."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from pfp.backends.tvm.graph import build_pfp_module
    from pfp.backends.tvm.targets import make_target
    from pfp.backends.tvm.tuning.records import open_database
    from pfp.backends.tvm.tuning.search import extract_tuning_tasks

    params = random_params(WIDE, seed=1)
    target = make_target("host")
    (task,) = [task for task in extract_tuning_tasks(build_pfp_module(WIDE, params, batch_size=10), target)
               if task.task_name == "fc1_dense_joint_first"]
    func = task.dispatched[0]
    sch = s_tir.Schedule(func)
    b, o, k = sch.get_loops(sch.get_sblock("dense_joint_first_acc"))
    sch.reorder(k, o, b)
    database = open_database(tmp_path_factory.mktemp("bad_record"))
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, database.commit_workload(func), [1e-9], target,
                                                           ms.arg_info.ArgInfo.from_prim_func(func["main"])))
    return (compile_pfp(WIDE, params, batch_size=10, schedule=Schedule.TUNED, database=database),
            compile_pfp(WIDE, params, batch_size=10))


def test_guard_times_on_the_rpc_board_that_tuned(slow_and_hand, rpc_tracker):
    """Over RPC (a real tracker and server on this host) the modules run on the board; the board is not sampled."""
    address, key = rpc_tracker
    slow, hand = slow_and_hand
    guard = guard_modules(slow, hand, GuardConfig(rounds=5, turn_ms=20, margin=0.25, rpc_tracker=address, rpc_key=key))
    assert guard["runner"] == f"rpc:{key}@{address}" and guard["host_busy"] is None and guard["busy_evidence"] is None
    assert guard["kept"] == "hand" and guard["ratio"] > 1.5 and len(guard["attempts"]) == 1
    assert len(guard["attempts"][0]["samples_ms"]["hand"]) == 5 and 0.001 < guard["hand_ms"] < 5
