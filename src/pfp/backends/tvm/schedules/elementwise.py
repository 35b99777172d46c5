"""Elementwise and pooling blocks: siblings merged, vectorised by whole rows, parallel over (batch, channel)."""

from __future__ import annotations

import math

from tvm import s_tir, tirx

from pfp.backends.tvm.ops.linear import FLAT_ROW_ANNOTATION, LIGHT_ANNOTATION
from pfp.backends.tvm.schedules.common import (
    CHAIN_MAX_ELEMENTS,
    MAX_VECTOR_LANES,
    MIN_VECTOR_ROW,
    PARALLEL_MIN_ELEMENTS,
    PARALLEL_MIN_LIGHT,
    _extent,
    _vector_width,
)


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


def _depends_on(sch: s_tir.Schedule, block, names: set[str]) -> bool:
    """True when ``block`` reads, directly or through other blocks, what a block of ``names`` writes."""
    frontier, seen = [block], set()
    while frontier:
        for producer in sch.get_producers(frontier.pop()):
            name = sch.get(producer).name_hint
            if name in names:
                return True
            if name not in seen:
                seen.add(name)
                frontier.append(producer)
    return False


def _can_share_loop(sch: s_tir.Schedule, first: str, name: str) -> bool:
    """True when block ``name`` may join the loop nest of block ``first`` (and of its merged siblings).

    ``sch.merge`` moves the nest to ``name``'s loop (the last one merged), past every block in
    between (root order), and runs ``name`` after the nest's blocks in the same body. So no block
    in between may depend on the nest or ``name`` or be read by them (checked both ways, whatever
    the placement), and ``name`` may not read what the nest computes, not even at its own
    position: a window read would see rows its loop has not computed yet, and a pointwise read is
    miscompiled once vectorised (TVM compacts the intermediate to one element inside the vector
    loop, then ``VectorizeLoop`` hoists it unwidened: every lane reads the last lane's value).
    E.g. a Gaussian ReLU, a Relax ``multiply`` and a max-pool fused into one function by FuseOps.
    """
    block = sch.get_sblock(name)
    enclosing = [sch.get(loop) for loop in sch.get_loops(block)]
    nest = {first}
    for loop in sch.get_loops(sch.get_sblock(first)):  # the outermost loop of first's not around name
        if not any(sch.get(loop).same_as(stmt) for stmt in enclosing):
            nest = {sch.get(child).name_hint for child in sch.get_child_blocks(loop)}
            break
    order = [sch.get(child).name_hint for child in sch.get_child_blocks(sch.get_sblock("root"))]
    positions = [order.index(member) for member in nest | {name}]
    between = set(order[min(positions):max(positions) + 1]) - nest - {name}
    movers = nest | {name}
    if _depends_on(sch, block, nest) or any(_depends_on(sch, sch.get_sblock(member), {name}) for member in nest):
        return False
    return not any(_depends_on(sch, sch.get_sblock(other), movers)
                   or any(_depends_on(sch, sch.get_sblock(mover), {other}) for mover in movers)
                   for other in between)


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
        if (last is not None and (last["extents"], last["form"]) == (extents, form) and not producers & last["names"]
                and _can_share_loop(sch, sch.get(last["block"]).name_hint, name)):
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
    row stage's results are read back right away). Stages are the blocks that may share a nest
    (see :func:`_can_share_loop`): siblings such as a ReLU's mean and variance, never a block and
    what it reads (an elementwise Relax op FuseOps put between the ReLU and the pool runs in a
    nest of its own). Returns the names of the blocks it scheduled (none if it did not apply).
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
    if not all(_can_share_loop(sch, sinks[0], name) for name in sinks[1:]):  # one sink feeds another through a non-chain block
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
    for name in reversed(names):  # each at the front of the loop's body: the nests then run in block order
        if name not in sinks:
            sch.compute_at(sch.get_sblock(name), outer, index=-2)
            fuse_plane(name)
    # each stage below the shared loop: siblings merged, then vectorised as in _schedule_elementwise
    stages: list[list[str]] = []
    for name in names:
        if name in sinks[1:]:
            continue
        # only independent blocks share a nest (see _can_share_loop): a stage's consumer (the
        # multiply after a ReLU, the pool after it) gets a nest of its own after the stage's
        stage = next((s for s in stages if name not in sinks and extents[s[0]] == extents[name]
                      and forms[s[0]] == forms[name] and _can_share_loop(sch, s[0], name)), None)
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
