"""The ARM path without hardware: infra/rpc/emulated-pi.sh as a Raspberry Pi 4 behind a real tracker.

Real components throughout: a TVM RPC tracker (infra/rpc/start-tracker.sh) on 127.0.0.1 and the
emulated board (``emulated-pi.sh start``: Debian's arm64 python3.11 with the aarch64 TVM wheel
under qemu-aarch64-static) registered under the key ``rasp4b-emulated``. The PFP MLP and LeNet
are cross-compiled for ``rasp4b``, uploaded and run there, and compared with the host build; a
short Meta Scheduler tuning measures its candidates on the board.

The runtime folder is cached outside the repo (``~/.cache/pfp/emulated-pi/<versions>``, or
``$PFP_EMULATED_PI_CACHE``): a cold build takes about a minute, then `build` is a no-op. The
Meta Scheduler test tunes three small tasks on the board; about 2 minutes in all.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from pfp.backends.tvm import graph, pipeline
from pfp.backends.tvm.targets import ARM_CROSS_COMPILER, TargetName
from pfp.backends.tvm.tuning import config as tune_config
from pfp.backends.tvm.tuning import search
from pfp.backends.tvm.tuning.records import open_database
from pfp.spec import build_spec

from ..backends.tvm.helpers import (
    RPC_DIR,
    assert_close,
    random_params,
)

SCRIPT = RPC_DIR / "emulated-pi.sh"
KEY = "rasp4b-emulated"  # the script's default key
BATCH = 2
BUILD_TIMEOUT = 1200  # a cold build downloads ~130 MB (Debian arm64 packages, aarch64 wheels)
SESSION_TIMEOUT = 120


def _script(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(["nice", "-n", "19", "bash", str(SCRIPT), *args], env=env, capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        pytest.fail(f"emulated-pi.sh {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}",
                    pytrace=False)
    return result




@pytest.fixture(scope="module")
def runtime(script_env) -> Path:
    """The runtime folder (built, or taken from the cache)."""
    start = time.monotonic()
    path = Path(_script("build", env=script_env, timeout=BUILD_TIMEOUT).stdout.strip().splitlines()[-1])
    print(f"emulated-pi build: {time.monotonic() - start:.1f} s -> {path}")
    assert (path / "bin" / "python3").is_file() and (path / "MANIFEST").is_file()
    return path




def run_on_board(address: str, library: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upload ``library``, run its ``main`` on the board's CPU; the session ends on return."""
    host, port = tune_config.parse_tracker(address)
    remote = tvm.rpc.connect_tracker(host, port).request(KEY, session_timeout=SESSION_TIMEOUT)
    remote.upload(str(library))
    device = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(library.name), device)
    vm.set_input("main", tvm.runtime.tensor(x, device))
    vm.invoke_stateful("main")
    mean, var = (out.numpy() for out in vm.get_outputs("main"))
    return mean, var


def _end_sessions() -> None:
    gc.collect()  # the board serves one session at a time: drop any left before the next request


# --------------------------------------------------------------------------- the runtime folder

def test_build_is_cached_and_interpreter_children_are_emulated(script_env, runtime):
    manifest = (runtime / "MANIFEST").stat().st_mtime_ns
    start = time.monotonic()
    again = _script("build", env=script_env, timeout=60).stdout.strip().splitlines()[-1]
    assert Path(again) == runtime and (runtime / "MANIFEST").stat().st_mtime_ns == manifest
    assert time.monotonic() - start < 30  # a no-op: no download, no rebuild
    check = _script("check", env=script_env, timeout=300).stdout
    assert "aarch64 python 3.11" in check and f"tvm {tvm.__version__}" in check
    assert f"child interpreter: aarch64 ({runtime / 'bin' / 'python3'})" in check  # sys.executable re-enters qemu


# --------------------------------------------------------------------------- inference over RPC

@pytest.mark.parametrize("architecture", ["mlp", "lenet"])
def test_cross_compiled_network_matches_host(board, architecture, tmp_path):
    spec = build_spec(architecture)
    params = random_params(spec, seed=0)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1)).numpy()
    host_mean, host_var = pipeline.compile_pfp(spec, params, batch_size=BATCH)(x)
    arm = pipeline.compile_pfp(spec, params, batch_size=BATCH, target=TargetName.RASP4B)
    library = arm.export(tmp_path / f"{architecture}_rasp4b.so")
    assert int.from_bytes(library.read_bytes()[18:20], "little") == 183  # EM_AARCH64
    _end_sessions()
    mean, var = run_on_board(board, library, x)
    _end_sessions()
    assert mean.shape == var.shape == (BATCH, 10)
    assert_close(mean, host_mean, rtol=1e-4, what=f"{architecture} logit mean (board vs host)")
    assert_close(var, host_var, rtol=1e-4, atol_fraction=0.0, what=f"{architecture} logit var (board vs host)")


# --------------------------------------------------------------------------- tuning on the board

