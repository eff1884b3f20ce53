"""ROC curve, its area and the operating point of a binary classifier's scores against known labels.

Client-side arithmetic for reports (``medge demo``): no scikit-learn, no
trainer. Ties are handled as in the Mann-Whitney statistic: frames of equal
score form one step of the curve, so a tie between a positive and a negative
counts one half.

Examples
--------
>>> fpr, tpr, thr = roc_points([0.9, 0.8, 0.4, 0.1], [True, False, True, False])
>>> fpr.tolist(), tpr.tolist()
([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
>>> roc_auc([0.9, 0.8, 0.4, 0.1], [True, False, True, False])
0.75
>>> operating_point([True, True, False, False], [True, False, True, False])["sensitivity"]
0.5
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["MAX_SAMPLES", "roc_points", "roc_auc", "operating_point"]

#: Most scored frames one curve may hold (a demo scores a few dozen).
MAX_SAMPLES = 1_000_000


def _checked(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as finite float64 and labels as bool, of one length; ``ValueError`` otherwise."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"{s.size} scores for {y.size} labels.")
    if s.size > MAX_SAMPLES:
        raise ValueError(f"{s.size} scores is more than {MAX_SAMPLES}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("A score is not a finite number.")
    return s, y.astype(bool)


def roc_points(scores: Sequence[float] | np.ndarray,
               labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve: false- and true-positive rates at each distinct score, highest first.

    Parameters
    ----------
    scores : sequence of float
        The classifier's score of the positive class per frame (higher = more
        likely positive).
    labels : sequence of bool
        The known truth per frame (``True`` = positive).

    Returns
    -------
    fpr, tpr : numpy.ndarray
        float64, starting at (0, 0) and ending at (1, 1); a point per
        distinct score (calling every frame at or above it positive).
    thresholds : numpy.ndarray
        The score of each point (``inf`` for the first).

    Raises
    ------
    ValueError
        If the lengths differ, a score is not finite, there are more than
        :data:`MAX_SAMPLES` frames, or one class is missing (the curve is
        undefined).
    """
    s, y = _checked(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"A ROC curve needs both classes ({n_pos} positive, {n_neg} negative).")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """Area under :func:`roc_points` (trapezoids; ties count one half); ``None`` when a class is missing."""
    s, y = _checked(scores, labels)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_points(s, y)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def operating_point(decisions: Sequence[bool] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity and the confusion counts of binary decisions against labels.

    A rate whose class is absent is ``None``.

    Raises
    ------
    ValueError
        If the lengths differ or there are more than :data:`MAX_SAMPLES`.
    """
    d = np.asarray(decisions).reshape(-1).astype(bool)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if d.size != y.size:
        raise ValueError(f"{d.size} decisions for {y.size} labels.")
    if d.size > MAX_SAMPLES:
        raise ValueError(f"{d.size} decisions is more than {MAX_SAMPLES}.")
    tp, fn = int((d & y).sum()), int((~d & y).sum())
    tn, fp = int((~d & ~y).sum()), int((d & ~y).sum())
    return {"sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}
