"""Small, dependency-free SVG building blocks for kiln's HTML reports (inline SVG, no network, no fonts).

Contract:
- ``esc(text)`` escapes text for XML content and attribute values.
- ``Svg(width, height)`` collects elements: ``rect``, ``line``, ``path``, ``text``, ``circle``, ``raw``;
  each takes an optional ``title`` (a hover tooltip) and ``cls`` (a CSS class); ``str(svg)`` is one
  ``<svg>`` element with a ``viewBox``, scaling with the page.
- ``nice_ticks(lo, hi, n)`` gives round tick values for a linear axis; ``log_ticks(lo, hi)`` powers of
  ten for a log axis; ``fmt_bytes`` / ``fmt_si`` format axis labels.
- ``color_for(key)`` is a stable colour for a string (same key, same colour in every report).
"""

from __future__ import annotations

import hashlib
import math
from html import escape


def esc(text: object) -> str:
    return escape(str(text), quote=True)


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


class Svg:
    def __init__(self, width: float, height: float, *, label: str = "", cls: str = "plot"):
        self.width, self.height = width, height
        self.label, self.cls = label, cls
        self.parts: list[str] = []

    def _add(self, tag: str, attrs: dict[str, object], title: str | None = None, body: str = "") -> None:
        a = " ".join(f'{k.replace("_", "-")}="{esc(_num(v) if isinstance(v, float) else v)}"'
                     for k, v in attrs.items() if v is not None)
        inner = (f"<title>{esc(title)}</title>" if title else "") + body
        self.parts.append(f"<{tag} {a}>{inner}</{tag}>" if inner else f"<{tag} {a}/>")

    def rect(self, x, y, w, h, *, fill="#ccc", stroke=None, rx=None, title=None, cls=None, **kw) -> None:
        self._add("rect", {"x": float(x), "y": float(y), "width": float(max(w, 0)), "height": float(max(h, 0)),
                           "rx": rx, "fill": fill, "stroke": stroke, "class": cls, **kw}, title)

    def line(self, x1, y1, x2, y2, *, stroke="#888", width=1.0, dash=None, title=None, cls=None) -> None:
        self._add("line", {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2), "stroke": stroke,
                           "stroke_width": float(width), "stroke_dasharray": dash, "class": cls}, title)

    def path(self, d: str, *, stroke="#888", fill="none", width=1.0, title=None, cls=None, **kw) -> None:
        self._add("path", {"d": d, "stroke": stroke, "fill": fill, "stroke_width": float(width), "class": cls,
                           **kw}, title)

    def circle(self, cx, cy, r, *, fill="#333", stroke=None, title=None, cls=None) -> None:
        self._add("circle", {"cx": float(cx), "cy": float(cy), "r": float(r), "fill": fill, "stroke": stroke,
                             "class": cls}, title)

    def text(self, x, y, text: str, *, size=11, anchor="start", fill="#222", weight=None, title=None,
             cls=None, rotate=None) -> None:
        transform = f"rotate({rotate} {_num(float(x))} {_num(float(y))})" if rotate else None
        self._add("text", {"x": float(x), "y": float(y), "font_size": size, "text_anchor": anchor, "fill": fill,
                           "font_weight": weight, "class": cls, "transform": transform}, title, esc(text))

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def __str__(self) -> str:
        w, h = _num(float(self.width)), _num(float(self.height))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{esc(self.cls)}" viewBox="0 0 {w} {h}" '
                f'width="{w}" height="{h}" role="img" aria-label="{esc(self.label)}" '
                f'font-family="sans-serif">' + "".join(self.parts) + "</svg>")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about ``n`` of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten from below ``lo`` to above ``hi`` (both > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0 ** e for e in range(a, b + 1)]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def fmt_si(x: float) -> str:
    for value, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= value:
            return f"{x / value:.3g}{suffix}"
    return f"{x:.3g}"


def color_for(key: str) -> str:
    """A stable, light-ish colour for ``key``."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:6], 16)
    return f"hsl({h % 360}, {45 + (h >> 9) % 30}%, {62 + (h >> 15) % 14}%)"
