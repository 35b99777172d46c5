"""Stage `tune@MODEL` as a function: libraries, summary and metrics in the stage's layout."""

from __future__ import annotations

import json

from pfp.config import TuneParams
from pfp.stages import tune


def test_summary_and_libraries_are_written(tuned_workspace, tune_params, monkeypatch):
    workspace, outcome = tuned_workspace
    monkeypatch.chdir(workspace)
    assert outcome.summary_path == tune.summary_path("mlp") and str(outcome.summary_path) == "metrics/tune_mlp.json"
    assert json.loads(outcome.summary_path.read_text()) == json.loads(json.dumps(outcome.summary))
    summary = outcome.summary
    assert summary["runner"] == "local" and summary["target"] == "host" and summary["emulated"] is False
    assert summary["variance_scale"] == 0.5 and summary["trials_per_task"] == 0
    assert [(lib["variant"], lib["batch_size"]) for lib in summary["libraries"]] == [("pfp", 2), ("det", 2)]
    for lib in summary["libraries"]:
        assert lib["library"] == f"models/mlp/tvm/host/{lib['variant']}_b2.so" and (workspace / lib["library"]).is_file()
    assert summary["seconds"] == sum(lib["seconds"] for lib in summary["libraries"])
    # which board measured what (here the local runner): counts over the libraries; each library lists its measurements
    measured = sum(len(lib["measurements"]) for lib in summary["libraries"])
    assert summary["rpc_workers"] == 1 and summary["search_trials"] == 0 and measured > 0
    assert summary["boards"] == [{"board": "local", "measurements": measured}]
    assert str(outcome.library_dir) == "models/mlp/tvm"


def test_metrics_count_the_kept_schedules(tuned_workspace):
    _, outcome = tuned_workspace
    metrics = outcome.metrics
    assert metrics["seconds"] == outcome.summary["seconds"]
    assert metrics["boards"] == len(outcome.summary["boards"]) == 1
    for lib in outcome.summary["libraries"]:
        prefix = f"{lib['variant']}_b2.kept_"
        counts = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
        assert set(counts) == {"hand", "earlier_hand", "meta_schedule", "default"}
        assert counts["hand"] == len(lib["tasks"]) and sum(counts.values()) == len(lib["tasks"])


def test_tags_name_the_runner():
    assert tune.tags(TuneParams()) == {"tune.target": "host", "tune.runner": "local", "tune.emulated": False}
    board = TuneParams(target="rasp4b", rpc={"tracker": "127.0.0.1:9190", "key": "rasp4b-emulated", "emulated": True})
    assert tune.runner_name(board) == "rpc:rasp4b-emulated@127.0.0.1:9190"
    assert tune.tags(board)["tune.emulated"] is True


def test_stage_modules_hold_no_tvm_symbol():
    import ast
    from pathlib import Path

    import pfp.stages

    for path in Path(pfp.stages.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name and (name == "tvm" or ".tvm" in name or name.startswith("tvm"))], path


def test_summary_and_metrics_carry_the_whole_model_guard(tuned_workspace):
    _, outcome = tuned_workspace
    rows = outcome.summary["guard"]
    assert [row["library"] for row in rows] == ["pfp_b2", "det_b2"]
    for row, lib in zip(rows, outcome.summary["libraries"]):
        assert row["kept"] == lib["guard"]["kept"] == "tuned"  # no search: the tuned module is the all-hand build
        assert row["tuned_ms"] == row["hand_ms"] > 0 and row["ratio"] == 1.0 and row["host_busy"] in (True, False)
        assert outcome.metrics[f"{row['library']}.guard_tuned_ms"] == row["tuned_ms"]
    assert outcome.metrics["guard_kept_hand"] == 0 and 0 <= outcome.metrics["guard_host_busy"] <= 2
