"""Stage ``report``: the per-model evaluations merged into ``metrics/evaluate.json``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfp.data.idx import DataError
from pfp.io import atomic_write_json
from pfp.spec import Architecture
from pfp.stage import METRICS_DIR


@dataclass(frozen=True)
class ReportResult:
    """model -> method -> metrics (with the per-set breakdown), and where it was written."""

    merged: dict[str, Any]
    path: Path

    def headline(self) -> dict[str, Any]:
        return headline_metrics(self.merged)


def headline_metrics(merged: dict) -> dict:
    """model -> method -> metrics, without the per-set breakdown (what MLflow runs show)."""
    return {model: {method: {k: v for k, v in values.items() if k != "sets"} for method, values in methods.items()}
            for model, methods in merged.items()}


def report(models: Iterable[Architecture | str], *, root: Path = Path(".")) -> ReportResult:
    """Merge ``metrics/evaluate/MODEL.json`` of every model into ``metrics/evaluate.json``.

    Parameters
    ----------
    models
        The configured models (``models``), in order.
    root
        The workspace folder.
    """
    root = Path(root)
    merged = {}
    for model in (str(getattr(m, "value", m)) for m in models):
        path = root / METRICS_DIR / "evaluate" / f"{model}.json"
        if not path.is_file():
            raise DataError(f"{path}: not found; run the evaluate@{model} stage first")
        merged[model] = json.loads(path.read_text())
    path = root / METRICS_DIR / "evaluate.json"
    atomic_write_json(path, merged)
    return ReportResult(merged=merged, path=path)
