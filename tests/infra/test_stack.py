"""infra/stack.sh for real: one `up` on free loopback ports in a temporary state folder brings up PostgreSQL,
the MLflow server on it (proxied artifacts), a Prefect server, a worker on the process pool, the RPC tracker and
the emulated Pi; the tests then use each service as a client would, and `down` must leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from ..servers import REPO, free_port

STACK = REPO / "infra" / "stack.sh"
SERVICES = ("postgres", "mlflow", "prefect-server", "prefect-worker", "tracker", "board")
BOARD_KEY = "rasp4b-emulated"


@dataclass
class Stack:
    state: Path
    env: dict[str, str]
    ports: dict[str, int]
    up_output: str

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text().splitlines()[0])


def run_stack(command: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), command], env=env, capture_output=True, text=True, timeout=timeout)


def stack_env(state: Path, ports: dict[str, int], board: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("STACK_", "PREFECT_", "MLFLOW_"))}
    return dict(env, STACK_DIR=str(state), STACK_PG_PORT=str(ports["pg"]), STACK_MLFLOW_PORT=str(ports["mlflow"]),
                STACK_PREFECT_PORT=str(ports["prefect"]), STACK_TRACKER_PORT=str(ports["tracker"]),
                STACK_BOARD_PORT=str(ports["board"]), STACK_BOARD=board, VENV=str(Path(sys.executable).parents[1]))


def state_folder() -> Path:
    """A fresh state folder the `postgres` user can reach (pytest's tmp_path sits under a 0700 folder)."""
    state = Path(tempfile.mkdtemp(prefix="pfp-stack-", dir="/tmp"))
    state.chmod(0o755)
    return state


def get_json(url: str, body: bytes | None = None):
    import json

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def port_free(port: int) -> bool:
    """A server could listen on ``port`` (with SO_REUSEADDR, as servers do: closed connections may linger in TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def stack():
    """The stack with the emulated Pi, up once for this module; `down` at the end whatever happened."""
    state = state_folder()
    ports = {name: free_port() for name in ("pg", "mlflow", "prefect", "tracker", "board")}
    env = stack_env(state, ports, board="emulated-pi")
    start = time.monotonic()
    try:
        result = run_stack("up", env)
        print(f"stack up in {time.monotonic() - start:.1f} s")
        if result.returncode != 0:
            pytest.fail(f"infra/stack.sh up failed (exit {result.returncode}):\n{result.stderr[-4000:]}", pytrace=False)
        yield Stack(state, env, ports, result.stdout)
    finally:
        run_stack("down", env, timeout=300)
        shutil.rmtree(state, ignore_errors=True)


def test_up_prints_and_writes_the_client_environment(stack):
    expected = {
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "PREFECT_API_URL": stack.prefect_url,
        "PFP_RPC_TRACKER": f"127.0.0.1:{stack.ports['tracker']}",
        "PFP_RPC_KEY": BOARD_KEY,
    }
    for name, value in expected.items():
        assert f"export {name}={value}\n" in stack.up_output
    # `source STATE/env` gives a shell exactly these values
    shown = subprocess.run(["bash", "-c", f"source {stack.state}/env && env"], capture_output=True, text=True, check=True,
                           env={"PATH": os.environ["PATH"]}).stdout.splitlines()
    assert {line.split("=", 1)[0]: line.split("=", 1)[1] for line in shown if "=" in line}.items() >= expected.items()

    status = run_stack("status", {name: value for name, value in stack.env.items() if not name.startswith("STACK_")
                                  or name == "STACK_DIR"}, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert set(rows) == set(SERVICES)
    for service in SERVICES:  # the ports come from the record of `up`, not from this environment
        assert rows[service].endswith("healthy"), status.stdout
        assert str(stack.pid(service)) in rows[service]
    assert stack.mlflow_url in rows["mlflow"]


def test_mlflow_runs_land_in_postgres_and_artifacts_go_through_the_proxy(stack, tmp_path):
    import psycopg
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url)
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.003")
    client.log_metric(run.info.run_id, "acc", 0.875)
    note = tmp_path / "note.txt"
    note.write_text("through the proxy\n")
    client.log_artifact(run.info.run_id, str(note), artifact_path="reports")
    client.set_terminated(run.info.run_id)

    # the server chose a proxied location and stored the file under its --artifacts-destination
    assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run.info.run_id}/artifacts"
    stored = stack.state / "mlflow" / "artifacts" / experiment_id / run.info.run_id / "artifacts" / "reports" / "note.txt"
    assert stored.read_text() == "through the proxy\n"
    assert [f.path for f in client.list_artifacts(run.info.run_id, "reports")] == ["reports/note.txt"]

    # and the run itself is in PostgreSQL (the stack's mlflow database, password from its secrets folder)
    password = (stack.state / "secrets" / "mlflow-db-password").read_text().strip()
    with psycopg.connect(host="127.0.0.1", port=stack.ports["pg"], user="mlflow", password=password, dbname="mlflow") as db:
        status, = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
        value, = db.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'lr'", (run.info.run_id,)).fetchone()
        metric, = db.execute("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'acc'", (run.info.run_id,)).fetchone()
        location, = db.execute("SELECT artifact_location FROM experiments WHERE experiment_id = %s", (int(experiment_id),)).fetchone()
    assert (status, value, metric, location) == ("FINISHED", "0.003", 0.875, f"mlflow-artifacts:/{experiment_id}")
    assert not list((stack.state / "mlflow").glob("*.db")), "no SQLite store next to the artifacts"


def test_prefect_server_and_a_worker_on_the_process_pool(stack):
    assert get_json(f"{stack.prefect_url}/health") is True
    pool = get_json(f"{stack.prefect_url}/work_pools/pfp-process")
    assert pool["type"] == "process"
    workers = get_json(f"{stack.prefect_url}/work_pools/pfp-process/workers/filter", b"{}")
    online = [worker["name"] for worker in workers if worker["status"] == "ONLINE"]
    assert len(online) == 1 and online[0].startswith("pfp-stack-"), workers

    # the worker runs flows from the repo root, with the stack's services in the environment it hands them
    worker = psutil.Process(stack.pid("prefect-worker"))
    assert worker.cwd() == str(REPO)
    environ = worker.environ()
    assert environ["PREFECT_API_URL"] == stack.prefect_url
    assert environ["MLFLOW_TRACKING_URI"] == stack.mlflow_url
    assert environ["PFP_RPC_TRACKER"] == f"127.0.0.1:{stack.ports['tracker']}"
    assert psutil.Process(stack.pid("prefect-server")).environ()["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"

    # the Prefect server keeps its state in the stack's PostgreSQL cluster (database prefect), not in SQLite
    import psycopg

    password = (stack.state / "secrets" / "prefect-db-password").read_text().strip()
    with psycopg.connect(host="127.0.0.1", port=stack.ports["pg"], user="prefect", password=password, dbname="prefect") as db:
        pools = db.execute("SELECT name, type FROM work_pool").fetchall()
        rows = db.execute("SELECT worker.name FROM worker JOIN work_pool ON worker.work_pool_id = work_pool.id "
                          "WHERE work_pool.name = 'pfp-process'").fetchall()
    assert ("pfp-process", "process") in pools
    assert [name for name, in rows] == online
    assert not list((stack.state / "prefect").glob("*.db"))


def test_the_tracker_reports_the_emulated_pi(stack):
    import tvm.rpc

    queue = tvm.rpc.connect_tracker("127.0.0.1", stack.ports["tracker"]).summary()["queue_info"]
    assert queue[BOARD_KEY]["free"] == 1, queue


def test_up_again_changes_nothing_and_other_ports_are_refused(stack):
    pids = {service: stack.pid(service) for service in SERVICES}
    again = run_stack("up", stack.env)
    assert again.returncode == 0, again.stderr
    assert {service: stack.pid(service) for service in SERVICES} == pids
    for service in SERVICES:
        assert f"{service}: already running (pid {pids[service]}" in again.stderr
    other = run_stack("up", dict(stack.env, STACK_MLFLOW_PORT=str(free_port())), timeout=60)
    assert other.returncode == 1
    assert "running with other settings: STACK_MLFLOW_PORT=" in other.stderr and "down' first" in other.stderr


FLOW = """
import json, os
from prefect import flow

@flow
def stack_probe(out: str) -> None:
    with open(out, "w") as handle:
        json.dump({"cwd": os.getcwd(), "mlflow": os.environ.get("MLFLOW_TRACKING_URI")}, handle)
"""


@pytest.mark.slow
def test_the_worker_runs_a_deployment(stack, tmp_path):
    """A deployment on the pool, triggered through the API, runs to completion in the worker with the stack's
    environment (about 20 s more; the pipeline's own deployment is tested with the flows)."""
    (tmp_path / "probe.py").write_text(FLOW)
    script = f"""
import json, sys
from prefect import flow
from prefect.deployments import run_deployment
flow.from_source(source={str(tmp_path)!r}, entrypoint="probe.py:stack_probe").deploy(
    name="probe", work_pool_name="pfp-process", print_next_steps=False, ignore_warnings=True)
run = run_deployment("stack-probe/probe", parameters={{"out": {str(tmp_path / "out.json")!r}}}, timeout=240)
print(run.state.type.value)
"""
    env = dict(stack.env, PREFECT_API_URL=stack.prefect_url, PREFECT_HOME=str(tmp_path / "prefect-home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "COMPLETED", result.stdout
    assert json.loads((tmp_path / "out.json").read_text()) == {"cwd": str(tmp_path), "mlflow": stack.mlflow_url}


def test_down_stops_every_process_and_frees_the_ports(stack):
    processes = []
    for service in SERVICES:
        process = psutil.Process(stack.pid(service))
        processes += [process, *process.children(recursive=True)]
    assert len(processes) > len(SERVICES)  # servers with workers (uvicorn, postgres backends, the RPC popen worker)

    result = run_stack("down", stack.env, timeout=300)
    assert result.returncode == 0, result.stderr
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    assert "still running" not in result.stderr  # each service stopped on SIGTERM (PostgreSQL: pg_ctl stop)
    assert not (stack.state / "pg" / "data" / "postmaster.pid").exists()
    assert not list((stack.state / "pids").iterdir())
    for name, port in stack.ports.items():
        assert port_free(port), f"port {port} ({name}) still in use"
    status = run_stack("status", stack.env, timeout=120)
    assert status.returncode == 1
    assert [line.split()[-1] for line in status.stdout.splitlines()[1:]] == ["down"] * len(SERVICES), status.stdout
    assert run_stack("down", stack.env, timeout=60).returncode == 0  # a second down is harmless


@pytest.mark.parametrize("broken", ["taken-port", "no-postgres"])
def test_up_fails_fast_naming_the_service(broken, tmp_path):
    state = state_folder()
    ports = {name: free_port() for name in ("pg", "mlflow", "prefect", "tracker", "board")}
    env = stack_env(state, ports, board="none")
    env["STACK_PG_BIN"] = str(tmp_path / "no-such-postgres") if broken == "no-postgres" else env.get("STACK_PG_BIN", "")
    env = {name: value for name, value in env.items() if value}
    with socket.socket() as taken:
        if broken == "taken-port":
            taken.bind(("127.0.0.1", ports["mlflow"]))
            taken.listen()
        try:
            start = time.monotonic()
            result = run_stack("up", env, timeout=120)
            seconds = time.monotonic() - start
            started = sorted(path.name for path in (state / "pids").glob("*.pid"))
        finally:
            run_stack("down", env, timeout=120)
            shutil.rmtree(state, ignore_errors=True)
    assert result.returncode == 1
    expected = {"taken-port": f"mlflow: port {ports['mlflow']} on 127.0.0.1 is in use by another program",
                "no-postgres": f"no PostgreSQL at {tmp_path / 'no-such-postgres'}"}[broken]
    assert expected in result.stderr
    assert started == [], "the checks come before any service starts"
    assert seconds < 30


def test_up_names_a_service_that_does_not_answer_in_time():
    """STACK_TIMEOUT=1: no Prefect server (nor PostgreSQL, under load) answers within a second; `up` must name the one
    it gave up on and show its log, and `down` must then stop what had started."""
    state = state_folder()
    ports = {name: free_port() for name in ("pg", "mlflow", "prefect", "tracker", "board")}
    env = dict(stack_env(state, ports, board="none"), STACK_TIMEOUT="1")
    try:
        result = run_stack("up", env, timeout=300)
        started = [path.stem for path in (state / "pids").glob("*.pid")]
        down = run_stack("down", env, timeout=300)
        left = [path.name for path in (state / "pids").glob("*.pid")]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert result.returncode == 1
    failed = re.search(r"stack: error: (postgres|prefect-server) (did not start \(pg_ctl start\)|did not answer within 1 s)\n"
                       r"stack: last lines of (\S+):", result.stderr)
    assert failed, result.stderr
    assert failed[3] == f"{state}/logs/{failed[1]}.log"
    assert "stop them with: " in result.stderr and started, result.stderr
    assert down.returncode == 0 and left == []
