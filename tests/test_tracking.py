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
