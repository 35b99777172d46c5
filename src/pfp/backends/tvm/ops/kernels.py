"""One operator on its own: a stand-alone PrimFunc (benchmarks, ``tune_tir``) or a compiled kernel (tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
from tvm import te

from pfp.backends.tvm.ops.common import DTYPE, _ints

__all__ = ["CompiledOp", "make_prim_func"]


def _op_prim_func(op, input_shapes, kwargs) -> tuple[tvm.tirx.PrimFunc, list[tuple[int, ...]]]:
    inputs = [te.placeholder(tuple(int(d) for d in shape), DTYPE, name=f"in{index}")
              for index, shape in enumerate(input_shapes)]
    outputs = op(*inputs, **kwargs)
    outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    func = te.create_prim_func(inputs + outputs).with_attr("global_symbol", "main")
    return func, [_ints(out.shape) for out in outputs]


def make_prim_func(op: Callable[..., te.Tensor | Sequence[te.Tensor]], input_shapes: Sequence[Sequence[int]],
                   **kwargs) -> tvm.tirx.PrimFunc:
    """A stand-alone PrimFunc ``main`` of one operator: parameters are the inputs, then the outputs.

    For per-operator benchmarks and ``meta_schedule.tune_tir``::

        f = make_prim_func(dense_joint_first, [(8, 784), (100, 784), (100, 784), (100,), (100,)])
    """
    return _op_prim_func(op, input_shapes, kwargs)[0]


class CompiledOp:
    """One operator compiled on its own; ``op(*numpy_inputs) -> list of numpy outputs``."""

    def __init__(self, op: Callable, input_shapes: Sequence[Sequence[int]], target=None, **kwargs) -> None:
        self.input_shapes = [tuple(int(d) for d in shape) for shape in input_shapes]
        self.prim_func, self.output_shapes = _op_prim_func(op, self.input_shapes, kwargs)
        self.target = target if target is not None else tvm.target.Target({"kind": "llvm"})
        self.executable = tvm.compile(self.prim_func, target=self.target)
        self._device = tvm.cpu()

    def __call__(self, *inputs) -> list:
        import numpy as np

        if len(inputs) != len(self.input_shapes):
            raise ValueError(f"expected {len(self.input_shapes)} inputs, got {len(inputs)}")
        args = []
        for index, (value, shape) in enumerate(zip(inputs, self.input_shapes)):
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"input {index}: expected shape {shape}, got {value.shape}")
            args.append(tvm.runtime.tensor(value, self._device))
        outputs = [tvm.runtime.empty(shape, DTYPE, self._device) for shape in self.output_shapes]
        self.executable["main"](*args, *outputs)
        return [out.numpy() for out in outputs]
