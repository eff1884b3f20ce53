"""PNG figures: latency and ROC plots drawn with matplotlib, result overlays drawn with Pillow.

Latency and ROC plots need the ``plots`` extra (``pip install 'medge[plots]'``);
matplotlib is imported inside the plotting functions, with its Agg canvas and
no pyplot state, so nothing else pays for it and the daemon never imports it.
Where matplotlib is absent, :func:`save_latency_plot` and
:func:`save_roc_plot` skip the plot with one warning naming the extra. Overlays on images stay with Pillow, drawn with the
daemon's own overlay drawing (:mod:`edge.egress.dicom.outlines`).

Examples
--------
>>> import numpy as np
>>> img = latency_figure({"zmq": np.array([1.0, 1.2, 1.1, 3.0])}, title="demo")
>>> img.size
(1000, 420)
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edge.egress.dicom.outlines import draw_boxes, mask_boundary, tint, to_display_uint8
from edge.tools.results import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PALETTE",
    "PLOTS_EXTRA",
    "to_display_uint8",
    "latency_png",
    "latency_figure",
    "save_latency_plot",
    "roc_png",
    "save_roc_plot",
    "draw_roc",
    "agg_figure",
    "png_bytes",
    "overlay_mask",
    "overlay_boxes",
    "overlay_heatmap",
    "save_png",
]

_log = logging.getLogger(__name__)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
#: What to install for latency plots.
PLOTS_EXTRA = "pip install 'medge[plots]'"
_DPI = 100


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def save_png(img: Image.Image, path: Path | str) -> Path:
    """Encode ``img`` as PNG and write it atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _rgb(image: np.ndarray) -> np.ndarray:
    """``image`` for display as RGB uint8 ``[H, W, 3]`` (uint8 as it is, others min-max scaled)."""
    a = to_display_uint8(image, stretch_uint8=False)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return np.array(Image.fromarray(a).convert("RGB"))


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4,
                 color: tuple[int, int, int] = (255, 40, 40), caption: str = "") -> Image.Image:
    """The image in gray with label pixels tinted and their outline drawn."""
    base = _rgb(image)
    m = np.asarray(mask) > 0
    if m.shape != base.shape[:2]:
        raise ValueError(f"Mask shape {list(m.shape)} does not match image shape {list(base.shape[:2])}.")
    tint(base, m, color, alpha)
    base[mask_boundary(m)] = color
    img = Image.fromarray(base)
    if caption:
        _caption(img, caption)
    return img


