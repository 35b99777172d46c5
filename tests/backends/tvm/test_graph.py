"""Whole networks built by the graph tables (PFP, twin, ensemble), compiled and run against the PyTorch reference; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import graph, pipeline, runtime, targets  # noqa: E402
from pfp.convert import pool_before_relu, with_pool_rule  # noqa: E402
from pfp.spec import (  # noqa: E402
    LAYER_KINDS,
    Architecture,
    Conv2d,
    Dense,
    Flatten,
    LayerTable,
    MaxPool2d,
    ModelSpec,
    PoolRule,
    ReLU,
    build_spec,
)

from .helpers import BATCH, assert_close, random_params  # noqa: E402


@pytest.fixture(scope="module")
def separate_runner(network):
    spec, params, *_ = network
    return pipeline.compile_pfp(spec, params, batch_size=BATCH, joint=False)


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
    runner = pipeline.compile_pfp(spec, params, batch_size=BATCH, joint=True)
    operators = [row["operator"] for row in runner.profile(number=1, x=x.numpy())]
    assert any(name.endswith("relu_gaussian1_maxpool_gaussian2") for name in operators), operators
    mean, var = runner(x.numpy())
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")


@pytest.mark.parametrize("rule", [PoolRule.CLARK_LOGISTIC, PoolRule.ARGMAX_MEAN])
def test_lenet_with_each_pool_rule_matches_reference(rule, caplog):
    """LeNet (converted order, random posterior) with the other max-pool rules: hand-scheduled TVM = reference
    (the clark rule is the ``network`` fixture's). The rule is in the kernels' names (tuning tasks, profiles),
    and every kernel got its hand schedule."""
    spec = with_pool_rule(pool_before_relu(build_spec(Architecture.LENET)), rule)
    params = random_params(spec, seed=0)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
        clark_var = ref.pfp_forward(with_pool_rule(spec, PoolRule.CLARK), params, x)[1]
    with caplog.at_level("WARNING", logger="pfp.backends.tvm.schedules"):
        runner = pipeline.compile_pfp(spec, params, batch_size=BATCH, joint=True)
    assert not [r for r in caplog.records if "no hand schedule" in r.getMessage()], caplog.text
    operators = [row["operator"] for row in runner.profile(number=1, x=x.numpy())]
    assert sum(f"maxpool_{rule.value}" in name for name in operators) == 2, operators
    mean, var = runner(x.numpy())
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")
    # and it is this rule's network, not Clark's: 10x closer to its reference than Clark's variance is
    assert np.abs(var - ref_var.numpy()).max() < 0.1 * (ref_var - clark_var).abs().max().item()


def test_separate_network_matches_reference(network, separate_runner):
    _, _, x, ref_mean, ref_var = network
    mean, var = separate_runner(x.numpy())
    assert_close(mean, ref_mean, what="logit mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="logit var")


def test_deterministic_twin_matches_reference(network):
    spec, params, x, _, _ = network
    weights = {name: (p.weight_mean, p.bias_mean) for name, p in params.items()}
    runner = pipeline.compile_deterministic(spec, weights, batch_size=BATCH)
    logits = runner(x.numpy())
    with torch.no_grad():
        expected = ref.deterministic_forward(spec, weights, x)
    assert logits.shape == (BATCH, 10)
    assert_close(logits, expected, what="logits")
    # GaussianLayerParams are accepted too (their means are the twin's weights)
    np.testing.assert_array_equal(graph.deterministic_weight_arrays(spec, params)[f"{spec.parametric_layers()[0].name}_weight"],
                                  weights[spec.parametric_layers()[0].name][0].numpy())


def test_joint_and_separate_modules_differ_in_operators(network):
    spec, params, *_ = network
    joint = graph.build_pfp_module(spec, params, batch_size=BATCH, joint=True)
    separate = graph.build_pfp_module(spec, params, batch_size=BATCH, joint=False)
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
    runner = pipeline.compile_pfp(spec, params, batch_size=BATCH, variance_scale=0.5)
    mean, var = runner(x.numpy())
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x, variance_scale=0.5)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, atol_fraction=0.0, what="var")


def test_weights_as_params(mlp_case, mlp_params_runner):
    spec, params, x = mlp_case
    mod = graph.build_pfp_module(spec, params, batch_size=BATCH, weights_as_params=True)
    names = [str(param) for param in mod["main"].params]
    expected = ["x", *graph.pfp_weight_arrays(spec, params)]
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
    from pfp.backends.tvm.pipeline import fuse_operators

    spec = build_spec("lenet")
    params = random_params(spec, seed=3)
    stacked = {name: (torch.stack([p.weight_mean] * 3), torch.stack([p.bias_mean] * 3)) for name, p in params.items()}
    for mod in (graph.build_pfp_module(spec, params, batch_size=2), graph.build_pfp_module(spec, params, batch_size=2, joint=False),
                graph.build_deterministic_module(spec, params, batch_size=2), graph.build_ensemble_module(spec, stacked, batch_size=2)):
        fused = fuse_operators(mod, targets.make_target("host"))
        kernels = {gv.name_hint: func for gv, func in fused.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
        assert not [name for name in kernels if "transpose" in name or "permute" in name], sorted(kernels)
        conv2 = [func for name, func in kernels.items() if "conv2_" in name]  # the twin's is fused with its ReLU
        conv1 = [func for name, func in kernels.items() if "conv1_" in name]
        assert conv2 and all("pfp.channels_last" in func.script() for func in conv2)
        assert conv1 and not any("pfp.channels_last" in func.script() for func in conv1)
    x = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    as_params = pipeline.compile_pfp(spec, params, batch_size=2, weights_as_params=True)
    mean, var = as_params(x.numpy())
    assert_close(mean, ref_mean, what="mean (weight parameters)")
    assert_close(var, ref_var, atol_fraction=0.0, what="var (weight parameters)")


def test_spec_without_parametric_layers_returns_zero_variance():
    spec = ModelSpec("tiny", (1, 2, 2), (Flatten(), ReLU()))
    runner = pipeline.compile_pfp(spec, {}, batch_size=2)
    x = np.array([[[[-1.0, 2.0], [0.5, -3.0]]], [[[1.0, -2.0], [0.0, 4.0]]]], np.float32)
    mean, var = runner(x)
    np.testing.assert_array_equal(mean, np.maximum(x.reshape(2, -1), 0))
    np.testing.assert_array_equal(var, np.zeros((2, 4), np.float32))


def test_inconsistent_spec_is_rejected():
    spec = ModelSpec("dense_only", (1, 2, 3), (Dense("fc", 6, 4),))  # no Flatten before the dense layer
    with pytest.raises(ValueError, match="expects"):
        graph.build_pfp_module(spec, random_params(spec, seed=4))


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
        graph.build_pfp_module(spec, {"fc1": params["fc1"], "fc3": params["fc3"]})
    wrong = dict(params)
    wrong["fc2"] = ref.GaussianLayerParams.from_mean_var(torch.zeros(100, 99), torch.ones(100, 99),
                                                         torch.zeros(100), torch.ones(100))
    with pytest.raises(ValueError, match=r"fc2.weight_mean has shape \(100, 99\)"):
        graph.build_pfp_module(spec, wrong)
    with pytest.raises(ValueError, match="batch_size"):
        graph.build_pfp_module(spec, params, batch_size=0)
    with pytest.raises(ValueError, match="variance scale"):
        graph.build_pfp_module(spec, params, variance_scale=-1.0)


def test_missing_weights_for_parameter_module(mlp_case):
    spec, params, x = mlp_case
    mod = graph.build_pfp_module(spec, params, batch_size=BATCH, weights_as_params=True)
    runner = runtime.CompiledPFP(pipeline.compile_module(mod), (BATCH, *spec.input_shape))  # no weights given
    with pytest.raises(ValueError, match="missing"):
        runner(x.numpy())


# --------------------------------------------------------------------------- export / load

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
    runner = pipeline.compile_ensemble(spec, stacked, batch_size=BATCH)
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
        graph.build_ensemble_module(spec, stacked)


def test_the_graph_tables_cover_every_layer_kind():
    for table in (graph.PFP_TABLE, graph.DETERMINISTIC_TABLE, graph.ENSEMBLE_TABLE):
        assert LayerTable.REGISTRY[table.backend] is table
        assert table.missing_kinds() == [], table.backend
    assert {"tvm.pfp", "tvm.deterministic", "tvm.ensemble"} <= set(LayerTable.REGISTRY)
    assert set(graph.PFP_TABLE) == set(LAYER_KINDS)
