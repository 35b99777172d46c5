"""Hand-written CPU schedules for the PFP operators, and the compile pipeline that applies them.

TVM's default Relax pipeline leaves TE operators as naive serial loops (no parallelism, no
SIMD) on CPU targets. The Meta Scheduler's design space does not tile the joint operators
(one TIR block with two accumulators), and cannot analyse the Gaussian ReLU / max-pool
kernels at all (see :func:`pfp.backends.tvm.tune._untunable`). So every TIR function gets a
schedule from this module unless the tuning database has a faster one:

* dense-like reductions (one reduction axis, contiguous in memory): the reduction is split
  into ``lanes`` independent partial sums (``rfactor``), which are vectorised, so the inner loop
  is a SIMD multiply-add over contiguous weights; the outputs are parallelised across threads;
* conv-like reductions (reductions over channel and kernel window): the output positions move
  innermost and are vectorised (contiguous input, broadcast weights), in full SIMD vectors of flat
  positions for stride-1 convolutions (see :class:`pfp.backends.tvm.ops._ConvGrid`), by output
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
"""

from __future__ import annotations

import contextlib
import logging
import math

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

from pfp.backends.tvm.lowering import REASSOCIATE_ANNOTATION
from pfp.backends.tvm.ops import CHANNEL_VECTOR, CHANNELS_LAST_ANNOTATION, FLAT_ROW_ANNOTATION, LIGHT_ANNOTATION

__all__ = ["HAND_SCHEDULE_VERSION", "HandSchedule", "apply_hand_schedule", "compile_scheduled", "fuse_operators",
           "schedule_prim_func", "simd_registers"]

logger = logging.getLogger(__name__)

#: Bump when the rules below change: tuning work dirs then measure the hand schedules again.
HAND_SCHEDULE_VERSION = 12
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


def simd_registers(target: tvm.target.Target | None = None) -> tuple[int, int]:
    """(float32 lanes per SIMD register, SIMD registers) of ``target``'s CPU (default: the current target).

    AVX-512: 16 x 32, AVX/AVX2: 8 x 16, NEON: 4 x 32. Without a target, AVX2's (our CI hosts).
    """
    target = target if target is not None else tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return 8, 16
    from tvm.target.codegen import target_has_features

    if target_has_features("avx512f", target):
        return 16, 32
    if target_has_features("avx", target):
        return 8, 16
    if target_has_features("neon", target) or "aarch64" in str(target.attrs.get("mtriple", "")):
        return 4, 32
    return 4, 16


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

    Two layouts (see :class:`pfp.backends.tvm.ops._ConvGrid`): flat (b, o, p) accumulators are cut
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

    A joint block (two accumulators) is marked for :class:`~pfp.backends.tvm.lowering.ReassociateAccumulation`:
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


def _reads_pointwise(sch: s_tir.Schedule, block) -> bool:
    """True when every read of ``block`` is its own output position (an elementwise map, not a window)."""
    stmt = sch.get(block)
    iter_vars = [iv.var for iv in stmt.iter_vars]
    for read in stmt.reads:
        if len(read.region) != len(iter_vars):
            return False
        for extent_range, var in zip(read.region, iter_vars):
            if not (extent_range.min.same_as(var) and int(extent_range.extent) == 1):
                return False
    return True


