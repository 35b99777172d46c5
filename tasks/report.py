"""DVC stage `report`: merge the per-model evaluations into metrics/evaluate.json."""

import json

from pfp import tracking
from pfp.data.idx import DataError
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, run_stage


def headline_metrics(merged: dict) -> dict:
    """model -> method -> metrics, without the per-set breakdown (what MLflow runs show)."""
    return {model: {method: {k: v for k, v in values.items() if k != "sets"} for method, values in methods.items()}
            for model, methods in merged.items()}


def main(params, argv):
    merged = {}
    for model in (m.value for m in params.models):
        path = METRICS_DIR / "evaluate" / f"{model}.json"
        if not path.is_file():
            raise DataError(f"{path}: not found; run the evaluate@{model} stage first")
        merged[model] = json.loads(path.read_text())
    atomic_write_json(METRICS_DIR / "evaluate.json", merged)
    with tracking.stage_run("report") as run:
        run.log_metrics(headline_metrics(merged))
        run.log_artifact(METRICS_DIR / "evaluate.json")


if __name__ == "__main__":
    run_stage(main)
