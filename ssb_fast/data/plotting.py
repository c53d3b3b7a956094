"""Minimal line charts drawn with Pillow, for figures the data commands write (no matplotlib needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Series:
    x: np.ndarray
    y: np.ndarray
    colour: tuple[int, int, int]
    label: str


def _ticks(low: float, high: float, n: int = 4) -> list[float]:
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return [low]
    step = 10 ** np.floor(np.log10((high - low) / n))
    for mult in (1, 2, 5, 10):
        if (high - low) / (step * mult) <= n + 1:
            step *= mult
            break
    start = np.ceil(low / step) * step
    return [float(v) for v in np.arange(start, high + step * 1e-9, step)]


def line_chart(
    draw,
    box: tuple[int, int, int, int],
    series: list[Series],
    title: str,
    xlabel: str,
    log_y: bool = False,
    log_x: bool = False,
    font=None,
) -> None:
    """Draw `series` as lines inside `box` (x0, y0, x1, y1) of an ImageDraw, with axes, ticks, a title and a
    legend. Log axes plot log10 of the values (non-positive values dropped)."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 46, y1 - 30, y0 + 20, x1 - 8
    draw.rectangle([x0, y0, x1, y1], fill=(255, 255, 255))
    draw.text((x0 + 6, y0 + 4), title, fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 3 * len(xlabel), bottom + 16), xlabel, fill=(60, 60, 60), font=font)

    def tx(values):
        values = np.asarray(values, dtype=np.float64)
        return np.log10(values) if log_x else values

    def ty(values):
        values = np.asarray(values, dtype=np.float64)
        return np.log10(values) if log_y else values

    pts = []
    for s in series:
        keep = np.isfinite(s.x) & np.isfinite(s.y)
        if log_x:
            keep &= s.x > 0
        if log_y:
            keep &= s.y > 0
        pts.append((tx(s.x[keep]), ty(s.y[keep])))
    xs = np.concatenate([p[0] for p in pts]) if pts else np.zeros(1)
    ys = np.concatenate([p[1] for p in pts]) if pts else np.zeros(1)
    if xs.size == 0:
        xs = ys = np.zeros(1)
    xlo, xhi = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    ylo, yhi = float(ys.min()), float(ys.max()) if ys.max() > ys.min() else float(ys.min()) + 1
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad

    def px(x, y):
        return (
            left + (x - xlo) / (xhi - xlo) * (right - left),
            bottom - (y - ylo) / (yhi - ylo) * (bottom - top),
        )

    draw.line([left, top, left, bottom, right, bottom], fill=(0, 0, 0))
    for t in _ticks(ylo, yhi):
        _, yy = px(xlo, t)
        draw.line([left - 3, yy, left, yy], fill=(0, 0, 0))
        draw.text((x0 + 2, yy - 5), f"1e{t:g}" if log_y else f"{t:g}", fill=(60, 60, 60), font=font)
    for t in _ticks(xlo, xhi):
        xx, _ = px(t, ylo)
        draw.line([xx, bottom, xx, bottom + 3], fill=(0, 0, 0))
        draw.text((xx - 8, bottom + 4), f"1e{t:g}" if log_x else f"{t:g}", fill=(60, 60, 60), font=font)
    for (xv, yv), s in zip(pts, series, strict=True):
        if len(xv) > 1:
            draw.line([px(a, b) for a, b in zip(xv, yv, strict=True)], fill=s.colour, width=2)
    for i, s in enumerate(series):
        ly = top + 4 + 12 * i
        draw.line([right - 110, ly + 5, right - 95, ly + 5], fill=s.colour, width=3)
        draw.text((right - 90, ly), s.label, fill=(0, 0, 0), font=font)
