"""What the schedule rules share: the constants that tune them, queries of blocks and loops."""

from __future__ import annotations

from tvm import s_tir

#: Bump when the rules below change: tuning work dirs then measure the hand schedules again.
HAND_SCHEDULE_VERSION = 14
#: Batch rows that share one load of a weight vector in a dense reduction (register tile): the first that divides the batch.
BATCH_TILES = (4, 5, 3, 2)
#: Outputs computed side by side in a dense reduction with few rows (independent accumulator chains).
OUTPUT_TILE = 4
#: Output channels computed side by side in a convolution (the first that divides the channels
#: and whose loop body fits in the SIMD registers, see :func:`_conv_channel_tile`).
CONV_CHANNEL_TILES = (4, 3, 2)
#: ... when each output sums at least this many terms (input channels x kernel window). LeNet's first
#: layer (1 x 5 x 5) gains too since convolutions read flat rows: joint 798 -> 540 us, twin 479 -> 365 us
#: at batch 100 (it ran slower tiled when output rows were vectorised one by one).
CONV_TILE_MIN_REDUCTION = 16
#: SIMD registers a channels-last convolution leaves free of accumulators (input broadcasts, products).
CHANNELS_LAST_FREE_REGISTERS = 4
#: Below this many multiply-adds (one per weight operand and term) a reduction runs on one thread (the pool's wake-up costs more).
PARALLEL_MIN_WORK = 100_000
#: Elementwise blocks with fewer elements stay on one thread.
PARALLEL_MIN_ELEMENTS = 1024
#: ... light blocks (a load or two per element: a convolution's padded input and bias epilogue) with
#: fewer than this: they take well under a nanosecond per element, less than waking the thread pool
#: (about 1 us here). LeNet at batch 1: 89 -> 82 us with the padding copies on one thread; its first
#: conv's bias epilogue (2 x 4704 elements) 0.89x the kernel time on one thread, and 1.07x at batch 2.
PARALLEL_MIN_LIGHT = 8192
#: Longest vector of an elementwise loop (several SIMD registers: independent chains in flight).
MAX_VECTOR_LANES = 64
#: Window (pooling) blocks vectorise row by row when rows are at least this long.
MIN_VECTOR_ROW = 8
#: Consumers of a reduction with more nodes than this in their body stay out of its loop (see :func:`_attach_consumers`).
HEAVY_BLOCK_NODES = 160
#: Image stages that feed each other share one (batch, channel) loop when none has more elements
#: than this (see :func:`_schedule_small_image_chain`).
CHAIN_MAX_ELEMENTS = 16384

_DATA_PAR = 0
_COMM_REDUCE = 2


def _iter_types(sch: s_tir.Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return _COMM_REDUCE in _iter_types(sch, block)


def _vector_width(extent: int, widest: int = 16) -> int:
    """The widest of ``widest``, ``widest/2``, ``widest/4`` lanes (at least 4) that divides ``extent``; 1 if none does."""
    for lanes in (widest, widest // 2, widest // 4):
        if lanes >= 4 and extent % lanes == 0:
            return lanes
    return 1
