"""PNG figures drawn with Pillow: latency plots and result overlays.

No matplotlib: the daemon side stays light. Every function renders to a
:class:`PIL.Image.Image`; the ``save_*`` helpers write it atomically.

Examples
--------
>>> import numpy as np
>>> img = latency_figure({"zmq": np.array([1.0, 1.2, 1.1, 3.0])}, title="demo")
>>> img.size
(1000, 420)
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edge.tools.results import atomic_write_bytes

__all__ = [
    "PALETTE",
    "to_display_uint8",
    "latency_figure",
    "overlay_mask",
    "overlay_boxes",
    "save_png",
]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_BG = (255, 255, 255)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def save_png(img: Image.Image, path: Path | str) -> Path:
    """Encode ``img`` as PNG and write it atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def to_display_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale any ``[H, W]`` or ``[H, W, 3]`` array to uint8 for display."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-12:
        return np.zeros(a.shape, dtype=np.uint8)
    return ((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> Image.Image:
    a = to_display_uint8(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a).convert("RGB")


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4,
                 color: tuple[int, int, int] = (255, 40, 40), caption: str = "") -> Image.Image:
    """The image in gray with label pixels tinted and their outline drawn."""
    base = np.asarray(_rgb(image), dtype=np.float32)
    m = np.asarray(mask) > 0
    if m.shape != base.shape[:2]:
        raise ValueError(f"Mask shape {list(m.shape)} does not match image shape {list(base.shape[:2])}.")
    tint = np.asarray(color, dtype=np.float32)
    base[m] = base[m] * (1 - alpha) + tint * alpha
    # Outline: label pixels with at least one 4-neighbour outside the label.
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    base[m & ~inner] = tint
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if caption:
        _caption(img, caption)
    return img


def overlay_boxes(image: np.ndarray, boxes: Iterable[Mapping[str, object]],
                  color: tuple[int, int, int] = (40, 220, 40), caption: str = "") -> Image.Image:
    """The image with each box (``x0 y0 x1 y1 label score``, source pixels) drawn."""
    img = _rgb(image)
    d = ImageDraw.Draw(img)
    font = _font()
    for b in boxes:
        x0, y0, x1, y1 = (float(b[k]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[arg-type]
        d.rectangle([x0, y0, x1, y1], outline=color, width=2)
        d.text((x0 + 2, max(0.0, y0 - 12)), f"{b.get('label', '')} {float(b.get('score', 0)):.2f}",  # type: ignore[arg-type]
               fill=color, font=font)
    if caption:
        _caption(img, caption)
    return img


def _caption(img: Image.Image, text: str) -> None:
    d = ImageDraw.Draw(img)
    w = int(d.textlength(text, font=_font())) + 8
    d.rectangle([0, 0, w, 14], fill=(0, 0, 0))
    d.text((4, 1), text, fill=(255, 255, 255), font=_font())


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _panel(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlo: float, xhi: float,
           ylo: float, yhi: float, xlabel: str, ylabel: str, title: str):
    """Draw axes, grid and tick labels; return a (x, y) -> pixel mapper."""
    font = _font()
    left, top, right, bottom = box
    def fx(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)
    def fy(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)
    for t in _nice_ticks(xlo, xhi):
        x = fx(t)
        d.line([x, top, x, bottom], fill=_GRID)
        label = f"{t:g}"
        d.text((x - d.textlength(label, font=font) / 2, bottom + 4), label, fill=_AXIS, font=font)
    for t in _nice_ticks(ylo, yhi, 4):
        y = fy(t)
        d.line([left, y, right, y], fill=_GRID)
        label = f"{t:g}"
        d.text((left - 6 - d.textlength(label, font=font), y - 5), label, fill=_AXIS, font=font)
    d.rectangle([left, top, right, bottom], outline=_AXIS)
    d.text(((left + right) / 2 - d.textlength(xlabel, font=font) / 2, bottom + 18), xlabel, fill=_AXIS, font=font)
    d.text((left, top - 28), ylabel, fill=_AXIS, font=font)
    d.text(((left + right) / 2 - d.textlength(title, font=font) / 2, top - 16), title, fill=(0, 0, 0), font=font)
    return fx, fy


def latency_figure(series: Mapping[str, Sequence[float] | np.ndarray], title: str = "latency",
                   size: tuple[int, int] = (1000, 420), bins: int = 50) -> Image.Image:
    """Histogram (left) and CDF (right) of one or more latency series in ms.

    The x range is clipped at the largest series' 99.9th percentile so a few
    outliers do not squash the plot; the title notes the clip.
    """
    img = Image.new("RGB", size, _BG)
    d = ImageDraw.Draw(img)
    font = _font()
    data = {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if len(v)}
    w, h = size
    d.text((10, 6), title, fill=(0, 0, 0), font=font)
    if not data:
        d.text((w / 2 - 40, h / 2), "no samples", fill=_AXIS, font=font)
        return img
    allv = np.concatenate(list(data.values()))
    xlo = max(0.0, float(allv.min()) * 0.95)
    xhi = float(np.percentile(allv, 99.9)) * 1.02
    if xhi <= xlo:
        xhi = xlo + 1.0
    clipped = int((allv > xhi).sum())
    if clipped:
        d.text((10, 20), f"({clipped} samples beyond {xhi:.2f} ms not shown)", fill=_AXIS, font=font)
    edges = np.linspace(xlo, xhi, bins + 1)
    hists = {k: np.histogram(np.clip(v, xlo, xhi), bins=edges)[0] for k, v in data.items()}
    ymax = max(int(hh.max()) for hh in hists.values()) * 1.1 or 1
    mid = w // 2
    fx, fy = _panel(d, (60, 60, mid - 20, h - 50), xlo, xhi, 0, ymax, "latency (ms)", "count", "histogram")
    for i, (k, hh) in enumerate(hists.items()):
        c = PALETTE[i % len(PALETTE)]
        for j, n in enumerate(hh):
            if n:
                x0, x1 = fx(edges[j]), fx(edges[j + 1])
                if len(hists) > 1:  # side by side
                    bw = (x1 - x0) / len(hists)
                    x0, x1 = x0 + i * bw, x0 + (i + 1) * bw
                d.rectangle([x0, fy(n), max(x0, x1 - 1), fy(0)], fill=c)
    gx, gy = _panel(d, (mid + 60, 60, w - 20, h - 50), xlo, xhi, 0, 1, "latency (ms)", "fraction <= x", "CDF")
    for i, (k, v) in enumerate(data.items()):
        c = PALETTE[i % len(PALETTE)]
        s = np.sort(v)
        n = s.size
        idx = np.unique(np.linspace(0, n - 1, min(n, 800)).astype(int))
        pts = [(gx(min(s[j], xhi)), gy((j + 1) / n)) for j in idx]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        p50, p99 = np.percentile(v, [50, 99])
        legend = f"{k}: p50 {p50:.2f} ms  p99 {p99:.2f} ms  n={n}"
        ly = h - 50 - 14 * (len(data) - i) - 6  # bottom right: CDFs rarely go there
        lx = w - 30 - int(d.textlength(legend, font=font)) - 15
        d.rectangle([lx, ly + 1, lx + 10, ly + 11], fill=c)
        d.text((lx + 15, ly), legend, fill=(0, 0, 0), font=font)
    return img
