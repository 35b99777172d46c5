"""The tiny pipeline run the end-to-end tests share: the flow, run as `make run` runs it, on tiny data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = (["prepare"] + [f"{s}@{m}" for s in ("train", "convert", "calibrate", "tune", "bundle", "evaluate") for m in ("mlp", "lenet")]
          + ["report", "benchmark"])
PROMOTION_STEP = "publish+promote"  # the flow's step after the stages (in its own process)
STORAGE_STEP = "commit+push"  # and its last: the workspace commit and the DVC push
METRIC_KEYS = {"accuracy", "nll", "ece", "brier", "auroc_mi", "auroc_sme", "auroc_var", "mi_id", "mi_ood", "sme_id", "sme_ood"}

TINY_PARAMS = {
    "seed": 0,
    "models": ["mlp", "lenet"],
    "data": {"mnist_dir": str(REPO / "data/embedded/mnist"), "ood_dir": str(REPO / "data/embedded/fashion-mnist"),
             "val_size": 200, "train_size": 600, "test_size": 200, "ood_size": 200},
    "ambiguous": {"train_images": 30, "val_images": 20, "test_images": 30, "labels_per_image": 5, "min_entropy": 0.05, "max_mi": 0.5,
                  "vae": {"epochs": 1, "hidden": [64], "latent_dim": 8}, "ensemble": {"members": 2, "epochs": 1}},
    "train": {"mlp": {"epochs": 1, "max_steps": 5}, "lenet": {"epochs": 1, "max_steps": 5}},
    "calibrate": {"objective": "mc_variance", "variance_scales": [0.5, 1.0], "logit_samples": 20, "fidelity_samples": 20,
                  "fidelity_images": 20},
    "evaluate": {"svi_samples": 4, "logit_samples": 20, "moment_samples": 10, "moment_images": 50, "fidelity_samples": 20,
                 "fidelity_images": 20},
    # measured hand schedules only (the Meta Scheduler search is tested in tests/backends/tvm and tests/infra);
    # one batch size: several are tested in tests/test_tuning.py and tests/test_bench.py, and each costs CI minutes;
    # pfp_cov is the models' PFP (convert.covariance_layers 2): the benchmark compiles the plain pfp itself
    "tune": {"batch_sizes": [2], "variants": ["pfp_cov", "det", "svi"], "trials_per_task": 0, "svi_samples": 3,
             "number": 1, "min_repeat_ms": 1},
    "bundle": {"batch_sizes": [2], "head_draws": 16},  # the tune stage's batch size: compiled with its database
    # the serving benchmark at the bundle's one batch size and one thread count, briefly (tests/test_serving_bench.py has the rest);
    # no peers: every flow run of the e2e tests would build them again (CI minutes); tests/test_bench.py and
    # tests/stages/test_benchmark.py build and time every peer
    "benchmark": {"batch_sizes": [2], "svi_samples": 3, "repeat": 1, "tvm_number": 1, "tvm_repeat": 1,
                  "serving_batch_sizes": [2], "serving_threads": [1], "serving_rounds": 3, "serving_turn_ms": 10.0,
                  "serving_warmup": 1, "peers": []},
}


def _pipeline_env(tracking_uri: str) -> dict:
    """The environment the flow and its stages run in: our tracking server and experiment, one OpenMP thread."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "DVC_NO_ANALYTICS": "1", "PFP_MLFLOW_EXPERIMENT": "pfp-e2e",
            "OMP_NUM_THREADS": "1"}


# what must not reach the terminal: library logs (TVM, Meta Scheduler, Prefect, MLflow, DVC, Python warnings)
LIBRARY_LINES = re.compile(r"(?i:meta_schedule|task_scheduler|tvm|Flow run|Task run|prefect|mlflow|alembic|Running stage|dvc\.lock|"
                           r"Traceback)|\b(INFO|DEBUG|WARNING)\b|Warning:")


def _run_flow(workdir: Path, params_file: Path, summary: Path, tracking_uri: str, prefect_home: Path) -> tuple[dict, str, str]:
    """Run the flow as `make run` does; returns its summary JSON and its terminal output (stdout, stderr)."""
    env = {**_pipeline_env(tracking_uri), "PREFECT_HOME": str(prefect_home)}
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--workdir", str(workdir), "--params", str(params_file),
                             "--summary", str(summary)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    logs = workdir / "logs"
    flow_log = (logs / "flow.log").read_text()[-5000:] if (logs / "flow.log").is_file() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:] + flow_log
    return json.loads(summary.read_text()), result.stdout, result.stderr


@dataclass
class TinyRun:
    """One flow run on tiny data in ``workdir`` (data: a copy of data/embedded under ``data``, free to change)."""

    root: Path
    workdir: Path
    params_file: Path
    data: Path
    summary: dict
    stdout: str
    stderr: str
    tracking_uri: str


def tiny_run(root: Path, tracking_uri: str, *, params: dict | None = None) -> TinyRun:
    """Copy the embedded data to ``root/data``, write the tiny params there and run the flow once."""
    data = root / "data"
    shutil.copytree(REPO / "data/embedded", data, dirs_exist_ok=True)
    values = json.loads(json.dumps(params or TINY_PARAMS))
    values["data"].update(mnist_dir=str(data / "mnist"), ood_dir=str(data / "fashion-mnist"))
    params_file = root / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(values))
    workdir = root / "workspace"
    summary, stdout, stderr = _run_flow(workdir, params_file, root / "first.json", tracking_uri, root / "prefect")
    return TinyRun(root, workdir, params_file, data, summary, stdout, stderr, tracking_uri)
