"""Scheduled retraining for real: a Prefect server, the pipeline's deployment on a process work pool and a
worker that runs its flow runs, on loopback (the workspace of the shared tiny run, tests/e2e/conftest.py)."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from tests.servers import prefect_worker

from .flow_run import STAGES, _pipeline_env

FINAL_TIMEOUT = 1200


@pytest.fixture(scope="module")
def prefect_api(prefect_api_url, tmp_path_factory, mlflow_server):
    """The session's Prefect server, the deployment's work pool and a worker on it (with the tiny runs' MLflow server)."""
    from flows import deployment

    root = tmp_path_factory.mktemp("prefect_worker")
    deployment.ensure_work_pool()
    worker_env = {**_pipeline_env(mlflow_server), "PREFECT_HOME": str(root / "home")}
    with prefect_worker(prefect_api_url, deployment.POOL, root / "worker.log", worker_env) as worker:
        yield prefect_api_url, worker, root / "worker.log"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_final(run_ids, worker, worker_log: Path, timeout: float = FINAL_TIMEOUT) -> list:
    """Poll the API until every flow run is final; fail with the worker's log if the worker died or time ran out."""
    deadline = time.monotonic() + timeout
    seen: dict = {run_id: set() for run_id in run_ids}
    with _client() as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
            for run in runs:
                seen[run.id].add(run.state.name)
            if all(run.state.is_final() for run in runs):
                return runs, seen
            assert worker.poll() is None, f"the worker exited: {worker_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"runs not final after {timeout} s: {[r.state.name for r in runs]}\n" \
                                                f"{worker_log.read_text()[-3000:]}"
            time.sleep(2)


def _artifacts(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


def _logs(flow_run_id, *expected: str, timeout: float = 60) -> str:
    """The flow run's log messages, once they hold every ``expected`` text (a process sends its last logs in a
    batch that may reach the server after the run's final state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        messages: list[str] = []
        with _client() as client:
            while True:
                page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        limit=200, offset=len(messages))
                messages += [log.message for log in page]
                if len(page) < 200:
                    break
        text = "\n".join(messages)
        if all(item in text for item in expected) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def _task_runs(flow_run_id, expected=(), timeout: float = 60) -> dict:
    """Task run name -> task run, once every ``expected`` name is there in a final state (the server records
    task runs from their events, which may arrive after the flow run's final state)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with _client() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        found = {run.name: run for run in runs}
        if all(name in found and found[name].state and found[name].state.is_final() for name in expected) \
                or time.monotonic() > deadline:
            return found
        time.sleep(1)


def _reverse_idx(path: Path, header: int) -> None:
    """New data arrived: the same images in the opposite order (new file hashes, a new training set)."""
    raw = gzip.decompress(path.read_bytes())
    body = np.frombuffer(raw[header:], dtype=np.uint8)
    count = int.from_bytes(raw[4:8], "big")
    path.write_bytes(gzip.compress(raw[:header] + body.reshape(count, -1)[::-1].tobytes()))


def test_deployment_runs_on_a_worker_queued_skipping_and_retraining_on_new_data(prefect_api, tiny_pipeline):
    from flows import deployment
    from flows.artifacts import METRICS_KEY, MLFLOW_KEY, PROMOTION_KEY, STAGES_KEY

    _, worker, worker_log = prefect_api
    deployment.deploy(cron="0 3 * * 0", parameters={"workdir": str(tiny_pipeline.workdir),
                                                    "params": str(tiny_pipeline.params_file)})
    with _client() as client:
        deployed = client.read_deployment_by_name(f"{deployment.FLOW_NAME}/{deployment.DEPLOYMENT}")
    assert deployed.work_pool_name == deployment.POOL and deployed.schedules[0].schedule.cron == "0 3 * * 0"
    assert deployed.global_concurrency_limit.limit == 1

    # Two runs triggered together, nothing changed since the shared tiny run: the second waits for the
    # first (never interleaved), and each skips every stage after one `dvc status`.
    first, second = deployment.trigger(), deployment.trigger()
    (first, second), seen = _wait_final([first.id, second.id], worker, worker_log)
    assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
    ordered = sorted((first, second), key=lambda run: run.start_time)
    assert ordered[0].end_time <= ordered[1].start_time  # serialized by the deployment's concurrency limit
    for run in (first, second):
        assert "nothing changed since the last run" in _logs(run.id, "nothing changed since the last run")
        assert run.total_run_time.total_seconds() < 60
        stages = _artifacts(run.id)[STAGES_KEY].data
        assert '"skipped"' in stages and '"ran"' not in stages

    # New data in the MNIST folder: the next run retrains what depends on it, and the gate decides.
    images = tiny_pipeline.data / "mnist" / "train-images-idx3-ubyte.gz"
    labels = tiny_pipeline.data / "mnist" / "train-labels-idx1-ubyte.gz"
    _reverse_idx(images, 16)
    _reverse_idx(labels, 8)
    retrain = deployment.trigger()
    (retrain,), _ = _wait_final([retrain.id], worker, worker_log)
    assert retrain.state.is_completed(), _logs(retrain.id, timeout=0)[-3000:]
    task_runs = _task_runs(retrain.id, STAGES)
    assert set(STAGES) <= set(task_runs)  # each stage, a task named after it
    assert all(task_runs[stage].state.is_completed() for stage in STAGES)
    expected = [f"stage {stage}: ran" for stage in ("prepare", "train@mlp", "train@lenet")]
    logs = _logs(retrain.id, *expected, "Running stage 'train@lenet'")
    for stage in ("prepare", "train@mlp", "train@lenet"):
        assert f"stage {stage}: ran" in logs and f"Running stage '{stage}'" in logs  # DVC's lines in Prefect's log
    found = _artifacts(retrain.id)
    assert {STAGES_KEY, METRICS_KEY, PROMOTION_KEY, MLFLOW_KEY} <= set(found)
    assert '"model": "lenet"' in found[METRICS_KEY].data and '"method": "pfp"' in found[METRICS_KEY].data
    assert "pfp-lenet" in found[PROMOTION_KEY].data and "| 2 |" in found[PROMOTION_KEY].data  # version 2 was gated
    assert f"]({tiny_pipeline.tracking_uri}/#/experiments/" in found[MLFLOW_KEY].data  # a link to the run's page


def test_failed_stage_shows_its_cause_in_the_prefect_api(prefect_api, tmp_path):
    from flows import deployment

    _, worker, worker_log = prefect_api
    empty = tmp_path / "no-images"
    empty.mkdir()
    # its own deployment on the same pool and worker (the retraining test's runs in the shared tiny run's workspace)
    deployment.deploy(cron=None, parameters={"workdir": str(tmp_path / "workspace")}, name="failure-paths")
    name = f"{deployment.FLOW_NAME}/failure-paths"
    run = deployment.trigger({"workdir": str(tmp_path / "workspace"), "params": str(tmp_path / "missing.yaml"),
                              "retries": 0}, name=name)
    (run,), _ = _wait_final([run.id], worker, worker_log, timeout=300)
    assert run.state.is_failed()
    assert "missing.yaml" in run.state.message  # a params file that is not there: named in the run's state

    import yaml

    from tests.e2e.flow_run import TINY_PARAMS

    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({**TINY_PARAMS, "models": ["mlp"]}))
    run = deployment.trigger({"workdir": str(tmp_path / "workspace"), "params": str(params), "mnist_dir": str(empty),
                              "retries": 0}, name=name)
    (run,), _ = _wait_final([run.id], worker, worker_log, timeout=300)
    assert run.state.is_failed() and "stage prepare failed" in run.state.message
    logs = _logs(run.id, "stage prepare failed: error:", str(empty))
    assert "stage prepare failed: error:" in logs and str(empty) in logs  # the stage's own error line, via the API
    assert _task_runs(run.id, ["prepare"])["prepare"].state.is_failed()
