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
