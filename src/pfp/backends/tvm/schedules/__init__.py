"""Hand-written CPU schedules for the PFP operators (applied by :mod:`pfp.backends.tvm.pipeline`).

TVM's default Relax pipeline leaves TE operators as naive serial loops (no parallelism, no
SIMD) on CPU targets. The Meta Scheduler's design space does not tile the joint operators
(one TIR block with two accumulators), and cannot analyse the Gaussian ReLU / max-pool
kernels at all (see :func:`pfp.backends.tvm.tuning._compat.untunable`). So every TIR function gets a
schedule from this module unless the tuning database has a faster one:

* dense-like reductions (one reduction axis, contiguous in memory): the reduction is split
  into ``lanes`` independent partial sums (``rfactor``), which are vectorised, so the inner loop
  is a SIMD multiply-add over contiguous weights; the outputs are parallelised across threads;
* conv-like reductions (reductions over channel and kernel window): the output positions move
  innermost and are vectorised (contiguous input, broadcast weights), in full SIMD vectors of flat
  positions for stride-1 convolutions (see :class:`pfp.backends.tvm.ops.linear._ConvGrid`), by output
  row otherwise; output channels are tiled as far as the registers allow; the (batch,
  out-channel) loop is parallelised;
* the bias epilogue and light elementwise consumers (ReLU, the final lane sum) are computed
  inside the parallel loop of their producer (heavy ones, the Gaussian ReLU, keep their own);
  remaining elementwise / pooling blocks are merged with their siblings, vectorised over the
  spatial axes (pointwise blocks over the H x W plane, pooling blocks row by row, never a
  vector across a row boundary) and, when large, parallelised over (batch, channel); small
  chains of image stages (a max-pool, then the ReLU) share one (batch, channel) loop.

The rules look at each block's iteration types, not at names, so they also apply to the
functions ``FuseOps``/``FuseTIR`` produce (e.g. dense + ReLU in one function).

Modules: :mod:`~.common` (the tuning constants, block and loop queries), :mod:`~.reductions`
(dense and convolution reductions), :mod:`~.elementwise` (elementwise and pooling blocks, small
image chains), :mod:`~.apply` (the rules applied to a function, the ``HandSchedule`` pass).
"""

from pfp.backends.tvm.schedules.apply import HandSchedule, apply_hand_schedule, schedule_prim_func
from pfp.backends.tvm.schedules.common import (
    BATCH_TILES,
    CHAIN_MAX_ELEMENTS,
    CHANNELS_LAST_FREE_REGISTERS,
    CONV_CHANNEL_TILES,
    CONV_TILE_MIN_REDUCTION,
    HAND_SCHEDULE_VERSION,
    HEAVY_BLOCK_NODES,
    MAX_VECTOR_LANES,
    MIN_VECTOR_ROW,
    OUTPUT_TILE,
    PARALLEL_MIN_ELEMENTS,
    PARALLEL_MIN_LIGHT,
    PARALLEL_MIN_WORK,
)

__all__ = ["BATCH_TILES", "CHAIN_MAX_ELEMENTS", "CHANNELS_LAST_FREE_REGISTERS", "CONV_CHANNEL_TILES",
           "CONV_TILE_MIN_REDUCTION", "HAND_SCHEDULE_VERSION", "HEAVY_BLOCK_NODES", "MAX_VECTOR_LANES", "MIN_VECTOR_ROW",
           "OUTPUT_TILE", "PARALLEL_MIN_ELEMENTS", "PARALLEL_MIN_LIGHT", "PARALLEL_MIN_WORK", "HandSchedule",
           "apply_hand_schedule", "schedule_prim_func"]
