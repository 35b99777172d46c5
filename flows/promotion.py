"""The flow's last step: publish each model's bundle to the MLflow registry and run the promotion gate.

Per model: one MLflow run ``publish@MODEL`` (nested under the pipeline run) logs the bundle as a
pyfunc model (:mod:`pfp.mlflow_model`), registers it as a version of ``pfp-MODEL`` carrying its
evaluation, and the gate (:func:`pfp.registry.promote`, limits in ``promote:``) moves the
``champion`` alias to it or leaves it where it was; the decision is recorded on the run and
printed as a table. A refused challenger is not an error.

    from flows.promotion import publish_and_promote
    publish_and_promote(str(workspace), run.run_id)     # inside the flow, after the benchmark
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from pfp import tracking
from pfp.config import CompileTarget, load_params
from pfp.registry import evaluation_from_metrics, publish_bundle
from pfp.stage import PREPARED_DIR, bundle_dir

EXAMPLE_IMAGES = 3


def example_images(workspace: Path):
    """A few real test images of the prepared data (the logged model's input example)."""
    import numpy as np

    path = workspace / PREPARED_DIR / "dirty_mnist.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared data not found; run the prepare stage first")
    with np.load(path, allow_pickle=False) as arrays:
        return arrays["mnist_test_x"][:EXAMPLE_IMAGES]


@contextmanager
def _in_workspace(workspace: Path) -> Iterator[None]:
    """cwd = the workspace: its default MLflow store (mlflow.db) and its data manifest."""
    previous = Path.cwd()
    os.chdir(workspace)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _publish_run(model: str, parent_run_id: str | None) -> Iterator[tracking.StageRun]:
    """The MLflow run ``publish@MODEL``, nested under the pipeline run.

    Unlike the stages (subprocesses), this step runs in the flow's process, where the pipeline
    run is the active run: the run is started nested (``tracking.stage_run`` would refuse).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    if parent_run_id:
        experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = tracking.use_experiment(mlflow)
    tags = {"pfp.stage": f"publish@{model}", "pfp.model": model, "git_commit": tracking.git_commit()}
    manifest = Path("data/prepared/manifest.json")
    if manifest.is_file():
        tags["data_hash"] = json.loads(manifest.read_text()).get("data_hash", "unknown")
    with mlflow.start_run(run_name=f"publish@{model}", experiment_id=experiment_id, tags=tags, nested=True,
                          parent_run_id=parent_run_id) as run:
        yield tracking.StageRun(mlflow, run)


def publish_models(workspace: str | Path, parent_run_id: str | None = None, params: str | Path | None = None) -> dict[str, dict]:
    """Publish and gate every configured model; returns model -> decision (``GateDecision.to_dict()``)."""
    from mlflow import MlflowClient

    workspace = Path(workspace).resolve()
    config = load_params(Path(params) if params else workspace / "params.yaml")
    evaluate = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    latency_path = workspace / "metrics" / "latency.json"
    latency = json.loads(latency_path.read_text()) if latency_path.is_file() else None
    serving_path = workspace / "metrics" / "serving.json"
    serving = json.loads(serving_path.read_text()) if serving_path.is_file() else None
    images = example_images(workspace)
    decisions = {}
    with _in_workspace(workspace):
        for architecture in config.models:
            model = architecture.value
            evaluation = evaluation_from_metrics(evaluate, latency, model, serving)
            with _publish_run(model, parent_run_id) as run:
                run.log_metrics({f"gate.{key}": value for key, value in asdict(evaluation).items() if value is not None})
                client = MlflowClient(tracking_uri=tracking.tracking_uri())
                bundle = workspace / bundle_dir(model, CompileTarget.HOST.value)
                decision = publish_bundle(client, model, bundle, evaluation, images, run_id=run.run_id, config=config.promote)
            print(decision.table(), flush=True)
            decisions[model] = decision.to_dict()
    return decisions


@task(name="publish-and-promote")
def publish_and_promote(workspace: str, parent_run_id: str | None = None, params: str | None = None) -> dict:
    """Prefect task around :func:`publish_models` (a refused challenger is logged, not raised)."""
    logger = get_run_logger()
    decisions = publish_models(workspace, parent_run_id, params)
    for model, decision in decisions.items():
        logger.info("%s: %s v%s %s (%s); champion v%s", model, decision["registered_model"], decision["version"],
                    "promoted" if decision["promoted"] else "not promoted", decision["reason"], decision["champion_after"])
    return decisions
