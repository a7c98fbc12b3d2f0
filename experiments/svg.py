"""Two small charts, written as SVG by hand (as training.loss_curve_svg writes the loss picture): no plotting
library at runtime. A chart is a title, axes with ticks and units, and the data; the caption that says what to see
goes in the Markdown page beside it.

    line_chart(path, title, xlabel, ylabel, series)   series: [Series(label, [(x, y), ...], [(lo, hi), ...])]
    bar_chart(path, title, ylabel, bars)              bars: [(label, value, (lo, hi) or None)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from training import atomic_write_text

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H = 820, 380
LEFT, RIGHT, TOP, BOTTOM = 64, 270, 36, 52          # margins: the right one holds the legend (~40 characters)


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    spread: list[tuple[float, float]] | None = None  # (low, high) per point: an error bar
    dashed: bool = False
    colour: str | None = None
    extra: dict = field(default_factory=dict)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10_000:
        return f"{v / 1000:.0f}k"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


class _Frame:
    """Maps data to pixels and draws the axes, ticks, grid and labels."""

    def __init__(self, xs: list[float], ys: list[float], title: str, xlabel: str, ylabel: str,
                 y_from_zero: bool = False):
        lo, hi = min(ys), max(ys)
        if y_from_zero:
            lo = min(0.0, lo)
        pad = 0.05 * (hi - lo or 1.0)
        self.yt = nice_ticks(lo - (0 if y_from_zero else pad), hi + pad)
        self.xt = nice_ticks(min(xs), max(xs)) if xs else []
        self.x0, self.x1 = (self.xt[0], self.xt[-1]) if xs else (0, 1)
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        self.parts = [f'<rect width="{W}" height="{H}" fill="white"/>',
                      f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
        px0, py0, px1, py1 = LEFT, H - BOTTOM, W - RIGHT, TOP
        for v in self.yt:
            y = self.py(v)
            self.parts.append(f'<line x1="{px0}" y1="{y:.1f}" x2="{px1}" y2="{y:.1f}" stroke="#ddd"/>'
                              f'<text x="{px0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_fmt(v)}</text>')
        for v in self.xt if xs else []:
            x = self.px(v)
            self.parts.append(f'<line x1="{x:.1f}" y1="{py0}" x2="{x:.1f}" y2="{py0 + 4}" stroke="black"/>'
                              f'<text x="{x:.1f}" y="{py0 + 17}" text-anchor="middle" font-size="11">{_fmt(v)}</text>')
        self.parts.append(f'<line x1="{px0}" y1="{py0}" x2="{px1}" y2="{py0}" stroke="black"/>'
                          f'<line x1="{px0}" y1="{py0}" x2="{px0}" y2="{py1}" stroke="black"/>'
                          f'<text x="{(px0 + px1) / 2}" y="{H - 12}" text-anchor="middle" font-size="12">'
                          f'{escape(xlabel)}</text>'
                          f'<text transform="translate(16 {(py0 + py1) / 2}) rotate(-90)" text-anchor="middle" '
                          f'font-size="12">{escape(ylabel)}</text>')

    def px(self, v: float) -> float:
        return LEFT + (v - self.x0) / ((self.x1 - self.x0) or 1) * (W - RIGHT - LEFT)

    def py(self, v: float) -> float:
        return H - BOTTOM - (v - self.y0) / ((self.y1 - self.y0) or 1) * (H - BOTTOM - TOP)

    def legend(self, items: list[tuple[str, str, bool]]) -> None:
        for i, (label, colour, dashed) in enumerate(items):
            y = TOP + 8 + 18 * i
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            self.parts.append(f'<line x1="{W - RIGHT + 10}" y1="{y}" x2="{W - RIGHT + 30}" y2="{y}" stroke="{colour}" '
                              f'stroke-width="2"{dash}/><text x="{W - RIGHT + 34}" y="{y + 4}" font-size="11">'
                              f'{escape(label)}</text>')

    def svg(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">'
                + "".join(self.parts) + "</svg>\n")


def line_chart(path: Path, title: str, xlabel: str, ylabel: str, series: list[Series],
               y_from_zero: bool = False) -> Path:
    """Lines with a dot per point (and a whisker per point where the series has a spread)."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [v for s in series for lh in (s.spread or []) for v in lh]
    if not ys:
        raise ValueError(f"{path}: no points to draw")
    frame = _Frame(xs, ys, title, xlabel, ylabel, y_from_zero)
    items = []
    for i, s in enumerate(series):
        colour = s.colour or COLOURS[i % len(COLOURS)]
        pts = sorted(s.points)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        line = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        frame.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{line}"/>')
        for (x, y) in pts:
            frame.parts.append(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3.5" fill="{colour}"/>')
        for (x, _), (lo, hi) in zip(s.points, s.spread or []):
            frame.parts.append(f'<line x1="{frame.px(x):.1f}" y1="{frame.py(lo):.1f}" x2="{frame.px(x):.1f}" '
                               f'y2="{frame.py(hi):.1f}" stroke="{colour}"/>')
        items.append((s.label, colour, s.dashed))
    frame.legend(items)
    atomic_write_text(Path(path), frame.svg())
    return Path(path)


def bar_chart(path: Path, title: str, ylabel: str, bars: list[tuple[str, float, tuple[float, float] | None]],
              y_from_zero: bool = True, reference: tuple[str, float] | None = None) -> Path:
    """One bar per (label, value), with a whisker from lo to hi where given; `reference` draws a dashed
    horizontal line (e.g. a majority-class baseline)."""
    if not bars:
        raise ValueError(f"{path}: no bars to draw")
    ys = [v for _, v, _ in bars] + [v for *_, ci in bars if ci for v in ci] + ([reference[1]] if reference else [])
    frame = _Frame([], ys, title, "", ylabel, y_from_zero)
    width = (W - RIGHT - LEFT) / len(bars)
    for i, (label, value, ci) in enumerate(bars):
        colour = COLOURS[i % len(COLOURS)]
        x = LEFT + i * width + 0.2 * width
        top, zero = frame.py(value), frame.py(max(frame.y0, 0.0))
        frame.parts.append(f'<rect x="{x:.1f}" y="{min(top, zero):.1f}" width="{0.6 * width:.1f}" '
                           f'height="{abs(zero - top):.1f}" fill="{colour}" fill-opacity="0.8"/>'
                           f'<text x="{x + 0.3 * width:.1f}" y="{H - BOTTOM + 17}" text-anchor="middle" '
                           f'font-size="11">{escape(label)}</text>'
                           f'<text x="{x + 0.3 * width:.1f}" y="{min(top, zero) - 4:.1f}" text-anchor="middle" '
                           f'font-size="10">{_fmt(value)}</text>')
        if ci:
            cx = x + 0.3 * width
            frame.parts.append(f'<line x1="{cx:.1f}" y1="{frame.py(ci[0]):.1f}" x2="{cx:.1f}" '
                               f'y2="{frame.py(ci[1]):.1f}" stroke="black" stroke-width="1.5"/>')
    if reference:
        y = frame.py(reference[1])
        frame.parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#555" '
                           f'stroke-dasharray="5 3"/>')
        frame.legend([(reference[0], "#555", True)])
    atomic_write_text(Path(path), frame.svg())
    return Path(path)
