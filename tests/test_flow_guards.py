"""flows/guards.py and the flow's helpers: one run per workspace (real processes), one measurement per board key
(a real Prefect server), retries only for transient errors, params overrides, the run's Prefect artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows import artifacts, guards
from tests.servers import source_env

HOLDER = """
import sys, time
from pathlib import Path
from flows.guards import workspace_lock
with workspace_lock(Path(sys.argv[1]), flow_run="run-1"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(workspace: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(workspace)], stdout=subprocess.PIPE, text=True,
                               env=source_env())
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_run_of_a_workspace_is_refused_naming_the_holder_until_it_ends(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(guards.WorkspaceBusy) as refused:
            with guards.workspace_lock(tmp_path):
                pytest.fail("two runs held one workspace")
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message and "flow run run-1" in message
        with guards.workspace_lock(tmp_path / "other"):  # another workspace is free
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a killed run leaves no stale lock: the kernel drops it
        holder.wait()
    with guards.workspace_lock(tmp_path):
        pass


def test_board_slot_lets_one_measurement_at_a_time_per_key(prefect_api_url):
    intervals: dict[str, list[tuple[float, float]]] = {"k1": [], "k2": []}

    def measure(key: str) -> None:
        with guards.board_slot(key):
            start = time.monotonic()
            time.sleep(0.5)
            intervals[key].append((start, time.monotonic()))

    threads = [threading.Thread(target=measure, args=(key,)) for key in ("k1", "k1", "k2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    (a_start, a_end), (b_start, b_end) = sorted(intervals["k1"])
    assert a_end <= b_start  # the same key: one after the other
    assert len(intervals["k2"]) == 1
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(guards.board_limit_name("k1"))
    assert limit.limit == 1 and limit.active_slots == 0  # released
    with guards.board_slot(None):  # host-only stages hold nothing
        pass


def test_only_transient_stage_failures_are_retried():
    from prefect.states import Completed, Failed

    from flows.console import StageFailed
    from flows.pipeline import failure_detail, is_transient

    def failed(detail):
        return Failed(data=StageFailed("tune@mlp", 1, "log", detail))

    log = "Running stage 'prepare':\n> python -m tasks.prepare\nerror: data.mnist_dir=/x: no IDX files\n" \
          "ERROR: failed to reproduce 'prepare': failed to run: python -m tasks.prepare, exited with 2\n"
    assert failure_detail(log) == "error: data.mnist_dir=/x: no IDX files"
    assert failure_detail("ERROR: failed to reproduce 'x'\n") == "ERROR: failed to reproduce 'x'"
    tracking = ("error: MLFLOW_TRACKING_URI=http://127.0.0.1:9: the MLflow tracking server does not answer "
                "(connection refused; 3 tries)")
    assert is_transient(None, None, failed(tracking))
    assert is_transient(None, None, failed("error: RPC session to tracker 127.0.0.1:9190 timed out while requesting"))
    assert not is_transient(None, None, failed("error: data.mnist_dir=/x: no IDX files"))
    assert not is_transient(None, None, failed("timed out after 240 min and was stopped"))
    assert not is_transient(None, None, failed(None))
    assert not is_transient(None, None, Completed())


def test_run_overrides_make_a_requested_params_file_and_bad_ones_are_refused(tmp_path):
    from flows.pipeline import requested_params

    base = tmp_path / "base.yaml"
    base.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
    assert requested_params(tmp_path / "ws", str(base), {"models": None}) == base  # no override: the file itself
    path = requested_params(tmp_path / "ws", str(base), {"models": ["lenet"], "bundle.targets": ["host"],
                                                         "data.mnist_dir": "relative/mnist"})
    values, original = yaml.safe_load(path.read_text()), yaml.safe_load(base.read_text())
    assert values["models"] == ["lenet"] and values["bundle"]["targets"] == ["host"]
    assert values["bundle"]["batch_sizes"] == original["bundle"]["batch_sizes"]  # the rest of the section kept
    assert values["data"]["mnist_dir"] == str(Path("relative/mnist").resolve())
    assert values["data"]["ood_dir"] == original["data"]["ood_dir"]
    from pfp.config import ConfigError

    with pytest.raises(ConfigError, match="models"):
        requested_params(tmp_path / "ws", str(base), {"models": ["resnet"]})
    from flows.workspace import REPO_ROOT

    with pytest.raises(ValueError, match="repo workspace"):
        requested_params(REPO_ROOT, None, {"models": ["mlp"]})


def test_artifact_contents():
    metrics = {"mlp": {"pfp": {"accuracy": 0.97321, "nll": 0.1, "ece": 0.01, "auroc_mi": 0.9, "auroc_sme": 0.8, "sets": {}},
                       "deployed": {"accuracy": 0.97}}}
    rows = artifacts.metrics_rows(metrics)
    assert rows[0] == {"model": "mlp", "method": "pfp", "accuracy": 0.9732, "NLL": 0.1, "ECE": 0.01, "OOD AUROC (MI)": 0.9,
                       "OOD AUROC (SME)": 0.8}
    assert rows[1]["accuracy"] == 0.97 and rows[1]["NLL"] is None
    text = artifacts.promotion_markdown({"mlp": {"registered_model": "pfp-mlp", "version": "3", "promoted": False,
                                                 "reason": "accuracy 0.95 < 0.96", "champion_after": "2"}})
    assert "| mlp | pfp-mlp | 3 | not promoted | accuracy 0.95 < 0.96 | 2 |" in text
    assert artifacts.mlflow_run_link("http://h:5000/", "7", "abc") == \
        "http://h:5000/#/experiments/7/runs/abc?workflowType=machine_learning"  # the model-training view
    assert artifacts.mlflow_run_link("sqlite:///x/mlflow.db", "7", "abc").startswith("mlflow ui --backend-store-uri sqlite")


def test_a_stage_past_its_time_out_is_stopped_with_its_children(tmp_path):
    from flows.pipeline import _run_logged

    log = tmp_path / "stage.log"
    pid_file = tmp_path / "child.pid"
    # the stage's own child (as dvc's python is) must go too: the whole process group is stopped
    command = ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; echo started; wait"]
    start = time.monotonic()
    assert _run_logged(command, str(tmp_path), dict(os.environ), str(log), timeout=2) is None
    assert time.monotonic() - start < 30 and "started" in log.read_text()
    child = int(pid_file.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stage's child {child} outlived the time-out")
    assert _run_logged(["true"], str(tmp_path), dict(os.environ), None, timeout=10) == 0
