"""kiln's default CPU schedule for a TIR function made of pointwise ops and reductions — fast without tuning.

Contract: ``schedule_cpu(func, lanes=16, min_parallel=1 << 18) -> tvm.IRModule`` returns a scheduled copy of
``func`` (a PrimFunc from ``te.create_prim_func``) with the same semantics:
1. every spatial block that does not write a function output is inlined into its consumers
   (``compute_inline``; a pointwise value read twice is recomputed, never stored), repeatedly, so a
   fused group of pointwise ops becomes one loop nest per output and per reduction — except a value read
   by several consumers whose inlined expression already stands for more than ``MAX_RECOMPUTE`` blocks,
   which is stored (recomputing a recurrence such as a selective scan's state costs O(steps^2));
   A function left with one matmul block and at most one epilogue output block reading it is then
   scheduled by kiln's register-tiled GEMM template (``gemm_schedule.apply_gemm_template``) instead of
   steps 2 and 3; where the template does not apply, they run as below. Before step 1, a function with a
   topi ``conv2d_nchw``/``group_conv2d_nchw`` block is offered to the direct-convolution template
   (``conv_schedule.apply_conv_template``, which does its own inlining and keeps the padded input), and
   used as it scheduled it when it applies.
2. each remaining reduction block is computed at the outermost loops of its consumer that cover its
   spatial axes (``compute_at``), so e.g. softmax's max, sum and normalisation run row by row while the
   row is in cache (a three-pass softmax over one row; see ``docs/`` for why not online);
3. each output block's leading loops are fused and parallelised when the block has at least
   ``min_parallel`` iterations, and its innermost loop is split by ``lanes`` and vectorised when its
   extent allows (AVX-512: 16 float32 lanes).
A step that TVM refuses (``ScheduleError``; ``InternalError`` from rfactor of a reduction it cannot
factor, e.g. a boolean ``any``) leaves the function as it was before that step (the schedule is a set of
best-effort transformations over a function that is always correct); those errors are swallowed only
there. Why ``min_parallel`` is large: TVM's thread pool spins; a small parallel loop gains microseconds
on an idle machine and costs a scheduler time slice (milliseconds, measured: 8-9 ms for a 64K-element
copy) when the cores are busy.
"""

from __future__ import annotations

import tvm
import tvm.s_tir as st
from tvm.s_tir import Schedule, ScheduleError

SCHEDULE_VERSION = "9"  # part of the kernel cache key: bump when the schedule's output changes
MAX_RECOMPUTE = 4  # a value read by several consumers is inlined only while it stands for <= this many blocks
SPATIAL = 0  # IterVar.iter_type of a data-parallel axis in TIR
REDUCE = 2  # IterVar.iter_type of a reduction axis in TIR
LANES = 16  # fp32 lanes of an AVX-512 register


def _is_spatial(sch: Schedule, block) -> bool:
    return all(int(iv.iter_type) == SPATIAL for iv in sch.get(block).iter_vars)


