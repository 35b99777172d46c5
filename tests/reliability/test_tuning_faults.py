"""Faults injected into real tuning processes and real RPC servers, and probes of what a crash leaves behind.

* a tuning subprocess (this module run as ``python -m tests.reliability.test_tuning_faults``: the
  project's :func:`~pfp.backends.tvm.tuning.search.tune_module` on the tiny network of the tuning
  tests) killed with SIGKILL once the database holds search records: the rerun resumes, keeps
  every record, and the compiled module matches the PyTorch reference;
* a database whose last line a crash tore (TVM refused it: every later tuning failed) and the temp
  files a kill leaves in a work dir and a tune stage's output folder;
* a real tracker and two real RPC servers on loopback: one server hung (SIGSTOP) or killed while
  the tuning measures on them; then every server killed.

Each tuning runs in a subprocess with a wall-time bound: before the fix a hung server hung the tuning forever.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tvm")

from pfp.backends.tvm.tuning.records import RECORDS_FILE, WORKLOADS_FILE  # noqa: E402
from tests.backends.tvm.helpers import (  # noqa: E402
    RPC_DIR,
    SPEC,
    TARGET,
    fast_config,
    free_port,
    random_params,
    start_tracker,
    stop_process_group,
)
from tests.reliability.report import record  # noqa: E402
from tests.servers import REPO, source_env  # noqa: E402

KEY = "fault-test"
SESSION_TIMEOUT = 10  # seconds of one RPC session; its measurement's worker is killed 5 s later (measurement_bound)


def tiny_module():
    from pfp.backends.tvm.graph import build_pfp_module

    return build_pfp_module(SPEC, random_params(SPEC, seed=0), batch_size=1)


def _tune_main(argv: list[str]) -> None:
    """Subprocess entry: tune the tiny module in ``argv[0]``, options as JSON in ``argv[1]``; write the report to ``argv[2]``."""
    from pfp.backends.tvm.tuning.config import TuneReport
    from pfp.backends.tvm.tuning.measure import TrackerError
    from pfp.backends.tvm.tuning.search import tune_module

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    work_dir, options, out = argv[0], json.loads(argv[1]), Path(argv[2])
    report = TuneReport()
    start = time.monotonic()
    try:
        tune_module(tiny_module(), config=fast_config(work_dir, **options), report=report)
        error = None
    except TrackerError as caught:
        error = str(caught)
    out.write_text(json.dumps({"error": error, "seconds": time.monotonic() - start, "tuned": report.tuned,
                               "skipped": report.skipped, "records_before": report.records_before,
                               "records_after": report.records_after, "measurements": report.measurements}))


def start_tuning(work_dir: Path, options: dict, out: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.reliability.test_tuning_faults", str(work_dir), json.dumps(options), str(out)]
    with log.open("w") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env or source_env(), stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, bound: float) -> None:
    """Wait at most ``bound`` seconds for the tuning (and its workers: its process group) to end."""
    try:
        process.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the tuning did not end within {bound:.0f} s (hung?): {log.read_text()[-3000:]}")
    finally:
        stop_process_group(process)
    assert process.returncode == 0, log.read_text()[-3000:]


def record_lines(work_dir: Path) -> list[str]:
    path = work_dir / RECORDS_FILE
    return path.read_text().splitlines() if path.is_file() else []


# --------------------------------------------------------------------------- torn database, temp files

@pytest.fixture(scope="module")
def small_database(tmp_path_factory):
    """A JSON database of the tiny module: each tunable task's hand schedule as a record (nothing measured)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from pfp.backends.tvm.schedules import apply_hand_schedule
    from pfp.backends.tvm.targets import make_target
    from pfp.backends.tvm.tuning.records import open_database
    from pfp.backends.tvm.tuning.search import extract_tuning_tasks

    work_dir = tmp_path_factory.mktemp("db")
    database = open_database(work_dir)
    target = make_target(TARGET)
    for index, task in enumerate(extract_tuning_tasks(tiny_module(), target)):
        sch = s_tir.Schedule(task.dispatched[0])
        apply_hand_schedule(sch, target=target)
        workload = database.commit_workload(task.dispatched[0])
        args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
        for seconds in (1e-5, 2e-5):  # two records per workload
            database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [seconds * (index + 1)], target, args))
    return work_dir


