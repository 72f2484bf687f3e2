"""The memory timeline of a compiled graph: live bytes per schedule step, and an arena plan to draw.

Contract:
- ``memory_timeline(graph, method="best-fit", time_limit_s=5.0) -> MemoryTimeline`` for the graph's own
  program order (what runs): ``buffers`` (``kiln.scheduler.liveness.buffers_for_order``: one per tensor
  result of a compute node, views included, weights and graph inputs not), ``live[i]`` = bytes live at
  step ``i``, ``steps`` = the node run at each step, ``peak`` = max live bytes (= the plan's lower bound)
  and ``plan`` = ``kiln.scheduler.arena.plan_arena(buffers, method)`` (CP-SAT with 2 workers and the
  time limit), checked with ``check_plan``. Symbolic shapes raise ``KilnError`` (memory planning needs
  static shapes).
- ``timeline_svg(tl)`` draws two aligned panels over the steps: live bytes (a step curve, the peak
  marked) and the arena: one rectangle per buffer at [start, end + 1) x [offset, offset + size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.report.svg import Svg, color_for, fmt_bytes, nice_ticks
from kiln.scheduler.arena import plan_arena
from kiln.scheduler.buffers import ArenaPlan, Buffer, check_plan
from kiln.scheduler.liveness import buffers_for_order, compute_nodes


@dataclass
class MemoryTimeline:
    steps: list[Node]
    buffers: list[Buffer]
    live: list[int]
    plan: ArenaPlan

    @property
    def peak(self) -> int:
        return max(self.live, default=0)


def live_bytes(buffers: list[Buffer], n_steps: int) -> list[int]:
    delta = [0] * (n_steps + 1)
    for b in buffers:
        delta[b.start] += b.size
        delta[b.end + 1] -= b.size
    live, acc = [], 0
    for i in range(n_steps):
        acc += delta[i]
        live.append(acc)
    return live


def memory_timeline(graph: Graph, method: str = "best-fit", time_limit_s: float = 5.0) -> MemoryTimeline:
    order = compute_nodes(graph)
    buffers = buffers_for_order(graph, order)
    kw = {"time_limit_s": time_limit_s, "workers": 2} if method == "cpsat" else {}
    plan = plan_arena(buffers, method, **kw)
    check_plan(buffers, plan)
    return MemoryTimeline(order, buffers, live_bytes(buffers, len(order)), plan)


def timeline_svg(tl: MemoryTimeline, width: float = 900) -> str:
    left, right, top, panel_h, gap = 70, 16, 14, 150, 46
    n = max(len(tl.steps), 1)
    plot_w = width - left - right
    height = top + 2 * panel_h + gap + 40
    svg = Svg(width, height, label="memory timeline")

    def sx(step: float) -> float:
        return left + plot_w * step / n

    def axes(y0: float, vmax: float, title: str) -> Callable[[float], float]:
        vmax = max(vmax, 1)

        def sy(v: float) -> float:
            return y0 + panel_h - panel_h * v / vmax

        for t in nice_ticks(0, vmax, 4):
            svg.line(left, sy(t), left + plot_w, sy(t), stroke="#eee")
            svg.text(left - 6, sy(t) + 4, fmt_bytes(t), anchor="end", size=9)
        svg.line(left, y0 + panel_h, left + plot_w, y0 + panel_h, stroke="#444")
        svg.line(left, y0, left, y0 + panel_h, stroke="#444")
        svg.text(left + 4, y0 - 3, title, size=11, weight="bold")
        return sy

    # panel 1: live bytes per step
    sy = axes(top, tl.peak, f"live bytes per step (peak {fmt_bytes(tl.peak)})")
    d = [f"M{sx(0):.1f},{sy(0):.1f}"]
    for i, v in enumerate(tl.live):
        d.append(f"L{sx(i):.1f},{sy(v):.1f} L{sx(i + 1):.1f},{sy(v):.1f}")
    d.append(f"L{sx(len(tl.live)):.1f},{sy(0):.1f} Z")
    svg.path(" ".join(d), stroke="#2b6cb0", fill="#bee3f8", width=1.2)
    for i, v in enumerate(tl.live):
        node = tl.steps[i]
        svg.rect(sx(i), top, sx(i + 1) - sx(i), panel_h, fill="transparent", cls="hover",
                 title=f"step {i}: {node.op.name} -> {', '.join('%' + r.name for r in node.results)}; "
                       f"live {fmt_bytes(v)}")
    peak_step = tl.live.index(tl.peak) if tl.live else 0
    svg.line(left, sy(tl.peak), left + plot_w, sy(tl.peak), stroke="#c53030", dash="4 3",
             title=f"peak {tl.peak} bytes at step {peak_step}")

    # panel 2: the arena plan
    y0 = top + panel_h + gap
    plan = tl.plan
    sy2 = axes(y0, max(plan.size, 1), f"arena plan: {plan.method}, {fmt_bytes(plan.size)} "
                                      f"(lower bound {fmt_bytes(plan.lower_bound)})")
    for b in tl.buffers:
        if not b.size:
            continue
        off = plan.offsets[b.name]
        svg.rect(sx(b.start), sy2(off + b.size), sx(b.end + 1) - sx(b.start), sy2(off) - sy2(off + b.size),
                 fill=color_for(b.name), stroke="#555", stroke_width="0.4", cls="buffer",
                 title=f"%{b.name}: {fmt_bytes(b.size)} at offset {off}, steps {b.start}..{b.end}")
    svg.line(left, sy2(plan.size), left + plot_w, sy2(plan.size), stroke="#c53030", dash="4 3",
             title=f"arena size {plan.size} bytes")
    for t in nice_ticks(0, n, 8):
        svg.text(sx(t), y0 + panel_h + 14, f"{t:g}", anchor="middle", size=9)
    svg.text(left + plot_w / 2, y0 + panel_h + 30, "schedule step (program order)", anchor="middle", size=10)
    return str(svg)
