"""Prefect artifacts of a pipeline run: what the Prefect UI's run page shows without opening MLflow.

Keys (lowercase, dashes) make each artifact a series across runs on the UI's Artifacts page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flows.console import SUMMARY_METRICS

METRICS_KEY = "pfp-headline-metrics"
PROMOTION_KEY = "pfp-promotion"
MLFLOW_KEY = "pfp-mlflow-run"
STAGES_KEY = "pfp-stages"


def metrics_rows(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model and method with the headline metrics (metrics/evaluate.json's layout)."""
    rows = []
    for model, methods in metrics.items():
        for method, values in methods.items():
            row: dict[str, Any] = {"model": model, "method": method}
            for key, title in SUMMARY_METRICS:
                value = values.get(key)
                row[title] = round(value, 4) if isinstance(value, (int, float)) else None
            rows.append(row)
    return rows


def promotion_markdown(promotion: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["# Promotion gate", "", "| model | registered | version | decision | reason | champion after |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model, decision in promotion.items():
        verdict = "promoted to champion" if decision.get("promoted") else "not promoted"
        lines.append(f"| {model} | {decision.get('registered_model')} | {decision.get('version')} | {verdict} | "
                     f"{decision.get('reason')} | {decision.get('champion_after') or '-'} |")
    return "\n".join(lines) + "\n"


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (a server), or the ``mlflow ui`` command that shows a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (experiment {experiment_id}, run {run_id})"


def publish(*, metrics: Mapping | None, promotion: Mapping | None, stages: Mapping[str, str],
            seconds: Mapping[str, float], tracking_uri: str | None = None, run_id: str | None = None) -> list[str]:
    """Create the run's artifacts in the current flow run; returns their keys."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    keys = []
    create_table_artifact([{"stage": stage, "outcome": outcome, "seconds": round(seconds.get(stage, 0.0), 1)}
                           for stage, outcome in stages.items()],
                          key=STAGES_KEY, description="Each DVC stage: ran or skipped (nothing it depends on changed)")
    keys.append(STAGES_KEY)
    if metrics:
        create_table_artifact(metrics_rows(metrics), key=METRICS_KEY,
                              description="MNIST test set; OOD AUROC: MNIST vs Fashion-MNIST")
        keys.append(METRICS_KEY)
    if promotion:
        create_markdown_artifact(promotion_markdown(promotion), key=PROMOTION_KEY,
                                 description="The promotion gate's decision per model")
        keys.append(PROMOTION_KEY)
    if tracking_uri and run_id:
        import mlflow

        experiment_id = mlflow.get_run(run_id).info.experiment_id
        link = mlflow_run_link(tracking_uri, experiment_id, run_id)
        if link.startswith("http"):
            create_link_artifact(link, link_text=f"MLflow run {run_id}", key=MLFLOW_KEY,
                                 description="The pipeline's parent run in MLflow")
        else:  # a local store has no page to link to: say how to open it
            create_markdown_artifact(f"MLflow run `{run_id}`: `{link}`", key=MLFLOW_KEY,
                                     description="The pipeline's parent run in MLflow")
        keys.append(MLFLOW_KEY)
    return keys