def test_meta_scheduler_tuning_on_the_board(board, tmp_path):
    spec = build_spec("mlp")
    params = random_params(spec, seed=0)
    mod = graph.build_pfp_module(spec, params, batch_size=1)
    trials = 2
    config = tune_config.TuneConfig(trials_per_task=trials, max_trials_global=3 * trials, num_trials_per_iter=trials,
                             target="rasp4b", work_dir=str(tmp_path / "tune"), builder_workers=1, number=1, repeat=1,
                             min_repeat_ms=1, population_size=16, genetic_num_iters=1, init_min_unmeasured=4, seed=0,
                             session_timeout_sec=SESSION_TIMEOUT, rpc_tracker=board, rpc_key=KEY,
                             finalists=1, selection_rounds=1)  # a short run-off: one emulated round
    report = tune_config.TuneReport()
    _end_sessions()
    database = search.tune_module(mod, config=config, report=report)
    print(f"tuning on the emulated board: {report.seconds:.1f} s, {report.new_records} records")

    work_dir = Path(config.work_dir)
    assert (work_dir / "database_workload.json").stat().st_size > 0
    assert (work_dir / "database_tuning_record.json").stat().st_size > 0
    assert {"fc1_dense_joint_first", "fc2_dense_joint", "fc3_dense_joint"} <= set(report.tuned)
    records = open_database(work_dir).get_all_tuning_records()
    assert report.new_records == len(records) >= 3 * trials
    failed = [r for r in records if r.run_secs is None or not len(r.run_secs)
              or any(float(s) >= 1e9 for s in r.run_secs)]  # failed runs are recorded as 1e10 s
    assert not failed, f"{len(failed)} of {len(records)} candidates did not run on the emulated board"
    # the run-off measured each task's hand schedule and best record again, on the board
    assert {"fc1_dense_joint_first", "fc2_dense_joint", "fc3_dense_joint"} <= set(report.side_by_side)
    assert all(report.hand_ms[name] > 0 and report.other_ms[name] > 0 for name in report.side_by_side)

    # the tuned module runs on the board and agrees with the host build
    x = torch.randn(1, *spec.input_shape, generator=torch.Generator().manual_seed(1)).numpy()
    host_mean, host_var = pipeline.compile_pfp(spec, params, batch_size=1)(x)
    library = tmp_path / "mlp_tuned.so"
    pipeline.compile_tuned(mod, "rasp4b", database).export_library(str(library), cc=shutil.which(ARM_CROSS_COMPILER))
    _end_sessions()
    mean, var = run_on_board(board, library, x)
    _end_sessions()
    assert_close(mean, host_mean, rtol=1e-4, what="tuned logit mean (board vs host)")
    assert_close(var, host_var, rtol=1e-4, atol_fraction=0.0, what="tuned logit var (board vs host)")


# --------------------------------------------------------------------------- the pipeline's stages

REPO = Path(__file__).resolve().parents[2]


def _stage(module: str, workspace: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), TVM_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
    env.pop("PFP_MLFLOW_PARENT_RUN_ID", None)
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=workspace, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_tune_stage_uses_the_emulated_board_and_keeps_its_timings_apart(board, tmp_path):
    import json

    import yaml

    from pfp.backends.torch_ref import pfp_forward
    from pfp.convert import convert_posterior

    from ..common import write_model_artifacts, write_prepared

    workspace = tmp_path / "workspace"
    posterior = write_model_artifacts(workspace, "mlp")
    pfp_model = convert_posterior(posterior)
    (workspace / "params.yaml").write_text(yaml.safe_dump({
        "models": ["mlp"], "train": {"mlp": {}},
        # hand schedules only: the Meta Scheduler's search on the board is test_meta_scheduler_tuning_on_the_board's
        "tune": {"target": "rasp4b", "batch_sizes": [1], "variants": ["pfp"], "trials_per_task": 0, "number": 1,
                 "min_repeat_ms": 1, "population_size": 4, "rpc": {"tracker": board, "key": KEY, "emulated": True}},
        "bundle": {"batch_sizes": [1], "head_draws": 16},
        "benchmark": {"batch_sizes": [1], "svi_samples": 3, "repeat": 1, "tvm_number": 1, "tvm_repeat": 1,
                      "serving_batch_sizes": [1], "serving_threads": [1], "serving_rounds": 1, "serving_turn_ms": 2.0,
                      "serving_max_calls": 3, "serving_warmup": 1, "serving_torch_threads": 1, "head_images": 12,
                      "peers": []}}))  # the peers are tests/test_bench.py's
    _end_sessions()
    _stage("tasks.tune", workspace, "mlp")

    summary = json.loads((workspace / "metrics/tune_mlp.json").read_text())
    assert summary["target"] == "rasp4b" and summary["emulated"] is True
    assert summary["runner"] == f"rpc:{KEY}@{board}"
    (library_entry,) = summary["libraries"]
    assert all(row["hand_ms"] > 0 for row in library_entry["tasks"])  # measured on the board
    library = workspace / library_entry["library"]
    assert library == workspace / "models/mlp/tvm/rasp4b/pfp_b1.so"
    assert int.from_bytes(library.read_bytes()[18:20], "little") == 183  # EM_AARCH64

    # the stage's library runs on the board and computes the reference
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_mean, ref_var = pfp_forward(posterior.spec, pfp_model.params, x)
    mean, var = run_on_board(board, library, x.numpy())
    _end_sessions()
    assert_close(mean, ref_mean, what="stage library mean (board)")
    assert_close(var, ref_var, what="stage library var (board)")

    # the host benchmark never runs (or reports) the board's libraries: its compiled variants are host builds
    # (its serving part needs the prepared data and the host bundle)
    write_prepared(workspace)
    _stage("tasks.bundle", workspace, "mlp")
    _stage("tasks.benchmark", workspace)
    latency = json.loads((workspace / "metrics/latency.json").read_text())
    assert set(latency["mlp"]["batch_1"]["schedules"].values()) == {"hand"}
    assert "emulated" not in json.dumps(latency)
