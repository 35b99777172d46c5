"""The DVC workspace a pipeline run works in, and the environment its stage processes get.

The workspace is this repo itself (params.yaml) or a separate folder holding a copy of the stage
code, ``dvc.yaml`` and a params file with every default filled in. A separate workspace is a git
repository of its own (DVC's experiments and ``dvc plots diff`` work on git revisions): each
successful run is one commit (:func:`commit_run`: params, dvc.lock, the uncached metrics and plots,
the stage code it ran), its cached outputs go to the DVC remote (:mod:`flows.storage`).

    cd runs/embedded && PATH=$PWD/../../.venv/bin:$PATH dvc exp run -S train.mlp.epochs=5
    dvc exp show; dvc plots diff HEAD~1 HEAD -o plots-diff   # (the stages' `python` is the venv's)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flows import storage
from pfp import tracking
from pfp.config import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a separate DVC workspace needs from the repo: the stage code and the stage graph.
WORKSPACE_CODE = ("src/pfp", "src/pfp_runtime", "tasks", "dvc.yaml")
DATA_PATH_KEYS = ("mnist_dir", "ood_dir", "ambiguous_dir", "download_dir")

# What a run writes in a separate workspace that is not a result: never committed (the run's lock
# and requested params: flows/guards.py, flows/pipeline.py). DVC adds its cached outputs to
# .gitignore files itself.
WORKSPACE_GITIGNORE = ("/logs/", "/mlflow.db", "/mlruns/", "/mlartifacts/", "/.pfp-pipeline.lock", "/.pfp/", "__pycache__/",
                       "*.tmp", "*.tmp.*", "/dvc_plots/")  # dvc_plots: `dvc plots show/diff`'s rendering, not a result
# Who commits in a separate workspace when git has no identity configured (CI, a service account).
PIPELINE_IDENTITY = {"user.name": "pfp pipeline", "user.email": "pfp-pipeline@localhost"}

# Stages whose torch timings are results: their OpenMP threads keep torch's default wait policy.
TIMED_STAGES = ("benchmark",)


def stage_env(stage: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml says `python`: make it this interpreter, whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault(tracking.GIT_COMMIT_ENV, tracking.git_commit(REPO_ROOT))
    if stage is not None and stage.split("@")[0] not in TIMED_STAGES:
        # torch's OpenMP threads spin at every barrier by default: with one other busy process on a
        # 2-core box, SVI training of the MLP ran 10 steps/s instead of 105 with passive waiting
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class WorkspaceError(RuntimeError):
    """A workspace git or DVC could not set up or commit (the message names the folder and the command)."""


def prepare_workspace(workdir: Path, params_file: Path | None, remote: str | None = None) -> Path:
    """Make ``workdir`` a DVC workspace: the repo itself, or a git repository with a copy of the stage code + params.

    ``remote``: the DVC remote URL (or folder) the run pushes to; None: ``$PFP_DVC_REMOTE``, else the
    default remote the workspace has, else the folder ``<workspace>.dvc-storage`` beside it (the repo
    workspace keeps the one in its ``.dvc/config``; a remote given for it goes to ``.dvc/config.local``).
    """
    workdir = workdir.resolve()
    remote = remote or os.environ.get(storage.REMOTE_ENV) or None
    if workdir == REPO_ROOT:
        if params_file is not None and params_file.resolve() != (REPO_ROOT / "params.yaml"):
            raise ValueError("--params: the repo workspace always uses params.yaml; give --workdir for another params file")
        if remote is not None:
            storage.configure_remote(workdir, remote, local=True)
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    for relative in WORKSPACE_CODE:
        source, target = REPO_ROOT / relative, workdir / relative
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    params_file = (params_file or REPO_ROOT / "params.yaml").resolve()
    # Write every key with its default filled in: DVC refuses a stage whose params are absent.
    resolved = load_params(params_file).model_dump(mode="json")
    for key in DATA_PATH_KEYS:  # relative data paths are relative to where the command runs
        if resolved["data"].get(key) is not None:
            resolved["data"][key] = str(Path(resolved["data"][key]).resolve())
    new_text = yaml.safe_dump(resolved, sort_keys=False)
    target = workdir / "params.yaml"
    if not target.exists() or target.read_text() != new_text:
        target.write_text(new_text)
    _init_git(workdir)
    _init_dvc(workdir)
    if remote is not None:
        storage.configure_remote(workdir, remote)
    elif storage.default_remote(workdir) is None:
        storage.configure_remote(workdir, storage.sibling_url(workdir))
    if _git(workdir, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode != 0:
        _commit_all(workdir, f"pfp workspace: stage code, dvc.yaml and params (project commit {_project_commit()})")
    return workdir


def commit_run(workspace: Path, message: str) -> str | None:
    """Commit what a successful run changed in a separate workspace; returns the commit (HEAD when nothing changed).

    What is committed: params.yaml, dvc.lock, dvc.yaml and the stage code it ran, the uncached
    metrics and plots, the .gitignore files DVC keeps for its cached outputs (everything not
    git-ignored). The repo workspace is never committed (None): its commits are the developers'.
    """
    workspace = Path(workspace).resolve()
    if workspace == REPO_ROOT:
        return None
    if not (workspace / ".git").exists():
        raise WorkspaceError(f"{workspace}: not a git repository; prepare_workspace makes it one")
    _commit_all(workspace, message)
    return _git(workspace, "rev-parse", "HEAD").stdout.strip()


def _project_commit() -> str:
    return tracking.git_commit(REPO_ROOT)


def _git(workspace: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise WorkspaceError(f"{workspace}: git {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result


def _commit_all(workspace: Path, message: str) -> None:
    _git(workspace, "add", "-A")
    if _git(workspace, "diff", "--cached", "--quiet", check=False).returncode != 0:
        _git(workspace, "commit", "-q", "--no-verify", "-m", message)


def _init_git(workdir: Path) -> None:
    """A git repository with the workspace's .gitignore and an identity to commit with."""
    if not (workdir / ".git").exists():
        _git(workdir, "init", "-q", "-b", "main")
    for key, value in PIPELINE_IDENTITY.items():
        if not _git(workdir, "config", "--get", key, check=False).stdout.strip():
            _git(workdir, "config", key, value)
    gitignore = workdir / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    missing = [line for line in WORKSPACE_GITIGNORE if line not in lines]
    if missing:
        header = ["# the pipeline's logs and tracking store (flows/workspace.py)"] if not lines else []
        gitignore.write_text("\n".join([*lines, *header, *missing]) + "\n")


def _init_dvc(workdir: Path) -> None:
    """DVC with git; a workspace made with ``dvc init --no-scm`` (before workspaces were git repos) is migrated."""
    from dvc.config import Config
    from dvc.repo import Repo

    if not (workdir / ".dvc").is_dir():
        Repo.init(str(workdir)).close()
    config = Config(dvc_dir=str(workdir / ".dvc"))
    if config["core"].get("no_scm"):
        with config.edit("repo") as conf:
            conf["core"].pop("no_scm", None)
    dvc_gitignore = workdir / ".dvc" / ".gitignore"
    if not dvc_gitignore.exists():  # what `dvc init` writes with git: DVC's own state is never committed
        dvc_gitignore.write_text("/config.local\n/tmp\n/cache\n")
    # git-ignore every cached output now (DVC does it when a stage runs; outputs of an existing
    # workspace would otherwise be committed)
    with Repo(str(workdir)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                if out.use_scm_ignore:
                    Path(out.fspath).parent.mkdir(parents=True, exist_ok=True)  # its .gitignore's folder
                    out.ignore()
