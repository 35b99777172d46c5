"""Whole networks through Relax + tvm.compile against the PyTorch reference; export, targets, errors."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import build as tb  # noqa: E402
from pfp.convert import pool_before_relu  # noqa: E402
from pfp.spec import Architecture, Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, ReLU, build_spec  # noqa: E402

from .helpers import assert_close, random_params  # noqa: E402

BATCH = 3


@pytest.fixture(scope="module", params=[Architecture.MLP, Architecture.LENET], ids=lambda a: a.value)
def network(request):
    """(spec, params, x, reference mean, reference var), per architecture, in the converted layer order."""
    spec = pool_before_relu(build_spec(request.param))
    params = random_params(spec, seed=0)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    return spec, params, x, ref_mean, ref_var


@pytest.fixture(scope="module")
def joint_runner(network):
    spec, params, *_ = network
    return tb.compile_pfp(spec, params, batch_size=BATCH, joint=True)


@pytest.fixture(scope="module")
def separate_runner(network):
    spec, params, *_ = network
    return tb.compile_pfp(spec, params, batch_size=BATCH, joint=False)


@pytest.fixture(scope="module")
def mlp_case():
    spec = build_spec("mlp")
    params = random_params(spec, seed=2)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(3))
    return spec, params, x


@pytest.fixture(scope="module")
def mlp_params_runner(mlp_case):
    spec, params, _ = mlp_case
    return tb.compile_pfp(spec, params, batch_size=BATCH, weights_as_params=True)


# --------------------------------------------------------------------------- whole networks

def test_joint_network_matches_reference(network, joint_runner):
    _, _, x, ref_mean, ref_var = network
    mean, var = joint_runner(x.numpy())
    assert mean.shape == var.shape == (BATCH, 10)
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")  # sums of positive terms: purely relative


def test_network_in_the_trained_layer_order_matches_reference():
    """ReLU before max-pool, as trained (``convert.pool_before_relu: false``): the fused ReLU + pool
    kernels of that order match the reference too (a small conv net: LeNet's compile takes longer)."""
    spec = ModelSpec("conv_relu_pool", (1, 12, 12), (Conv2d("conv1", 1, 4, 5, padding=2), ReLU(), MaxPool2d(),
                                                      Conv2d("conv2", 4, 6, 3), ReLU(), MaxPool2d(), Flatten(),
                                                      Dense("fc1", 24, 10)))
    params = random_params(spec, seed=0)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    runner = tb.compile_pfp(spec, params, batch_size=BATCH, joint=True)
    operators = [row["operator"] for row in runner.profile(number=1, x=x.numpy())]
    assert any(name.endswith("relu_gaussian1_maxpool_gaussian2") for name in operators), operators
    mean, var = runner(x.numpy())
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")


def test_separate_network_matches_reference(network, separate_runner):
    _, _, x, ref_mean, ref_var = network
    mean, var = separate_runner(x.numpy())
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")


def test_deterministic_twin_matches_reference(network):
    spec, params, x, _, _ = network
    weights = {name: (p.weight_mean, p.bias_mean) for name, p in params.items()}
    runner = tb.compile_deterministic(spec, weights, batch_size=BATCH)
    logits = runner(x.numpy())
    with torch.no_grad():
        expected = ref.deterministic_forward(spec, weights, x)
    assert logits.shape == (BATCH, 10)
    assert_close(logits, expected, what="logits")
    # GaussianLayerParams are accepted too (their means are the twin's weights)
    np.testing.assert_array_equal(tb.deterministic_weight_arrays(spec, params)[f"{spec.parametric_layers()[0].name}_weight"],
                                  weights[spec.parametric_layers()[0].name][0].numpy())


def test_joint_and_separate_modules_differ_in_operators(network):
    spec, params, *_ = network
    joint = tb.build_pfp_module(spec, params, batch_size=BATCH, joint=True)
    separate = tb.build_pfp_module(spec, params, batch_size=BATCH, joint=False)
    joint_names = {gv.name_hint for gv in joint.get_global_vars()}
    separate_names = {gv.name_hint for gv in separate.get_global_vars()}
    layers = [layer.name for layer in spec.parametric_layers()]
    assert all(any(n.startswith(f"{layer}_") and "joint" in n for n in joint_names) for layer in layers)
    assert not any("joint" in n for n in separate_names)
    assert all(any(n.startswith(f"{layer}_") and n.endswith("_mean") for n in separate_names) for layer in layers)
    assert "main" in joint_names and "main" in separate_names


def test_predict_any_number_of_examples(network, joint_runner):
    spec, params, x, ref_mean, ref_var = network
    xs = torch.cat([x, x[:2]])  # 5 examples with batch size 3: one full and one padded batch
    mean, var = joint_runner.predict(xs.numpy())
    assert mean.shape == (5, 10)
    assert_close(mean, torch.cat([ref_mean, ref_mean[:2]]), what="mean")
    assert_close(var, torch.cat([ref_var, ref_var[:2]]), atol_fraction=0.0, what="var")


def test_variance_scale(mlp_case):
    spec, params, x = mlp_case
    runner = tb.compile_pfp(spec, params, batch_size=BATCH, variance_scale=0.5)
    mean, var = runner(x.numpy())
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x, variance_scale=0.5)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="var")


