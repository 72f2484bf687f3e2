"""Roofline numbers: the machine's peaks, each kernel's FLOPs and bytes, its bound and (measured) time.

Contract:
- ``MachinePeaks(flops_per_s, bytes_per_s, source)``: ``measure_machine(threads=None, quick=False)``
  measures in this process: the best of a few ``torch.mm`` fp32 GEMMs (1024^3, 512^3 in quick mode) and
  the best of a few 64 MiB tensor copies (bytes read + written); ``source`` says exactly that.
  ``REFERENCE_PEAKS`` are the figures measured once on this project's machine type
  (../shared/ENVIRONMENT.md: sgemm 2048^3 ~184 GFLOP/s, copy ~60 GB/s, 2 threads), clearly labelled as
  such, for when measuring is switched off. ``FMA_PEAK_FLOPS`` (~471 GFLOP/s, AVX-512 FMA, 2 threads)
  is the theoretical compute ceiling of that machine, drawn as a second roof.
- ``kernel_rows(graph, times=None, peaks)`` -> one ``KernelRow`` per kernel node (``analysis.is_kernel``:
  views, weights and ``sym`` ops are not kernels; a ``kiln.fused`` group is one kernel): FLOPs and bytes
  (``analysis.node_cost``), arithmetic intensity, ``bound`` ("compute" or "memory"), the roofline time
  max(FLOPs / peak, bytes / bandwidth) and, when ``times`` has the node, the measured time and the
  fraction of the roofline reached (roofline time / measured time). Symbolic shapes raise ``KilnError``.
- ``time_nodes(graph, inputs, reps=5)`` -> {node: best seconds of ``reps`` runs}: runs ``to_fx(graph)``
  under an fx Interpreter that times every call (after one untimed run); the best, not the median, as
  for any micro-benchmark of one kernel on a shared machine. The fx graph holds one call per kiln
  compute node in program order (plus ``getitem``s for multi-result ops), which is how calls are
  matched to nodes; if the counts differ it raises ``KilnError`` rather than guess.
- ``roofline_svg(rows, peaks)``: log-log plot, x = FLOP/byte, y = FLOP/s; the roof min(peak, AI x BW),
  the FMA ceiling dashed, and one dot per kernel (measured FLOP/s when timed, else on its roof).
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import WEIGHT
from kiln.passes.analysis import is_kernel, node_cost
from kiln.report.svg import Svg, color_for, fmt_si, log_ticks

FMA_PEAK_FLOPS = 471e9


@dataclass(frozen=True)
class MachinePeaks:
    flops_per_s: float
    bytes_per_s: float
    source: str


REFERENCE_PEAKS = MachinePeaks(184e9, 60e9, "constants, not measured in this run: ../shared/ENVIRONMENT.md "
                                            "figures for this project's machine type (2 threads): MKL sgemm "
                                            "2048^3 ~184 GFLOP/s, large copy ~60 GB/s")


def _best_time(fn, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(threads: int | None = None, quick: bool = False) -> MachinePeaks:
    n = 512 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = _best_time(lambda: torch.mm(a, b), 3 if quick else 5)
    src = torch.empty(16 * 1024 * 1024, dtype=torch.float32).fill_(1.0)  # 64 MiB
    dst = torch.empty_like(src)
    copy = _best_time(lambda: dst.copy_(src), 3 if quick else 5)
    flops, bw = 2 * n ** 3 / gemm, 2 * src.nbytes / copy
    th = threads or torch.get_num_threads()
    return MachinePeaks(flops, bw, f"measured in this run ({th} threads): torch.mm fp32 {n}^3 best of "
                                   f"{3 if quick else 5} = {flops / 1e9:.0f} GFLOP/s; 64 MiB tensor copy "
                                   f"(read + write) = {bw / 1e9:.1f} GB/s")


@dataclass
class KernelRow:
    node: Node
    name: str
    op: str
    flops: int
    bytes: int
    roofline_s: float
    bound: str
    measured_s: float | None = None

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def fraction_of_roofline(self) -> float | None:
        if self.measured_s is None or self.measured_s <= 0:
            return None
        return self.roofline_s / self.measured_s

    @property
    def achieved_flops_per_s(self) -> float | None:
        return self.flops / self.measured_s if self.measured_s else None


def kernel_rows(graph: Graph, peaks: MachinePeaks, times: dict[Node, float] | None = None) -> list[KernelRow]:
    rows = []
    for node in graph.nodes:
        if not is_kernel(node):
            continue
        c = node_cost(node)
        t_compute, t_memory = c.flops / peaks.flops_per_s, c.bytes / peaks.bytes_per_s
        label = node.op.name if node.subgraph is None else f"{node.op.name}:{node.attrs.get('kind', '?')}"
        rows.append(KernelRow(node, node.results[0].name if node.results else "?", label, c.flops, c.bytes,
                              max(t_compute, t_memory), "compute" if t_compute >= t_memory else "memory",
                              (times or {}).get(node)))
    return rows


def time_nodes(graph: Graph, inputs: tuple, reps: int = 5) -> dict[Node, float]:
    from torch.fx import Interpreter

    from kiln.ir.to_fx import to_fx

    gm = to_fx(graph)
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")
             and not (n.op == "call_function" and n.target is operator.getitem)]
    compute = [n for n in graph.nodes if n.op is not WEIGHT]
    if len(calls) != len(compute):
        raise KilnError(f"cannot match fx calls to kiln nodes ({len(calls)} calls, {len(compute)} nodes)")
    to_kiln = dict(zip(calls, compute))
    samples: dict[Node, list[float]] = {n: [] for n in compute}

    class Timed(Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            if n in to_kiln:
                samples[to_kiln[n]].append(time.perf_counter() - t0)
            return out

    with torch.no_grad():
        Timed(gm).run(*inputs)
        for s in samples.values():
            s.clear()
        for _ in range(reps):
            Timed(gm).run(*inputs)
    return {n: min(s) for n, s in samples.items() if s}


def roofline_svg(rows: list[KernelRow], peaks: MachinePeaks, width: float = 720, height: float = 380) -> str:
    left, right, top, bottom = 70, 20, 16, 46
    pts = [r for r in rows if r.flops > 0 and r.bytes > 0]
    ais = [r.intensity for r in pts] or [1.0]
    perf = [r.achieved_flops_per_s or min(peaks.flops_per_s, r.intensity * peaks.bytes_per_s) for r in pts]
    ridge = peaks.flops_per_s / peaks.bytes_per_s
    x_lo, x_hi = min(min(ais), ridge) / 2, max(max(ais), ridge) * 2
    y_lo = min([p for p in perf if p > 0] + [peaks.flops_per_s]) / 3
    y_hi = max(FMA_PEAK_FLOPS, peaks.flops_per_s) * 2
    lx_lo, lx_hi, ly_lo, ly_hi = map(math.log10, (x_lo, x_hi, y_lo, y_hi))
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + pw * (math.log10(x) - lx_lo) / (lx_hi - lx_lo)

    def sy(y: float) -> float:
        return top + ph - ph * (math.log10(y) - ly_lo) / (ly_hi - ly_lo)

    svg = Svg(width, height, label="roofline")
    for t in log_ticks(x_lo, x_hi):
        if x_lo <= t <= x_hi:
            svg.line(sx(t), top, sx(t), top + ph, stroke="#eee")
            svg.text(sx(t), top + ph + 14, fmt_si(t), anchor="middle", size=9)
    for t in log_ticks(y_lo, y_hi):
        if y_lo <= t <= y_hi:
            svg.line(left, sy(t), left + pw, sy(t), stroke="#eee")
            svg.text(left - 6, sy(t) + 4, fmt_si(t), anchor="end", size=9)
    svg.line(left, top + ph, left + pw, top + ph, stroke="#444")
    svg.line(left, top, left, top + ph, stroke="#444")
    svg.text(left + pw / 2, height - 8, "arithmetic intensity (FLOP / byte)", anchor="middle", size=10)
    svg.text(14, top + ph / 2, "FLOP/s", anchor="middle", size=10, rotate=-90)
    # memory roof up to the ridge, then the compute roof
    x_start = max(x_lo, y_lo / peaks.bytes_per_s)
    svg.path(f"M{sx(x_start):.1f},{sy(x_start * peaks.bytes_per_s):.1f} L{sx(ridge):.1f},{sy(peaks.flops_per_s):.1f} "
             f"L{sx(x_hi):.1f},{sy(peaks.flops_per_s):.1f}", stroke="#2b6cb0", width=2.0,
             title=f"roof: {peaks.flops_per_s / 1e9:.0f} GFLOP/s, {peaks.bytes_per_s / 1e9:.1f} GB/s "
                   f"({peaks.source})")
    svg.line(left, sy(FMA_PEAK_FLOPS), left + pw, sy(FMA_PEAK_FLOPS), stroke="#999", dash="5 4",
             title="AVX-512 FMA peak of this machine type, 2 threads (~471 GFLOP/s, constant)")
    svg.text(left + pw - 4, sy(FMA_PEAK_FLOPS) - 4, "FMA peak (constant)", anchor="end", size=9, fill="#777")
    for r, p in zip(pts, perf):
        measured = "measured" if r.measured_s is not None else "on its roof (not timed)"
        svg.circle(sx(r.intensity), sy(p), 4, fill=color_for(r.op), stroke="#333", cls="kernel",
                   title=f"%{r.name} {r.op}: {fmt_si(r.flops)}FLOP, {fmt_si(r.bytes)}B, "
                         f"AI {r.intensity:.3g}, {fmt_si(p)}FLOP/s {measured}, {r.bound}-bound")
    return str(svg)