def test_torn_database_recovered(small_database, tmp_path, caplog):
    """A kill mid-append tears the last line; TVM then refused the database. The torn tail is dropped, every whole record kept."""
    from tvm.s_tir import meta_schedule as ms

    from pfp.backends.tvm.tuning.records import count_records, open_database

    cases = 0
    # (1) the last record torn
    work_dir = tmp_path / "record"
    work_dir.mkdir()
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (work_dir / name).write_bytes((small_database / name).read_bytes())
    whole = record_lines(work_dir)
    text = (work_dir / RECORDS_FILE).read_text()
    (work_dir / RECORDS_FILE).write_text(text[: len(text) - len(whole[-1]) // 2])  # half the last line, no newline
    with pytest.raises(Exception, match="Unexpected"):  # the defect: TVM refuses the whole database
        ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    with caplog.at_level(logging.WARNING, logger="pfp.backends.tvm.tuning.records"):
        database = open_database(work_dir)
    assert count_records(database) == len(whole) - 1
    assert record_lines(work_dir) == whole[:-1]  # every whole record, byte for byte
    assert "dropped 1 torn line(s)" in caplog.text and f"kept 4 workload(s) and {len(whole) - 1} record(s)" in caplog.text
    # appends go on a line of their own: the database reopens with one more record
    existing = database.get_all_tuning_records()[0]
    database.commit_tuning_record(ms.database.TuningRecord(existing.trace, existing.workload, [3e-5], existing.target,
                                                           existing.args_info))
    assert count_records(open_database(work_dir)) == len(whole)
    cases += 1

    # (2) a whole last line without its newline (killed between the two writes): kept, newline added
    work_dir = tmp_path / "newline"
    work_dir.mkdir()
    for name in (WORKLOADS_FILE, RECORDS_FILE):
        (work_dir / name).write_bytes((small_database / name).read_bytes())
    (work_dir / RECORDS_FILE).write_text((small_database / RECORDS_FILE).read_text().rstrip("\n"))
    assert count_records(open_database(work_dir)) == len(whole)
    assert (work_dir / RECORDS_FILE).read_text().endswith("\n")
    cases += 1

    # (3) the last workload torn (its records were never written) and a record torn after it
    work_dir = tmp_path / "workload"
    work_dir.mkdir()
    workloads = (small_database / WORKLOADS_FILE).read_text().splitlines()
    (work_dir / WORKLOADS_FILE).write_text("\n".join(workloads[:-1]) + "\n" + workloads[-1][:100])
    kept = [line for line in whole if json.loads(line)[0] < len(workloads) - 1]
    (work_dir / RECORDS_FILE).write_text("\n".join(kept) + "\n" + kept[-1][:50])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pfp.backends.tvm.tuning.records"):
        database = open_database(work_dir)
    assert count_records(database) == len(kept)
    assert len((work_dir / WORKLOADS_FILE).read_text().splitlines()) == len(workloads) - 1
    assert "dropped 2 torn line(s)" in caplog.text
    cases += 1
    record("probe", "torn tuning database recovered", tried=cases, survived=cases)


def test_tuning_temp_files_cleaned(tmp_path):
    """What a killed tune stage leaves in models/M/tvm (staged builds, atomic-write temps, run-off staging, logs) is
    deleted before the next run, so DVC never caches it with the stage's output; the libraries and databases stay."""
    from pfp.tuning import clean_leftovers

    out = tmp_path / "models" / "mlp" / "tvm"
    host, work = out / "host", out / "host" / "pfp_b1"
    (work / ".selection-abc123").mkdir(parents=True)
    (work / ".selection-abc123" / RECORDS_FILE).write_text("[0,")
    (work / "logs").mkdir()
    (work / "logs" / "tvm.s_tir.meta_schedule.logging.task_0_fc1.log").write_text("...")
    leftovers = [host / ".pfp_b1.tuned.so", host / ".pfp_b1.tuned.so.json", host / ".pfp_b1.hand.so.weights.npz",
                 host / ".pfp_b1.so.json.k2j3.tmp.json", work / "pfp_tune_state.tmp",
                 work / ".pfp_tune_state.json.x8.tmp.json", work / ".database_tuning_record.json.q1.tmp.json"]
    kept = [host / "pfp_b1.so", host / "pfp_b1.so.json", work / RECORDS_FILE, work / WORKLOADS_FILE,
            work / "pfp_tune_state.json", work / "selection" / RECORDS_FILE]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = clean_leftovers(out)
    assert sorted(removed) == sorted(leftovers + [work / ".selection-abc123", work / "logs"])
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(kept)
    assert clean_leftovers(out) == []  # nothing left to clean
    record("probe", "tuning temp files cleaned", tried=len(removed), survived=len(removed))


# --------------------------------------------------------------------------- SIGKILL mid-search

def test_tuning_killed_with_sigkill_resumes(tmp_path):
    import torch

    from pfp.backends import torch_ref as ref
    from pfp.backends.tvm.pipeline import compile_tuned, compiling_database
    from pfp.backends.tvm.tuning.records import count_records, open_database
    from tests.backends.tvm.helpers import assert_close, run_local

    work_dir = tmp_path / "work"
    options = {"trials_per_task": 4, "max_trials_global": 12, "num_trials_per_iter": 2}
    first_tmp = tmp_path / "tmp1"
    first_tmp.mkdir()
    log = tmp_path / "first.log"
    process = start_tuning(work_dir, options, tmp_path / "first.json", log, env=source_env(TMPDIR=str(first_tmp)))
    # 4 hand schedules first; more lines are search records
    deadline = time.monotonic() + 300
    try:
        while len(record_lines(work_dir)) < 6:
            assert process.poll() is None, f"the tuning ended before it was killed: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no search records after 300 s: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the tuning and its builder and runner workers
        process.wait(timeout=30)
    finally:
        stop_process_group(process)
    assert process.returncode == -signal.SIGKILL
    before = record_lines(work_dir)
    whole = []
    for line in before:
        try:
            json.loads(line)
            whole.append(line)
        except json.JSONDecodeError:  # the kill may tear the last line
            pass
    assert len(whole) >= 6

    second_tmp = tmp_path / "tmp2"
    second_tmp.mkdir()
    log = tmp_path / "second.log"
    start = time.monotonic()
    process = start_tuning(work_dir, options, tmp_path / "second.json", log, env=source_env(TMPDIR=str(second_tmp)))
    finish(process, log, bound=600)
    seconds = time.monotonic() - start
    report = json.loads((tmp_path / "second.json").read_text())
    after = record_lines(work_dir)
    # resumed from the database: every record measured before the kill is kept, in order, and more were added
    assert after[: len(whole)] == whole
    assert report["records_before"] == len(whole) and report["records_after"] == len(after) > len(whole)
    assert report["tuned"], report  # the unfinished tasks were tuned again
    # no temp files in the work dir; the rerun left none of its builds in its TMPDIR
    assert not list(work_dir.glob(".selection-*")) and not list(work_dir.glob("*.tmp")) and not list(work_dir.glob(".*.tmp*"))
    assert not list(second_tmp.rglob("*.tar")) and not list(second_tmp.rglob("*.so")), sorted(second_tmp.rglob("*"))

    # the compiled result is valid: runs and matches the PyTorch reference
    mod = tiny_module()
    database = open_database(work_dir)
    assert count_records(database) == len(after)
    x = torch.randn(1, *SPEC.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(SPEC, random_params(SPEC, seed=0), x)
    mean, var = run_local(compile_tuned(mod, TARGET, compiling_database(work_dir)), x.numpy())
    assert_close(mean, ref_mean, what="mean after the resumed tuning")
    assert_close(var, ref_var, what="var after the resumed tuning")
    print(f"rerun after SIGKILL: {seconds:.0f} s, {len(whole)} records kept, {len(after) - len(whole)} new")
    record("fault", "tuning killed with SIGKILL mid-search", tried=1, survived=1)


# --------------------------------------------------------------------------- RPC servers hung or killed

def _count_servers(port: int) -> int:
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    return RPCConfig(tracker_host="127.0.0.1", tracker_port=port, tracker_key=KEY, session_timeout_sec=10).count_num_servers()


@pytest.fixture
def two_servers(tmp_path):
    """A real tracker and two real RPC servers under KEY on loopback; yields (tracker address, [server processes])."""
    logs = tmp_path / "rpc_logs"
    logs.mkdir()
    port = free_port()
    env = dict(os.environ, PYTHON=sys.executable, TVM_NUM_THREADS="1")
    tracker = start_tracker(env, port, logs / "tracker.log")
    servers = []
    try:
        for index in range(2):
            server_port = free_port()
            server_env = dict(env, TRACKER=f"127.0.0.1:{port}", RPC_KEY=KEY, SERVER_HOST="127.0.0.1",
                              SERVER_PORT=str(server_port), SERVER_PORT_END=str(server_port + 1))
            with (logs / f"server{index}.log").open("w") as out:  # not niced: a starved server overruns its sessions
                servers.append(subprocess.Popen(["bash", str(RPC_DIR / "start-server.sh")], env=server_env, stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 120
        while _count_servers(port) < 2:
            assert time.monotonic() < deadline, "the RPC servers did not register within 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", [(server, logs / f"server{index}.log") for index, server in enumerate(servers)]
    finally:
        for server in servers:
            try:
                os.killpg(server.pid, signal.SIGCONT)  # a stopped process group cannot handle SIGTERM
            except ProcessLookupError:
                pass
            stop_process_group(server)
        stop_process_group(tracker)


def signal_when_serving(servers, sig: int, timeout: float = 120.0) -> int:
    """Send ``sig`` to the first of ``servers`` ((process, log)) seen in a session (its log: a "start serving" not
    yet followed by "finish serving"), i.e. mid-measurement; returns its index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for index, (server, log) in enumerate(servers):
            text = log.read_text()
            if server.poll() is None and text.count("start serving") > text.count("finish serving"):
                os.killpg(server.pid, sig)
                return index
        time.sleep(0.01)
    pytest.fail(f"no RPC server was seen measuring within {timeout:.0f} s")


def _tune_with_fault(tmp_path, address, fault) -> tuple[dict, float, str]:
    """Tune over RPC; ``fault()`` runs once the hand schedules are recorded (the search measures next)."""
    work_dir = tmp_path / "work"
    options = {"rpc_tracker": address, "rpc_key": KEY, "trials_per_task": 4, "max_trials_global": 12,
               "num_trials_per_iter": 4, "session_timeout_sec": SESSION_TIMEOUT, "finalists": 0,
               "min_repeat_ms": 100}  # each measurement's session lasts 0.2 s or more: a fault can land inside one
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "tune.log"
    process = start_tuning(work_dir, options, tmp_path / "report.json", log)
    try:
        deadline = time.monotonic() + 300
        while len(record_lines(work_dir)) < 4 and process.poll() is None:
            assert time.monotonic() < deadline, f"no hand records after 300 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        fault()
        faulted = time.monotonic()
        # the bound: the search of 12 candidates (about a minute here) plus one session time-out per hung server
        finish(process, log, bound=240 + 2 * SESSION_TIMEOUT)
    finally:
        stop_process_group(process)
    return json.loads((tmp_path / "report.json").read_text()), time.monotonic() - faulted, log.read_text()


def test_rpc_server_hung_during_measurement(tmp_path, two_servers):
    address, servers = two_servers
    report, seconds, log = _tune_with_fault(tmp_path, address, lambda: signal_when_serving(servers, signal.SIGSTOP))
    assert report["error"] is None, report["error"]
    search = [m for m in report["measurements"] if m["phase"] == "search"]
    failed = [m for m in search if m["ms"] is None]
    # the server stopped mid-measurement: that measurement was killed at the time-out, and the other server
    # measured every other candidate (the stopped one never went back to the tracker's queue)
    assert len(failed) == 1 and failed[0]["board"] == "unknown", failed
    assert failed[0]["error"] == f"RPCRunner: Timeout, killed after {SESSION_TIMEOUT} seconds", failed  # TVM's text
    assert failed[0]["start"] is None  # its session never ended (no board log line)
    assert "1 measurement(s) of the search phase failed" in log
    boards = {m["board"] for m in search if m["ms"] is not None}
    assert len(boards) == 1 and len(search) - len(failed) >= 6, search  # (a task may exhaust its space early)
    assert sorted(report["tuned"]) == ["fc1_dense_joint_first", "fc2_dense_joint", "reshape"]
    assert seconds < 240 + 2 * SESSION_TIMEOUT
    print(f"one server hung: {len(failed)} measurement failed, the tuning went on; {seconds:.0f} s after the fault")
    record("fault", "RPC server hung (SIGSTOP) during measurement", tried=1, survived=1)


def test_rpc_server_killed_during_measurement(tmp_path, two_servers):
    address, servers = two_servers
    tried = survived = 0
    # (1) one server killed mid-measurement: that measurement fails at once (or, killed while the session was
    # being set up, TVM's client asks the tracker again and gets the other server), the tracker drops the
    # server, and the search goes on with the other
    killed, faulted_at = [], []

    def kill_one():
        killed.append(signal_when_serving(servers, signal.SIGKILL))
        faulted_at.append(time.time())

    report, seconds, _ = _tune_with_fault(tmp_path / "one", address, kill_one)
    tried += 1
    assert report["error"] is None, report["error"]
    search = [m for m in report["measurements"] if m["phase"] == "search"]
    failed = [m for m in search if m["ms"] is None]
    assert len(search) >= 6 and len(failed) <= 1 and all("Timeout" not in m["error"] for m in failed), search
    survivor = {m["board"] for m in search if m["ms"] is not None and m["start"] > faulted_at[0]}
    assert len(survivor) == 1, search  # after the kill, one board measured everything
    assert sorted(report["tuned"]) == ["fc1_dense_joint_first", "fc2_dense_joint", "reshape"]
    assert seconds < 240 + 2 * SESSION_TIMEOUT
    survived += 1
    # (2) the last server killed: every measurement fails at once, and the tuning stops naming the tracker and key
    report, seconds, _ = _tune_with_fault(tmp_path / "all", address,
                                          lambda: signal_when_serving([servers[1 - killed[0]]], signal.SIGKILL))
    tried += 1
    assert report["error"] is not None and f"has no server registered under key {KEY!r}" in report["error"], report
    assert "tuning stopped" in report["error"] and address in report["error"]
    search = [m for m in report["measurements"] if m["phase"] == "search"]
    # the measurement in the killed session fails at once on its board (the socket is gone), or, killed while its
    # session was being set up, asks the tracker again and waits in its queue: killed at the bound (a Timeout);
    # every later one fails at once, naming the key, instead of waiting out its own time-out
    assert search and all(m["ms"] is None for m in search), search
    in_session = [m for m in search if m["error"].startswith("RPCRunner: Timeout")
                  or (m["board"] != "unknown" and "Socket" in m["error"])]
    assert len(in_session) <= 1 and all("no RPC server is registered under key" in m["error"]
                                        for m in search if m not in in_session), search
    assert seconds < 180, f"{seconds:.0f} s after the last server was killed"
    survived += 1
    record("fault", "RPC server killed during measurement", tried=tried, survived=survived)


if __name__ == "__main__":
    _tune_main(sys.argv[1:])
