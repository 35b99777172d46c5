"""Reductions: dense (rfactor-vectorised, register tiles) and convolutions (flat, NCHW, channels-last)."""

from __future__ import annotations

import math

from tvm import s_tir, tirx

from pfp.backends.tvm.ops.linear import CHANNEL_VECTOR, CHANNELS_LAST_ANNOTATION
from pfp.backends.tvm.passes.reassociate import REASSOCIATE_ANNOTATION
from pfp.backends.tvm.schedules.common import (
    _COMM_REDUCE,
    _DATA_PAR,
    BATCH_TILES,
    CHANNELS_LAST_FREE_REGISTERS,
    CONV_CHANNEL_TILES,
    CONV_TILE_MIN_REDUCTION,
    OUTPUT_TILE,
    PARALLEL_MIN_WORK,
    _extent,
    _iter_types,
    _vector_width,
)
from pfp.backends.tvm.targets import simd_registers


def _schedule_dense(sch: s_tir.Schedule, block, lanes: int):
    """rfactor + vectorise the single reduction axis.

    Returns the fused outer (parallel) loop and the block computed there first (the rfactor block).
    """
    types = _iter_types(sch, block)
    loops = sch.get_loops(block)
    head = block
    spatial = [loop for loop, kind in zip(loops, types) if kind == _DATA_PAR]
    (reduction,) = [loop for loop, kind in zip(loops, types) if kind == _COMM_REDUCE]
    # multiply-adds: one per weight operand and term (a joint hidden layer streams 3 weight
    # matrices; LeNet's fc1 at batch 1 then needs two cores' bandwidth, the twin's single one does not)
    work = math.prod(_extent(sch, loop) for loop in loops) * max(1, _operands(sch, block, _spatial_vars(sch, block)[0])[0])
    # partial sums that divide the reduction: a remainder makes TVM guard every lane (K = 120 with
    # 16 lanes ran 15x slower than with 8 on AVX2; K = 100 with 4 lanes 4x faster than with 8)
    dividing = _vector_width(_extent(sch, reduction), lanes)
    lanes = dividing if dividing > 1 else lanes
    if _extent(sch, reduction) >= 2 * lanes:
        _, inner = sch.split(reduction, [None, lanes])
        rf_block = sch.rfactor(inner, factor_axis=len(spatial))
        head = rf_block
        rf_loops = sch.get_loops(rf_block)
        sch.vectorize(rf_loops[-1])
        spatial = rf_loops[:len(spatial)]
        batch = _extent(sch, spatial[0])
        batch_tile = next((t for t in BATCH_TILES if batch >= 2 * t and batch % t == 0), 1)
        if len(spatial) == 2 and batch_tile > 1:
            # batch_tile rows share each weight vector load (a GEMM register tile)
            batch_outer, batch_inner = sch.split(spatial[0], [None, batch_tile])
            sch.reorder(batch_outer, spatial[1], rf_loops[-2], batch_inner, rf_loops[-1])
            sch.unroll(batch_inner)
            spatial = [batch_outer, spatial[1]]
        elif len(spatial) == 2:
            # few rows (a GEMV): OUTPUT_TILE outputs per step give independent multiply-add chains
            # (one chain waits on the FMA latency) and share each input vector load
            tile = next((t for t in (OUTPUT_TILE, 2) if _extent(sch, spatial[1]) % t == 0), 1)
            if tile > 1:
                out_outer, out_inner = sch.split(spatial[1], [None, tile])
                sch.reorder(spatial[0], out_outer, rf_loops[-2], out_inner, rf_loops[-1])
                sch.unroll(out_inner)
                spatial = [spatial[0], out_outer]
    outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    return outer, head


def _schedule_gemm(sch: s_tir.Schedule, block, target=None):
    """Row-times-matrix accumulators with the weight stored (reduction, padded outputs) (:data:`GEMM_ANNOTATION`).

    The output axis is vectorised and a register tile of ``rows x vectors`` accumulators (about
    half the SIMD registers, whole padded rows when they fit) stays in registers over the
    reduction: each weight vector load feeds ``rows`` multiply-adds, each broadcast ``vectors``.
    Returns the fused outer (parallel) loop and the write-back block (its consumers follow it).
    """
    lanes, registers = simd_registers(target)
    r, n, k = sch.get_loops(block)
    rows, width = _extent(sch, r), _extent(sch, n)
    budget = registers // 2
    vectors = width // lanes
    vector_tile = max(d for d in range(1, min(vectors, budget) + 1) if vectors % d == 0)
    row_tile = next(t for t in (4, 2, 1) if rows % t == 0 and t * vector_tile <= budget)
    r_outer, r_inner = sch.split(r, [None, row_tile])
    n_outer, n_vectors, n_lanes = sch.split(n, [None, vector_tile, lanes])
    sch.reorder(r_outer, n_outer, k, r_inner, n_vectors, n_lanes)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, n_outer)
    _, back_lanes = sch.split(sch.get_loops(write_back)[-1], [None, lanes])
    sch.vectorize(back_lanes)
    # vectorize and parallel need the complete reduction block: before the init is split off
    sch.vectorize(n_lanes)
    sch.unroll(n_vectors)
    sch.unroll(r_inner)
    outer = sch.fuse(r_outer, n_outer)
    if rows * width * _extent(sch, k) >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.decompose_reduction(block, k)
    return outer, write_back