def test_weights_as_params(mlp_case, mlp_params_runner):
    spec, params, x = mlp_case
    mod = tb.build_pfp_module(spec, params, batch_size=BATCH, weights_as_params=True)
    names = [str(param) for param in mod["main"].params]
    expected = ["x", *tb.pfp_weight_arrays(spec, params)]
    assert names == expected
    assert "fc1_weight_m2" not in expected  # the first layer has a deterministic input: no E[w^2]
    mean, var = mlp_params_runner(x.numpy())
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="var")


def test_channels_last_weights_are_transposed_at_compile_time():
    """LeNet's conv2 (16 channels) takes channels-last weights in every variant, conv1 (6) the flat form.
    Bound weights are transposed once, by FoldConstant; weight parameters are transposed in the graph."""
    from pfp.backends.tvm.schedules import fuse_operators

    spec = build_spec("lenet")
    params = random_params(spec, seed=3)
    stacked = {name: (torch.stack([p.weight_mean] * 3), torch.stack([p.bias_mean] * 3)) for name, p in params.items()}
    for mod in (tb.build_pfp_module(spec, params, batch_size=2), tb.build_pfp_module(spec, params, batch_size=2, joint=False),
                tb.build_deterministic_module(spec, params, batch_size=2), tb.build_ensemble_module(spec, stacked, batch_size=2)):
        fused = fuse_operators(mod, tb.make_target("host"))
        kernels = {gv.name_hint: func for gv, func in fused.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
        assert not [name for name in kernels if "transpose" in name or "permute" in name], sorted(kernels)
        conv2 = [func for name, func in kernels.items() if "conv2_" in name]  # the twin's is fused with its ReLU
        conv1 = [func for name, func in kernels.items() if "conv1_" in name]
        assert conv2 and all("pfp.channels_last" in func.script() for func in conv2)
        assert conv1 and not any("pfp.channels_last" in func.script() for func in conv1)
    x = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    as_params = tb.compile_pfp(spec, params, batch_size=2, weights_as_params=True)
    mean, var = as_params(x.numpy())
    assert_close(mean, ref_mean, what="mean (weight parameters)")
    assert_close(var, ref_var, atol_fraction=0.0, what="var (weight parameters)")


def test_spec_without_parametric_layers_returns_zero_variance():
    spec = ModelSpec("tiny", (1, 2, 2), (Flatten(), ReLU()))
    runner = tb.compile_pfp(spec, {}, batch_size=2)
    x = np.array([[[[-1.0, 2.0], [0.5, -3.0]]], [[[1.0, -2.0], [0.0, 4.0]]]], np.float32)
    mean, var = runner(x)
    np.testing.assert_array_equal(mean, np.maximum(x.reshape(2, -1), 0))
    np.testing.assert_array_equal(var, np.zeros((2, 4), np.float32))


def test_inconsistent_spec_is_rejected():
    spec = ModelSpec("dense_only", (1, 2, 3), (Dense("fc", 6, 4),))  # no Flatten before the dense layer
    with pytest.raises(ValueError, match="expects"):
        tb.build_pfp_module(spec, random_params(spec, seed=4))


# --------------------------------------------------------------------------- errors

def test_batch_size_mismatch_and_wrong_shape_raise_clear_errors(mlp_case, mlp_params_runner):
    spec, params, x = mlp_case
    with pytest.raises(ValueError, match="batch-size mismatch.*batch size 3, got 2"):
        mlp_params_runner(x[:2].numpy())
    with pytest.raises(ValueError, match=r"wrong input shape: expected \(3, 1, 28, 28\)"):
        mlp_params_runner(np.zeros((3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="wrong input shape"):
        mlp_params_runner(np.zeros((3, 1, 28, 27), np.float32))
    with pytest.raises(ValueError, match="wrong input shape"):
        mlp_params_runner.predict(np.zeros((4, 784), np.float32))


def test_bad_parameters_raise_clear_errors(mlp_case):
    spec, params, _ = mlp_case
    with pytest.raises(KeyError, match="no parameters for layer 'fc2'"):
        tb.build_pfp_module(spec, {"fc1": params["fc1"], "fc3": params["fc3"]})
    wrong = dict(params)
    wrong["fc2"] = ref.GaussianLayerParams.from_mean_var(torch.zeros(100, 99), torch.ones(100, 99),
                                                         torch.zeros(100), torch.ones(100))
    with pytest.raises(ValueError, match=r"fc2.weight_mean has shape \(100, 99\)"):
        tb.build_pfp_module(spec, wrong)
    with pytest.raises(ValueError, match="batch_size"):
        tb.build_pfp_module(spec, params, batch_size=0)
    with pytest.raises(ValueError, match="variance scale"):
        tb.build_pfp_module(spec, params, variance_scale=-1.0)


def test_missing_weights_for_parameter_module(mlp_case):
    spec, params, x = mlp_case
    mod = tb.build_pfp_module(spec, params, batch_size=BATCH, weights_as_params=True)
    runner = tb.CompiledPFP(tb.compile_module(mod), (BATCH, *spec.input_shape))  # no weights given
    with pytest.raises(ValueError, match="missing"):
        runner(x.numpy())


# --------------------------------------------------------------------------- export / load

def test_export_load_round_trip(tmp_path, network, joint_runner):
    _, _, x, _, _ = network
    path = joint_runner.export_library(tmp_path / "model.so")
    assert path.is_file() and (tmp_path / "model.so.json").is_file()
    loaded = tb.load_compiled(path)
    assert isinstance(loaded, tb.CompiledPFP)
    assert loaded.input_shape == joint_runner.input_shape
    expected = joint_runner(x.numpy())
    for got, want in zip(loaded(x.numpy()), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="loaded from a library"):
        loaded.export_library(tmp_path / "again.so")


def test_export_load_round_trip_with_weight_parameters(tmp_path, mlp_case, mlp_params_runner):
    _, _, x = mlp_case
    path = mlp_params_runner.export_library(tmp_path / "mlp_params.so")
    assert (tmp_path / "mlp_params.so.weights.npz").is_file()
    loaded = tb.CompiledPFP.load(path)
    for got, want in zip(loaded(x.numpy()), mlp_params_runner(x.numpy())):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not a deterministic model"):
        tb.CompiledDeterministic.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tb.load_compiled(tmp_path / "missing.so")


def test_benchmark(mlp_params_runner):
    timing = mlp_params_runner.benchmark(number=2, repeat=2)
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
    runner = tb.compile_pfp(spec, params, batch_size=BATCH)
    runner.info = {"variant": "pfp", "variance_scale": 0.5}
    loaded = tb.load_compiled(runner.export_library(tmp_path / "m.so"))
    assert loaded.info == {"variant": "pfp", "variance_scale": 0.5}
    assert not list(tmp_path.glob(".*tmp*")), "temp files left behind"


# --------------------------------------------------------------------------- ensemble (SVI baseline) and memory

@pytest.mark.parametrize("architecture", [Architecture.MLP, Architecture.LENET], ids=lambda a: a.value)
def test_ensemble_matches_per_member_deterministic_networks(architecture):
    spec = build_spec(architecture)
    params = random_params(spec, seed=6)
    generator = torch.Generator().manual_seed(7)
    members = 4
    stacked = {layer.name: (params[layer.name].weight_mean + 0.05 * torch.randn((members, *layer.weight_shape),
                                                                              generator=generator),
                            params[layer.name].bias_mean + 0.05 * torch.randn((members, *layer.bias_shape),
                                                                            generator=generator))
               for layer in spec.parametric_layers()}
    x = torch.randn(BATCH, *spec.input_shape, generator=generator)
    runner = tb.compile_ensemble(spec, stacked, batch_size=BATCH)
    logits = runner(x.numpy())
    assert logits.shape == (members, BATCH, spec.num_outputs)
    for member in range(members):
        with torch.no_grad():
            expected = ref.deterministic_forward(spec, {k: (w[member], b[member]) for k, (w, b) in stacked.items()}, x)
        assert_close(logits[member], expected, what=f"member {member}")


def test_ensemble_rejects_inconsistent_members():
    spec = build_spec("mlp")
    params = random_params(spec)
    stacked = {layer.name: (params[layer.name].weight_mean[None].repeat(2, *[1] * len(layer.weight_shape)),
                            params[layer.name].bias_mean[None].repeat(3, 1)) for layer in spec.parametric_layers()}
    with pytest.raises(ValueError, match="bias"):
        tb.build_ensemble_module(spec, stacked)


def test_memory_estimate_counts_weights_and_planned_activations():
    spec = build_spec("lenet")
    params = random_params(spec)
    pfp = tb.memory_estimate(tb.build_pfp_module(spec, params, batch_size=4))
    det = tb.memory_estimate(tb.build_deterministic_module(spec, params, batch_size=4))
    floats = sum(int(np.prod(layer.weight_shape)) + int(np.prod(layer.bias_shape)) for layer in spec.parametric_layers())
    assert det["weight_bytes"] == 4 * floats
    # PFP stores mean, variance and E[w^2] of every weight (the bias has mean and variance; the
    # first layer needs no E[w^2]): at most 3x the twin's weights
    assert 2 * det["weight_bytes"] < pfp["weight_bytes"] <= 3 * det["weight_bytes"]
    assert 0 < det["activation_bytes"] < pfp["activation_bytes"] <= 2 * det["activation_bytes"] + 1024
    assert pfp["total_bytes"] == pfp["weight_bytes"] + pfp["activation_bytes"]
    as_params = tb.memory_estimate(tb.build_pfp_module(spec, params, batch_size=4, weights_as_params=True))
    assert as_params["weight_bytes"] == pfp["weight_bytes"]


# --------------------------------------------------------------------------- targets

def test_make_target_names():
    host = tb.make_target("host")
    assert host.kind.name == "llvm"
    assert int(host.attrs["num-cores"]) >= 1
    for name, cpu in [(tb.TargetName.RASP4B, "cortex-a72"), (tb.TargetName.RASP5, "cortex-a76")]:
        target = tb.make_target(name)
        assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
        assert str(target.attrs["mcpu"]) == cpu
        assert list(target.attrs["mattr"]) == ["+neon"]
        assert int(target.attrs["num-cores"]) == 4
    assert tb.make_target({"kind": "llvm"}).kind.name == "llvm"
    given = tvm.target.Target({"kind": "llvm"})
    assert tb.make_target(given) is given
    with pytest.raises(ValueError, match="unknown target 'rasp3'"):
        tb.make_target("rasp3")


@pytest.fixture(scope="module")
def arm_runner(mlp_case):
    spec, params, _ = mlp_case
    return tb.compile_pfp(spec, params, batch_size=BATCH, target=tb.TargetName.RASP4B)


def test_arm_module_does_not_run_on_the_host(arm_runner, mlp_case):
    _, _, x = mlp_case
    with pytest.raises(RuntimeError, match="compiled for aarch64"):
        arm_runner(x.numpy())


def test_arm_module_holds_aarch64_code(arm_runner, tmp_path):
    """The kernels are aarch64 machine code (checked on the object file; linking needs the cross gcc)."""
    (llvm_module,) = [m for m in arm_runner.module.mod.imports if m.kind == "llvm"]
    llvm_module.write_to_file(str(tmp_path / "kernels.o"))
    header = (tmp_path / "kernels.o").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64


def test_arm_export_without_cross_compiler_is_a_clear_error(arm_runner, tmp_path, monkeypatch):
    monkeypatch.setattr(tb.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="gcc-aarch64-linux-gnu"):
        arm_runner.export_library(tmp_path / "arm.so")


@pytest.mark.skipif(shutil.which(tb.ARM_CROSS_COMPILER) is None,
                    reason=f"{tb.ARM_CROSS_COMPILER} not installed (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu)")
def test_arm_cross_export(arm_runner, tmp_path):
    path = arm_runner.export_library(tmp_path / "mlp_rasp4b.so")
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    with pytest.raises(RuntimeError, match="compiled for aarch64"):
        tb.load_compiled(path)