def _reads_strided_plane(sch: s_tir.Schedule, block) -> bool:
    """True when ``block`` reads its (H, W) plane with a stride along W, and as one flat strided run.

    E.g. the horizontal pairs of a 2x2 max-pool: output (i, j) of a (H, W/2) plane reads input
    (i, 2j) and (i, 2j + 1), i.e. flat positions 2k and 2k + 1 of k = i * W/2 + j. TVM vectorises
    a strided read as one scalar load and lane insert per element; LLVM's loop vectoriser loads
    the run contiguously and deinterleaves it with shuffles (see :func:`_schedule_elementwise`).
    A whole 2x2 window (rows 2i and 2i + 1 too) is not one run: it keeps the row-by-row form.
    """
    from tvm.sym.pattern import detect_linear_equation

    stmt = sch.get(block)
    if len(stmt.iter_vars) < 2:
        return False
    row, column = (iv.var for iv in stmt.iter_vars[-2:])
    width = int(stmt.iter_vars[-1].dom.extent)
    strided = False
    for read in stmt.reads:
        if len(read.region) < 2:
            return False
        row_linear = detect_linear_equation(read.region[-2].min, [row])
        column_linear = detect_linear_equation(read.region[-1].min, [column])
        if len(row_linear) != 2 or len(column_linear) != 2:
            return False
        row_step, column_step = row_linear[0], column_linear[0]
        if not (isinstance(row_step, tirx.IntImm) and isinstance(column_step, tirx.IntImm)):
            return False
        input_width = int(read.source.shape[-1])
        # one run: consecutive output rows read consecutive input rows, each read whole
        if int(column_step) > 1 and int(row_step) == 1 and int(column_step) * width == input_width:
            strided = True
        elif int(column_step) != 1:
            return False
    return strided


def _contiguous_lanes(extent: int) -> int:
    """Vector length for a contiguous loop: whole if short, else 16 or the longest divisor that fits."""
    if extent <= MAX_VECTOR_LANES:
        return extent
    if extent % 16 == 0:
        return 16
    divisors = [lanes for lanes in range(8, MAX_VECTOR_LANES + 1) if extent % lanes == 0]
    return divisors[-1] if divisors else _vector_width(extent)


def _vectorise(sch: s_tir.Schedule, loop, lanes: int):
    """Vectorise ``loop`` in chunks of ``lanes`` (whole if it is that short); returns the outer loop of the split, if any."""
    extent = _extent(sch, loop)
    if lanes <= 1:
        return None
    if extent <= lanes:
        sch.vectorize(loop)
        return None
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer


def _schedule_elementwise(sch: s_tir.Schedule, blocks: list) -> None:
    """Merge sibling blocks over the same domain into one loop nest; vectorise by whole rows; parallelise.

    Siblings are e.g. the mean and variance blocks of the Gaussian ReLU: in one loop body LLVM
    computes their common subexpressions (the standardised argument, Phi, phi) once.

    Image tensors (rank >= 3) run a parallel (batch, channel) loop. Under it, a pointwise block
    (ReLU) is vectorised over its fused H x W axes in chunks of whole rows (two 28-wide rows, five
    10-wide rows in LeNet); a window block (pooling) row by row, because the rows it reads are not
    contiguous with each other. Vectors of up to MAX_VECTOR_LANES (several registers each) keep
    enough independent work in flight for the long dependency chains of Phi and phi: 16-lane
    chunks that straddle 28-wide rows were 2x slower, 4-lane chunks of 10-wide rows 3x.

    A window block that reads with a stride (the horizontal pairs of a 2x2 max-pool, columns 2j
    and 2j + 1) runs its fused H x W axes as one plain loop, left to LLVM's loop vectoriser: it
    loads the input contiguously and deinterleaves it with shuffles, where TVM's vectorised form
    loads and inserts lane by lane (Clark maxima of stride-2 pairs: 382 -> 312 us per 235k at
    2 threads; contiguous pairs take 253 us). The fused plane has no remainder per row.
    """
    chained = _schedule_small_image_chain(sch, blocks)
    groups: list[dict] = []
    for block in blocks:
        if sch.get(block).name_hint in chained:
            continue
        loops = sch.get_loops(block)
        if not loops:
            continue
        row = sch.get(block).annotations.get(FLAT_ROW_ANNOTATION)
        light = LIGHT_ANNOTATION in sch.get(block).annotations
        if row is not None:  # a flat conv input: rows of the padded image, each read contiguously
            sch.split(loops[-1], [None, int(row)])
            loops = sch.get_loops(block)
        extents = tuple(_extent(sch, loop) for loop in loops)
        strided, by_rows = _plane_form(sch, block, extents[-1]) if len(loops) > 3 else (False, False)
        if len(loops) >= 3:
            sch.fuse(*loops[:2])
            if not by_rows and len(loops) > 3:
                sch.fuse(*sch.get_loops(block)[1:])
        elif len(loops) == 2:
            sch.fuse(*loops)
        name = sch.get(block).name_hint
        producers = {sch.get(p).name_hint for p in sch.get_producers(block)}
        last = groups[-1] if groups else None
        form = (by_rows, strided, light)
        if last is not None and (last["extents"], last["form"]) == (extents, form) and not producers & last["names"]:
            for level in range(len(sch.get_loops(block))):  # loop handles change on merging: looked up again
                sch.merge(sch.get_loops(last["block"])[level], sch.get_loops(block)[level])
            last["names"].add(name)
        else:
            groups.append({"extents": extents, "form": form, "names": {name}, "block": block})
    for group in groups:
        extents, loops = group["extents"], sch.get_loops(group["block"])
        _, strided, light = group["form"]
        parallel = math.prod(extents) >= (PARALLEL_MIN_LIGHT if light else PARALLEL_MIN_ELEMENTS)
        split_outer = _vectorise_innermost_loop(sch, loops[-1], strided)
        outer = loops[0] if len(extents) >= 3 else split_outer  # (batch, channel), else the rows of the split
        if outer is not None and parallel:
            sch.parallel(outer)


