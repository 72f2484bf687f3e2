"""kiln's GEMM template: a register-tiled CPU schedule for a TIR matmul (and its epilogue), fast untuned.

MetaSchedule needs many trials to find a good GEMM schedule (16 trials reached 26-41% of this machine's
FMA peak in ``benchmarks/gemm.py``) and the generic schedule (``schedule.schedule_cpu``) leaves a GEMM
scalar. This template is the classic micro-kernel: the output is cut into ``MR x NR`` tiles (``NR`` a
multiple of the 16 fp32 lanes of an AVX-512 register), each tile's accumulators live in a ``local``
buffer that LLVM keeps in vector registers, and the K loop runs over the whole reduction with, per step,
one broadcast of ``A[i, k]`` per row and ``NR / 16`` vector loads of ``B[k, j:j+NR]`` shared by the
``MR`` rows. Tiles are spread over the threads (outer loops fused and parallelised, column tiles outer so
each thread reuses its ``K x NR`` panel of ``B`` from cache across its row tiles).

Contract:
- ``apply_gemm_template(sch, outputs) -> bool`` schedules, in place, a function whose blocks (after
  ``schedule_cpu``'s inlining of non-output spatial blocks) are exactly one matmul block (topi's
  ``T_matmul_NN`` or ``T_batch_matmul_NN``: spatial ``[batch,] i, j``, one reduction ``k``, static
  extents) and at most one spatial output block that reads it (the fused epilogue: bias, activation,
  scaling), with ``N`` a multiple of 16. The epilogue is computed tile by tile right after the tile's
  reduction (the matmul's buffer becomes tile-sized ``local`` storage); without an epilogue the tile is
  written back from ``local`` storage. Returns False, leaving ``sch`` unusable, when the function does
  not have that form or TVM refuses a step: call it on ``sch.copy()``. The tiles run in parallel when
  the GEMM has at least ``min_parallel`` multiply-adds (``schedule_cpu``'s threshold: waking the thread
  pool costs more than a small GEMM).
- ``tile_shape(m, n) -> (MR, NR)``: ``NR`` = 32 when it divides ``n`` else 16; ``MR`` = the largest of
  16, 8, 4, 2, 1 dividing ``m`` (no predicated tail tiles).
- Results equal the unscheduled function's up to float32 summation order (the K loop still runs in
  order; only where accumulators live changes).

Measured here (2 threads, the template's kernel called directly, five tile shapes and ``torch.mm`` timed
interleaved in one process; GFLOP/s): 512x512x512: 16x32 267, 8x32 298, 4x64 296, 8x64 243 (MKL 329);
256x1024x1024: 16x32 155, the others 107-147 (MKL 281); 64x512x1024: 16x32 169, others 130-163 (MKL 252).
16x32 is kept: best on two of three. Weak spot: a ``B`` with 1024 columns puts consecutive rows of a
panel 4 KB apart (a TLB page per K step); packing ``B`` into ``[N/NR, K, NR]`` inside the kernel measured
no better (101-128 against 103-107), so it is not done. ``benchmarks/gemm.py`` times it through
``kiln.compile`` (gemm="tvm"), interleaved with the other contenders: see the README for what it printed.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule, ScheduleError

from .schedule import SPATIAL, _blocks, _dom_extents, _extent, _is_spatial, _writes_output

LANES = 16  # fp32 lanes of an AVX-512 register
MATMUL_BLOCKS = ("T_matmul_NN", "T_batch_matmul_NN")
REDUCE = 2  # IterVar.iter_type of a reduction axis in TIR


def tile_shape(m: int, n: int) -> tuple[int, int]:
    nr = 2 * LANES if n % (2 * LANES) == 0 else LANES
    mr = next(r for r in (16, 8, 4, 2, 1) if m % r == 0)
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


def apply_gemm_template(sch: Schedule, outputs: set[str], min_parallel: int = 1 << 18) -> bool:
    found = _matmul_and_epilogue(sch, outputs)
    if found is None:
        return False
    matmul, epilogue, iters = found
    m, n = iters[-3][1], iters[-2][1]
    if n % LANES:
        return False
    mr, nr = tile_shape(m, n)
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
        ti, tj, tk = sch.get_loops(matmul)[-3:]
        sch.reorder(tk, ti, tj)
        sch.unroll(ti)
        sch.vectorize(tj)
        _, lanes = sch.split(ji, [None, LANES])
        sch.vectorize(lanes)
        tiles = sch.fuse(*batch, jo, io)
        if macs >= min_parallel:
            sch.parallel(tiles)
        sch.decompose_reduction(matmul, tk)  # last: parallel/vectorize refuse a reduction without its init
    except (ScheduleError, tvm.error.InternalError):
        return False
    return True
