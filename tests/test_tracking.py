"""The connection to the tracking server: a server that does not answer fails a stage within seconds, naming the URI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pfp import tracking

from .common import write_model_artifacts
from .servers import free_port

REPO = Path(__file__).resolve().parents[1]


def test_closed_port_fails_the_stage_within_30_s_naming_the_uri(tmp_path):
    write_model_artifacts(tmp_path, "mlp")
    before = (tmp_path / "models/mlp/pfp.npz").read_bytes()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"models": ["mlp"], "train": {"mlp": {}}}))
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tasks.convert", "mlp"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    seconds = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"MLFLOW_TRACKING_URI={uri}: the MLflow tracking server does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30, f"took {seconds:.1f} s"
    assert (tmp_path / "models/mlp/pfp.npz").read_bytes() == before  # the stage wrote nothing: it stopped first


def test_a_live_server_passes_and_other_stores_need_none(mlflow_server):
    tracking.check_tracking_server(mlflow_server)
    tracking.check_tracking_server("sqlite:///nowhere/mlflow.db")  # no server to ask
    with pytest.raises(tracking.TrackingUnavailable, match="does not answer"):
        tracking.check_tracking_server(f"http://127.0.0.1:{free_port()}", timeout=1, attempts=1)


def test_pipeline_run_records_params_datasets_and_the_git_commit(mlflow_server, tmp_path, monkeypatch):
    """Two runs that differ in one param: the runs show the difference and both datasets' digests."""
    import hashlib
    import json

    from mlflow import MlflowClient

    from pfp.config import load_params

    from .common import write_prepared

    arrays = write_prepared(tmp_path)
    manifest_path = tmp_path / "data/prepared/manifest.json"  # the prepare stage records each array's sha256
    manifest = json.loads(manifest_path.read_text())
    manifest["array_sha256"] = {key: hashlib.sha256(value.tobytes()).hexdigest() for key, value in arrays.items()}
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setattr(tracking, "EXPERIMENT", "pfp-tracking-test")
    run_ids = []
    for seed in (0, 1):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": seed, "models": ["mlp"], "train": {"mlp": {}}}))
        with tracking.pipeline_run("pipeline") as run:
            run.log_params(load_params("params.yaml").model_dump(mode="json"))
            logged = run.log_prepared_datasets("data/prepared")
            run_ids.append(run.run_id)
    client = MlflowClient(mlflow_server)
    first, second = (client.get_run(run_id) for run_id in run_ids)
    assert first.data.params["seed"] == "0" and second.data.params["seed"] == "1"
    assert first.data.params["tune.trials_per_task"] == second.data.params["tune.trials_per_task"]
    assert first.data.tags["mlflow.source.git.commit"] == first.data.tags["git_commit"]
    digests = manifest["array_sha256"]
    for run in (first, second):
        inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
        assert set(inputs) == set(logged) == {"mnist_train", "mnist_val", "mnist_test", "ambiguous_train", "ambiguous_val",
                                              "ambiguous_test", "ood_test"}
        assert inputs["mnist_train"].dataset.digest == digests["mnist_train_x"][:32]
        assert {tag.value for tag in inputs["ood_test"].tags if tag.key == "mlflow.data.context"} == {"ood"}
        assert {tag.value for tag in inputs["mnist_val"].tags if tag.key == "mlflow.data.context"} == {"validation"}


# a stage that keeps one core busy with its run open until the server holds two samples (MLflow samples every
# 2 s here; under load its HTTP calls are slow, so the stage waits for the samples rather than a fixed time)
_SYSTEM_METRICS_STAGE = """
import time
from mlflow import MlflowClient
from pfp import tracking
with tracking.stage_run("tune@mlp", system_metrics=True) as run:
    client, deadline, checked = MlflowClient(), time.monotonic() + 90, 0.0
    while time.monotonic() < deadline:
        sum(range(10000))
        if time.monotonic() - checked > 1:
            checked = time.monotonic()
            if len(client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")) >= 2:
                break
print(run.run_id)
"""


