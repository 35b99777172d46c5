"""Shared DVC storage and experiments, for real: one run of the flow on tiny data, pushed to a
folder remote; a git clone of the workspace pulls every output, is up to date, and its pulled bundle predicts;
`dvc exp run -S` in a clone makes experiments that `dvc exp show` lists.

Real processes: the Prefect flow (its stages through DVC), MLflow's default store in the workspace, git, DVC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import storage
from flows.workspace import commit_run, stage_env
from tests.e2e.test_pipeline import REPO, TINY_PARAMS

DVC = str(Path(sys.executable).parent / "dvc")
# One more whole flow run (about 4 min on a quiet 2-core host, 10 under load): opt in with -m slow.
pytestmark = pytest.mark.slow


def _dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, *args], cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert not check or result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """The flow on tiny data in a fresh workspace, with its own folder remote; committed and pushed.

    (Both models: the benchmark stage's deps name both.)"""
    root = tmp_path_factory.mktemp("dvc-storage")
    params_file = root / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(TINY_PARAMS))
    workspace, remote = root / "workspace", root / "remote"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}  # the store in the workspace
    env.update({"DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(root / "prefect"),
                "PFP_MLFLOW_EXPERIMENT": "pfp-dvc-storage", storage.REMOTE_ENV: str(remote)})
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--workdir", str(workspace), "--params", str(params_file),
                             "--summary", str(root / "summary.json")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1500)
    flow_log = workspace / "logs" / "flow.log"
    assert result.returncode == 0, result.stderr[-4000:] + (flow_log.read_text()[-4000:] if flow_log.is_file() else "")
    commit = commit_run(workspace, "tiny run")  # (the flow commits and pushes itself once it calls these)
    pushed = storage.push(workspace)
    return {"workspace": workspace, "remote": remote, "commit": commit, "push": pushed, "root": root}


def _clone(pushed_run, name: str) -> Path:
    clone = pushed_run["root"] / name
    subprocess.run(["git", "clone", "-q", str(pushed_run["workspace"]), str(clone)], check=True)
    return clone


def test_push_sent_every_cached_output(pushed_run):
    push = pushed_run["push"]
    assert push["remote"] == "storage" and push["url"] == str(pushed_run["remote"]) and push["missing"] == 0
    # every cached output's objects are in the remote (the folder has DVC's content-addressed files)
    stored = [path for path in (pushed_run["remote"] / "files" / "md5").rglob("*") if path.is_file()]
    assert len(stored) >= 10, stored
    assert storage.push(pushed_run["workspace"])["pushed"] == 0  # nothing new
    # the workspace's history: the initial commit, then the run (params, lock, uncached metrics and plots)
    workspace = pushed_run["workspace"]
    assert _git(workspace, "status", "--porcelain") == ""
    committed = set(_git(workspace, "ls-files").split())
    assert {"dvc.lock", "params.yaml", "metrics/evaluate.json", "plots/mlp/series/roc.csv", "plots/mlp/series/loss.csv",
            "plots/mlp/series/reliability.csv", "plots/mlp/evaluate/roc.png"} <= committed
    assert not any(path.startswith(("logs/", "data/prepared/", "models/mlp/bundle/", "mlruns/")) or path == "mlflow.db"
                   for path in committed)


def test_clone_pulls_every_output_and_is_up_to_date(pushed_run):
    from pfp_runtime import load_bundle

    clone = _clone(pushed_run, "clone")
    storage.configure_remote(clone, pushed_run["remote"])  # the same remote (it is also in the committed config)
    pull = _dvc(clone, "pull")
    assert "fetched" in pull.stdout + pull.stderr or "added" in pull.stdout + pull.stderr, pull.stdout
    status = json.loads(_dvc(clone, "status", "--json").stdout or "{}")
    assert status == {}, status
    dry = _dvc(clone, "repro", "--dry")
    assert "Running stage" not in dry.stdout and "Data and pipelines are up to date" in dry.stdout, dry.stdout
    # the pulled bundles predict, exactly as the ones the run made
    images = np.load(clone / "data/prepared/dirty_mnist.npz")["mnist_test_x"][:8]
    for model in ("mlp", "lenet"):
        pulled = load_bundle(clone / f"models/{model}/bundle/host", expected_model=model).predict(images)
        made = load_bundle(pushed_run["workspace"] / f"models/{model}/bundle/host", expected_model=model).predict(images)
        assert pulled.probs.shape == (8, 10) and np.allclose(pulled.probs.sum(1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(pulled.probs, made.probs)
        np.testing.assert_array_equal(pulled.ood, made.ood)


def test_dvc_plots_show_renders_the_series_of_the_run(pushed_run):
    shown = json.loads(_dvc(pushed_run["workspace"], "plots", "show", "--json", "--split").stdout)
    assert not shown.get("errors"), shown["errors"]
    for model in ("mlp", "lenet"):
        for plot_id in (f"{model} ELBO loss per example", f"{model} OOD ROC, MNIST test vs Fashion-MNIST",
                        f"{model} reliability, MNIST test"):
            (plot,) = shown["data"][plot_id]
            assert plot["anchor_definitions"]["<DVC_METRIC_DATA>"], plot_id
        # the ROC series holds the evaluate stage's AUROC (trapezoids on the 201-point grid)
        import csv
        rows = list(csv.DictReader((pushed_run["workspace"] / f"plots/{model}/series/roc.csv").read_text().splitlines()))
        fpr = np.array([float(row["fpr"]) for row in rows])
        auroc = json.loads((pushed_run["workspace"] / f"metrics/evaluate/{model}.json").read_text())["pfp"]["auroc_mi"]
        assert abs(np.trapezoid([float(row["pfp_mi"]) for row in rows], fpr) - auroc) < 0.02


def test_exp_run_set_param_lists_two_experiments(pushed_run):
    clone = _clone(pushed_run, "experiments")
    for val_size in (150, 180):  # the prepare stage only: the cheapest stage a param changes
        _dvc(clone, "exp", "run", "-S", f"data.val_size={val_size}", "prepare")
    shown = json.loads(_dvc(clone, "exp", "show", "--json").stdout)
    (baseline,) = [entry for entry in shown if entry["rev"] == pushed_run["commit"]]
    experiments = baseline["experiments"] or []
    values = sorted(exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["data"]["val_size"] for exp in experiments)
    assert values == [150, 180], json.dumps(shown)[:3000]
    # each experiment is a commit whose lock records the prepare stage run with its value
    for exp in experiments:
        rev = exp["revs"][0]
        lock = yaml.safe_load(_git(clone, "show", f"{rev['rev']}:dvc.lock"))
        assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["val_size"] == rev["data"]["params"]["params.yaml"]["data"]["data"]["val_size"]
    assert _git(clone, "rev-parse", "HEAD").strip() == pushed_run["commit"]  # experiments are refs, not commits on the branch
