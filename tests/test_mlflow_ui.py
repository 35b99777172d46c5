"""The MLflow UI as a new user sees it: headless Chromium on a real tracking server (scripts/mlflow_ui_screenshot.py).

Slow (a server, a bundle, a browser: about a minute) and opt-in; needs Debian's Chromium and the
Python package playwright, and is skipped, saying which is missing, without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pfp import tracking

from .common import write_prepared
from .servers import REPO, mlflow_tracking_server, source_env

SCRIPT = REPO / "scripts" / "mlflow_ui_screenshot.py"
CHROMIUM = os.environ.get("PFP_CHROMIUM", "/usr/bin/chromium")
EXPERIMENT = "pfp-ui-check"


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM}: no Chromium (Debian package chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the Python package playwright is not installed"
    return None


# skipped before the fixtures build a bundle and a server
pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _populate(workspace: Path, bundle: Path) -> dict[str, str]:
    """Runs the way the flow logs them: a pipeline run with every split, stage runs with theirs, a published bundle."""
    from flows.promotion import publish_models

    write_prepared(workspace)
    (workspace / "params.yaml").write_text(yaml.safe_dump({"models": ["lenet"], "train": {"lenet": {"epochs": 1}}}))
    (workspace / "metrics").mkdir()
    pfp = {"accuracy": 0.97, "nll": 0.1, "ece": 0.01, "auroc_mi": 0.9}
    (workspace / "metrics" / "evaluate.json").write_text(json.dumps({"lenet": {"pfp": pfp}}))
    shutil.copytree(bundle, workspace / "models" / "lenet" / "bundle" / "host")
    runs = {}
    with tracking.pipeline_run("pipeline") as pipeline:
        pipeline.log_prepared_datasets(workspace / "data" / "prepared")
        publish_models(workspace, pipeline.run_id)
    runs["pipeline"] = pipeline.run_id
    os.environ[tracking.PARENT_RUN_ENV] = pipeline.run_id  # as the flow gives it to the stage processes
    try:
        for stage, datasets in (("train@lenet", ["training"]), ("evaluate@lenet", ["test", "ood"]), ("convert@lenet", None)):
            with tracking.stage_run(stage, datasets=datasets) as run:
                runs[stage] = run.run_id
    finally:
        os.environ.pop(tracking.PARENT_RUN_ENV, None)
    return runs


def _screenshot(uri: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", uri, "--experiment", EXPERIMENT, "--output", str(output),
                           "--timeout", "60", *extra], cwd=REPO, env=source_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_experiment_opens_on_its_runs_with_datasets_and_models(tmp_path, lenet_bundle, monkeypatch):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(tracking, "EXPERIMENT", EXPERIMENT)
    with mlflow_tracking_server(tmp_path / "mlflow") as uri:  # its own registry: pfp-lenet v1 is this test's
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        _populate(workspace, lenet_bundle)

        good = _screenshot(uri, tmp_path / "runs.png")
        assert good.returncode == 0, good.stdout + good.stderr
        # 5 runs: pipeline, publish@lenet, 3 stages; datasets on pipeline, train and evaluate; the model on publish@lenet
        assert f"ok: experiment {EXPERIMENT} (5 runs, 3 with datasets, 1 with models)" in good.stdout
        png = (tmp_path / "runs.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

        # the bare experiment link: MLflow 3.17 shows a new browser its GenAI view there (the check can fail, and says why)
        bare = _screenshot(uri, tmp_path / "bare.png", "--plain", "--timeout", "15")
        assert bare.returncode == 1, bare.stdout + bare.stderr
        assert "no runs table" in bare.stderr and "workflowType=genai" in bare.stderr
        assert (tmp_path / "bare.png").is_file()

    # no server: exit 2, one clear line
    down = _screenshot(uri, tmp_path / "down.png")
    assert down.returncode == 2 and "the MLflow tracking server does not answer" in down.stderr, down.stderr