def _plane_form(sch: s_tir.Schedule, block, width: int) -> tuple[bool, bool]:
    """(strided, by_rows) of a block over an image plane with rows ``width`` long.

    Strided: it reads its plane as one strided run (left to LLVM, see :func:`_schedule_elementwise`);
    by rows: any other window read, vectorised one row at a time when rows are long enough.
    Pointwise blocks are neither: their whole plane is one contiguous run.
    """
    if _reads_pointwise(sch, block):
        return False, False
    strided = _reads_strided_plane(sch, block)
    return strided, not strided and width >= MIN_VECTOR_ROW


def _vectorise_innermost_loop(sch: s_tir.Schedule, loop, strided: bool):
    """Vectorise an elementwise nest's innermost loop (a row, or the fused plane) unless LLVM takes a strided one."""
    if strided:  # LLVM vectorises the plane (see _schedule_elementwise)
        return None
    return _vectorise(sch, loop, _contiguous_lanes(_extent(sch, loop)))


def _schedule_small_image_chain(sch: s_tir.Schedule, blocks: list) -> set[str]:
    """Small image stages that feed each other (max-pool pairs, then ReLU) under ONE (batch, channel) loop.

    Each parallel loop is a launch of the thread pool (about 1 us on our 2-core hosts, as much as a
    small stage's work), so a chain of stages pays one launch instead of one per stage. Below the
    shared loop every stage keeps its own form (see :func:`_schedule_elementwise`). Side by side
    at batch 1, LeNet's Gaussian pool + ReLU kernels ran 10.4 -> 8.9 us and 7.5 -> 4.0 us (the
    second one parallel now), the twin's 0.62x and 0.89x the time. Only small chains: chaining
    every size made the first Gaussian pool 1.05x slower at batch 10 and 1.2x at batch 100 (its
    row stage's results are read back right away). Returns the names of the blocks it scheduled
    (none if it did not apply).
    """
    chain = [block for block in blocks if len(sch.get_loops(block)) == 4
             and LIGHT_ANNOTATION not in sch.get(block).annotations]
    names = [sch.get(block).name_hint for block in chain]
    extents = {name: tuple(_extent(sch, loop) for loop in sch.get_loops(block)) for name, block in zip(names, chain)}
    if (not chain or len({shape[:2] for shape in extents.values()}) != 1
            or max(math.prod(shape) for shape in extents.values()) > CHAIN_MAX_ELEMENTS):
        return set()
    consumers = {name: {sch.get(c).name_hint for c in sch.get_consumers(block)} & set(names)
                 for name, block in zip(names, chain)}
    sinks = [name for name in names if not consumers[name]]
    if len(sinks) == len(names) or len({extents[name] for name in sinks}) != 1:  # no stage feeds another
        return set()
    forms = {name: _plane_form(sch, sch.get_sblock(name), extents[name][-1]) for name in names}

    def fuse_plane(name: str) -> None:  # (row, column) -> one loop unless the block is vectorised by rows
        if not forms[name][1]:
            sch.fuse(*sch.get_loops(sch.get_sblock(name))[-2:])

    def merge(first: str, name: str, levels: range) -> None:  # loop handles change on merging: looked up again
        for level in levels:
            sch.merge(sch.get_loops(sch.get_sblock(first))[level], sch.get_loops(sch.get_sblock(name))[level])

    # the sinks (the ReLU's mean and variance) share one nest; every producer goes under its (b, c) loop
    for name in sinks:
        sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2])
        fuse_plane(name)
    anchor = sinks[0]
    for name in sinks[1:]:
        merge(anchor, name, range(len(sch.get_loops(sch.get_sblock(anchor)))))
    outer = sch.get_loops(sch.get_sblock(anchor))[0]
    for name in reversed(names):
        if name not in sinks:
            sch.compute_at(sch.get_sblock(name), outer)
            fuse_plane(name)
    # each stage below the shared loop: siblings merged, then vectorised as in _schedule_elementwise
    stages: list[list[str]] = []
    for name in names:
        if name in sinks[1:]:
            continue
        stage = next((s for s in stages if extents[s[0]] == extents[name] and forms[s[0]] == forms[name]
                      and not consumers[name] & set(s) and name not in sinks), None)
        if stage is None:
            stages.append([name])
            continue
        merge(stage[0], name, range(1, len(sch.get_loops(sch.get_sblock(name)))))
        stage.append(name)
    for stage in stages:
        _vectorise_innermost_loop(sch, sch.get_loops(sch.get_sblock(stage[0]))[-1], forms[stage[0]][0])
    if sum(math.prod(shape) for shape in extents.values()) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
    return set(names)