def _blocks(sch: Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _all_blocks(sch: Schedule) -> list:
    """Every block, nested ones included (after compute_at some blocks live under loops)."""
    found = []

    def visit(block) -> None:
        for child in sch.get_child_blocks(block):
            found.append(child)

    visit(sch.get_sblock("root"))
    return found


def _permutation(region, variables: list) -> list[int] | None:
    """For each dimension of a block's buffer ``region``, which of ``variables`` (block iteration variables)
    indexes it, each exactly once and one element per dimension; None when the access is not a plain
    permutation of them (an offset, a broadcast, a sum such as ``y + ry``)."""
    order = []
    for r in region.region:
        if not (isinstance(r.extent, tvm.tirx.IntImm) and int(r.extent) == 1):
            return None
        match = [i for i, v in enumerate(variables) if r.min.same_as(v)]
        if len(match) != 1:
            return None
        order.append(match[0])
    return order if sorted(order) == list(range(len(variables))) else None


def _writes_output(sch: Schedule, block, outputs: set[str]) -> bool:
    return any(region.source.name in outputs for region in sch.get(block).writes)


def _inline_spatial(sch: Schedule, outputs: set[str]) -> None:
    # cost[name]: how many original blocks' expressions a block computes once its producers are inlined.
    # A block read by k > 1 consumers is recomputed k times: past MAX_RECOMPUTE that is not inlined, or a
    # recurrence (h_t = h_{t-1} * a_t + b_t, read by h_{t+1} and by y_t: Mamba's scan) costs O(T^2).
    cost: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for block in _blocks(sch):
            if _writes_output(sch, block, outputs) or not _is_spatial(sch, block):
                continue
            name = sch.get(block).name_hint
            consumers = [sch.get(c).name_hint for c in sch.get_consumers(block)]
            own = cost.get(name, 1)
            if len(consumers) > 1 and own > MAX_RECOMPUTE:
                continue
            try:
                sch.compute_inline(block)
            except ScheduleError:
                continue
            for c in consumers:
                cost[c] = cost.get(c, 1) + own
            changed = True


def _extent(sch: Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


def _dom_extents(sch: Schedule, block) -> list[tuple[int, int | None]]:
    """(iter_type, extent) per block iter."""
    out = []
    for iv in sch.get(block).iter_vars:
        ext = iv.dom.extent
        out.append((int(iv.iter_type), int(ext) if isinstance(ext, tvm.tirx.IntImm) else None))
    return out


def _attach_point(sch: Schedule, block, consumer) -> int:
    """How many of the consumer's leading loops enumerate exactly the reduction's output rows (0: none).

    The reduction's non-unit spatial axes must come first among its non-unit axes and match the
    consumer's leading loop extents; otherwise attaching would recompute the reduction per element."""
    iters = [(kind, ext) for kind, ext in _dom_extents(sch, block) if ext != 1]
    spatial = []
    for kind, ext in iters:
        if kind != SPATIAL:
            break
        spatial.append(ext)
    if len(spatial) != sum(kind == SPATIAL for kind, _ in iters) or not spatial:
        return 0
    loops = [_extent(sch, lp) for lp in sch.get_loops(consumer)]
    loops = [e for e in loops]
    return len(spatial) if loops[:len(spatial)] == spatial else 0


def _attach_reductions(sch: Schedule, outputs: set[str]) -> None:
    for block in reversed(_blocks(sch)):
        if _is_spatial(sch, block) or _writes_output(sch, block, outputs):
            continue
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            continue
        depth = _attach_point(sch, block, consumers[0])
        if depth:
            try:
                sch.compute_at(block, sch.get_loops(consumers[0])[depth - 1], preserve_unit_loops=True)
            except ScheduleError:
                continue


def _vectorize(sch: Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops or not _is_spatial(sch, block):
        return
    # the innermost loops that hold only this block can be fused and vectorised
    private = []
    for lp in reversed(loops):
        if len(sch.get_child_blocks(lp)) != 1 or _extent(sch, lp) is None:
            break
        private.insert(0, lp)
    if not private:
        return
    inner = sch.fuse(*private) if len(private) > 1 else private[0]
    ext = _extent(sch, inner)
    if ext is not None and ext >= lanes and ext % lanes == 0:
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)


def _vectorize_reduction(sch: Schedule, block, lanes: int) -> None:
    """Split the innermost reduction loop by ``lanes`` and rfactor it: ``lanes`` partial results per row,
    accumulated with vector instructions (the rfactor block keeps its init, so it stays a reduction block
    that can still be parallelised), then summed. Changes the order of a floating-point reduction
    (as every vectorised reduction does), within float tolerances."""
    iters = _dom_extents(sch, block)
    if not iters or iters[-1][0] == SPATIAL:
        return
    loops = sch.get_loops(block)
    last = loops[-1]
    ext = _extent(sch, last)
    if ext is None or ext < 2 * lanes or ext % lanes or len(sch.get_child_blocks(last)) != 1:
        return
    outer, inner = sch.split(last, [None, lanes])
    n_spatial = sum(kind == SPATIAL for kind, _ in iters)
    rf = sch.rfactor(inner, factor_axis=n_spatial)  # partials laid out [rows..., lanes]: one row, one line
    sch.vectorize(sch.get_loops(rf)[-1])


def _parallelize_roots(sch: Schedule, min_parallel: int) -> None:
    root = sch.get_sblock("root")
    for block in list(sch.get_child_blocks(root)):
        loops = sch.get_loops(block)
        if not loops:
            continue
        top = loops[0]
        work = 1
        for lp in loops:
            work *= _extent(sch, lp) or 1
        if work < min_parallel or (_extent(sch, top) or 0) < 2:
            continue
        try:
            sch.parallel(top)
        except ScheduleError:
            continue


def _outputs(sch: Schedule) -> set[str]:
    # a buffer the root block does not allocate is a parameter: blocks that write one write an output
    internal = {buf.name for buf in sch.get(sch.get_sblock("root")).alloc_buffers}
    return {r.source.name for b in _blocks(sch) for r in sch.get(b).writes} - internal


def inline_producers(func):
    """``func`` with step 1 of ``schedule_cpu`` applied (every non-output spatial block inlined): the
    form MetaSchedule is retried on when its rules reject a function (see ``tune.py``)."""
    sch = Schedule(tvm.IRModule({"main": func}))
    _inline_spatial(sch, _outputs(sch))
    return sch.mod["main"]


def schedule_cpu(func, lanes: int = 16, min_parallel: int = 1 << 18) -> tvm.IRModule:
    sch = Schedule(tvm.IRModule({"main": func}))
    outputs = _outputs(sch)
    from .conv_schedule import CONV_BLOCKS, apply_conv_template  # they build on this module's block helpers
    from .gemm_schedule import apply_gemm_template

    if any(sch.get(b).name_hint in CONV_BLOCKS for b in _blocks(sch)):
        conv = sch.copy()
        if apply_conv_template(conv, outputs, min_parallel):
            st.analysis.verify_well_formed(conv.mod)
            return conv.mod
    _inline_spatial(sch, outputs)

    gemm = sch.copy()
    if apply_gemm_template(gemm, outputs, min_parallel):
        st.analysis.verify_well_formed(gemm.mod)
        return gemm.mod
    _attach_reductions(sch, outputs)
    for block in _all_blocks(sch):
        try:
            if _is_spatial(sch, block):
                _vectorize(sch, block, lanes)
            else:
                _vectorize_reduction(sch, block, lanes)
        except (ScheduleError, tvm.error.InternalError):  # e.g. rfactor of a bool "any": leave it scalar
            continue
    _parallelize_roots(sch, min_parallel)
    st.analysis.verify_well_formed(sch.mod)
    return sch.mod
