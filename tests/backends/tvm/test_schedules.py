"""Hand schedules: every operator kind keeps its numbers (vs TVM's naive loops and the torch
reference), actually gets parallel/SIMD loops, and whole networks compile through them."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import (
    ops,  # noqa: E402
    pipeline,  # noqa: E402
)
from pfp.backends.tvm.ops import covariance as cov_ops  # noqa: E402
from pfp.backends.tvm.passes import register_pipeline  # noqa: E402
from pfp.backends.tvm.schedules import MAX_VECTOR_LANES, schedule_prim_func  # noqa: E402
from pfp.spec import Architecture, build_spec  # noqa: E402

from .helpers import assert_close, random_params  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm"})

def _pool_then_relu_gaussian(mean, var):
    return ops.relu_gaussian(*ops.maxpool2x2_gaussian(mean, var))


def _argmax_pool_then_relu_gaussian(mean, var):
    return ops.relu_gaussian(*ops.maxpool2x2_gaussian(mean, var, "argmax_mean"))


def _pool_then_relu(x):
    return ops.relu(ops.maxpool2x2(x))


# (operator, input shapes, kwargs): dense batch 8 exercises the 4-row register tile, K=100 the
# rfactor remainder, the conv cases padding and stride, the ensembles a shared and a per-member input
CASES = {
    "dense_joint_first": (ops.dense_joint_first, [(8, 784), (100, 784), (100, 784), (100,), (100,)], {}),
    "dense_joint": (ops.dense_joint, [(8, 100), (8, 100), (10, 100), (10, 100), (10, 100), (10,), (10,)], {}),
    "dense_joint_b1": (ops.dense_joint, [(1, 100), (1, 100), (100, 100), (100, 100), (100, 100), (100,), (100,)], {}),
    "dense_var": (ops.dense_var, [(4, 120), (4, 120), (84, 120), (84, 120), (84,)], {}),
    "dense": (ops.dense, [(12, 64), (32, 64), (32,)], {}),
    "conv2d_joint_first": (ops.conv2d_joint_first, [(2, 1, 28, 28), (6, 1, 5, 5), (6, 1, 5, 5), (6,), (6,)],
                           {"padding": 2}),
    "conv2d_joint": (ops.conv2d_joint, [(2, 6, 14, 14), (2, 6, 14, 14), (16, 6, 5, 5), (16, 6, 5, 5), (16, 6, 5, 5),
                                        (16,), (16,)], {}),
    "conv2d_strided": (ops.conv2d, [(1, 3, 9, 9), (4, 3, 3, 3), (4,)], {"stride": 2, "padding": 1}),
    # channels-last: LeNet's conv2 (16 channels), and 32 channels with padding (two channel vectors)
    "conv2d_joint_channels_last": (ops.conv2d_joint, [(2, 6, 14, 14), (2, 6, 14, 14), (6, 5, 5, 16), (6, 5, 5, 16),
                                                      (6, 5, 5, 16), (16,), (16,)], {"channels_last": True}),
    "conv2d_var_channels_last": (ops.conv2d_var, [(2, 6, 14, 14), (2, 6, 14, 14), (6, 5, 5, 32), (6, 5, 5, 32), (32,)],
                                 {"channels_last": True, "padding": 2}),
    "conv2d_channels_last": (ops.conv2d, [(3, 6, 14, 14), (6, 5, 5, 32), (32,)], {"channels_last": True, "padding": 1}),
    "relu_gaussian": (ops.relu_gaussian, [(2, 6, 28, 28), (2, 6, 28, 28)], {}),
    "maxpool2x2_gaussian": (ops.maxpool2x2_gaussian, [(2, 6, 28, 28), (2, 6, 28, 28)], {}),
    # a width (8) and pooled width (4) narrower than 16 lanes: vectors must not straddle rows
    "maxpool2x2_gaussian_small": (ops.maxpool2x2_gaussian, [(3, 16, 8, 8), (3, 16, 8, 8)], {}),
    # the other pool rules (pfp.spec.PoolRule): Clark with the logistic cdf (two stages), argmax of means (one)
    "maxpool2x2_gaussian_logistic": (ops.maxpool2x2_gaussian, [(2, 6, 28, 28)] * 2, {"rule": "clark_logistic"}),
    "maxpool2x2_argmax_mean": (ops.maxpool2x2_gaussian, [(2, 6, 28, 28)] * 2, {"rule": "argmax_mean"}),
    "maxpool2x2_argmax_mean_small": (ops.maxpool2x2_gaussian, [(3, 16, 8, 8)] * 2, {"rule": "argmax_mean"}),
    # max-pool then ReLU in one function (as FuseOps makes them), small enough to share one loop
    "maxpool_relu_gaussian_chain": (_pool_then_relu_gaussian, [(1, 16, 10, 10)] * 2, {}),
    "maxpool_argmax_relu_gaussian_chain": (_argmax_pool_then_relu_gaussian, [(1, 16, 10, 10)] * 2, {}),
    "dense_ensemble_shared": (ops.dense_ensemble, [(2, 64), (5, 7, 64), (5, 7)], {"batch": 2}),
    "conv2d_ensemble": (ops.conv2d_ensemble, [(6, 2, 8, 8), (3, 4, 2, 3, 3), (3, 4)], {"batch": 2, "padding": 1}),
    "conv2d_ensemble_channels_last": (ops.conv2d_ensemble, [(2, 2, 8, 8), (3, 2, 3, 3, 16), (3, 16)],
                                      {"batch": 2, "padding": 1, "channels_last": True}),
}


def _covariance_backprop_seeded(weight_last, seed_slope, weight_padded, slope):
    return cov_ops.covariance_backprop((weight_last, seed_slope), weight_padded, slope, 10, 4, 100)


# the covariance epilogue's GEMMs (output axis vectorised, weights padded to 16 columns): the
# first backward step with its inline seed, a later one, the independent forward at batch 1
CASES.update({
    "covariance_backprop_seeded": (_covariance_backprop_seeded, [(10, 100), (4, 100), (100, 112), (4, 100)], {}),
    "covariance_backprop": (cov_ops.covariance_backprop, [(30, 84), (84, 128), (3, 120)],
                            {"classes": 10, "batch": 3, "in_units": 120}),
    "covariance_forward_b1": (cov_ops.covariance_forward, [(1, 100), (100, 16)],
                              {"noise": None, "slope": None, "out_units": 10}),
})


def _inputs(shapes, seed=0):
    rng = np.random.default_rng(seed)
    # positive variances where an operator has them; any values are valid for the others
    return [rng.uniform(0.05, 1.0, size=shape).astype("float32") for shape in shapes]


def _run(func, inputs, output_shapes):
    # lowered as compiled modules are (e.g. the joint conv's accumulation order, see pfp.backends.tvm.passes.reassociate)
    executable = tvm.tirx.build(tvm.IRModule({"main": func}), target=TARGET, pipeline=register_pipeline())
    device = tvm.cpu()
    args = [tvm.runtime.tensor(a, device) for a in inputs]
    outputs = [tvm.runtime.empty(shape, "float32", device) for shape in output_shapes]
    executable["main"](*args, *outputs)
    return [out.numpy() for out in outputs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_schedule_keeps_every_operator_exact(name):
    op, shapes, kwargs = CASES[name]
    naive_op = ops.CompiledOp(op, shapes, target=TARGET, **kwargs)
    func, output_shapes = naive_op.prim_func, naive_op.output_shapes
    scheduled = schedule_prim_func(func)
    inputs = _inputs(shapes)
    naive = _run(func, inputs, output_shapes)
    fast = _run(scheduled, inputs, output_shapes)
    for expected, actual in zip(naive, fast):
        # same sums in another order: float32 rounding only
        np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6 * float(np.abs(expected).max()))
    script = scheduled.script()
    assert "T.vectorized" in script, "no SIMD loop"


@pytest.mark.parametrize("name", ["dense_joint_first", "conv2d_joint", "relu_gaussian", "maxpool2x2_gaussian",
                                  "maxpool2x2_gaussian_logistic", "maxpool2x2_argmax_mean"])
def test_large_operators_run_in_parallel(name):
    op, shapes, kwargs = CASES[name]
    assert "T.parallel" in schedule_prim_func(ops.make_prim_func(op, shapes, **kwargs)).script()


@pytest.mark.parametrize(("batch", "parallel_light"), [(1, False), (4, False), (8, True)])
def test_small_padding_and_bias_blocks_stay_on_one_thread(batch, parallel_light):
    """LeNet's conv2 pads 6 x 18 x 14 floats per example and adds the bias to 16 x 10 x 10: one thread below 8192 each.

    Only the reduction, over (example, pair of output channels), then wakes the thread pool.
    """
    op, shapes, kwargs = CASES["conv2d_joint"]
    func = schedule_prim_func(ops.make_prim_func(op, [(batch, *shapes[0][1:]), (batch, *shapes[1][1:]), *shapes[2:]],
                                                 **kwargs))
    light = [6 * batch, 16 * batch] if parallel_light else []
    assert sorted(_loops(func, "parallel")) == sorted([16 // 2 * batch, *light]), func.script()


def test_small_operators_stay_on_one_thread():
    # 100 x 100 multiply-adds: the thread pool's wake-up would cost more than the work
    op, shapes, kwargs = CASES["dense_joint_b1"]
    assert "T.parallel" not in schedule_prim_func(ops.make_prim_func(op, shapes, **kwargs)).script()


def _loops(func, kind: str) -> list[int]:
    """Extents of the loops of ``func`` annotated as ``kind`` (parallel / vectorized / unroll)."""
    return [int(extent) for extent in re.findall(rf"in T\.{kind}\((\d+)\)", func.script())]


@pytest.mark.parametrize("shape", [(2, 6, 24, 24), (3, 16, 8, 8), (1, 6, 12, 12), (2, 16, 10, 10)])
def test_image_elementwise_vectorises_whole_rows(shape):
    """Vector lanes never straddle a row boundary of the H x W plane, and vectors are 8+ lanes long.

    Splitting the flat (B, C, H, W) loop by 16 when 16 does not divide the width made TVM load
    every lane separately, with its own index divisions (2-4x slower on LeNet's shapes); 4-lane
    chunks of LeNet's 10 x 10 plane left too little independent work in flight (3x slower than 50).
    """
    func = schedule_prim_func(ops.make_prim_func(ops.relu_gaussian, [shape, shape]))
    spatial = shape[2] * shape[3]
    vectorised = _loops(func, "vectorized")
    assert vectorised, func.script()
    for extent in vectorised:
        assert spatial % extent == 0 and 8 <= extent <= MAX_VECTOR_LANES or extent == spatial
    for extent in _loops(func, "parallel"):
        assert extent == shape[0] * shape[1]  # (batch, channel) rows across threads


def test_pooling_vectorises_row_by_row():
    """The vertical pairs (rows 2i and 2i+1) run one output row per vector, rows in a serial loop.

    LeNet's pooled rows are 14 wide: chunks over the flat pooled plane straddled them (8 and 4 lanes).
    The horizontal pairs (columns 2j, 2j+1) are one strided run over the plane, left to LLVM.
    """
    func = schedule_prim_func(ops.make_prim_func(ops.maxpool2x2_gaussian, [(2, 6, 28, 28)] * 2))
    assert _loops(func, "vectorized") == [14], func.script()  # the vertical pairs
    assert re.findall(r"for \w+ in range\((\d+)\)", func.script()) == ["392", "14"]  # horizontal plane, vertical rows
    # rows narrower than MIN_VECTOR_ROW: the whole pooled plane is one vector instead
    small = schedule_prim_func(ops.make_prim_func(ops.maxpool2x2_gaussian, [(3, 16, 8, 8)] * 2))
    assert _loops(small, "vectorized") == [4 * 4], small.script()
    # the twin's whole 2x2 window (rows and columns strided) is not one run: still row by row
    twin = schedule_prim_func(ops.make_prim_func(ops.maxpool2x2, [(2, 6, 28, 28)]))
    assert _loops(twin, "vectorized") == [14], twin.script()


@pytest.mark.parametrize(("op", "inputs", "batch", "parallel"), [
    (_pool_then_relu_gaussian, 2, 1, [6]),  # LeNet's first pool at batch 1: one launch for three stages
    (_pool_then_relu_gaussian, 2, 10, [60, 60, 60]),  # its row stage has 47k elements: each stage its own loop
    (_pool_then_relu, 1, 10, [60]),  # the twin's pool and ReLU (12k elements)
    (_pool_then_relu, 1, 100, [600, 600]),
], ids=["pfp_b1", "pfp_b10", "twin_b10", "twin_b100"])
def test_small_image_stages_share_one_parallel_loop(op, inputs, batch, parallel):
    """Stages that feed each other run under one (batch, channel) loop up to CHAIN_MAX_ELEMENTS elements,
    each stage keeping its own vectorisation below it."""
    func = schedule_prim_func(ops.make_prim_func(op, [(batch, 6, 28, 28)] * inputs))
    assert _loops(func, "parallel") == parallel, func.script()
    assert 14 in _loops(func, "vectorized")  # the vertical pairs (or the twin's window) row by row
    if len(parallel) == 1:  # every stage's nest is inside the shared loop
        body = func.script().split("T.parallel", 1)[1]
        names = ("maxpool_row_mean", "maxpool_var", "relu_mean") if inputs == 2 else ("maxpool", "relu")
        assert all(f'T.sblock("{name}")' in body for name in names), func.script()


# --------------------------------------------------------------------------- elementwise ops inside a small image chain
# FuseOps/FuseTIR put a Relax elementwise op between the ReLU and the max-pool into the same
# function: its blocks have the ReLU's shape but read the ReLU's output. The chain rule had merged
# them into the ReLU's vector loop (TVM then miscompiled the one-element intermediate: every lane
# read the last lane's value, errors of ~13 on values ~10). Each (name: Gaussian op, twin op,
# torch reference of the Gaussian op, of the twin op); the Gaussian ops map (mean, var) -> (mean, var).

def _relax_scale(bb, mean, var):
    from tvm import relax

    def times(value, factor):
        return bb.emit(relax.op.multiply(value, relax.const(factor, "float32")))

    return times(mean, 2.0), None if var is None else times(var, 4.0)


def _relax_shift(bb, mean, var):
    from tvm import relax

    return bb.emit(relax.op.subtract(bb.emit(relax.op.add(mean, relax.const(0.75, "float32"))),
                                     relax.const(2.0, "float32"))), var


def _relax_relu(bb, mean, var):
    from tvm import relax

    if var is None:
        return bb.emit_te(ops.relu, mean), None
    out = bb.emit_te(ops.relu_gaussian, mean, var)
    return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))


CHAIN_MIDDLES = {
    "multiply": (_relax_scale, lambda m, v: (2.0 * m, None if v is None else 4.0 * v)),
    "add_subtract": (_relax_shift, lambda m, v: (m + 0.75 - 2.0, v)),
    "second_relu": (_relax_relu, lambda m, v: (torch.relu(m), None) if v is None else ref.relu(m, v)),
}


def _relu_middle_maxpool_module(middle, shape, gaussian: bool) -> tvm.IRModule:
    """Relax ``main``: ReLU -> ``middle`` -> 2x2 max-pool on (mean, var) inputs (a Gaussian network) or one input (twin)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    inputs = [relax.Var(name, relax.TensorType(shape, "float32")) for name in ("mean", "var")[:1 + gaussian]]
    with bb.function("main", inputs):
        with bb.dataflow():
            mean, var = _relax_relu(bb, inputs[0], inputs[1] if gaussian else None)
            mean, var = middle(bb, mean, var)
            out = bb.emit_te(ops.maxpool2x2_gaussian, mean, var) if gaussian else bb.emit_te(ops.maxpool2x2, mean)
            output = bb.emit_output(out)
        bb.emit_func_output(output)
    return bb.get()


def _run_module(mod, schedule, inputs) -> list[np.ndarray]:
    from tvm import relax

    vm = relax.VirtualMachine(pipeline.compile_module(mod, "host", schedule), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]  # one tensor, or a tuple of them


@pytest.mark.parametrize("shape", [(5, 2, 4, 4), (2, 6, 12, 12)], ids=["repro", "parallel"])
@pytest.mark.parametrize("gaussian", [True, False], ids=["pfp", "twin"])
@pytest.mark.parametrize("middle", sorted(CHAIN_MIDDLES))
def test_elementwise_ops_between_relu_and_pool_keep_the_hand_schedule_exact(middle, gaussian, shape):
    """ReLU -> elementwise op -> max-pool, fused into one function: the hand build equals TVM's default
    build and the PyTorch reference (it had errors of the size of the values with a multiply)."""
    relax_middle, torch_middle = CHAIN_MIDDLES[middle]
    generator = torch.Generator().manual_seed(0)
    mean = 3.0 * torch.randn(shape, generator=generator)
    var = 0.05 + torch.rand(shape, generator=generator)
    mod = _relu_middle_maxpool_module(relax_middle, shape, gaussian)
    fused = [gvar.name_hint for gvar, func in pipeline.fuse_operators(mod, "host").functions_items()
             if isinstance(func, tvm.tirx.PrimFunc)]
    assert any("relu" in name and "maxpool" in name for name in fused), fused  # one function: the case of the bug
    with torch.no_grad():
        if gaussian:
            expected = ref.maxpool2x2(*torch_middle(*ref.relu(mean, var)))
        else:
            expected = (torch.nn.functional.max_pool2d(torch_middle(torch.relu(mean), None)[0], 2),)
    inputs = [mean.numpy(), var.numpy()][:1 + gaussian]
    default = _run_module(mod, "default", inputs)
    hand = _run_module(mod, "hand", inputs)
    for what, actual, reference, baseline in zip(("mean", "var"), hand, expected, default):
        assert_close(baseline, reference, what=f"default {what}")
        assert_close(actual, reference, what=f"hand {what}")


def test_a_stage_never_shares_a_vector_loop_with_its_producer():
    """In the chain ReLU -> multiply -> pool the multiplies run in a nest after the ReLU's (mean and
    variance still share theirs), not in the ReLU's vector loop."""
    mod = _relu_middle_maxpool_module(_relax_scale, (5, 2, 4, 4), gaussian=True)
    (func,) = [func for gvar, func in pipeline.fuse_operators(mod, "host").functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and "maxpool" in gvar.name_hint]
    script = schedule_prim_func(func).script()
    nests = script.split("T.vectorized")
    relu_nest = next(nest for nest in nests if 'T.sblock("relu_mean")' in nest)
    assert 'T.sblock("relu_var")' in relu_nest and "T_multiply" not in relu_nest, script
    multiply_nest = next(nest for nest in nests if 'T.sblock("T_multiply")' in nest)
    assert 'T.sblock("T_multiply1")' in multiply_nest and 'T.sblock("relu' not in multiply_nest, script


def _dense_mean_then_relu_gaussian(x, var, weight, bias):
    return ops.relu_gaussian(ops.dense(x, weight, bias), var)


def test_heavy_consumers_of_a_reduction_keep_their_own_loop():
    """The separate path's dense mean + Gaussian ReLU (one function after FuseOps): the bias epilogue
    runs in the dense's parallel loop, the ReLU's mean and variance in one loop of whole vectors
    after it (under the dense's register tile they ran 4 lanes at a time, each on its own)."""
    func = schedule_prim_func(ops.make_prim_func(_dense_mean_then_relu_gaussian,
                                                 [(100, 400), (100, 120), (120, 400), (120,)]))
    script = func.script()
    dense_loop, relu_loop = script.split("T.parallel")[1:]
    assert 'T.sblock("dense")' in dense_loop and "relu" not in dense_loop, script
    assert 'T.sblock("relu_mean")' in relu_loop and 'T.sblock("relu_var")' in relu_loop
    assert max(_loops(func, "vectorized")) >= 8
    # the twin's ReLU (a max) is light: it stays in the dense's loop
    twin = schedule_prim_func(ops.make_prim_func(lambda x, w, b: ops.relu(ops.dense(x, w, b)),
                                                 [(100, 400), (120, 400), (120,)]))
    assert twin.script().count("T.parallel") == 1, twin.script()


def test_strided_pool_pairs_are_vectorised_by_llvm_with_shuffles():
    """Columns 2j and 2j+1 as contiguous loads + shuffles, not one scalar load and lane insert each.

    TVM's own vectorisation of the stride-2 read emitted 40 ``vinsertps`` here; LLVM's loop
    vectoriser none, and no scalar square root or division is left (every Clark maximum in SIMD).
    """
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    with target:
        func = schedule_prim_func(ops.make_prim_func(ops.maxpool2x2_gaussian, [(2, 6, 28, 28)] * 2))
    executable = tvm.compile(func, target=target)
    assembly = executable.mod.inspect_source("asm")
    assert re.search(r"\bvsqrtps\b", assembly) and re.search(r"\bvdivps\b", assembly)
    for scalar in ("vinsertps", "vsqrtss", "vdivss"):
        assert not re.search(rf"\b{scalar}\b", assembly), scalar
    inputs = _inputs([(2, 6, 28, 28)] * 2, seed=3)
    expected = _run(ops.make_prim_func(ops.maxpool2x2_gaussian, [(2, 6, 28, 28)] * 2), inputs, [(2, 6, 14, 14)] * 2)
    for want, got in zip(expected, _run(func, inputs, [(2, 6, 14, 14)] * 2)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)


@pytest.mark.parametrize(("target", "joint", "twin"), [
    # AVX2's 16 registers (the default): 4 joint channels need 4 x (2 + 3) + 2 = 22; the twin's
    # 144 positions (16-aligned) take two-register vectors, 4 channels x (2 + 1) + 2 = 14
    (None, (2, 8), (4, 16)),
    # 32 registers: the joint conv's 136 positions do not divide into 32 lanes, nor into 16
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, (4, 8), (4, 16)),
    # NEON, 4 lanes and 32 registers: two-register vectors for both, 4 x (2 x 2 + 3) + 2 x 2 = 32
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}, (4, 8), (4, 8)),
], ids=["avx2", "avx512", "neon"])
def test_conv_channel_tile_fits_the_register_file(target, joint, twin):
    """LeNet's conv2 (16 channels, flat positions): (channels side by side, positions per vector) while the loop body fits."""
    target = tvm.target.Target(target) if target else None
    joint_func = ops.make_prim_func(ops.conv2d_joint, [(1, 6, 14, 14)] * 2 + [(16, 6, 5, 5)] * 3 + [(16,)] * 2)
    twin_func = ops.make_prim_func(ops.conv2d, [(1, 6, 14, 14), (16, 6, 5, 5), (16,)])
    for func, (tile, lanes) in ((joint_func, joint), (twin_func, twin)):
        scheduled = schedule_prim_func(func, target=target)
        assert set(_loops(scheduled, "unroll")) == {tile}
        assert lanes in _loops(scheduled, "vectorized"), scheduled.script()  # full vectors of flat positions


