"""GEMM/conv micro-benchmark pieces (``benchmarks/gemm.py``): workloads, the machine's measured FP32 peak,
achieved FLOP/s as a fraction of it, and the summary.

Contract:
- ``Workload(name, kind, shape)``: ``kind`` ``mm`` (shape ``(M, K, N)``: ``A[M,K] @ B[K,N]``), ``bmm``
  (``(B, M, K, N)``) or ``conv`` (``(N, Cin, H, W, Cout, kernel, stride, pad, groups)``, NCHW, with bias).
  ``flops`` counts a multiply-add as 2 FLOPs (bias adds not counted): ``2*M*K*N`` (times ``B``), for a conv
  ``2 * N * Cout * Hout * Wout * (Cin / groups) * kernel^2``. ``build(seed)`` -> ``(module, inputs)``, fp32,
  deterministic: GEMM operands are both inputs (no weight layout games), a conv is an ``nn.Conv2d``.
  ``WORKLOADS``: the issue's shapes; ``QUICK_WORKLOADS`` the names ``--quick`` runs.
- ``fma_peak(threads, seconds=0.05, reps=5)``: the FP32 FMA throughput of this machine, measured: a TIR
  kernel (TVMScript, compiled by TVM for the host CPU) in which each of ``threads`` parallel workers keeps
  ``FMA_CHAINS`` independent 16-lane (AVX-512) accumulators in registers and updates each with one fused
  multiply-add per iteration (``acc = acc * a + b``, constants in registers: no memory traffic in the loop;
  the chains hide the FMA latency). FLOPs = 2 per lane per FMA. Best of ``reps`` runs of about ``seconds``.
  Returns FLOP/s, or raises ``KilnError`` when TVM cannot build it.
- ``mkl_gemm_peak(threads, n, reps)``: FLOP/s of ``torch.mm`` on ``n x n`` fp32 (MKL), best of ``reps``.
- ``measure_peak(threads, quick)`` -> ``Peak(flops_per_s, fma_flops_per_s, mkl_flops_per_s, source)``:
  the peak is the *larger* of the two measurements (the most FP32 FLOP/s any code reached on this machine
  in this run: normally the FMA loop); when the FMA loop cannot be built the MKL figure is the peak and
  ``source`` says so. ``combine_peaks(a, b)``: the larger of two such measurements (the script measures at
  the start and at the end of its run, so one busy moment on a shared machine does not lower the peak).
- ``check_gemm_paths(row, contenders)``: per timed kiln contender, ``<c>_gemm_path`` = the path(s) its
  GEMM/conv kernels took (from ``<c>_gemm_kernels``, ``kiln.report.bench``; "?" when the backend reports
  none); a contender that asked for ``backend_options={"gemm": "tvm"}`` but whose GEMM/conv did not run
  (only) as TIR is marked failed and unavailable, ``<c>_error`` saying so: its time would be PyTorch's.
- ``add_rates(row, workload, contenders, peak)``: per contender with a time, ``<c>_gflops`` (FLOPs /
  median time) and ``<c>_peak_fraction`` (achieved / peak); None when the contender's output was wrong or
  it failed (a wrong answer has no rate).
- ``summarize(rows, contenders, peak)``: ``peak_fraction_best`` = the largest ``<c>_peak_fraction`` over
  every row (shape) and every *kiln* contender whose output matched eager there, i.e. kiln's best kernel as
  a fraction of the measured peak (None when no kiln cell is correct), with ``peak_fraction_best_shape``
  and ``peak_fraction_best_contender``; ``peak_fraction_best_tir``: the same over the cells whose GEMM/conv
  ran as generated TIR (``<c>_gemm_path == "tvm"``: not PyTorch's kernel through kiln's hybrid path);
  ``peak_fraction_by_shape`` {shape: kiln's best fraction there};
  ``torch_peak_fraction_best`` (the same for PyTorch's own kernels, for scale); ``all_correct`` (every
  available kiln cell matched eager); ``unavailable``; ``peak_gflops``; ``above_peak``: cells faster than
  the peak ("shape: contender"; non-empty means the peak measurement was disturbed and the fractions are
  not to be trusted); and ``by_contender``: per
  contender ``peak_fraction_max``, ``peak_fraction_geomean`` (over the shapes where it is correct),
  ``gflops`` {shape: GFLOP/s} and ``shapes_correct``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from kiln.benchmarking import geomean
from kiln.errors import KilnError
from kiln.report.bench import Contender

FMA_LANES = 16  # fp32 lanes of an AVX-512 register
FMA_CHAINS = 12  # independent accumulators per worker: > FMA latency (4) x FMA pipes (2)


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        want = {"mm": 3, "bmm": 4, "conv": 9}
        if self.kind not in want or len(self.shape) != want[self.kind]:
            raise KilnError(f"workload {self.name!r}: kind {self.kind!r} with shape {self.shape} (kinds and "
                            f"shape lengths: {want})")

    def conv_out(self) -> tuple[int, int]:
        _, _, h, w, _, k, stride, pad, _ = self.shape
        return (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1

    @property
    def flops(self) -> int:
        if self.kind == "mm":
            m, k, n = self.shape
            return 2 * m * k * n
        if self.kind == "bmm":
            b, m, k, n = self.shape
            return 2 * b * m * k * n
        batch, cin, _, _, cout, k, _, _, groups = self.shape
        ho, wo = self.conv_out()
        return 2 * batch * cout * ho * wo * (cin // groups) * k * k

    def build(self, seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "mm":
            m, k, n = self.shape
            return _MM().eval(), (torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))
        if self.kind == "bmm":
            b, m, k, n = self.shape
            return _BMM().eval(), (torch.randn(b, m, k, generator=g), torch.randn(b, k, n, generator=g))
        batch, cin, h, w, cout, k, stride, pad, groups = self.shape
        conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(cin // groups * k * k))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        return conv.eval(), (torch.randn(batch, cin, h, w, generator=g),)


class _MM(torch.nn.Module):
    def forward(self, a, b):
        return torch.mm(a, b)


class _BMM(torch.nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


WORKLOADS = [
    Workload("mm 64x512x1024", "mm", (64, 512, 1024)),
    Workload("mm 256x1024x1024", "mm", (256, 1024, 1024)),
    Workload("mm 512x512x512", "mm", (512, 512, 512)),
    Workload("mm 1x4096x4096", "mm", (1, 4096, 4096)),
    Workload("bmm 8x128x64x128", "bmm", (8, 128, 64, 128)),
    Workload("conv3x3 64->64 56x56", "conv", (1, 64, 56, 56, 64, 3, 1, 1, 1)),
    Workload("conv1x1 64->256 56x56", "conv", (1, 64, 56, 56, 256, 1, 1, 0, 1)),
    Workload("dwconv3x3 144 56x56", "conv", (1, 144, 56, 56, 144, 3, 1, 1, 144)),
]
QUICK_WORKLOADS = ["mm 64x512x1024", "conv3x3 64->64 56x56"]


@dataclass(frozen=True)
class Peak:
    flops_per_s: float
    fma_flops_per_s: float | None
    mkl_flops_per_s: float
    source: str


def _fma_kernel(threads: int):
    import tvm
    from tvm.script import tirx as T

    width = FMA_CHAINS * FMA_LANES

    @T.prim_func
    def fma(x: T.Buffer((threads, width), "float32"), out: T.Buffer((threads, width), "float32"), n: T.int32):
        T.func_attr({"global_symbol": "fma", "tir.noalias": True})
        for p in T.parallel(threads):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for i in T.vectorized(width):
                acc[i] = x[p, i]
            for _k in T.serial(n):
                for c in T.unroll(FMA_CHAINS):
                    for lane in T.vectorized(FMA_LANES):
                        acc[c * FMA_LANES + lane] = acc[c * FMA_LANES + lane] * T.float32(0.999999) + T.float32(1e-7)
            for i in T.vectorized(width):
                out[p, i] = acc[i]

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": threads})
    return tvm.compile(tvm.IRModule({"fma": fma}), target=target)["fma"]


def fma_peak(threads: int = 2, seconds: float = 0.05, reps: int = 5) -> float:
    try:
        import tvm

        fn = _fma_kernel(threads)
        x = tvm.runtime.from_dlpack(torch.ones(threads, FMA_CHAINS * FMA_LANES))
        out = tvm.runtime.from_dlpack(torch.empty(threads, FMA_CHAINS * FMA_LANES))
    except Exception as e:  # TVM missing or the kernel does not build on this CPU
        raise KilnError(f"cannot build the FMA peak kernel with TVM: {type(e).__name__}: {e}") from e
    flops_per_iter = 2 * threads * FMA_CHAINS * FMA_LANES
    n = 100_000
    t0 = time.perf_counter()
    fn(x, out, n)
    dt = max(time.perf_counter() - t0, 1e-6)
    n = max(1000, int(n * seconds / dt))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x, out, n)
        best = min(best, time.perf_counter() - t0)
    return flops_per_iter * n / best


def mkl_gemm_peak(threads: int = 2, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def measure_peak(threads: int = 2, quick: bool = False) -> Peak:
    mkl_n = 1024 if quick else 2048
    mkl = mkl_gemm_peak(threads, mkl_n, 3 if quick else 5)
    mkl_text = f"torch.mm fp32 {mkl_n}^3 (MKL) best of {3 if quick else 5} = {mkl / 1e9:.0f} GFLOP/s"
    try:
        fma = fma_peak(threads, 0.02 if quick else 0.05, 5 if quick else 10)
    except KilnError as e:
        return Peak(mkl, None, mkl, f"measured in this run ({threads} threads): {mkl_text}; the FMA loop "
                                    f"could not run ({e}), so the peak is MKL's")
    fma_text = (f"TIR FMA loop ({FMA_CHAINS} x {FMA_LANES}-lane fp32 accumulators per thread, best of "
                f"{5 if quick else 10}) = {fma / 1e9:.0f} GFLOP/s")
    return Peak(max(fma, mkl), fma, mkl, f"measured in this run ({threads} threads): {fma_text}; {mkl_text}; "
                                         "peak = the larger")


def combine_peaks(first: Peak, second: Peak) -> Peak:
    """The larger of two measurements of the same machine (e.g. at the start and at the end of a run: on a
    shared machine either may have caught a busy moment)."""
    fmas = [p.fma_flops_per_s for p in (first, second) if p.fma_flops_per_s is not None]
    fma = max(fmas) if fmas else None
    mkl = max(first.mkl_flops_per_s, second.mkl_flops_per_s)
    return Peak(max(first.flops_per_s, second.flops_per_s), fma, mkl,
                f"the larger of two measurements, at the start and at the end of the run: [{first.source}] and "
                f"[{second.source}]")


def _ok(row: dict[str, Any], name: str) -> bool:
    return bool(row.get(f"{name}_correct")) and f"{name}_ms" in row


def check_gemm_paths(row: dict[str, Any], contenders: list[Contender]) -> None:
    for c in contenders:
        if c.kind != "kiln" or f"{c.name}_ms" not in row:
            continue
        paths = row.get(f"{c.name}_gemm_kernels")
        row[f"{c.name}_gemm_path"] = ", ".join(sorted(paths)) if paths else "?"
        if (c.options.get("backend_options") or {}).get("gemm") == "tvm" and (not paths or set(paths) != {"tvm"}):
            row[f"{c.name}_correct"], row[f"{c.name}_unavailable"] = False, True
            row[f"{c.name}_error"] = (f"backend option gemm='tvm' not honoured: the GEMM/conv kernel ran on path(s) "
                                      f"{row[f'{c.name}_gemm_path']} (kernel_paths), not as TIR")


def add_rates(row: dict[str, Any], workload: Workload, contenders: list[Contender], peak: Peak) -> None:
    row["flops"] = workload.flops
    for c in contenders:
        if f"{c.name}_ms" not in row:
            continue
        ok = _ok(row, c.name)
        rate = workload.flops / (row[f"{c.name}_ms"] / 1e3) if ok else None
        row[f"{c.name}_gflops"] = rate / 1e9 if rate is not None else None
        row[f"{c.name}_peak_fraction"] = rate / peak.flops_per_s if rate is not None else None


def summarize(rows: list[dict[str, Any]], contenders: list[Contender], peak: Peak) -> dict[str, Any]:
    kilns = [c.name for c in contenders if c.kind == "kiln"]
    by: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for c in contenders:
        n = c.name
        fractions = {r["model"]: r[f"{n}_peak_fraction"] for r in rows if r.get(f"{n}_peak_fraction") is not None}
        by[n] = {"peak_fraction_max": max(fractions.values()) if fractions else None,
                 "peak_fraction_geomean": geomean(fractions.values()) if fractions else None,
                 "gflops": {r["model"]: r.get(f"{n}_gflops") for r in rows},
                 "shapes_correct": len(fractions)}
        if any(r.get(f"{n}_unavailable") for r in rows):
            unavailable[n] = by[n]["unavailable"] = "; ".join(
                dict.fromkeys(r.get(f"{n}_error", "?") for r in rows if r.get(f"{n}_unavailable")))
    best: tuple[float, str, str] | None = None
    best_tir: float | None = None
    by_shape: dict[str, float | None] = {}
    for r in rows:
        cells = [(r[f"{k}_peak_fraction"], k) for k in kilns if r.get(f"{k}_peak_fraction") is not None]
        by_shape[r["model"]] = max(cells)[0] if cells else None
        for frac, k in cells:
            if best is None or frac > best[0]:
                best = (frac, r["model"], k)
            if r.get(f"{k}_gemm_path") == "tvm" and (best_tir is None or frac > best_tir):
                best_tir = frac
    kiln_cells = [bool(r.get(f"{k}_correct")) for k in kilns for r in rows if not r.get(f"{k}_unavailable")]
    above = sorted({f"{r['model']}: {c.name}" for c in contenders for r in rows
                    if (r.get(f"{c.name}_peak_fraction") or 0) > 1})
    torch_best = [by[c.name]["peak_fraction_max"] for c in contenders if c.kind == "eager"]
    return {
        "peak_fraction_best": best[0] if best else None,
        "peak_fraction_best_shape": best[1] if best else None,
        "peak_fraction_best_contender": best[2] if best else None,
        "peak_fraction_best_tir": best_tir,
        "peak_fraction_by_shape": by_shape,
        "torch_peak_fraction_best": torch_best[0] if torch_best else None,
        "all_correct": bool(kiln_cells) and all(kiln_cells),
        "peak_gflops": peak.flops_per_s / 1e9,
        "above_peak": above,
        "shapes": len(rows),
        "unavailable": unavailable,
        "by_contender": by,
    }