def schedule_prim_func(func: tirx.PrimFunc, *, lanes: int | None = None, target=None) -> tirx.PrimFunc:
    """``func`` with the hand-written CPU schedule applied (see the module docstring)."""
    sch = s_tir.Schedule(func)
    apply_hand_schedule(sch, lanes=lanes, target=target)
    return sch.mod["main"]


def apply_hand_schedule(sch: s_tir.Schedule, *, lanes: int | None = None, target=None) -> None:
    """Apply the hand-written schedule to the function ``main`` of ``sch`` (recorded in ``sch.trace``).

    ``target`` (default: the current target) sizes register tiles and, unless ``lanes`` is given,
    the dense reductions' partial sums (one SIMD register of them), see :func:`simd_registers`.
    """
    lanes = lanes if lanes is not None else simd_registers(target)[0]
    root = sch.get_sblock("root")
    names = [sch.get(block).name_hint for block in sch.get_child_blocks(root)]
    placed: set[str] = set()  # blocks moved under another block's loops
    for name in names:
        if name in placed:
            continue
        block = sch.get_sblock(name)
        if not _is_reduction(sch, block):
            continue
        types = _iter_types(sch, block)
        if types.count(_COMM_REDUCE) == 1:
            scheduled = _schedule_dense(sch, block, lanes)
        else:
            scheduled = _schedule_conv(sch, block, lanes, target)
        if scheduled is None:
            continue
        # consumers (final lane sum, bias epilogue, ReLU) inside the same parallel loop
        outer, head = scheduled
        _attach_consumers(sch, head, outer)
        placed |= {sch.get(child).name_hint for child in sch.get_child_blocks(outer)}
    _schedule_elementwise(sch, [block for block in sch.get_child_blocks(root)
                                if sch.get(block).name_hint not in placed and not _is_reduction(sch, block)])


def _block_size(sch: s_tir.Schedule, block) -> int:
    """Nodes in a block's body: a measure of its work per element (a bias add ~30, a Gaussian ReLU ~240)."""
    count = 0

    def visit(_node) -> None:
        nonlocal count
        count += 1

    tvm_ffi.structural_walk(sch.get(block).body, visit)
    return count


