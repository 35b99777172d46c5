"""Reassociated accumulation: the hand schedule marks the channels-last joint convolution, whose variance
update then accumulates product by product (and keeps its numbers); unmarked blocks are left alone."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import s_tir  # noqa: E402

from pfp.backends.tvm import ops  # noqa: E402
from pfp.backends.tvm.passes import REASSOCIATE_ANNOTATION, reassociate_accumulation, register_pipeline  # noqa: E402
from pfp.backends.tvm.schedules import apply_hand_schedule, schedule_prim_func  # noqa: E402

HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
JOINT = (ops.conv2d_joint, [(2, 6, 14, 14)] * 2 + [(6, 5, 5, 16)] * 3 + [(16,)] * 2)
SEPARATE_VAR = (ops.conv2d_var, [(2, 6, 14, 14)] * 2 + [(6, 5, 5, 16)] * 2 + [(16,)])
TWIN = (ops.conv2d, [(2, 6, 14, 14), (6, 5, 5, 16), (16,)])


def _scheduled(case, **kwargs):
    op, shapes = case
    return schedule_prim_func(ops.make_prim_func(op, shapes, channels_last=True, **kwargs), target=HASWELL)


def _variance_update(func) -> str:
    """The TVMScript line that accumulates the joint block's second accumulator (the variance)."""
    (line,) = [line.strip() for line in func.script().splitlines() if re.match(r"\s*v_conv2d_joint_acc_v1: T\.let", line)]
    return line


def test_hand_schedule_marks_only_the_channels_last_joint_conv():
    assert REASSOCIATE_ANNOTATION in _scheduled(JOINT).script()
    for case in (SEPARATE_VAR, TWIN):
        assert REASSOCIATE_ANNOTATION not in _scheduled(case).script()
    flat = schedule_prim_func(ops.make_prim_func(JOINT[0], [(2, 6, 14, 14)] * 2 + [(16, 6, 5, 5)] * 3 + [(16,)] * 2),
                              target=HASWELL)
    assert REASSOCIATE_ANNOTATION not in flat.script()


def test_the_mark_is_part_of_the_schedule_trace():
    """Tuning records store the hand schedule as its trace: compiling from the database must mark the block too."""
    op, shapes = JOINT
    sch = s_tir.Schedule(ops.make_prim_func(op, shapes, channels_last=True))
    apply_hand_schedule(sch, target=HASWELL)
    assert REASSOCIATE_ANNOTATION in str(sch.trace)


def test_variance_update_accumulates_one_product_at_a_time():
    func = _scheduled(JOINT)
    before, after = _variance_update(func), _variance_update(reassociate_accumulation(func))
    # acc + (var * E[w^2] + mu * mu * sigma^2)  ->  acc + var * E[w^2] + mu * mu * sigma^2, i.e. (acc + p) + q
    assert re.search(r"= conv2d_joint_acc_v1\[[^\]]*\] \+ \(", before), before
    assert not re.search(r"\+ \(", after), after
    assert after.replace(" ", "") == before.replace(" ", "").replace("+(", "+", 1)[:-1]


def test_unmarked_functions_are_unchanged():
    for case in (SEPARATE_VAR, TWIN):
        func = _scheduled(case)
        assert reassociate_accumulation(func).same_as(func)  # the very same object: nothing rebuilt


def test_a_mark_without_an_update_to_reassociate_is_an_error():
    op, shapes = TWIN  # acc + x * w: nothing to split
    sch = s_tir.Schedule(ops.make_prim_func(op, shapes, channels_last=True))
    sch.annotate(sch.get_sblock("conv2d_acc"), REASSOCIATE_ANNOTATION, 1)
    with pytest.raises(ValueError, match="conv2d_acc.*none has an update"):
        reassociate_accumulation(sch.mod["main"])


@pytest.mark.parametrize("flush", [True, False], ids=["flush_denormals", "keep_denormals"])
def test_reassociated_joint_conv_matches_the_naive_loops(flush):
    """Compiled through the pipeline, the marked kernel computes the same sums (float32 rounding only)."""
    op, shapes = JOINT
    naive = ops.CompiledOp(op, shapes, channels_last=True)
    scheduled = _scheduled(JOINT)
    lib = tvm.tirx.build(tvm.IRModule({"main": scheduled}), target=tvm.target.Target({"kind": "llvm"}),
                         pipeline=register_pipeline(flush))
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0.05, 1.0, size=shape).astype("float32") for shape in shapes]
    device = tvm.cpu()
    outputs = [tvm.runtime.empty(shape, "float32", device) for shape in naive.output_shapes]
    lib["main"](*[tvm.runtime.tensor(a, device) for a in inputs], *outputs)
    for expected, actual in zip(naive(*inputs), outputs):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-6, atol=0)


def test_pipelines_differ_only_in_flushing_denormals():
    assert register_pipeline(True) != register_pipeline(False)
    assert register_pipeline(True) == register_pipeline(True)  # registered once per process


# --------------------------------------------------------------------------- Relax: unused tuples

