"""The DVC workspace a pipeline run works in, and the environment its stage processes get.

The workspace is this repo itself (params.yaml) or a separate folder holding a copy of the stage
code, ``dvc.yaml`` and a params file with every default filled in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pfp import tracking
from pfp.config import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a separate DVC workspace needs from the repo: the stage code and the stage graph.
WORKSPACE_CODE = ("src/pfp", "src/pfp_runtime", "tasks", "dvc.yaml")
DATA_PATH_KEYS = ("mnist_dir", "ood_dir", "ambiguous_dir", "download_dir")

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


def prepare_workspace(workdir: Path, params_file: Path | None) -> Path:
    """Make ``workdir`` a DVC workspace: the repo itself, or a copy of the stage code + params."""
    workdir = workdir.resolve()
    if workdir == REPO_ROOT:
        if params_file is not None and params_file.resolve() != (REPO_ROOT / "params.yaml"):
            raise ValueError("--params: the repo workspace always uses params.yaml; give --workdir for another params file")
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
    if not (workdir / ".dvc").is_dir():
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=workdir, env=stage_env(), check=True)
    return workdir
