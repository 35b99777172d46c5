"""End to end: the Prefect flow drives real DVC stages on tiny data in a temp dir and
logs to a real MLflow tracking server on loopback (the ``mlflow_server`` fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .flow_run import BIN, LIBRARY_LINES, METRIC_KEYS, PROMOTION_STEP, STAGES, STORAGE_STEP, TINY_PARAMS, _pipeline_env, _run_flow

__all__ = ["TINY_PARAMS", "STAGES"]  # the other end-to-end tests' imports


def _check_terminal_output(stdout: str, stderr: str, workdir: Path, outcome: str) -> None:
    """Quiet terminal: one line per stage and the summary table; the library logs are in workdir/logs."""
    terminal = stdout + stderr
    noisy = [line for line in terminal.splitlines() if LIBRARY_LINES.search(line)]
    assert not noisy, noisy
    progress = [line.split() for line in stderr.splitlines() if line.startswith("[")]
    # nothing changed: no stage process, no new bundle to register (the promotion step is skipped too)
    assert [row[1:3] for row in progress] == [[stage, outcome] for stage in [*STAGES, PROMOTION_STEP, STORAGE_STEP]]
    assert f"library logs: {workdir / 'logs'}/" in stderr.splitlines()[0]
    lines = stdout.splitlines()
    assert any(line.split()[:5] == ["model", "method", "accuracy", "NLL", "ECE"] for line in lines)
    for model in ("mlp", "lenet"):
        for method in ("svi", "pfp", "det"):
            assert any(line.split()[:2] == [model, method] for line in lines), (model, method)
    assert any(line.split()[:2] == ["tune@lenet", outcome] for line in lines)
    if outcome == "ran":
        assert "promotion gate (registered models, champion alias)" in lines
        assert any(line.startswith("  pfp-lenet v") for line in lines)
    assert lines[-1].startswith(f"results: {workdir}/metrics/")
    assert sum(str(workdir / "logs") in line for line in terminal.splitlines()) == 1  # the logs folder, named once


def test_pipeline_end_to_end(tmp_path, tiny_pipeline, mlflow_server):
    from mlflow.tracking import MlflowClient

    params_file, workdir = tiny_pipeline.params_file, tiny_pipeline.workdir
    first, stdout, stderr = tiny_pipeline.summary, tiny_pipeline.stdout, tiny_pipeline.stderr

    # Every stage ran once, in order, and the metrics file has the promised shape.
    assert first["stages"] == {stage: "ran" for stage in STAGES}
    assert set(first["seconds"]) == {*STAGES, PROMOTION_STEP, STORAGE_STEP} and all(value > 0 for value in first["seconds"].values())
    # The terminal got the progress and the summary; each stage's output (DVC, the stage, its libraries) is in its log,
    # the flow's own (Prefect, MLflow) in flow.log.
    _check_terminal_output(stdout, stderr, workdir, "ran")
    assert first["logs"] == str(workdir / "logs")
    # the promotion step's decisions are the summary's last section (the first version of a model is champion)
    for model in ("mlp", "lenet"):
        assert first["promotion"][model]["promoted"] is True and str(first["promotion"][model]["version"]) == "1"
        assert f"  pfp-{model} v1: PROMOTED to champion" in stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in (workdir / "logs" / f"{stage}.log").read_text()
    tune_log = (workdir / "logs" / "tune@mlp.log").read_text()
    assert "[tune 1/3] mlp pfp_cov batch 2" in tune_log and "schedules kept" in tune_log
    flow_log = (workdir / "logs" / "flow.log").read_text()
    assert "Beginning flow run" in flow_log and "Finished in state Completed" in flow_log
    metrics = json.loads((workdir / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"mlp", "lenet"}
    for model in metrics.values():
        assert set(model) == {"svi", "pfp", "det", "deployed"}  # deployed: the bundle, at its OOD threshold
        for values in (model[method] for method in ("svi", "pfp", "det")):
            assert METRIC_KEYS <= set(values)
            assert 0.0 <= values["accuracy"] <= 1.0 and values["nll"] > 0 and 0.0 <= values["auroc_mi"] <= 1.0
    for path in ("data/prepared/manifest.json", "models/mlp/posterior.npz", "models/lenet/pfp.npz", "models/mlp/calibration.json",
                 "plots/mlp/evaluate/roc.png", "plots/lenet/train/loss.png"):
        assert (workdir / path).is_file(), path
    latency = json.loads((workdir / "metrics/latency.json").read_text())
    assert set(latency) == {"mlp", "lenet"} and set(latency["lenet"]) == {"batch_2"}
    assert latency["mlp"]["batch_2"]["pfp_tvm_untuned_ms"] > 0 and latency["mlp"]["batch_2"]["svi_pyro_ms"] > 0
    # tuned libraries of the tune stage ran; pfp and pfp_separate were not built there, so the benchmark compiled them
    assert latency["lenet"]["batch_2"]["schedules"] == {"pfp": "hand", "pfp_separate": "hand", "det": "tuned", "svi": "tuned",
                                                        "pfp_cov": "tuned"}
    assert latency["lenet"]["batch_2"]["pfp_cov_tvm_ms"] > 0
    # figures only (which is faster is the benchmark's to say, not a test's: these machines are shared)
    assert latency["lenet"]["batch_2"]["svi_tvm_ms"] > 0 and latency["lenet"]["batch_2"]["det_tvm_ms"] > 0
    assert (workdir / "plots/benchmark/lenet/latency.png").is_file()
    profile = json.loads((workdir / "metrics/profile.json").read_text())
    lenet = profile["lenet"]["batch_2"]
    # mean, variance and E[w^2] per weight (the first layer needs no E[w^2]): between 2x and 3x the twin's
    assert 2 * lenet["memory"]["det"]["weight_bytes"] < lenet["memory"]["pfp"]["weight_bytes"] <= 3 * lenet["memory"]["det"]["weight_bytes"]
    assert {row["operator"] for row in lenet["pfp_operators"]} >= {"conv1_conv2d_joint_first", "fc3_dense_joint"}
    assert lenet["pfp_operators_variant"] == "pfp_cov"
    # tune stage: a library + database per variant and batch size, and the per-task choice
    tuned = json.loads((workdir / "metrics/tune_mlp.json").read_text())
    assert tuned["target"] == "host" and tuned["runner"] == "local" and tuned["emulated"] is False
    assert {(lib["variant"], lib["batch_size"]) for lib in tuned["libraries"]} == {
        (v, 2) for v in ("pfp_cov", "det", "svi")}
    for lib in tuned["libraries"]:
        assert (workdir / lib["library"]).is_file()
        assert lib["tasks"] and all(row["kept"] == "hand" and row["hand_ms"] > 0 for row in lib["tasks"])
    assert (workdir / "models/mlp/tvm/host/pfp_cov_b2/database_tuning_record.json").stat().st_size > 0
    assert metrics["mlp"]["pfp"]["library"] == "models/mlp/tvm/host/pfp_cov_b2.so"  # the model's PFP is covariance-aware
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    # DVC's own views of the results work.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    shown = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=workdir, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "evaluate.json" in shown.stdout and "auroc_mi" in shown.stdout
    plotted = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "dvc_plots")], cwd=workdir, env=env,
                             capture_output=True, text=True)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "dvc_plots" / "index.html").is_file()

    # MLflow: one pipeline run with every stage nested under it, params, metrics and artifacts.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("pfp-e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pfp.stage") == "pipeline"]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {*STAGES, "publish@mlp", "publish@lenet"}
    train = children["train@mlp"]
    assert train.data.params["prior_scale"] == "1.0" and "elbo_loss" in train.data.metrics
    assert train.data.tags["git_commit"] != ""
    assert children["prepare"].data.tags["data_hash"] == json.loads((workdir / "data/prepared/manifest.json").read_text())["data_hash"]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert "posterior.npz" in artifacts
    tune_run = children["tune@lenet"]
    assert tune_run.data.tags["tune.runner"] == "local" and "seconds" in tune_run.data.metrics
    assert {a.path for a in client.list_artifacts(tune_run.info.run_id, "tvm/host")} >= {"tvm/host/pfp_cov_b2.so",
                                                                                          "tvm/host/pfp_cov_b2"}
    assert parents[0].data.metrics["mlp.pfp.accuracy"] == pytest.approx(metrics["mlp"]["pfp"]["accuracy"])
    # the parent run says what it was: resolved params, the params file and lock, the data, the commit
    parent = parents[0]
    assert parent.data.params["tune.batch_sizes"] == "[2]" and parent.data.params["seed"] == "0"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"params.yaml", "dvc.lock"}
    assert {item.dataset.name for item in parent.inputs.dataset_inputs} >= {"mnist_train", "mnist_test", "ood_test"}
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["git_commit"]

    # Nothing changed: DVC skips every stage.
    second, stdout, stderr = _run_flow(workdir, params_file, tmp_path / "second.json", mlflow_server, tmp_path / "prefect")
    assert second["stages"] == {stage: "skipped" for stage in STAGES}
    _check_terminal_output(stdout, stderr, workdir, "skipped")
    assert second["up_to_date"] is True and sum(second["seconds"].values()) == 0  # one `dvc status`, no stage process

    # One evaluate parameter changed: DVC finds only the evaluation stages out of date, and `dvc repro`
    # (without the flow: its runs were checked above) reruns them and the report that reads their metrics
    from flows.workspace import prepare_workspace

    tiny = yaml.safe_load(params_file.read_text())  # TINY_PARAMS on the run's copy of the data
    params_file.write_text(yaml.safe_dump({**tiny, "evaluate": {**tiny["evaluate"], "logit_samples": 30}}))
    prepare_workspace(workdir, params_file)  # the flow's first step: its params.yaml, defaults filled in
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=workdir, env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"evaluate@mlp", "evaluate@lenet"}
    stage_env = {**_pipeline_env(mlflow_server), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    repro = subprocess.run([str(BIN / "dvc"), "repro"], cwd=workdir, env=stage_env, capture_output=True, text=True, timeout=900)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert set(re.findall(r"Running stage '([^']+)'", repro.stdout)) == {"evaluate@mlp", "evaluate@lenet", "report"}
