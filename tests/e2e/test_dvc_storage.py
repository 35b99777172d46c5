"""Shared DVC storage and experiments, for real, on the end-to-end tests' tiny flow run (tests/e2e/conftest.py):
its workspace committed and pushed to its folder remote; a git clone of the workspace pulls every output, is up to
date, and its pulled bundles predict; `dvc exp run -S` in a clone makes experiments that `dvc exp show` lists.

Real processes: the Prefect flow (its stages through DVC), git, DVC. These tests run before test_pipeline.py
(which changes the shared workspace's params) and only read the workspace, or work in clones of it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import storage
from flows.workspace import commit_run, stage_env

DVC = str(Path(sys.executable).parent / "dvc")


def _dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, *args], cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert not check or result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def pushed_run(tiny_pipeline, tmp_path_factory):
    """The shared tiny run's workspace, which the flow committed and pushed to its default remote (the folder beside it)."""
    workspace = tiny_pipeline.workdir
    status = json.loads(_dvc(workspace, "status", "--json").stdout or "{}")
    assert status == {}, f"the shared tiny run's workspace changed before these tests: {status}"
    return {"workspace": workspace, "remote": Path(storage.sibling_url(workspace)), "storage": tiny_pipeline.summary["storage"],
            "root": tmp_path_factory.mktemp("dvc-storage")}


def _clone(pushed_run, name: str) -> Path:
    clone = pushed_run["root"] / name
    subprocess.run(["git", "clone", "-q", str(pushed_run["workspace"]), str(clone)], check=True)
    return clone


def test_the_flow_committed_and_pushed_the_run(pushed_run):
    stored, workspace = pushed_run["storage"], pushed_run["workspace"]
    assert stored["remote"] == "storage" and stored["url"] == str(pushed_run["remote"]) and stored["missing"] == 0
    assert stored["pushed"] >= 20  # the run's cached outputs (prepared data, posteriors, libraries, bundles)
    assert stored["commit"] == _git(workspace, "rev-parse", "HEAD").strip()
    assert _git(workspace, "log", "--format=%s").splitlines()[0].startswith("pfp pipeline run ")
    assert storage.push(workspace)["pushed"] == 0  # nothing new
    assert commit_run(workspace, "again") == stored["commit"]  # nothing changed since the flow's commit
    # the remote holds the objects of the run's outputs (DVC's content-addressed files; the local cache may
    # hold more, e.g. earlier states of a persisted output), and DVC finds nothing of the lock missing there
    def objects(folder: Path) -> set[str]:
        return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}

    in_remote = objects(pushed_run["remote"] / "files/md5")
    assert len(in_remote) >= 20 and in_remote <= objects(workspace / ".dvc/cache/files/md5")
    assert json.loads(_dvc(workspace, "status", "--cloud", "--json").stdout or "{}") == {}
    # the workspace's history: the initial commit, then the run (params, lock, uncached metrics and plots)
    assert _git(workspace, "status", "--porcelain") == ""
    committed = set(_git(workspace, "ls-files").split())
    assert {"dvc.lock", "params.yaml", "metrics/evaluate.json", "plots/mlp/series/roc.csv", "plots/mlp/series/loss.csv",
            "plots/mlp/series/reliability.csv", "plots/mlp/evaluate/roc.png"} <= committed
    assert not any(path.startswith(("logs/", "data/prepared/", "models/mlp/bundle/", "mlruns/", ".pfp/"))
                   or path in ("mlflow.db", ".pfp-pipeline.lock") for path in committed), committed


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
        rows = list(csv.DictReader((pushed_run["workspace"] / f"plots/{model}/series/roc.csv").read_text().splitlines()))
        fpr = np.array([float(row["fpr"]) for row in rows])
        auroc = json.loads((pushed_run["workspace"] / f"metrics/evaluate/{model}.json").read_text())["pfp"]["auroc_mi"]
        assert abs(np.trapezoid([float(row["pfp_mi"]) for row in rows], fpr) - auroc) < 0.02


def test_exp_run_set_param_lists_two_experiments(pushed_run):
    clone = _clone(pushed_run, "experiments")
    for val_size in (150, 180):  # the prepare stage only: the cheapest stage a param changes
        _dvc(clone, "exp", "run", "-S", f"data.val_size={val_size}", "prepare")
    shown = json.loads(_dvc(clone, "exp", "show", "--json").stdout)
    (baseline,) = [entry for entry in shown if entry["rev"] == pushed_run["storage"]["commit"]]
    experiments = baseline["experiments"] or []
    values = sorted(exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["data"]["val_size"] for exp in experiments)
    assert values == [150, 180], json.dumps(shown)[:3000]
    # each experiment is a commit whose lock records the prepare stage run with its value
    for exp in experiments:
        rev = exp["revs"][0]
        lock = yaml.safe_load(_git(clone, "show", f"{rev['rev']}:dvc.lock"))
        assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["val_size"] == rev["data"]["params"]["params.yaml"]["data"]["data"]["val_size"]
    assert _git(clone, "rev-parse", "HEAD").strip() == pushed_run["storage"]["commit"]  # experiments are refs, not commits on the branch