def _conv_channel_tile(channels: int, accumulators: int, weights: int, inputs: int, width: int, target) -> int:
    """Output channels side by side, as many as keep the loop body in the SIMD registers.

    Each channel of the tile holds ``accumulators`` vectors of ``width`` floats across the whole
    reduction plus one broadcast register per weight operand; the ``inputs`` vectors are shared by
    the tile. Past the register file LLVM spills at every step: on AVX2, 4 joint channels
    (2 accumulators, 3 weights) ran slower than 2; the deterministic conv (1 + 1) takes 4.
    """
    lanes, registers = simd_registers(target)
    vectors = -(-width // lanes)
    return next((tile for tile in CONV_CHANNEL_TILES if channels % tile == 0
                 and tile * (accumulators * vectors + weights) + inputs * vectors <= registers), 1)


def _spatial_vars(sch: s_tir.Schedule, block) -> list:
    """The block's data-parallel iteration variables, outermost (the batch row) first."""
    return [iv.var for iv in sch.get(block).iter_vars if int(iv.iter_type) == _DATA_PAR]


def _operands(sch: s_tir.Schedule, block, var) -> tuple[int, int]:
    """(reads that do not depend on ``var``, reads that do) of a block.

    With the output position as ``var`` (conv) or the batch row (dense), the first are the weight
    operands, the second the inputs.
    """
    depends = [any(any(used.same_as(var) for used in tirx.analysis.undefined_vars(r.min)) for r in read.region)
               for read in sch.get(block).reads]
    return depends.count(False), depends.count(True)


def _schedule_conv(sch: s_tir.Schedule, block, lanes: int, target=None):
    """Convolutions: output positions innermost and vectorised under the reductions; (b, o) parallel.

    Two layouts (see :class:`pfp.backends.tvm.ops.linear._ConvGrid`): flat (b, o, p) accumulators are cut
    into vectors of consecutive positions (:func:`_conv_position_lanes`); NCHW (b, o, i, j) ones
    vectorise the output row. Returns the fused outer loop and the block, or None for other blocks.
    """
    if CHANNELS_LAST_ANNOTATION in sch.get(block).annotations:
        return _schedule_conv_channels_last(sch, block, target)
    types = _iter_types(sch, block)
    loops = sch.get_loops(block)
    work = math.prod(_extent(sch, loop) for loop in loops)
    if types == [_DATA_PAR] * 3 + [_COMM_REDUCE] * 3:
        b, o, p, rc, ry, rx = loops
    elif types == [_DATA_PAR] * 4 + [_COMM_REDUCE] * 3:
        b, o, outer_positions, vector, rc, ry, rx = loops  # output rows, then the vectorised row
    else:
        return None
    reduction = _extent(sch, rc) * _extent(sch, ry) * _extent(sch, rx)
    operands = _operands(sch, block, _spatial_vars(sch, block)[-1])
    accumulators = len(sch.get(block).writes)

    def channel_tile(width: int) -> int:
        if reduction < CONV_TILE_MIN_REDUCTION:  # a few terms per output: the loop overhead outweighs shared loads
            return 1
        return _conv_channel_tile(_extent(sch, o), accumulators, *operands, width, target)

    if len(loops) == 6:
        width = _conv_position_lanes(_extent(sch, p), lanes, channel_tile)
        outer_positions, vector = sch.split(p, [None, width])
    tile = channel_tile(_extent(sch, vector))
    if tile > 1:
        # `tile` output channels side by side: each input vector load feeds `tile` independent
        # multiply-add chains (one chain stalls on the FMA latency over the whole reduction)
        o, o_inner = sch.split(o, [None, tile])
        sch.reorder(b, o, outer_positions, rc, ry, rx, o_inner, vector)
        sch.unroll(o_inner)
    else:
        sch.reorder(b, o, outer_positions, rc, ry, rx, vector)
    # vectorize and parallel need the complete reduction block: before the init is split off
    sch.vectorize(vector)
    outer = sch.fuse(b, o)
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.decompose_reduction(block, rc)
    return outer, block


def _schedule_conv_channels_last(sch: s_tir.Schedule, block, target=None):
    """Channels-last convolutions (b, i, j, o): output channels vectorised, positions side by side.

    Under the reduction, ``positions`` adjacent outputs of a row (unrolled) each take a vector
    of :data:`~pfp.backends.tvm.ops.CHANNEL_VECTOR` channels: every input element is broadcast
    once and meets its weights as whole vectors (memory operands of the multiply-adds), so the
    weights need no broadcasts and no output position is computed in vain. As many positions as
    fit the SIMD registers; (b, i[, o]) parallel.

    A position holds one channel vector per weight operand: its accumulators, and the product
    of each weight operand beyond one per accumulator, which is formed before it is added. On
    AVX2 this gives LeNet's conv2 the fastest of 2 or 5 positions: 5 for the twin, 2 for the
    hidden joint and separate variance convs (at batch 100 the variance took 1495 us with 5,
    913 with 2; the twin 498 with 2, 353 with 5). Against the flat form, measured side by side
    at batch 100 / 1: joint 2347 -> 1732 / 32.0 -> 21.2 us, twin 511 -> 370 / 11.1 -> 7.2 us,
    separate variance 1410 -> 1054 / 23.5 -> 15.1 us.

    A joint block (two accumulators) is marked for :class:`~pfp.backends.tvm.passes.reassociate.ReassociateAccumulation`:
    its variance update ``acc + (var * E[w^2] + mu^2 * sigma_w^2)`` then compiles to two
    multiply-adds into the accumulator instead of a multiply, a multiply-add and an add with the
    products held in registers, which made LLVM spill 17 vectors per 5 kernel taps (no spills
    after). Measured side by side (min of 20-25 interleaved rounds, 3 runs), LeNet's conv2 ran
    0.76-0.95x the time at batch 100 and 0.83-0.93x at batch 1. The single-accumulator variance
    conv keeps the sum of products: its add-only chain is shorter than two dependent multiply-adds
    (1.09-1.36x slower reassociated), as is the flat form of the joint conv (1.46x at batch 100).
    """
    b, i, j, o, rc, ry, rx = sch.get_loops(block)
    work = math.prod(_extent(sch, loop) for loop in (b, i, j, o, rc, ry, rx))
    lanes, registers = simd_registers(target)
    weights = _operands(sch, block, _spatial_vars(sch, block)[2])[0]  # the reads that do not move with j
    per_position = max(1, weights) * -(-CHANNEL_VECTOR // lanes)
    fit = max(1, (registers - CHANNELS_LAST_FREE_REGISTERS) // per_position)
    width = _extent(sch, j)
    positions = max(p for p in range(1, min(fit, width) + 1) if width % p == 0)
    j_outer, j_inner = sch.split(j, [None, positions])
    if _extent(sch, o) > CHANNEL_VECTOR:
        o_outer, o = sch.split(o, [None, CHANNEL_VECTOR])
        sch.reorder(b, i, o_outer, j_outer, rc, ry, rx, j_inner, o)
        outer = sch.fuse(b, i, o_outer)
    else:
        sch.reorder(b, i, j_outer, rc, ry, rx, j_inner, o)
        outer = sch.fuse(b, i)
    sch.unroll(j_inner)
    sch.vectorize(o)
    if len(sch.get(block).writes) > 1:
        sch.annotate(block, REASSOCIATE_ANNOTATION, 1)
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.decompose_reduction(block, rc)
    return outer, block


def _conv_position_lanes(positions: int, lanes: int, channel_tile) -> int:
    """Flat positions per vector: two SIMD registers' worth (2 x ``lanes``) when they divide ``positions``
    and ``channel_tile(width)`` then keeps at least as many accumulator registers in flight; else one
    register's, or the widest fraction of it that divides.

    Two registers per vector halve the weight broadcasts per multiply-add, which bound the
    single-accumulator convolutions on AVX2: at batch 100 the twin's conv2 ran 729 -> 474 us
    (4 channels x 2 registers), its conv1 307 -> 246 us, the SVI-30 ensemble's conv2 23.3 -> 15.7 ms,
    PFP's first-layer joint conv 559 -> 511 us (2 channels x 2 registers instead of 3 x 1). The
    hidden joint conv (two accumulators and three weights per channel) fits one channel only
    at that width; it keeps 2 x 1 (2.03 ms either way) and its 8-aligned positions.
    """
    wide = 2 * lanes
    if positions % wide == 0 and 2 * channel_tile(wide) >= channel_tile(lanes):
        return wide
    return _vector_width(positions, lanes)
