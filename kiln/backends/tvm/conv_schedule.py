"""kiln's convolution template: a register-tiled direct convolution for TIR convolutions, fast untuned.

The generic schedule (``schedule.schedule_cpu``) leaves a convolution scalar (1.5 GFLOP/s on ResNet's 3x3
64->64 at 56x56 in ``benchmarks/gemm.py``). This template computes it the way the GEMM template
(``gemm_schedule.py``) computes a matmul, with output pixels as the rows and output channels as the
columns: each ``MR x NR`` tile (``MR`` consecutive output pixels of one row, ``NR`` output channels, a
multiple of the 16 fp32 lanes of an AVX-512 register) keeps its accumulators in a ``local`` buffer that
LLVM keeps in vector registers, and the reduction runs over ``(ry, rx, rc)`` with, per step, one broadcast
of an input value per pixel and ``NR / 16`` vector loads of weights shared by the ``MR`` pixels. Two
packed copies make every load unit-stride, whatever the caller's layouts:
- the padded input is materialised once per call in NHWC order (topi's ``pad_temp`` stage kept instead of
  inlined, so the hot loop has no bounds test; it also reads an NCHW or NHWC input once);
- the weights are copied once per call into ``[C_out / NR, KH, KW, C_in, NR]`` (about the size of the
  weights: small next to the convolution).

Contract:
- ``apply_conv_template(sch, outputs, min_parallel) -> bool`` schedules, in place, a function that is (after
  inlining every spatial block except ``pad_temp``) exactly one topi ``conv2d_nchw`` or
  ``group_conv2d_nchw`` block (spatial ``n, f, y, x``, reductions ``rc, ry, rx``, static extents), at
  most one ``pad_temp`` block feeding it,
  and at most one spatial output block reading it (the fused epilogue: bias, activation, and the layout
  of the output, NCHW or NHWC) whose index into the convolution is a permutation of its own loops, with
  ``C_out`` a multiple of 16. Call it on an un-inlined copy (``sch.copy()``) of a schedule: it returns
  False, leaving ``sch`` unusable, when the function does not have that form or TVM refuses a step.
  The tiles run in parallel (over ``n, y`` and the tiles of a row) when the convolution has at least
  ``min_parallel`` multiply-adds.
- ``conv_tile(width, channels) -> (MR, NR)``: ``NR`` = 32 when it divides ``channels`` else 16; ``MR`` = the
  largest of 8, 7, 6, 4, 2, 1 dividing the output width (no predicated tail tiles).
- Results equal the unscheduled function's up to float32 summation order (the reduction runs as
  ``ry, rx, rc`` instead of ``rc, ry, rx``).
- Grouped and depthwise convolutions take the same path: their reduction over ``rc`` is ``C_in / groups``
  long (1 for a depthwise one) and the input channel read follows the output channel, so in a depthwise
  convolution the broadcast becomes a vector load of ``NR`` input channels (with 16 channels per group or
  more it stays one broadcast per vector; fewer give gathers).

Measured (``benchmarks/gemm.py --tune-trials 16``, session 9, untuned, through ``kiln.compile`` with
``gemm="tvm"``; the benchmark's modules take and give NCHW tensors): ResNet's 3x3 64->64 at 56x56 136
GFLOP/s (38% of the FMA peak; PyTorch/oneDNN 145 in the same run; the generic schedule 1.5); 1x1 64->256
at 56x56 62 GFLOP/s (oneDNN 78): its reduction is only 64 long, and its NCHW output is written with
scattered stores (a vector of output channels is 56x56 elements apart there; channels-last outputs are
written contiguously). The kernel alone on channels-last tensors (``build_kernel``, against
``F.conv2d`` on the same tensors; probe, not a benchmark script): 3x3 175 GFLOP/s against oneDNN's 280,
1x1 197 against 231, depthwise 3x3 144 channels 0.35-0.49 ms against 0.18-0.25 ms (it moves more memory
than it computes, and the padded copy is one more pass over it); the generic schedule ran the depthwise
one at 3.5 GFLOP/s in ``benchmarks/gemm.py``.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule, ScheduleError

from .schedule import (
    LANES,
    REDUCE,
    SPATIAL,
    _blocks,
    _dom_extents,
    _extent,
    _inline_spatial,
    _is_spatial,
    _permutation,
    _writes_output,
)

CONV_BLOCKS = ("conv2d_nchw", "group_conv2d_nchw")
PAD_BLOCK = "pad_temp"


def conv_tile(width: int, channels: int) -> tuple[int, int]:
    nr = 2 * LANES if channels % (2 * LANES) == 0 else LANES
    mr = next(r for r in (8, 7, 6, 4, 2, 1) if width % r == 0)
    return mr, nr


def _block_named(sch: Schedule, *names: str):
    found = [b for b in _blocks(sch) if sch.get(b).name_hint in names]
    return found[0] if len(found) == 1 else None


def _same(sch: Schedule, a, b) -> bool:
    """Whether two block handles name the same block (handles from separate queries are distinct objects)."""
    return sch.get(a).same_as(sch.get(b))


def _read_of(sch: Schedule, block, buffer_name: str):
    """(index into ``block``'s reads, the region) of its read of ``buffer_name``, or None."""
    for index, region in enumerate(sch.get(block).reads):
        if region.source.name == buffer_name:
            return index, region
    return None


def _pack_weights(sch: Schedule, conv, weight_index: int, dims: list[int], nr: int) -> None:
    """Copy the weights into ``[C_out / NR, KH, KW, C_in, NR]``; ``dims[d]`` says which conv iterator
    (1 = f, 4 = rc, 5 = ry, 6 = rx) indexes the weight buffer's dimension ``d``."""
    packed = sch.cache_read(conv, weight_index, "global")

    def layout(*axes):
        by = dict(zip(dims, axes))
        return by[1] // nr, by[5], by[6], by[4], by[1] % nr

    sch.transform_layout(packed, ("write", 0), layout)


def _pad_to_nhwc(sch: Schedule, pad, parallel: bool) -> None:
    """Store the padded input NHWC (a broadcast per pixel walks ``rc`` with unit stride) and write it in
    that order, channels vectorised when they allow it."""
    sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    n, c, h, w = sch.get_loops(pad)
    sch.reorder(n, h, w, c)
    if (_extent(sch, c) or 0) % LANES == 0:
        sch.vectorize(sch.split(c, [None, LANES])[1])
    rows = sch.fuse(n, h)
    if parallel:
        sch.parallel(rows)


def apply_conv_template(sch: Schedule, outputs: set[str], min_parallel: int = 1 << 18) -> bool:
    conv = _block_named(sch, *CONV_BLOCKS)
    if conv is None:
        return False
    iters = _dom_extents(sch, conv)
    if any(ext is None for _, ext in iters) or [k for k, _ in iters] != [SPATIAL] * 4 + [REDUCE] * 3:
        return False
    pad = _block_named(sch, PAD_BLOCK)
    if pad is not None and not any(_same(sch, c, conv) for c in sch.get_consumers(pad)):
        return False
    try:
        _inline_spatial(sch, outputs | ({PAD_BLOCK} if pad is not None else set()))
    except (ScheduleError, tvm.error.InternalError):
        return False
    blocks = _blocks(sch)
    conv = _block_named(sch, *CONV_BLOCKS)
    pad = _block_named(sch, PAD_BLOCK) if pad is not None else None
    rest = [b for b in blocks if not _same(sch, b, conv) and (pad is None or not _same(sch, b, pad))]
    if conv is None or len(rest) > 1 or (pad is not None and len(sch.get(pad).iter_vars) != 4):
        return False
    epilogue = rest[0] if rest else None
    if epilogue is not None:
        if not _writes_output(sch, epilogue, outputs) or not _is_spatial(sch, epilogue):
            return False
    elif not _writes_output(sch, conv, outputs):
        return False
    n_, f_, y_, x_ = (ext for _, ext in iters[:4])
    if f_ % LANES:
        return False
    mr, nr = conv_tile(x_, f_)
    macs = 1
    for _, ext in iters:
        macs *= ext
    conv_vars = [iv.var for iv in sch.get(conv).iter_vars]
    conv_buffer = sch.get(conv).writes[0].source.name
    kernel_vars = [conv_vars[1], *conv_vars[4:]]  # f, rc, ry, rx: what indexes a weight
    weights = [(r.source.name, _permutation(r, kernel_vars)) for r in sch.get(conv).reads if len(r.region) == 4]
    weights = [(name, perm) for name, perm in weights if perm is not None]
    try:
        if epilogue is not None:
            read = _read_of(sch, epilogue, conv_buffer)
            writer = epilogue
            if read is None:
                return False
            sch.set_scope(conv, 0, "local")
        else:
            writer = sch.cache_write(conv, 0, "local")
            read = _read_of(sch, writer, sch.get(conv).writes[0].source.name)
        loops = sch.get_loops(writer)
        writer_vars = [iv.var for iv in sch.get(writer).iter_vars]
        role = _permutation(read[1], writer_vars)  # role[d]: the writer iterator reading conv dimension d
        if role is None or len(loops) != 4 or [_extent(sch, loops[role[d]]) for d in range(4)] != [n_, f_, y_, x_]:
            return False  # the writer must enumerate the convolution's output space, in any order
        n, f, y, x = (loops[role[d]] for d in range(4))
        xo, xi = sch.split(x, [None, mr])
        fo, fi = sch.split(f, [None, nr])
        sch.reorder(n, y, xo, fo, xi, fi)
        sch.compute_at(conv, fo, preserve_unit_loops=True)
        # the tile's accumulators channel-minor, so a vector of NR channels is one register, not a gather
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
        cn, cf, cy, cx, rc, ry, rx = sch.get_loops(conv)[-7:]
        sch.reorder(cn, cy, ry, rx, rc, cx, cf)
        sch.unroll(cx)
        sch.vectorize(cf)
        _, lanes = sch.split(fi, [None, LANES])
        sch.vectorize(lanes)
        tiles = sch.fuse(n, y, xo, fo)
        if macs >= min_parallel:
            sch.parallel(tiles)
        if len(weights) == 1:
            name, perm = weights[0]
            _pack_weights(sch, conv, _read_of(sch, conv, name)[0], [(1, 4, 5, 6)[p] for p in perm], nr)
        if pad is not None:
            _pad_to_nhwc(sch, pad, macs >= min_parallel)
        sch.decompose_reduction(conv, ry)  # last: parallel/vectorize refuse a reduction without its init
    except (ScheduleError, tvm.error.InternalError):
        return False
    return True
