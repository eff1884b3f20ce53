"""The classification report's figures: ROC, precision-recall and reliability PNGs.

Drawn with matplotlib's object API on its Agg canvas (no pyplot state),
imported inside :func:`write_report_plots` so nothing else pays for it; the
numbers come from :mod:`trainer.classification_metrics`. All three PNGs are
rendered before any is written, and each is written atomically.

Examples
--------
>>> import numpy as np, tempfile
>>> y = np.array([0, 0, 1, 1, 0, 1])
>>> p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
>>> paths = write_report_plots(y, p, tempfile.mkdtemp(), "fp32", threshold=0.35)
>>> sorted(k + ":" + v.name for k, v in paths.items())
['pr:fp32-pr.png', 'reliability:fp32-reliability.png', 'roc:fp32-roc.png']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.errors import DataError
from edge.fileio import atomic_write
from trainer.classification_metrics import (
    average_precision,
    binary_inputs,
    confusion,
    expected_calibration_error,
    pr_curve,
    reliability_curve,
    roc_auc,
    roc_curve,
)

__all__ = ["PLOT_NAMES", "write_report_plots"]

#: The figures, by the key :func:`write_report_plots` returns them under.
PLOT_NAMES = ("roc", "pr", "reliability")
_SIZE_PX = 500  # each figure's width and height
_GREY = "#999999"
_MARK = "#d62728"


def _draw_roc(ax: Any, y: np.ndarray, s: np.ndarray, threshold: float | None) -> None:
    from edge.tools.plots import draw_roc

    fpr, tpr, _ = roc_curve(y, s)
    if threshold is None:
        draw_roc(ax, fpr, tpr, auc=roc_auc(y, s))
        return
    c = confusion(y, s, threshold)
    point = (c["fp"] / (c["fp"] + c["tn"]), c["tp"] / (c["tp"] + c["fn"]))
    draw_roc(ax, fpr, tpr, auc=roc_auc(y, s), operating_point=point, op_label=f"threshold {threshold:.3g}")


def _draw_pr(ax: Any, y: np.ndarray, s: np.ndarray, threshold: float | None) -> None:
    precision, recall, _ = pr_curve(y, s)
    ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", linewidth=1.8,
            label=f"average precision {average_precision(y, s):.3f}")
    ax.axhline(y.mean(), linestyle="--", color=_GREY, linewidth=1, label=f"prevalence {y.mean():.3f}")
    if threshold is not None and (s >= threshold).any():
        c = confusion(y, s, threshold)
        ax.plot(c["tp"] / (c["tp"] + c["fn"]), c["tp"] / (c["tp"] + c["fp"]), "o", color=_MARK,
                label=f"threshold {threshold:.3g}")
    ax.set(title="Precision-recall", xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize="small")


def _draw_reliability(ax: Any, y: np.ndarray, s: np.ndarray, bins: int) -> None:
    r = reliability_curve(y, s, bins)
    centres = 0.5 * (r["edges"][:-1] + r["edges"][1:])
    share = ax.twinx()  # the bars behind say how much each bin's point weighs in the ECE
    share.bar(centres, r["count"] / y.size, width=1.0 / bins, color="#dddddd")
    share.set(ylabel="share of cases", ylim=(0, 1))
    ax.set_zorder(share.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], linestyle="--", color=_GREY, linewidth=1, label="perfect calibration")
    ax.plot(r["mean_predicted"], r["fraction_positive"], "o-", linewidth=1.8,
            label=f"ECE {expected_calibration_error(y, s, bins):.3f} ({bins} bins)")
    ax.set(title="Reliability", xlabel="mean predicted probability", ylabel="fraction positive",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper left", fontsize="small")


def _render(draw: Callable[[Any], None], caption: str) -> bytes:
    """One figure drawn by ``draw`` on a fresh Agg canvas, as PNG bytes."""
    from edge.tools.plots import agg_figure, png_bytes

    fig = agg_figure((_SIZE_PX, _SIZE_PX))
    ax = fig.add_subplot()
    draw(ax)
    ax.grid(True, color="#e1e1e1")
    fig.suptitle(caption, fontsize="small")
    fig.tight_layout()
    return png_bytes(fig)


def write_report_plots(
    y: Any, p: Any, out_dir: Path | str, prefix: str, *, threshold: float | None = None, bins: int = 10
) -> dict[str, Path]:
    """Write the ROC, precision-recall and reliability plots as PNGs (atomically).

    Parameters
    ----------
    y, p : numpy.ndarray
        ``(N,)`` labels (0/1, both classes present) and positive-class probabilities.
    out_dir : pathlib.Path or str
        Folder for the files (created if missing).
    prefix : str
        File name prefix: ``<prefix>-roc.png``, ``<prefix>-pr.png``,
        ``<prefix>-reliability.png`` (``roc.png`` etc. when empty).
    threshold : float, optional
        The operating threshold, marked on the ROC and PR curves.
    bins : int
        Equal-width calibration bins of the reliability plot.

    Returns
    -------
    dict
        ``{"roc": path, "pr": path, "reliability": path}``.

    Raises
    ------
    ImportError
        If matplotlib (the ``plots`` extra) is not installed.
    DataError
        If the inputs are invalid or ``y`` holds one class only.
    """
    yb, s = binary_inputs(y, p)
    if yb.all() or not yb.any():
        raise DataError("Report plots need both positive and negative cases.")
    caption = f"n = {yb.size}, positive = {int(yb.sum())}"
    drawers: dict[str, Callable[[Any], None]] = {
        "roc": lambda ax: _draw_roc(ax, yb, s, threshold),
        "pr": lambda ax: _draw_pr(ax, yb, s, threshold),
        "reliability": lambda ax: _draw_reliability(ax, yb, s, bins),
    }
    images = {name: _render(drawers[name], caption) for name in PLOT_NAMES}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        name: atomic_write(folder / (f"{prefix}-{name}.png" if prefix else f"{name}.png"), png)
        for name, png in images.items()
    }
