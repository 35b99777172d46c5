"""Tuning fans out over the boards under one tracker key, and records which board measured what.

A real tracker and two real RPC servers (infra/rpc/*.sh) on loopback, registered under one key;
one comparison run (pfp.backends.tvm.tuning.fanout) tunes the tiny module measuring on one board at
a time, then on both at once. Speed is not asserted (a shared 2-core host); that both boards measured,
that they measured at the same time only when fanned out, and that every record names its board is.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from pfp.backends.tvm.tuning.boards import busy_seconds, concurrency  # noqa: E402
from pfp.backends.tvm.tuning.config import TuneConfig  # noqa: E402
from pfp.backends.tvm.tuning.fanout import compare_fanout, main  # noqa: E402
from pfp.backends.tvm.tuning.records import open_database  # noqa: E402
from pfp.backends.tvm.tuning.search import extract_tuning_tasks  # noqa: E402

from ..helpers import (  # noqa: E402
    RPC_DIR,
    TARGET,
    fast_config,
    free_port,
    start_process_group,
    start_tracker,
    stop_process_group,
    wait_for_key,
)

KEY = "fanout-test"


def wait_for_servers(port: int, count: int, server, log, timeout: float = 60.0) -> None:
    import time

    from tvm.s_tir.meta_schedule.runner import RPCConfig

    wait_for_key(port, KEY, server, log, timeout)
    rpc_config = RPCConfig(tracker_host="127.0.0.1", tracker_port=port, tracker_key=KEY, session_timeout_sec=10)
    deadline = time.monotonic() + timeout
    while rpc_config.count_num_servers() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} servers under {KEY!r} after {timeout:.0f} s: {log.read_text()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def two_boards(tmp_path_factory):
    """A tracker and two x86 RPC servers under KEY on 127.0.0.1; yields (tracker address, server addresses)."""
    logs = tmp_path_factory.mktemp("fanout_logs")
    port = free_port()
    env = dict(os.environ, PYTHON=sys.executable, TVM_NUM_THREADS="1")
    processes, addresses = [], []
    try:
        processes.append(start_tracker(env, port, logs / "tracker.log"))
        for index in range(2):
            server_port = free_port()
            addresses.append(f"127.0.0.1:{server_port}")
            server_env = dict(env, TRACKER=f"127.0.0.1:{port}", RPC_KEY=KEY, SERVER_HOST="127.0.0.1",
                              SERVER_PORT=str(server_port), SERVER_PORT_END=str(server_port + 1))
            log = logs / f"server{index}.log"
            processes.append(start_process_group(["bash", str(RPC_DIR / "start-server.sh")], server_env, log))
        wait_for_servers(port, 2, processes[-1], logs / "server1.log")
        yield f"127.0.0.1:{port}", addresses
    finally:
        for process in reversed(processes):
            stop_process_group(process)


@pytest.fixture(scope="module")
def comparison(case, two_boards, tmp_path_factory):
    address, _ = two_boards
    # 2 tunable tasks x 4 trials, in batches of 4: the runner gets 4 candidates at a time; candidates
    # run >= 2 x 20 ms, so two sessions at once overlap in time
    config = fast_config(tmp_path_factory.mktemp("unused"), rpc_tracker=address, rpc_key=KEY, trials_per_task=4,
                         max_trials_global=8, num_trials_per_iter=4, min_repeat_ms=20, finalists=0)
    reports = {}
    work_dir = tmp_path_factory.mktemp("fanout")
    result = compare_fanout(case[0], config, work_dir, reports)
    return result, reports, work_dir


def test_the_runner_measures_on_both_boards_at_once(two_boards, comparison):
    _, servers = two_boards
    result, reports, _ = comparison
    one, every = result["one"], result["all"]
    # parallelism follows the servers the tracker reports under the key
    assert every["rpc_workers"] == reports["all"].rpc_workers == 2 and one["rpc_workers"] == 1
    # both boards measured search candidates, and only the fanned-out run had two sessions open at once
    assert set(every["boards"]) == set(servers) and all(count > 0 for count in every["boards"].values())
    assert every["most_at_once"] == 2 and one["most_at_once"] == 1
    for run in (one, every):
        assert run["trials"] == 8 and run["failed"] == 0 and sum(run["boards"].values()) == 8
        # both rates exist (their ratio is the benchmark's business, not a unit test's)
        assert run["trials_per_second"] > 0 and run["measured_per_second"] > 0
        assert 0 < run["measuring_seconds"] <= run["search_seconds"]
    assert result["speedup"]["trials_per_second"] > 0 and result["speedup"]["measured_per_second"] > 0


def test_every_measurement_names_its_board_and_matches_a_record(case, two_boards, comparison):
    _, servers = two_boards
    _, reports, work_dir = comparison
    report = reports["all"]
    assert {item["phase"] for item in report.measurements} == {"hand", "search"}  # no run-off (finalists=0)
    assert all(item["board"] in servers and item["start"] <= item["end"] for item in report.measurements)
    assert busy_seconds(report.measurements) > 0 and concurrency(report.measurements) == 2
    # each search measurement is a database record of its task, with the same median
    database = open_database(work_dir / "all")
    tasks = {task.task_name: task for task in extract_tuning_tasks(case[0], TARGET)}
    for item in report.measurements:
        task = tasks[item["task"]]
        medians = [1e3 * float(np.median([float(v) for v in record.run_secs]))
                   for record in database.get_top_k(database.commit_workload(task.dispatched[0]), 256)]
        assert any(np.isclose(item["ms"], value, rtol=1e-6) for value in medians), item


def test_comparison_refuses_a_used_work_dir_and_the_local_runner(case, comparison, tmp_path):
    _, _, work_dir = comparison
    config = TuneConfig(rpc_tracker="127.0.0.1:9", rpc_key=KEY)
    with pytest.raises(ValueError, match="fresh work dir"):
        compare_fanout(case[0], config, work_dir)
    with pytest.raises(ValueError, match="RPC boards"):
        compare_fanout(case[0], TuneConfig(), tmp_path)
    with pytest.raises(ValueError, match="cooldown_ms rests an RPC board"):
        TuneConfig(cooldown_ms=5)
    with pytest.raises(ValueError, match="rpc_workers"):
        TuneConfig(rpc_tracker="127.0.0.1:9", rpc_key=KEY, rpc_workers=0)


def test_command_names_a_dead_tracker(capsys):
    port = free_port()
    assert main(["--tracker", f"127.0.0.1:{port}", "--key", KEY, "--trials", "1"]) == 2
    assert f"RPC tracker 127.0.0.1:{port} (key '{KEY}') is unreachable" in capsys.readouterr().err
