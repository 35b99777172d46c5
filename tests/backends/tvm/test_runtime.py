"""Compiled models: the Predictor protocol, export / load with metadata (CPU features, model), timing, profiling."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends.base import Predictor, PredictorKind  # noqa: E402
from pfp.backends.tvm import (  # noqa: E402
    pipeline,
    runtime,  # noqa: E402
)
from pfp.backends.tvm.targets import ARM_CROSS_COMPILER  # noqa: E402
from tests.common import require_command  # noqa: E402

from .helpers import BATCH  # noqa: E402


def test_runtime_imports_without_torch():
    code = "import pfp.backends.tvm.runtime, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compiled_models_are_predictors(mlp_case, mlp_params_runner):
    spec, _, x = mlp_case
    assert isinstance(mlp_params_runner, Predictor)
    assert mlp_params_runner.kind is PredictorKind.PFP
    outputs = mlp_params_runner.predict(np.concatenate([x.numpy()] * 3)[:BATCH + 2])
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(BATCH + 2, 10)] * 2
    described = mlp_params_runner.describe()
    assert described["kind"] == "pfp" and described["model"] == spec.name
    assert described["batch_size"] == BATCH and described["input_shape"] == [BATCH, *spec.input_shape]
    assert described["cpu_features"] == runtime.target_cpu_features(mlp_params_runner.target)
    json.dumps(described)


def test_export_load_round_trip(tmp_path, network, joint_runner):
    _, _, x, _, _ = network
    path = joint_runner.export(tmp_path / "model.so")
    assert path.is_file() and (tmp_path / "model.so.json").is_file()
    loaded = runtime.load(path)
    assert isinstance(loaded, runtime.CompiledPFP)
    assert loaded.input_shape == joint_runner.input_shape
    expected = joint_runner(x.numpy())
    for got, want in zip(loaded(x.numpy()), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="loaded from a library"):
        loaded.export(tmp_path / "again.so")


def test_export_load_round_trip_with_weight_parameters(tmp_path, mlp_case, mlp_params_runner):
    _, _, x = mlp_case
    path = mlp_params_runner.export(tmp_path / "mlp_params.so")
    assert (tmp_path / "mlp_params.so.weights.npz").is_file()
    loaded = runtime.CompiledPFP.load(path)
    for got, want in zip(loaded(x.numpy()), mlp_params_runner(x.numpy())):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not a deterministic model"):
        runtime.CompiledDeterministic.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        runtime.load(tmp_path / "missing.so")


def test_time(mlp_params_runner):
    timing = mlp_params_runner.time(number=2, repeat=2)
    assert timing["mean_ms"] > 0 and timing["repeat"] == 2


def test_profile_lists_every_operator_of_the_network(mlp_params_runner):
    rows = mlp_params_runner.profile(number=2)
    names = {row["operator"] for row in rows}
    assert {"fc1_dense_joint_first", "fc2_dense_joint", "fc3_dense_joint"} <= names
    assert all(row["ms"] > 0 and row["calls"] >= 1 for row in rows)
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)
    assert not any(name.startswith("vm.builtin") for name in names)
    # the instrument is removed afterwards: a run calls no Python function at all
    main = mlp_params_runner._machine()["main"]
    args = [tvm.runtime.tensor(np.zeros(mlp_params_runner.input_shape, np.float32)), *mlp_params_runner._weight_args]
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_name) if event == "call" else None)
    try:
        main(*args)
    finally:
        sys.setprofile(None)
    assert calls == [], calls


def test_export_keeps_the_provenance_info(tmp_path, mlp_case):
    spec, params, x = mlp_case
    runner = pipeline.compile_pfp(spec, params, batch_size=BATCH)
    runner.info = {"variant": "pfp", "variance_scale": 0.5}
    loaded = runtime.load(runner.export(tmp_path / "m.so"))
    assert loaded.info == {"variant": "pfp", "variance_scale": 0.5}
    assert not list(tmp_path.glob(".*tmp*")), "temp files left behind"


def test_arm_module_does_not_run_on_the_host(arm_runner, mlp_case):
    _, _, x = mlp_case
    with pytest.raises(RuntimeError, match="compiled for aarch64"):
        arm_runner(x.numpy())


def test_arm_export_without_cross_compiler_is_a_clear_error(arm_runner, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="gcc-aarch64-linux-gnu"):
        arm_runner.export(tmp_path / "arm.so")


def test_arm_cross_export(arm_runner, tmp_path):
    require_command(ARM_CROSS_COMPILER, "gcc-aarch64-linux-gnu")
    path = arm_runner.export(tmp_path / "mlp_rasp4b.so")
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    with pytest.raises(RuntimeError, match="compiled for aarch64"):
        runtime.load(path)



def test_load_refuses_a_library_needing_cpu_features_the_host_lacks(tmp_path, mlp_params_runner):
    path = mlp_params_runner.export(tmp_path / "m.so")
    meta_path = tmp_path / "m.so.json"
    metadata = json.loads(meta_path.read_text())
    assert metadata["cpu_features"] == mlp_params_runner.cpu_features
    metadata["cpu_features"] = [*metadata["cpu_features"], "fake_feature_9000"]
    meta_path.write_text(json.dumps(metadata))
    loaded_modules = []
    original = tvm.runtime.load_module
    try:
        tvm.runtime.load_module = lambda *args: loaded_modules.append(args) or original(*args)
        with pytest.raises(runtime.IncompatibleLibraryError, match="fake_feature_9000.*rebuild it for this host"):
            runtime.load(path)
    finally:
        tvm.runtime.load_module = original
    assert loaded_modules == []  # refused before any of its code was loaded


def test_load_checks_the_model(tmp_path, mlp_case, mlp_params_runner):
    spec, _, x = mlp_case
    path = mlp_params_runner.export(tmp_path / "m.so")
    assert json.loads((tmp_path / "m.so.json").read_text())["model"] == spec.name
    loaded = runtime.load(path, expected_model=spec.name)
    assert loaded.model == spec.name
    np.testing.assert_array_equal(loaded.predict(x.numpy())[0], mlp_params_runner.predict(x.numpy())[0])
    with pytest.raises(runtime.IncompatibleLibraryError, match="'mlp' model, not the 'lenet' model"):
        runtime.load(path, expected_model="lenet")
