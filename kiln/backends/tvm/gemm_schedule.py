"""kiln's GEMM template: a register-tiled CPU schedule for a TIR matmul (and its epilogue), fast untuned.

MetaSchedule needs many trials to find a good GEMM schedule (16 trials reached 26-41% of this machine's
FMA peak in ``benchmarks/gemm.py``) and the generic schedule (``schedule.schedule_cpu``) leaves a GEMM
scalar. This template is the classic micro-kernel: the output is cut into ``MR x NR`` tiles (``NR`` a
multiple of the 16 fp32 lanes of an AVX-512 register), each tile's accumulators live in a ``local``
buffer that LLVM keeps in vector registers, and the K loop runs over the whole reduction with, per step,
one broadcast of ``A[i, k]`` per row and ``NR / 16`` vector loads of ``B[k, j:j+NR]`` shared by the
``MR`` rows. Column tiles are spread over the threads; for each, ``B``'s ``K x NR`` panel is first copied
into a contiguous buffer (packed, as BLAS libraries do), and the row tiles then walk it with unit stride.

Contract:
- ``apply_gemm_template(sch, outputs) -> bool`` schedules, in place, a function whose blocks (after
  ``schedule_cpu``'s inlining of non-output spatial blocks) are exactly one matmul block (topi's
  ``T_matmul_NN`` or ``T_batch_matmul_NN``: spatial ``[batch,] i, j``, one reduction ``k``, static
  extents) and at most one spatial output block that reads it (the fused epilogue: bias, activation,
  scaling), with ``N`` a multiple of 16. The epilogue is computed tile by tile right after the tile's
  reduction (the matmul's buffer becomes tile-sized ``local`` storage); without an epilogue the tile is
  written back from ``local`` storage. Returns False, leaving ``sch`` unusable, when the function does
  not have that form or TVM refuses a step: call it on ``sch.copy()``. The parallel loop (when the GEMM
  has at least ``min_parallel`` multiply-adds: ``schedule_cpu``'s threshold, since waking the thread pool
  costs more than a small GEMM) runs over ``[batch x] column tiles``.
- Packing: when ``B`` is read element for element (``B[b, k, j]``: not transposed or broadcast by an
  inlined view) and there are at least two row tiles to share a panel, each column tile first copies its
  ``K x NR`` panel into a buffer laid out ``[batch,] N / NR, K, NR`` (one workspace of ``B``'s size per
  call); otherwise the micro-kernel reads ``B`` in place and the parallel loop also covers the row tiles.
- ``tile_shape(m, n) -> (MR, NR)``: ``NR`` = 32 when it divides ``n`` else 16; ``MR`` = the largest of
  8, 4, 2, 1 dividing ``m`` (no predicated tail tiles).
- Streaming (``stream_width(m, k, n)``): a GEMV-like GEMM (at most 4 rows, ``K`` >= 2048, ``N`` a multiple
  of 1024 and at least 2048) is tiled ``M x 1024`` instead: each tile's accumulators are a row of 1024
  floats per output row (in L1, not registers), and the K loop reads 4 KB of each row of ``B`` at a time.
  A register tile reads 128 bytes per row of ``B``, so with rows a page or more apart it touches K pages
  per tile, more than the second-level TLB holds once K passes ~2048: measured (kernel alone, 2 threads,
  GFLOP/s) 1x4096x4096 12-13 tiled, 20-21 streamed (MKL 22-23); 4x4096x4096 20-27 against 37-54 (MKL
  45-48); with K = 1024 register tiles stayed ahead (2x1024x4096: 36-44 against 27-34).
- Results equal the unscheduled function's up to float32 summation order (the K loop still runs in
  order; only where accumulators and ``B`` live changes).

Measured here (2 threads, the kernel called directly, interleaved with ``torch.mm`` in one process, three
rounds; fraction of the FMA peak measured in the same process): 8x32 packed 0.86/0.86/0.61 on
512x512x512, 0.84/0.89/0.67 on 1024^3, 0.84/0.87/0.89 on 256x1024x1024, 0.75/0.75/0.49 on 64x512x1024;
MKL in the same rounds 0.85/0.89/0.83, 0.81/0.89/0.84, 0.72/0.76/0.75, 0.70/0.66/0.67. Unpacked 8x32 fell
to 0.24-0.40 on the shapes with N = 1024 (rows of ``B`` 4 KB apart: every K step of a panel lands in the
same L1 set). 16x32 (32 accumulators: all 32 vector registers, so LLVM spills) was 0.64-0.74 on 512^3 and
0.66-0.70 packed on the others. ``benchmarks/gemm.py`` times it through ``kiln.compile`` (gemm="tvm"),
interleaved with the other contenders: see the README for what it printed.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule, ScheduleError

from .schedule import LANES, REDUCE, SPATIAL, _blocks, _dom_extents, _extent, _is_spatial, _permutation, _writes_output

MATMUL_BLOCKS = ("T_matmul_NN", "T_batch_matmul_NN")


STREAM_ROWS = 4  # at most this many rows ...
STREAM_MIN_K = 2048  # ... and a reduction this long: stream B row by row instead of register tiles
STREAM_WIDTH = 1024  # columns per streamed tile (accumulators in L1: 4 KB per row)


def stream_width(m: int, k: int, n: int) -> int | None:
    """Columns per tile when ``B`` is streamed (a GEMV-like GEMM), None for register tiles."""
    if m > STREAM_ROWS or k < STREAM_MIN_K or n % STREAM_WIDTH or n // STREAM_WIDTH < 2:
        return None
    return STREAM_WIDTH


def tile_shape(m: int, n: int) -> tuple[int, int]:
    nr = 2 * LANES if n % (2 * LANES) == 0 else LANES
    mr = next(r for r in (8, 4, 2, 1) if m % r == 0)
    return mr, nr


def _matmul_and_epilogue(sch: Schedule, outputs: set[str]):
    blocks = _blocks(sch)
    matmuls = [b for b in blocks if sch.get(b).name_hint in MATMUL_BLOCKS]
    if len(matmuls) != 1 or len(blocks) > 2:
        return None
    matmul = matmuls[0]
    iters = _dom_extents(sch, matmul)
    if (any(ext is None for _, ext in iters) or len(iters) not in (3, 4)
            or [k for k, _ in iters] != [SPATIAL] * (len(iters) - 1) + [REDUCE]):
        return None
    epilogue = next((b for b in blocks if not b.same_as(matmul)), None)
    if epilogue is not None:
        if (not _writes_output(sch, epilogue, outputs) or not list(sch.get_producers(epilogue))
                or not _is_spatial(sch, epilogue)):
            return None
    elif not _writes_output(sch, matmul, outputs):
        return None
    return matmul, epilogue, iters


def _read_index(sch: Schedule, block, dims: list) -> int | None:
    """Where in ``block``'s reads the buffer read exactly at the block iteration variables ``dims`` is (one
    element per iteration: ``B[b, k, j]``), or None (read transposed, broadcast, or at an offset)."""
    in_order = list(range(len(dims)))
    return next((i for i, r in enumerate(sch.get(block).reads) if _permutation(r, dims) == in_order), None)


def _pack_panels(sch: Schedule, matmul, b_index: int, nr: int, rank: int, at) -> None:
    """Copy ``B``'s ``K x NR`` panel for the current column tile into a contiguous buffer laid out
    ``[..., N / NR, K, NR]`` at loop ``at`` (the tile's outer loop), so the micro-kernel walks it with unit
    stride instead of one row of ``B`` (``4 N`` bytes apart) per K step."""
    packed = sch.cache_read(matmul, b_index, "global")
    if rank == 3:
        sch.transform_layout(packed, ("write", 0), lambda b, k, j: (b, j // nr, k, j % nr))
    else:
        sch.transform_layout(packed, ("write", 0), lambda k, j: (j // nr, k, j % nr))
    sch.compute_at(packed, at, preserve_unit_loops=True)
    *_, j = sch.get_loops(packed)
    sch.vectorize(sch.split(j, [None, LANES])[1])


def apply_gemm_template(sch: Schedule, outputs: set[str], min_parallel: int = 1 << 18) -> bool:
    found = _matmul_and_epilogue(sch, outputs)
    if found is None:
        return False
    matmul, epilogue, iters = found
    m, n = iters[-3][1], iters[-2][1]
    if n % LANES:
        return False
    stream = stream_width(m, iters[-1][1], n)
    mr, nr = (m, stream) if stream else tile_shape(m, n)
    macs = 1
    for _, ext in iters:
        macs *= ext
    try:
        if epilogue is not None:
            writer = epilogue
            sch.set_scope(matmul, 0, "local")
        else:
            writer = sch.cache_write(matmul, 0, "local")
        loops = sch.get_loops(writer)
        if [_extent(sch, lp) for lp in loops] != [e for _, e in iters[:-1]]:
            return False  # the epilogue must enumerate the matmul's own output space (not a transpose of it)
        *batch, i, j = loops
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(*batch, jo, io, ii, ji)
        sch.compute_at(matmul, io, preserve_unit_loops=True)
        *batch_v, iv, jv, kv = [it.var for it in sch.get(matmul).iter_vars]
        b_index = _read_index(sch, matmul, [*batch_v, kv, jv])
        pack = b_index is not None and m // mr >= 2
        ti, tj, tk = sch.get_loops(matmul)[-3:]
        sch.reorder(tk, ti, tj)
        sch.unroll(ti)
        # a register tile is one vector loop; a streamed row is a loop of vectors kept in L1, not registers
        sch.vectorize(sch.split(tj, [None, LANES])[1] if stream else tj)
        _, lanes = sch.split(ji, [None, LANES])
        sch.vectorize(lanes)
        if pack:
            tiles = sch.fuse(*batch, jo)
            _pack_panels(sch, matmul, b_index, nr, len(iters) - 1, tiles)
        else:
            tiles = sch.fuse(*batch, jo, io)
        if macs >= min_parallel:
            sch.parallel(tiles)
        sch.decompose_reduction(matmul, tk)  # last: parallel/vectorize refuse a reduction without its init
    except (ScheduleError, tvm.error.InternalError):
        return False
    return True
