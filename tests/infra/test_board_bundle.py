"""A deployed bundle on the emulated Raspberry Pi 4: the torch-free runtime there, and its latency over RPC.

Real components throughout: bundles built by ``pfp.bundle.build_bundle`` (``tests.common.make_bundle``:
a random MLP posterior, target ``host`` and ``rasp4b``, batch sizes 1 and 2), the emulated Pi's
Python (``infra/rpc/emulated-pi.sh``: Debian's arm64 python3.11, numpy and the aarch64 TVM wheel
under qemu-aarch64-static, no torch) given a copy of ``src/pfp_runtime`` alone, and for the
latency a TVM RPC tracker with the emulated board registered under ``rasp4b-emulated``.
About 1.5 minutes warm (the board's RPC server takes 15-40 s to start under qemu).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pfp import board as board_module
from pfp.backends.tvm.remote import RemoteError, bundle_latency_over_rpc
from pfp.backends.tvm.tuning.measure import TrackerError
from pfp.data.idx import read_idx_images
from pfp_runtime import load_bundle

from ..backends.tvm.helpers import (
    RPC_DIR,
    assert_close,
)
from ..common import make_bundle

REPO = Path(__file__).resolve().parents[2]
SCRIPT = RPC_DIR / "emulated-pi.sh"
KEY = "rasp4b-emulated"
BATCH_SIZES = (1, 2)
FLOAT_OUTPUTS = ("probs", "logit_mean", "logit_var", "mi", "sme")


def _end_sessions() -> None:
    gc.collect()  # the board serves one session at a time: drop any left before the next request


# --------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def board_python(script_env) -> Path:
    """The emulated Pi's Python (built on first use, ~1 min, then cached)."""
    start = time.monotonic()
    python = board_module.emulated_pi_python()
    print(f"emulated Pi: {python} ({time.monotonic() - start:.1f} s)")
    return python


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The same model's bundle for the host and for rasp4b (the board's takes the host bundle's OOD threshold)."""
    root = tmp_path_factory.mktemp("bundles")
    start = time.monotonic()
    host = make_bundle(root / "host", "mlp", target="host", batch_sizes=BATCH_SIZES)
    arm = make_bundle(root / "rasp4b", "mlp", target="rasp4b", batch_sizes=BATCH_SIZES,
                      threshold=host.metadata["ood"]["threshold"])
    print(f"bundles built in {time.monotonic() - start:.1f} s")
    library = arm.folder / arm.metadata["libraries"]["1"]
    assert int.from_bytes(library.read_bytes()[18:20], "little") == 183  # EM_AARCH64
    return {"host": host.folder, "rasp4b": arm.folder}


@pytest.fixture(scope="module")
def images(bundles) -> np.ndarray:
    """Five real test images: three MNIST digits and the two Fashion-MNIST items the host bundle flags OOD most clearly."""
    digits = read_idx_images(REPO / "data/embedded/mnist/t10k-images-idx3-ubyte.gz")[:3]
    fashion = read_idx_images(REPO / "data/embedded/fashion-mnist/t10k-images-idx3-ubyte.gz")[:40]
    host = load_bundle(bundles["host"])
    x = np.concatenate([digits, fashion[np.argsort(host.predict(fashion).mi)[-2:]]])
    prediction = host.predict(x)
    # the OOD flags compared below are not all alike, and no score is within 1e-3 of the threshold
    assert prediction.ood.any() and not prediction.ood.all(), prediction.mi
    assert np.all(np.abs(prediction.mi - host.bundle.ood_threshold) > 1e-3 * host.bundle.ood_threshold)
    return x




def _assert_same_prediction(board_outputs: dict, host_outputs: dict, what: str) -> None:
    for name in FLOAT_OUTPUTS:
        assert_close(board_outputs[name], host_outputs[name], rtol=1e-4, what=f"{what}: {name} (board vs host)")
    np.testing.assert_array_equal(board_outputs["predicted"], host_outputs["predicted"], err_msg=f"{what}: predicted")
    np.testing.assert_array_equal(board_outputs["ood"], host_outputs["ood"], err_msg=f"{what}: ood")


# --------------------------------------------------------------------------- the runtime on the board