def _attach_consumers(sch: s_tir.Schedule, producer, loop) -> None:
    """Move the chain of consumers of ``producer`` under ``loop`` where their indexing allows.

    Heavy consumers (more than :data:`HEAVY_BLOCK_NODES`, e.g. the Gaussian ReLU after a joint
    layer) stay at the root: under a register tile they would run a few lanes at a time and apart
    from their sibling, where :func:`_schedule_elementwise` merges mean and variance into one loop
    and vectorises whole rows.
    """
    frontier = [producer]
    seen = {sch.get(producer).name_hint}
    while frontier:
        block = frontier.pop(0)
        for consumer in sch.get_consumers(block):
            consumer_name = sch.get(consumer).name_hint
            if consumer_name in seen:
                continue
            seen.add(consumer_name)
            if _block_size(sch, consumer) > HEAVY_BLOCK_NODES:
                continue
            try:
                sch.reverse_compute_at(consumer, loop)
            except (s_tir.ScheduleError, tvm.error.InternalError, ValueError):  # its indexing does not match (a pooling window, a flat conv's rows): stays at root
                continue
            if not _is_reduction(sch, consumer):
                _vectorise_innermost(sch, consumer, below=loop)
            frontier.append(consumer)


def _vectorise_innermost(sch: s_tir.Schedule, block, below) -> None:
    """Vectorise the innermost loop of ``block`` if it is one of the loops under ``below`` (e.g. a bias epilogue row)."""
    loops = sch.get_loops(block)
    position = next((index for index, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(below))), None)
    if position is None or position == len(loops) - 1:
        return
    _vectorise(sch, loops[-1], _contiguous_lanes(_extent(sch, loops[-1])))


@tvm.transform.module_pass(opt_level=0, name="HandSchedule")
class HandSchedule:
    """Apply :func:`schedule_prim_func` to every TIR function not scheduled yet (e.g. by the database)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            try:
                scheduled = schedule_prim_func(func)
            except (s_tir.ScheduleError, tvm.error.InternalError) as error:  # keep the default loops rather than fail the build
                logger.warning("no hand schedule for %s (%s); default loops kept", gvar.name_hint,
                               str(error).strip().splitlines()[-1])
                continue
            updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def fuse_operators(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Legalise and fuse a Relax module as the CPU pipeline does, ready for tuning or scheduling.

    Both the Meta Scheduler's task extraction and :func:`compile_scheduled` start from this
    module, so tuning records match the functions that are compiled. ``AnnotateTIROpPattern``'s
    ``op_pattern`` attribute is dropped afterwards: it is only needed by ``FuseOps``, and a
    function that keeps it no longer equals its tuning task.
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from pfp.backends.tvm.build import make_target

    target = make_target(target)
    with target:
        mod = tvm.transform.Sequential([
            *cpu.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)
    updates = {gvar: func.without_attr("op_pattern") for gvar, func in mod.functions_items()
               if isinstance(func, tirx.PrimFunc) and "op_pattern" in func.attrs}
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def compile_scheduled(mod: tvm.IRModule, target, database=None, *, flush_denormals: bool = True) -> tvm.runtime.Executable:
    """Compile a Relax module with hand schedules (and the database's schedules where it has them).

    :func:`fuse_operators` first (the functions the tuning tasks were extracted from), then the
    database's best schedule per function, then the hand schedule for every function the
    database does not cover, then the VM lowering
    (:func:`~pfp.backends.tvm.lowering.vm_lowering_passes`). With ``flush_denormals`` every kernel
    computes with subnormal floats flushed to zero (see :mod:`pfp.backends.tvm.denormals`).
    """
    from pfp.backends.tvm.build import make_target
    from pfp.backends.tvm.lowering import register_pipeline, vm_lowering_passes

    target = make_target(target)
    lower = vm_lowering_passes(target)
    mod = fuse_operators(mod, target)
    tir_pipeline = register_pipeline(flush_denormals)

    @tvm.transform.module_pass(opt_level=3, name="PFPScheduledPipeline")
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if database is not None:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            from_database = [gvar.name_hint for gvar, func in mod.functions_items()
                             if isinstance(func, tirx.PrimFunc) and func.attrs.get("tirx.is_scheduled", False)]
            logger.info("schedules from the database: %s", ", ".join(sorted(from_database)) or "none")
        mod = HandSchedule()(mod)
        return tvm.transform.Sequential(lower)(mod)

    with target, tvm.transform.PassContext(opt_level=3), (database if database is not None else contextlib.nullcontext()):
        return relax.build(mod, target=target, relax_pipeline=pipeline, tir_pipeline=tir_pipeline)