def overlay_boxes(image: np.ndarray, boxes: Iterable[Mapping[str, object]],
                  color: tuple[int, int, int] = (40, 220, 40), caption: str = "") -> Image.Image:
    """The image with each box (``x0 y0 x1 y1 label score``, source pixels) drawn and labelled."""
    boxes = list(boxes)
    img = Image.fromarray(draw_boxes(_rgb(image), boxes, color, width=2))  # type: ignore[arg-type]
    d = ImageDraw.Draw(img)
    font = _font()
    for b in boxes:
        x0, y0 = float(b["x0"]), float(b["y0"])  # type: ignore[arg-type]
        d.text((x0 + 2, max(0.0, y0 - 12)), f"{b.get('label', '')} {float(b.get('score', 0)):.2f}",  # type: ignore[arg-type]
               fill=color, font=font)
    if caption:
        _caption(img, caption)
    return img


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6,
                    color: tuple[int, int, int] = (255, 40, 40), threshold: float | None = None,
                    boxes: Iterable[Mapping[str, object]] = (), box_color: tuple[int, int, int] = (60, 140, 255),
                    caption: str = "") -> Image.Image:
    """The image in gray with a uint8 heatmap (0..255) blended in ``color``, weight ``alpha * heat / 255``.

    With ``threshold`` (a probability in [0, 1]), the edge of the region at or
    above ``round(255 * threshold)`` is drawn in yellow; ``boxes``
    (``x0 y0 x1 y1``, source pixels) are outlined in ``box_color`` (e.g. the
    simulator's truth).

    Raises
    ------
    ValueError
        If the heatmap's shape is not the image's, or ``alpha`` is not in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} is not in [0, 1].")
    base = _rgb(image)
    heat = np.asarray(heatmap)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"Heatmap shape {list(heat.shape)} does not match image shape {list(base.shape[:2])}.")
    weight = np.clip(heat.astype(np.float32), 0.0, 255.0)[..., None] * np.float32(alpha / 255.0)
    blend = base.astype(np.float32) * (1.0 - weight) + np.asarray(color, np.float32) * weight
    out = np.rint(blend).clip(0, 255).astype(np.uint8)
    if threshold is not None:
        out[mask_boundary(heat >= round(255.0 * float(threshold)))] = (255, 230, 40)
    draw_boxes(out, list(boxes), box_color, width=2)  # type: ignore[arg-type]
    img = Image.fromarray(out)
    if caption:
        _caption(img, caption)
    return img


def _caption(img: Image.Image, text: str) -> None:
    d = ImageDraw.Draw(img)
    w = int(d.textlength(text, font=_font())) + 8
    d.rectangle([0, 0, w, 14], fill=(0, 0, 0))
    d.text((4, 1), text, fill=(255, 255, 255), font=_font())


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def latency_png(series: Mapping[str, Sequence[float] | np.ndarray], title: str = "latency",
                size: tuple[int, int] = (1000, 420), bins: int = 50) -> bytes:
    """Histogram (left) and CDF (right) of one or more latency series in ms, as PNG bytes.

    The x range is clipped at the largest series' 99.9th percentile so a few
    outliers do not squash the plot; the title notes the clip. The image is
    ``size`` pixels (width, height).

    Raises
    ------
    ImportError
        If matplotlib (the ``plots`` extra) is not installed.
    """
    fig = agg_figure(size)
    data = {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if len(v)}
    if not data:
        fig.suptitle(title)
        fig.text(0.5, 0.5, "no samples", ha="center", va="center")
        return png_bytes(fig)
    allv = np.concatenate(list(data.values()))
    xlo = max(0.0, float(allv.min()) * 0.95)
    xhi = float(np.percentile(allv, 99.9)) * 1.02
    if xhi <= xlo:
        xhi = xlo + 1.0
    clipped = int((allv > xhi).sum())
    fig.suptitle(title + (f"\n({clipped} samples beyond {xhi:.2f} ms not shown)" if clipped else ""),
                 fontsize="medium")
    colors = [_hex(PALETTE[i % len(PALETTE)]) for i in range(len(data))]
    hist_ax, cdf_ax = fig.subplots(1, 2)
    edges = np.linspace(xlo, xhi, bins + 1)
    hist_ax.hist([np.clip(v, xlo, xhi) for v in data.values()], bins=edges, color=colors,
                 label=list(data))  # several series: side by side in each bin
    hist_ax.set(title="histogram", xlabel="latency (ms)", ylabel="count", xlim=(xlo, xhi))
    for (name, v), c in zip(data.items(), colors):
        s = np.sort(v)
        frac = np.arange(1, s.size + 1) / s.size
        p50, p99 = np.percentile(v, [50, 99])
        cdf_ax.plot(np.minimum(s, xhi), frac, drawstyle="steps-post", color=c, linewidth=1.5,
                    label=f"{name}: p50 {p50:.2f} ms  p99 {p99:.2f} ms  n={s.size}")
    cdf_ax.set(title="CDF", xlabel="latency (ms)", ylabel="fraction <= x", xlim=(xlo, xhi), ylim=(0, 1.02))
    cdf_ax.legend(loc="lower right", fontsize="small")  # CDFs rarely go there
    for ax in (hist_ax, cdf_ax):
        ax.grid(True, color="#e1e1e1")
        ax.set_axisbelow(True)
    fig.tight_layout()
    return png_bytes(fig)


def agg_figure(size: tuple[int, int]) -> Figure:
    """A matplotlib figure of ``size`` pixels (width, height) on its own Agg canvas (no pyplot, no display).

    Raises
    ------
    ImportError
        If matplotlib (the ``plots`` extra) is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = size
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """``fig`` encoded as PNG at the figure's own resolution."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def latency_figure(series: Mapping[str, Sequence[float] | np.ndarray], title: str = "latency",
                   size: tuple[int, int] = (1000, 420), bins: int = 50) -> Image.Image:
    """:func:`latency_png` decoded as an RGB :class:`PIL.Image.Image`."""
    with Image.open(io.BytesIO(latency_png(series, title=title, size=size, bins=bins))) as img:
        return img.convert("RGB")


def save_latency_plot(series: Mapping[str, Sequence[float] | np.ndarray], path: Path | str,
                      title: str = "latency", size: tuple[int, int] = (1000, 420)) -> Path | None:
    """Write :func:`latency_png` to ``path`` atomically; return the path.

    Without matplotlib, logs one warning naming the extra to install and
    returns ``None`` (nothing is written).
    """
    try:
        png = latency_png(series, title=title, size=size)
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("matplotlib"):
            raise
        _log.warning("Latency plot %s skipped: matplotlib is not installed (%s).", path, PLOTS_EXTRA)
        return None
    return atomic_write_bytes(path, png)


def roc_png(fpr: Sequence[float] | np.ndarray, tpr: Sequence[float] | np.ndarray, *, auc: float | None,
            title: str = "ROC", operating_point: tuple[float, float] | None = None,
            op_label: str = "operating point", size: tuple[int, int] = (560, 560)) -> bytes:
    """A ROC curve (false- against true-positive rate, chance diagonal dashed) as PNG bytes.

    ``operating_point`` is ``(fpr, tpr)`` of the decisions at the model's
    threshold, marked and labelled ``op_label``; the legend gives ``auc``.

    Raises
    ------
    ImportError
        If matplotlib (the ``plots`` extra) is not installed.
    """
    fig = agg_figure(size)
    draw_roc(fig.subplots(), fpr, tpr, auc=auc, title=title, operating_point=operating_point, op_label=op_label)
    fig.tight_layout()
    return png_bytes(fig)


def draw_roc(ax: Any, fpr: Sequence[float] | np.ndarray, tpr: Sequence[float] | np.ndarray, *,
             auc: float | None, title: str = "ROC", operating_point: tuple[float, float] | None = None,
             op_label: str = "operating point") -> None:
    """A ROC curve on matplotlib axes ``ax``: the curve, the chance diagonal, the operating point, a grid.

    Shared by :func:`roc_png` (the demo report) and the trainer's evaluation plots.
    """
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance")
    auc_text = f"AUC {auc:.3f}" if auc is not None else "AUC undefined"
    ax.plot(np.asarray(fpr, np.float64), np.asarray(tpr, np.float64),
            color=_hex(PALETTE[0]), linewidth=2, label=auc_text)
    if operating_point is not None:
        ax.plot([operating_point[0]], [operating_point[1]], marker="o", color=_hex(PALETTE[3]),
                linestyle="none", label=op_label)
    ax.set(title=title, xlabel="false-positive rate (1 - specificity)", ylabel="true-positive rate (sensitivity)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), aspect="equal")
    ax.grid(True, color="#e1e1e1")
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", fontsize="small")


def save_roc_plot(path: Path | str, fpr: Sequence[float] | np.ndarray, tpr: Sequence[float] | np.ndarray, *,
                  auc: float | None, title: str = "ROC", operating_point: tuple[float, float] | None = None,
                  op_label: str = "operating point") -> Path | None:
    """Write :func:`roc_png` to ``path`` atomically; return the path (``None`` without matplotlib, one warning)."""
    try:
        png = roc_png(fpr, tpr, auc=auc, title=title, operating_point=operating_point, op_label=op_label)
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("matplotlib"):
            raise
        _log.warning("ROC plot %s skipped: matplotlib is not installed (%s).", path, PLOTS_EXTRA)
        return None
    return atomic_write_bytes(path, png)