def test_importing_pfp_runtime_on_the_board_imports_neither_torch_nor_tvm(script_env, board_python, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "pfp_runtime").symlink_to(board_module.runtime_package(), target_is_directory=True)
    code = ("import json, platform, sys; import pfp_runtime, pfp_runtime.cli; "
            "print(json.dumps([platform.machine(), 'torch' in sys.modules, sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('tvm', 'torch', 'pfp'))]))")
    env = dict(script_env, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    result = subprocess.run(["bash", str(SCRIPT), "run", "-c", code], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    machine, torch_imported, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert machine == "aarch64" and torch_imported is False and imported == []


def test_bundle_on_the_emulated_board_predicts_as_the_host_bundle(board_python, bundles, images):
    host = load_bundle(bundles["host"]).predict(images).to_dict()
    start = time.monotonic()
    run = board_module.run_bundle_on_board(bundles["rasp4b"], images)
    print(f"board run: {time.monotonic() - start:.1f} s (import {run.info['import_seconds']:.1f} s, load "
          f"{run.info['load_seconds']:.1f} s, predict {run.info['predict_seconds']:.2f} s)")
    info = run.info
    assert info["machine"] == "aarch64" and info["python"].startswith("3.11")
    assert info["describe"]["target"] == "rasp4b" and info["describe"]["batch_sizes"] == list(BATCH_SIZES)
    assert info["images"] == [5, 28, 28]  # 5 images: batches of 2, 2 and 1
    _assert_same_prediction(run.outputs, host, "rasp4b bundle on the emulated board")

    # torch-free and tvm-package-free, and nothing of the repo but the copied package
    assert info["after_import"] == {"torch": False, "tvm": False, "tvm_ffi": False}
    assert info["after_predict"] == {"torch": False, "tvm": False}
    assert info["tvm_modules"] == [] and info["project_modules"] == [] and info["modules_outside"] == []
    assert run.torch_imports == []  # the tripwire package: nobody tried `import torch`
    assert Path(info["runtime_package"]).parent.name == "site" and str(REPO) not in info["runtime_package"]
    assert not [p for p in info["sys_path"] if str(REPO) in p]
    # qemu-user shows the host's /proc/cpuinfo; the runtime reads the emulated CPU's features from AT_HWCAP
    assert "asimd" in info["hwcap_features"] and "fp" in info["hwcap_features"]
    assert info["cpuinfo_check"] == "accepted"  # pfp_runtime reads AT_HWCAP on aarch64, not qemu's host cpuinfo


def test_predict_command_on_the_emulated_board(board_python, bundles, images, tmp_path):
    np.save(tmp_path / "images.npy", images[:1])
    result = subprocess.run([sys.executable, "-m", "pfp.board", "predict", str(bundles["rasp4b"]), str(tmp_path / "images.npy"),
                             "--out", str(tmp_path / "out.npz")], env=dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "aarch64 python 3.11" in result.stdout and "torch imported: False" in result.stdout
    host = load_bundle(bundles["host"]).predict(images[:1]).to_dict()
    with np.load(tmp_path / "out.npz") as archive:
        _assert_same_prediction(dict(archive), host, "predict command")


def test_missing_qemu_is_named(bundles, images, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(board_module.BoardError, match="qemu-aarch64-static not found.*qemu-user-static"):
        board_module.run_bundle_on_board(bundles["rasp4b"], images)


# --------------------------------------------------------------------------- latency over RPC

def test_bundle_latency_over_rpc_on_the_emulated_board(board, bundles, images):
    _end_sessions()
    start = time.monotonic()
    rows = bundle_latency_over_rpc(bundles["rasp4b"], board, KEY, emulated=True, number=3, repeat=3, images=images,
                                   keep_outputs=True)
    _end_sessions()
    print(f"latency over RPC: {time.monotonic() - start:.1f} s; "
          + ", ".join(f"batch {r['batch_size']}: {r['median_ms']:.2f} ms" for r in rows))
    assert [row["batch_size"] for row in rows] == list(BATCH_SIZES)
    host = load_bundle(bundles["host"])
    for row in rows:
        assert row["median_ms"] > 0 and row["mean_ms"] > 0 and row["min_ms"] > 0
        assert row["min_ms"] <= row["median_ms"] and row["per_image_ms"] == pytest.approx(row["median_ms"] / row["batch_size"])
        assert row["emulated"] is True and row["key"] == KEY and row["tracker"] == board
        assert row["model"] == "mlp" and row["target"] == "rasp4b" and row["number"] == 3 and row["repeat"] == 3
        expected = host.predict(images[:row["batch_size"]]).to_dict()
        for name in FLOAT_OUTPUTS:  # the timed run's outputs, on the board
            assert_close(row["outputs"][name], expected[name], rtol=1e-4, what=f"batch {row['batch_size']} {name} (RPC vs host)")


def test_each_session_ends_on_return_and_the_threads_are_set_on_the_board(board, bundles):
    _end_sessions()
    start = time.monotonic()
    for threads in (1, 2, None):  # no gc in between: the function itself frees the board
        (row,) = bundle_latency_over_rpc(bundles["rasp4b"], board, KEY, emulated=True, threads=threads, number=1, repeat=1,
                                         batch_sizes=[1], session_timeout=300)
        assert row["threads"] == threads and row["median_ms"] > 0
    # a session left open would block the next request until its 300 s timeout (the board serves one at a time)
    assert time.monotonic() - start < 150


def test_latency_command_takes_the_emulated_flag_from_params(board, bundles, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "models": ["mlp"], "train": {"mlp": {}},
        "tune": {"target": "rasp4b", "rpc": {"tracker": board, "key": KEY, "emulated": True}}}))
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}", TVM_NUM_THREADS="1")
    _end_sessions()
    result = subprocess.run([sys.executable, "-m", "pfp.board", "latency", str(bundles["rasp4b"]), "--number", "2",
                             "--repeat", "2", "--batch-size", "2", "--json", "rows.json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["batch_size"] == 2 and row["median_ms"] > 0 and row["mean_ms"] > 0
    assert row["emulated"] is True and row["key"] == KEY and row["tracker"] == board  # all from params.yaml
    assert "EMULATED" in result.stdout

    # an explicit flag wins over the params file
    result = subprocess.run([sys.executable, "-m", "pfp.board", "latency", str(bundles["rasp4b"]), "--tracker", board, "--key",
                             KEY, "--no-emulated", "--number", "1", "--repeat", "1", "--batch-size", "1", "--json",
                             "rows.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["emulated"] is False and row["batch_size"] == 1 and row["median_ms"] > 0


def test_latency_refuses_a_bundle_the_board_cannot_load_and_an_unknown_key(board, bundles):
    _end_sessions()
    with pytest.raises(RemoteError, match=re.escape(f"under key {KEY!r} cannot load it: the bundle is for target host (x86_64)")):
        bundle_latency_over_rpc(bundles["host"], board, KEY, emulated=True, number=1, repeat=1)
    _end_sessions()
    with pytest.raises(TrackerError, match="no server registered under key 'rasp9-nowhere'"):
        bundle_latency_over_rpc(bundles["rasp4b"], board, "rasp9-nowhere", emulated=False)
    # the board is free again: a session right after the refusals runs
    (row,) = bundle_latency_over_rpc(bundles["rasp4b"], board, KEY, emulated=True, number=1, repeat=1, batch_sizes=[1])
    assert row["median_ms"] > 0
    _end_sessions()


# --------------------------------------------------------------------------- LeNet (convolutions) on the board

def test_lenet_bundle_on_the_emulated_board_and_over_rpc(board, images, tmp_path):
    host_built = make_bundle(tmp_path / "host", "lenet", target="host", batch_sizes=BATCH_SIZES)
    arm_built = make_bundle(tmp_path / "rasp4b", "lenet", target="rasp4b", batch_sizes=BATCH_SIZES,
                            threshold=host_built.metadata["ood"]["threshold"])
    x = images[:3]  # batches of 2 and 1
    host = load_bundle(host_built.folder).predict(x).to_dict()
    run = board_module.run_bundle_on_board(arm_built.folder, x)
    assert run.info["machine"] == "aarch64" and run.info["after_predict"] == {"torch": False, "tvm": False}
    _assert_same_prediction(run.outputs, host, "lenet rasp4b bundle on the emulated board")
    _end_sessions()
    rows = bundle_latency_over_rpc(arm_built.folder, board, KEY, emulated=True, number=2, repeat=2, images=x,
                                   keep_outputs=True)
    _end_sessions()
    print("lenet latency over RPC: " + ", ".join(f"batch {r['batch_size']}: {r['median_ms']:.2f} ms" for r in rows))
    for row in rows:
        assert row["model"] == "lenet" and row["median_ms"] > 0 and row["mean_ms"] > 0 and row["emulated"] is True
        expected = load_bundle(host_built.folder).predict(x[:row["batch_size"]]).to_dict()
        for name in FLOAT_OUTPUTS:
            assert_close(row["outputs"][name], expected[name], rtol=1e-4, what=f"lenet batch {row['batch_size']} {name}")
