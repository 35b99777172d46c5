"""Stage report: the per-model evaluations merged in the configured order."""

from __future__ import annotations

import json

import pytest

from pfp.data.idx import DataError
from pfp.spec import Architecture
from pfp.stages.report import headline_metrics, report


def test_report_merges_the_models(tmp_path):
    folder = tmp_path / "metrics" / "evaluate"
    folder.mkdir(parents=True)
    evaluations = {"lenet": {"pfp": {"accuracy": 0.9, "sets": {"mnist": {"accuracy": 0.95}}}},
                   "mlp": {"svi": {"accuracy": 0.8, "sets": {}}}}
    for model, values in evaluations.items():
        (folder / f"{model}.json").write_text(json.dumps(values))
    result = report([Architecture.MLP, "lenet"], root=tmp_path)
    assert list(result.merged) == ["mlp", "lenet"]
    assert json.loads((tmp_path / "metrics" / "evaluate.json").read_text()) == result.merged == evaluations
    assert result.headline() == headline_metrics(evaluations) == {"lenet": {"pfp": {"accuracy": 0.9}}, "mlp": {"svi": {"accuracy": 0.8}}}


def test_report_names_the_missing_evaluation(tmp_path):
    with pytest.raises(DataError, match="evaluate/mlp.json: not found; run the evaluate@mlp stage first"):
        report(["mlp"], root=tmp_path)
    assert not (tmp_path / "metrics" / "evaluate.json").exists()
