"""A separate DVC workspace is a git repository (quick: no stage runs here; tests/e2e/test_dvc_storage.py runs them).

Real git and DVC: the workspace is made by flows.workspace.prepare_workspace, revisions by commit_run,
`dvc plots diff` renders the top-level plots of the project's dvc.yaml from the CSV series that
pfp.plots writes (as the evaluate stage does).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import storage
from flows.workspace import REPO_ROOT, commit_run, prepare_workspace, stage_env
from pfp import metrics, plots
from tests.e2e.flow_run import TINY_PARAMS

DVC = str(Path(sys.executable).parent / "dvc")


def _dvc(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DVC, *args], cwd=workspace, env=stage_env(), capture_output=True, text=True)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def _git(workspace: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def params_file(tmp_path) -> Path:
    params = copy.deepcopy(TINY_PARAMS)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(autouse=True)
def _no_remote_env(monkeypatch):
    monkeypatch.delenv(storage.REMOTE_ENV, raising=False)


def test_new_workspace_is_a_git_repo_with_dvc_and_a_default_remote(tmp_path, params_file):
    workspace = prepare_workspace(tmp_path / "ws", params_file)
    assert _git(workspace, "rev-parse", "--show-toplevel").strip() == str(workspace)
    # one initial commit: code, dvc.yaml, params; DVC's cached outputs and the run's logs are git-ignored
    assert len(_git(workspace, "log", "--format=%H").split()) == 1
    tracked = set(_git(workspace, "ls-files").split())
    assert {"dvc.yaml", "params.yaml", ".dvc/config", ".gitignore", "tasks/evaluate.py", "src/pfp/plots.py",
            "data/.gitignore", "models/mlp/.gitignore"} <= tracked
    assert "/prepared" in (workspace / "data/.gitignore").read_text().split()
    assert {"/posterior.npz", "/bundle", "/tvm"} <= set((workspace / "models/lenet/.gitignore").read_text().split())
    assert {"/logs/", "/mlflow.db", "/mlruns/", "/.pfp-pipeline.lock", "/.pfp/"} <= set((workspace / ".gitignore").read_text().split())
    assert _git(workspace, "status", "--porcelain") == ""
    # the DVC remote: the folder beside the workspace, in the committed config
    assert storage.default_remote(workspace) == ("storage", str(tmp_path / "ws.dvc-storage"))
    # a second preparation changes nothing
    prepare_workspace(workspace, params_file)
    assert _git(workspace, "status", "--porcelain") == "" and len(_git(workspace, "log", "--format=%H").split()) == 1


def test_remote_precedence_argument_env_existing(tmp_path, params_file, monkeypatch):
    workspace = prepare_workspace(tmp_path / "ws", params_file, remote=str(tmp_path / "given"))
    assert storage.default_remote(workspace) == ("storage", str(tmp_path / "given"))
    prepare_workspace(workspace, params_file)  # None: the workspace keeps the remote it has
    assert storage.default_remote(workspace) == ("storage", str(tmp_path / "given"))
    monkeypatch.setenv(storage.REMOTE_ENV, "s3://bucket/pfp")
    prepare_workspace(workspace, params_file)
    assert storage.default_remote(workspace) == ("storage", "s3://bucket/pfp")


def test_no_scm_workspace_is_migrated(tmp_path, params_file):
    workspace = tmp_path / "old"
    prepare_workspace(workspace, params_file)
    # what the workspace looked like before: no git, DVC with --no-scm, outputs of an earlier run
    subprocess.run(["rm", "-rf", str(workspace / ".git"), str(workspace / ".dvc"), str(workspace / ".gitignore")], check=True)
    for ignore in workspace.rglob(".gitignore"):
        ignore.unlink()
    _dvc(workspace, "init", "--no-scm", "-q")
    (workspace / "data/prepared").mkdir(parents=True)
    (workspace / "data/prepared/dirty_mnist.npz").write_bytes(b"x" * 1000)
    (workspace / "logs").mkdir()
    (workspace / "logs/flow.log").write_text("old log\n")
    prepare_workspace(workspace, params_file)
    assert not [line for line in (workspace / ".dvc/config").read_text().splitlines() if line.strip().startswith("no_scm")]
    tracked = set(_git(workspace, "ls-files").split())
    assert "params.yaml" in tracked and "dvc.yaml" in tracked
    assert not any(path.startswith(("data/prepared", "logs/")) for path in tracked), tracked
    assert _git(workspace, "status", "--porcelain") == ""
    _dvc(workspace, "status")  # DVC works with git now


def test_commit_run_commits_changes_and_never_the_repo(tmp_path, params_file):
    workspace = prepare_workspace(tmp_path / "ws", params_file)
    first = _git(workspace, "rev-parse", "HEAD").strip()
    assert commit_run(workspace, "nothing changed") == first
    (workspace / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (workspace / "logs").mkdir()
    (workspace / "logs/prepare.log").write_text("not a result\n")
    (workspace / "mlflow.db").write_bytes(b"sqlite")
    second = commit_run(workspace, "run 1")
    assert second != first and _git(workspace, "log", "-1", "--format=%s").strip() == "run 1"
    assert _git(workspace, "show", "--name-only", "--format=", "HEAD").split() == ["dvc.lock"]
    head = _git(REPO_ROOT, "rev-parse", "HEAD")
    assert commit_run(REPO_ROOT, "never") is None
    assert _git(REPO_ROOT, "rev-parse", "HEAD") == head


def test_push_names_the_remote_when_it_fails(tmp_path, params_file):
    workspace = prepare_workspace(tmp_path / "ws", params_file)
    (tmp_path / "a-file").write_text("not a folder\n")
    storage.configure_remote(workspace, tmp_path / "a-file" / "store", name="broken")
    (workspace / "data.bin").write_bytes(os.urandom(64))
    _dvc(workspace, "add", "-q", "data.bin")
    with pytest.raises(storage.StorageError, match=f"remote 'broken' \\({tmp_path / 'a-file' / 'store'}\\)"):
        storage.push(workspace)
    with pytest.raises(storage.StorageError, match="remote 'nowhere' is not configured"):
        storage.push(workspace, remote="nowhere")
    storage.configure_remote(workspace, tmp_path / "good")
    assert storage.push(workspace) == {"remote": "storage", "url": str(tmp_path / "good"), "pushed": 1, "missing": 0}
    assert storage.push(workspace)["pushed"] == 0  # already there


def _write_series(workspace: Path, model: str, seed: int, shift: float) -> dict[str, Path]:
    """The four series of the evaluate stage for ``model``, from predictions that depend on ``shift``."""
    rng = np.random.default_rng(seed)
    series = workspace / "plots" / model / "series"
    probs = rng.dirichlet(np.full(10, 0.3), 300)
    labels = np.where(rng.random(300) < 0.7, probs.argmax(1), rng.integers(0, 10, 300))
    bins = {"svi": metrics.reliability_bins(probs, labels), "pfp": metrics.reliability_bins(probs ** 1.2 / (probs ** 1.2).sum(1, keepdims=True), labels),
            "det": metrics.reliability_bins(probs ** 2 / (probs ** 2).sum(1, keepdims=True), labels)}
    curves = {}
    for name in ("svi_mi", "pfp_mi", "det_mi", "svi_sme", "pfp_sme", "det_sme"):
        s_in, s_out = rng.normal(0, 1, 200), rng.normal(shift, 1, 200)
        fpr, tpr = metrics.roc_curve_points(s_in, s_out)
        curves[name] = (fpr, tpr, metrics.auroc(s_in, s_out))
    return {"roc": plots.roc_series(curves, series / "roc.csv"),
            "reliability": plots.reliability_series(bins, series / "reliability.csv"),
            "loss": plots.loss_series(np.linspace(3, 1, 5) + shift, series / "loss.csv"),
            "fidelity": plots.fidelity_series({"pfp": {name: rng.lognormal(-0.4 + shift / 10, 0.2, 50)
                                                       for name in ("mnist", "ambiguous", "fashion")}},
                                              series / "fidelity.csv")}


def test_plots_diff_overlays_two_revisions(tmp_path, params_file):
    workspace = prepare_workspace(tmp_path / "ws", params_file)
    for model in ("mlp", "lenet"):
        _write_series(workspace, model, seed=0, shift=0.5)
    first = commit_run(workspace, "run 1")
    _write_series(workspace, "lenet", seed=1, shift=2.0)
    files = _write_series(workspace, "mlp", seed=1, shift=2.0)
    second = commit_run(workspace, "run 2")
    assert first != second
    result = _dvc(workspace, "plots", "diff", first, second, "--json", "--split")
    rendered = json.loads(result.stdout)
    data = rendered["data"]
    expected = {"mlp ELBO loss per example": ("loss", "epoch", {"elbo_loss"}),
                "mlp OOD ROC, MNIST test vs Fashion-MNIST": ("roc", "fpr", {"svi_mi", "pfp_mi", "det_mi", "svi_sme", "pfp_sme", "det_sme"}),
                "mlp reliability, MNIST test": ("reliability", "confidence", {"ideal", "svi_accuracy", "pfp_accuracy", "det_accuracy"}),
                "mlp PFP / Monte-Carlo logit variance (quantiles over logits, variance scale 1)": (
                    "fidelity", "quantile", {"pfp_mnist", "pfp_ambiguous", "pfp_fashion"})}
    # (the stage plots, PNG figures, are not in this workspace: only the series' plots must render)
    assert not [error for error in rendered.get("errors", []) if error["name"] in expected or "series" in error["source"]]
    for plot_id, (name, x, fields) in expected.items():
        (plot,) = data[plot_id]
        assert plot["revisions"] == [first, second]
        points = plot["anchor_definitions"]["<DVC_METRIC_DATA>"]
        for point in points:  # DVC names the column (and the y value) only when a plot has several
            point.setdefault("field", next(iter(fields)))
            point.setdefault("dvc_inferred_y_value", point[point["field"]])
        assert {p["rev"] for p in points} == {first, second} and {p["field"] for p in points} == fields
        # the second revision's points are the CSV of the workspace (the first's, of the first commit)
        import csv
        for rev in (first, second):
            text = _git(workspace, "show", f"{rev}:{files[name].relative_to(workspace)}")
            rows = list(csv.DictReader(text.splitlines()))
            mine = [p for p in points if p["rev"] == rev and p["field"] == sorted(fields)[0]]
            assert [p[x] for p in mine] == [row[x] for row in rows]
            assert [p["dvc_inferred_y_value"] for p in mine] == [row[sorted(fields)[0]] for row in rows]
        first_points = [p["dvc_inferred_y_value"] for p in points if p["rev"] == first]
        second_points = [p["dvc_inferred_y_value"] for p in points if p["rev"] == second]
        assert first_points != second_points  # the revisions differ in data
    html = tmp_path / "diff"
    _dvc(workspace, "plots", "diff", first, second, "-o", str(html))
    page = (html / "index.html").read_text()
    assert "mlp OOD ROC, MNIST test vs Fashion-MNIST" in page and first in page and second in page


def test_repo_workspace_default_remote_is_beside_the_clone():
    """The recorded run's storage, in the committed .dvc/config: the folder pfp-dvc-storage beside the repo."""
    from dvc.config import Config

    committed = Config(dvc_dir=str(REPO_ROOT / ".dvc")).read("repo")
    assert committed["core"]["remote"] == "storage"
    assert Path(committed["remote"]["storage"]["url"]) == REPO_ROOT.parent / "pfp-dvc-storage"