def test_system_metrics_are_sampled_quietly(mlflow_server, tmp_path):
    """A stage run with system metrics: CPU and memory series on the server, nothing from MLflow's monitor on the terminal."""
    from mlflow import MlflowClient

    from .servers import source_env

    env = source_env(MLFLOW_TRACKING_URI=mlflow_server, PFP_MLFLOW_EXPERIMENT="pfp-system-metrics-test")
    env.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
    result = subprocess.run([sys.executable, "-c", _SYSTEM_METRICS_STAGE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", result.stderr  # MLflow's "Started monitoring system metrics" and the like stay off it
    run_id = result.stdout.split()[-1]  # after MLflow's "View run" lines
    client = MlflowClient(mlflow_server)
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run_id, "system/system_memory_usage_percentage")
    assert len(cpu) >= 2 and len(memory) == len(cpu), (len(cpu), len(memory))
    assert [point.step for point in cpu] == list(range(len(cpu)))
    assert all(0 < point.value <= 100 for point in memory)
    assert max(point.value for point in cpu) >= 25  # one of the two cores was busy (the busy loop above)
    seconds = (cpu[-1].timestamp - cpu[0].timestamp) / 1000 / (len(cpu) - 1)
    assert 1.5 <= seconds <= 10, seconds  # tracking.SYSTEM_METRICS_INTERVAL (2 s), not MLflow's 10 s
    assert "system/cpu_utilization_percentage" not in client.get_run(_plain_stage_run(mlflow_server, tmp_path)).data.metrics


def _plain_stage_run(uri: str, folder: Path) -> str:
    """A stage run without the option: no system metrics (the default)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(tracking, "EXPERIMENT", "pfp-system-metrics-test")
        with tracking.stage_run("convert@mlp") as run:
            time.sleep(2.5)
        return run.run_id


def test_experiment_opens_on_the_training_runs_and_stage_runs_log_their_splits(mlflow_server, tmp_path, monkeypatch):
    """The experiment kind the UI reads (a new experiment, one made without it, a user's choice kept); datasets per stage."""
    from mlflow import MlflowClient

    from .common import write_prepared

    write_prepared(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    kind = tracking.EXPERIMENT_KIND_TAG
    bare = client.create_experiment("pfp-made-without-a-kind")  # e.g. by an older version of this project
    chosen = client.create_experiment("pfp-chosen-kind", tags={kind: "genai_development"})
    monkeypatch.setattr(tracking, "EXPERIMENT", "pfp-kind-test")
    with tracking.stage_run("evaluate@mlp", datasets=["test", "ood"]) as run:
        pass
    made = client.get_experiment_by_name("pfp-kind-test")
    assert made.tags[kind] == "custom_model_development" and client.get_run(run.run_id).info.experiment_id == made.experiment_id
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    contexts = {item.dataset.name: {t.value for t in item.tags if t.key == "mlflow.data.context"} for item in inputs}
    assert contexts == {"mnist_test": {"test"}, "ambiguous_test": {"test"}, "ood_test": {"ood"}}
    for name, experiment_id, expected in (("pfp-made-without-a-kind", bare, "custom_model_development"),
                                          ("pfp-chosen-kind", chosen, "genai_development")):
        monkeypatch.setattr(tracking, "EXPERIMENT", name)
        with tracking.stage_run("train@mlp", datasets=["training"]) as run:
            pass
        assert client.get_experiment(experiment_id).tags[kind] == expected
        logged = {item.dataset.name for item in client.get_run(run.run_id).inputs.dataset_inputs}
        assert logged == {"mnist_train", "ambiguous_train"}
    with pytest.raises(ValueError, match=r"dataset contexts \['testing'\]: expected some of"):
        with tracking.stage_run("evaluate@mlp", datasets=["testing"]):
            pass


def test_ui_links_ask_for_the_model_training_view():
    assert (tracking.experiment_url("7", "http://127.0.0.1:5000/")
            == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert (tracking.run_url("7", "abc", "https://mlflow.example.org")
            == "https://mlflow.example.org/#/experiments/7/runs/abc?workflowType=machine_learning")
    assert tracking.experiment_url("7", "sqlite:///mlflow.db") is None and tracking.run_url("7", "abc", "file:///x") is None
