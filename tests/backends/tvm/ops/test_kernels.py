"""Stand-alone operators: argument checks of make_prim_func and CompiledOp."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")


from pfp.backends.tvm import ops  # noqa: E402

from ..helpers import compiled_op  # noqa: E402


def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match="does not match input"):
        ops.make_prim_func(ops.dense_joint_first, [(2, 8), (4, 7), (4, 7), (4,), (4,)])
    with pytest.raises(ValueError, match="mean and variance inputs differ"):
        ops.make_prim_func(ops.dense_joint, [(2, 8), (2, 9), (4, 8), (4, 8), (4, 8), (4,), (4,)])
    with pytest.raises(ValueError, match="NCHW"):
        ops.make_prim_func(ops.conv2d, [(2, 8), (4, 2, 3, 3), (4,)])
    op = compiled_op("relu", ((2, 3),))
    with pytest.raises(ValueError, match="expected shape"):
        op(np.zeros((3, 2), np.float32))
