"""Stage scripts end to end (subprocess): bad inputs give exit code 2, a one-line message
naming the key or file, and leave no output behind."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pfp.artifacts.posterior import save_posterior
from pfp.bnn import Posterior, site_names
from pfp.spec import build_spec

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"


def stage_env(db: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PFP_MLFLOW_PARENT_RUN_ID"}
    env.update({
        # this checkout's package first, whichever checkout the (shared) venv installed in editable mode
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "PFP_GIT_COMMIT": "test",  # no `git rev-parse` from the tracking code
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    return env


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One SQLite tracking database for the module: creating its schema costs seconds, so
    only the first stage run that reaches MLflow pays for it."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def params_yaml(mnist_dir=EMBEDDED / "mnist", ood_dir=EMBEDDED / "fashion-mnist", models="[mlp]", epochs=1) -> str:
    return textwrap.dedent(f"""\
        seed: 0
        models: {models}
        data: {{mnist_dir: "{mnist_dir}", ood_dir: "{ood_dir}", val_size: 50, train_size: 100, test_size: 20, ood_size: 20}}
        ambiguous:
          train_images: 4
          val_images: 2
          test_images: 2
          labels_per_image: 2
          max_mi: 1.0
          min_entropy: 0.0
          vae: {{epochs: 1, hidden: [16], latent_dim: 2}}
          ensemble: {{members: 2, epochs: 1}}
        train:
          mlp: {{epochs: {epochs}, batch_size: 32}}
        """)


def run_stage(workdir: Path, db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], check=False, cwd=workdir, env=stage_env(db),
                          capture_output=True, text=True, timeout=120)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # MLflow may log INFO lines first; the stage's message starts at the one "error:" line
    lines = result.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, result.stderr
    message = "\n".join(lines[starts[0]:])
    for fragment in fragments:
        assert fragment in message, (fragment, result.stderr)


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (params_yaml(models="[mlp, resnet]"), ("params.yaml: invalid parameters", "models.1", "'resnet'")),
        (params_yaml(epochs=-3), ("params.yaml: invalid parameters", "train.mlp.epochs", "greater than or equal to 0", "-3")),
    ],
    ids=["unknown-model", "negative-epochs"],
)
def test_train_invalid_params(tmp_path, mlflow_db, text, fragments):
    (tmp_path / "params.yaml").write_text(text)
    result = run_stage(tmp_path, mlflow_db, "tasks.train", "mlp")
    assert_user_error(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no models/, metrics/, plots/, mlflow files


# --------------------------------------------------------------------------- convert


def write_posterior(path: Path) -> dict[str, np.ndarray]:
    spec = build_spec("mlp")
    g = torch.Generator().manual_seed(0)
    loc = {s: 0.05 * torch.randn(shape, generator=g) for l in spec.parametric_layers()
           for s, shape in zip(site_names(l.name), (l.weight_shape, l.bias_shape))}
    save_posterior(Posterior(spec, loc, {s: torch.full_like(v, 0.01) for s, v in loc.items()}), path)
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("fc2_weight.loc", np.nan, "fc2_weight.loc contains NaN or infinite values"),
        ("fc1_bias.scale", 0.0, "fc1_bias.scale has 1 non-positive value(s)"),
    ],
    ids=["nan-loc", "zero-scale"],
)
def test_convert_rejects_bad_posterior(tmp_path, mlflow_db, key, value, problem):
    (tmp_path / "params.yaml").write_text(params_yaml())
    posterior = tmp_path / "models" / "mlp" / "posterior.npz"
    posterior.parent.mkdir(parents=True)
    arrays = write_posterior(posterior)
    arrays[key].flat[7] = value
    np.savez(posterior, **arrays)
    result = run_stage(tmp_path, mlflow_db, "tasks.convert", "mlp")
    assert_user_error(result, "models/mlp/posterior.npz", problem)
    assert not (tmp_path / "models" / "mlp" / "pfp.npz").exists()
    assert sorted(p.name for p in posterior.parent.iterdir()) == ["posterior.npz"]  # no temp file either


def test_convert_refuses_another_models_posterior(tmp_path, mlflow_db):
    """LeNet's posterior copied into the MLP's slot: exit code 2, the file and both models named."""
    (tmp_path / "params.yaml").write_text(params_yaml())
    posterior = tmp_path / "models" / "mlp" / "posterior.npz"
    spec = build_spec("lenet")
    loc = {s: torch.zeros(shape) for l in spec.parametric_layers()
           for s, shape in zip(site_names(l.name), (l.weight_shape, l.bias_shape))}
    save_posterior(Posterior(spec, loc, {s: torch.full_like(v, 0.01) for s, v in loc.items()}), posterior)
    result = run_stage(tmp_path, mlflow_db, "tasks.convert", "mlp")
    assert_user_error(result, "models/mlp/posterior.npz", "of model 'lenet', expected 'mlp'", "belongs to another model")
    assert sorted(p.name for p in posterior.parent.iterdir()) == ["posterior.npz"]


# --------------------------------------------------------------------------- prepare


def test_prepare_missing_data_folder(tmp_path, mlflow_db):
    missing = tmp_path / "no-such-folder"
    (tmp_path / "params.yaml").write_text(params_yaml(mnist_dir=missing))
    result = run_stage(tmp_path, mlflow_db, "tasks.prepare")
    assert_user_error(result, "data.mnist_dir", str(missing), "does not exist")
    assert not (tmp_path / "data").exists()


def test_prepare_truncated_idx_file(tmp_path, mlflow_db):
    mnist = tmp_path / "mnist"
    shutil.copytree(EMBEDDED / "mnist", mnist)
    bad = mnist / "t10k-images-idx3-ubyte.gz"
    payload = bad.read_bytes()
    bad.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(EOFError):  # really truncated
        gzip.decompress(bad.read_bytes())
    (tmp_path / "params.yaml").write_text(params_yaml(mnist_dir=mnist))
    before = files_under(tmp_path)
    result = run_stage(tmp_path, mlflow_db, "tasks.prepare")
    assert_user_error(result, str(bad), "truncated")
    assert not (tmp_path / "data").exists()
    assert {f for f in files_under(tmp_path) - before if not f.startswith("mlruns")} == set()