@pytest.mark.parametrize("op, shapes, positions", [
    (ops.conv2d, [(2, 6, 14, 14), (6, 5, 5, 16), (16,)], 5),  # 1 weight operand: 2 registers a position
    (ops.conv2d_var, [(2, 6, 14, 14)] * 2 + [(6, 5, 5, 16)] * 2 + [(16,)], 2),  # 2 weight operands: 4
    (ops.conv2d_joint, [(2, 6, 14, 14)] * 2 + [(6, 5, 5, 16)] * 3 + [(16,)] * 2, 2),  # 3 weight operands: 6
], ids=["twin", "separate_var", "joint"])
def test_channels_last_conv_vectorises_channels_over_adjacent_positions(op, shapes, positions):
    """LeNet's conv2 in the channels-last form on AVX2: 16 channels (two registers) a vector, and as
    many adjacent output positions (a divisor of the 10-wide row) as 12 registers hold."""
    func = schedule_prim_func(ops.make_prim_func(op, shapes, channels_last=True),
                              target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    assert set(_loops(func, "unroll")) == {positions}, func.script()
    assert 16 in _loops(func, "vectorized")
    assert _loops(func, "parallel") == [2 * 10]  # (example, output row)


def test_channels_last_conv_splits_wide_channel_counts():
    """32 channels: two channel vectors, each its own reduction; (example, row, vector) run in parallel."""
    func = schedule_prim_func(ops.make_prim_func(ops.conv2d, [(2, 6, 14, 14), (6, 5, 5, 32), (32,)], channels_last=True),
                              target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    assert _loops(func, "parallel") == [2 * 10 * 2], func.script()
    assert 16 in _loops(func, "vectorized") and 32 not in _loops(func, "vectorized")


def test_flat_conv_vectorises_full_registers():
    """Stride-1 conv2 of LeNet: two-register vectors over flat positions (not 8 + 2 lanes per 10-wide row)."""
    func = schedule_prim_func(ops.make_prim_func(ops.conv2d, [(2, 6, 14, 14), (16, 6, 5, 5), (16,)]),
                              target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    vectors = _loops(func, "vectorized")
    assert 16 in vectors and 2 not in vectors, func.script()
    assert 14 in vectors, func.script()  # the flat input copied a padded row at a time


def test_first_layer_conv_tiles_output_channels():
    """LeNet's conv1 (1 x 5 x 5 terms per output) shares each input load among several of its 6 channels.

    With two-register vectors of positions: 2 channels for the joint conv (2 accumulators each,
    2 x 2 x 2 + 2 weights + 2 inputs = 14 registers), 3 for the twin.
    """
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    joint = schedule_prim_func(ops.make_prim_func(ops.conv2d_joint_first, [(2, 1, 28, 28), (6, 1, 5, 5), (6, 1, 5, 5),
                                                                            (6,), (6,)], padding=2), target=haswell)
    twin = schedule_prim_func(ops.make_prim_func(ops.conv2d, [(2, 1, 28, 28), (6, 1, 5, 5), (6,)], padding=2),
                              target=haswell)
    assert set(_loops(joint, "unroll")) == {2} and 16 in _loops(joint, "vectorized"), joint.script()
    assert set(_loops(twin, "unroll")) == {3} and 16 in _loops(twin, "vectorized"), twin.script()


def test_gemv_tiles_outputs():
    """Batch 1 dense: OUTPUT_TILE outputs per step (independent accumulator chains), unrolled."""
    from pfp.backends.tvm.schedules import OUTPUT_TILE

    op, shapes, kwargs = CASES["dense_joint_b1"]
    func = schedule_prim_func(ops.make_prim_func(op, shapes, **kwargs))
    assert OUTPUT_TILE in _loops(func, "unroll"), func.script()


@pytest.mark.parametrize(("batch", "tile"), [(8, 4), (10, 5), (100, 4), (6, 3)])
def test_gemm_tiles_the_batch_by_a_divisor(batch, tile):
    """Batch rows share each weight load: a tile that divides the batch (10 rows had streamed the weights 10 times)."""
    func = schedule_prim_func(ops.make_prim_func(ops.dense_joint_first, [(batch, 784), (100, 784), (100, 784),
                                                                         (100,), (100,)]))
    assert tile in _loops(func, "unroll"), func.script()


@pytest.mark.parametrize(("target", "rows", "vectors", "lanes"), [
    (None, 1, 7, 8),  # AVX2: 14 vectors of 8 in 112 columns, half the 16 registers as accumulators
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 2, 7, 16),  # 32 registers: 2 rows x 7 vectors of 16
])
def test_covariance_gemm_keeps_a_register_tile_of_whole_rows(target, rows, vectors, lanes):
    """The backward step (B * C rows x 100 x 100): accumulators in a local tile, the output axis vectorised
    (a 4-lane rfactor over K = 100 had run at a quarter of the speed)."""
    target = tvm.target.Target(target) if target else None
    func = schedule_prim_func(ops.make_prim_func(_covariance_backprop_seeded, [(10, 100), (4, 100), (100, 112), (4, 100)]),
                              target=target)
    script = func.script()
    assert '"local"' in script, script
    assert lanes in _loops(func, "vectorized") and {rows, vectors} <= set(_loops(func, "unroll")) | {1}, script


def test_parallel_threshold_counts_weight_operands():
    """LeNet's fc1 at batch 1: the joint layer streams 3 weight matrices (144k multiply-adds) on both
    cores; the twin's single matrix (48k) stays on one thread, where the pool's wake-up would cost more."""
    joint = schedule_prim_func(ops.make_prim_func(ops.dense_joint, [(1, 400)] * 2 + [(120, 400)] * 3 + [(120,)] * 2))
    twin = schedule_prim_func(ops.make_prim_func(ops.dense, [(1, 400), (120, 400), (120,)]))
    assert "T.parallel" in joint.script()
    assert "T.parallel" not in twin.script()


def test_relu_mean_and_variance_share_one_loop():
    op, shapes, kwargs = CASES["relu_gaussian"]
    script = schedule_prim_func(ops.make_prim_func(op, shapes, **kwargs)).script()
    assert script.count("T.parallel") == 1  # the mean and variance blocks were merged into one loop nest


@pytest.mark.parametrize("architecture", list(Architecture), ids=lambda a: a.value)
@pytest.mark.parametrize("schedule", [pipeline.Schedule.DEFAULT, pipeline.Schedule.HAND])
def test_networks_compile_with_every_schedule(architecture, schedule):
    spec = build_spec(architecture)
    params = random_params(spec, seed=4)
    x = torch.randn(8, *spec.input_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    mean, var = pipeline.compile_pfp(spec, params, batch_size=8, schedule=schedule)(x.numpy())
    assert_close(mean, ref_mean, what=f"{schedule.value} mean")
    assert_close(var, ref_var, what=f"{schedule.value} var")


def test_tuned_schedule_needs_a_database(tmp_path):
    spec = build_spec("mlp")
    with pytest.raises(ValueError, match="needs the tuning database"):
        pipeline.compile_pfp(spec, random_params(spec), schedule=pipeline.Schedule.TUNED)
    with pytest.raises(FileNotFoundError, match="tuning database folder not found"):
        pipeline.compile_pfp(spec, random_params(spec), schedule=pipeline.Schedule.TUNED, database=tmp_path / "missing")
