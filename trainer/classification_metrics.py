"""Binary classification metrics with bootstrap intervals, calibration and the operating threshold.

Pure numpy, no torch: the figures live in :mod:`trainer.classification_plots`
(matplotlib, imported only when :func:`write_report_plots` is called) and
temperature scaling in :mod:`trainer.temperature` (re-exported here). ``y`` holds the true labels (0/1, 1 = the positive
class, e.g. "nodule present"), ``p`` the model's probability of the positive
class; a case is called positive when ``p >= threshold``.

- Confusion-based metrics at the threshold: accuracy, sensitivity
  (TP / (TP + FN)), specificity (TN / (TN + FP)), PPV (TP / (TP + FP)) and
  NPV (TN / (TN + FN)).
- ROC AUC: the Mann-Whitney U statistic over (positive, negative) pairs, a
  tie counting one half; threshold free.
- PR AUC: average precision, ``sum_k (R_k - R_{k-1}) P_k`` over the distinct
  scores in decreasing order (step-wise, no interpolation; tied scores form
  one step), as scikit-learn's ``average_precision_score`` defines it.
- ECE: expected calibration error of the positive-class probability over
  ``bins`` equal-width bins of ``[0, 1]`` (bin ``b`` holds
  ``edges[b] <= p < edges[b + 1]``, the last bin also ``p == 1``):
  ``sum_b n_b / n * |fraction positive_b - mean p_b|``.

A metric that is undefined on a set (sensitivity with no positive case,
PPV with no positive call, AUC with one class only) is ``None``, never NaN,
so reports stay strict JSON. Confidence intervals are percentile bootstrap
intervals: resample ``r`` is the cases at the ``r``-th draw of
``rng.integers(0, n, size=n)``, ``rng = numpy.random.default_rng(seed)``, so
the same inputs and seed give the same interval (and anyone can redraw it).
A resample on which a metric is undefined is skipped for that metric, and
each metric records how many resamples it used (``n_boot``). Resamples are
evaluated in blocks as case-count weights, so memory stays bounded (about
16 MiB per array) whatever ``n`` and ``n_boot``.

:func:`fit_temperature` fits one temperature ``T`` on validation logits
(binary ``(N,)`` or ``C``-class ``(N, C)``), :func:`choose_threshold`
(:mod:`trainer.operating_point`, re-exported here) picks the operating
threshold for a target sensitivity on the validation set, by default with a
95 % lower confidence bound of that sensitivity at the target, and
:func:`evaluation_report` is the hook ``medge evaluate`` calls on the
held-out set (report, plus the ROC, PR and reliability PNGs).

Examples
--------
>>> import numpy as np
>>> y = np.array([0, 0, 1, 1])
>>> p = np.array([0.1, 0.4, 0.35, 0.8])
>>> roc_auc(y, p), round(average_precision(y, p), 4)
(0.75, 0.8333)
>>> choose_threshold(y, p, target_sensitivity=0.9, confidence=None)["threshold"]
0.35
>>> r = classification_report(y, p, threshold=0.35, n_boot=50)
>>> r["sensitivity"]["value"], r["specificity"]["value"], r["confusion"]
(1.0, 0.5, {'tp': 2, 'fp': 1, 'tn': 1, 'fn': 0})
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge.errors import ConfigError, DataError
from trainer.operating_point import DEFAULT_TARGET_SENSITIVITY, choose_threshold
from trainer.temperature import TEMPERATURE_RANGE, apply_temperature, fit_temperature

__all__ = [
    "METRICS",
    "DEFAULT_TARGET_SENSITIVITY",
    "MAX_BOOTSTRAP",
    "MAX_BINS",
    "TEMPERATURE_RANGE",
    "binary_inputs",
    "confusion",
    "roc_auc",
    "average_precision",
    "roc_curve",
    "pr_curve",
    "reliability_curve",
    "expected_calibration_error",
    "point_metrics",
    "fit_temperature",
    "apply_temperature",
    "choose_threshold",
    "classification_report",
    "report_scalars",
    "write_report_plots",
    "evaluation_report",
]

_log = logging.getLogger(__name__)

#: The metrics of :func:`classification_report`, in report order.
METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc", "ece")
#: Most bootstrap resamples one report may ask for.
MAX_BOOTSTRAP = 100_000
#: Most calibration bins.
MAX_BINS = 1000
# Bootstrap resamples are evaluated in blocks of at most this many (resample, case) cells.
_MAX_CELLS = 1 << 21


# ----------------------------------------------------------------- validation
def _labels(y: Any, n: int | None = None) -> np.ndarray:
    """``y`` as a 1-D bool array; 0/1 (or bool) values only."""
    a = np.asarray(y)
    if a.ndim != 1 or a.size == 0:
        raise DataError(f"Labels must be a non-empty 1-D array; got shape {a.shape}.")
    if n is not None and a.size != n:
        raise DataError(f"Labels and scores differ in length ({a.size} and {n}).")
    if a.dtype != bool and not (np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all()):
        raise DataError("Labels must be 0 or 1 (1 = the positive class).")
    return a.astype(bool)


def _scores(p: Any, probabilities: bool = True) -> np.ndarray:
    """``p`` as a finite 1-D float64 array (in ``[0, 1]`` when ``probabilities``)."""
    a = np.asarray(p)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.number):
        raise DataError(f"Scores must be a non-empty 1-D numeric array; got shape {a.shape}, dtype {a.dtype}.")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError("Scores must be finite (no NaN or infinity).")
    if probabilities and (a.min() < 0.0 or a.max() > 1.0):
        raise DataError(f"Probabilities must lie in [0, 1]; got values in [{a.min():g}, {a.max():g}].")
    return a


def binary_inputs(y: Any, p: Any, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(y, p)``: 1-D 0/1 labels as bool, finite scores as float64 (in ``[0, 1]`` when ``probabilities``).

    Raises
    ------
    DataError
        If either is empty or not 1-D, their lengths differ, a label is not
        0/1, or a score is not finite (or outside ``[0, 1]``).
    """
    s = _scores(p, probabilities)
    return _labels(y, s.size), s


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not math.isfinite(t):
        raise ConfigError(f"The threshold must be a finite number; got {threshold!r}.")
    return t


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 1 <= bins <= MAX_BINS:
        raise ConfigError(f"bins must be an integer in [1, {MAX_BINS}]; got {bins!r}.")
    return int(bins)


def _value(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# ----------------------------------------------------- weighted metric kernel
@dataclass(frozen=True)
class _Cases:
    """One set of cases, arranged once so any case weighting is a few matrix operations."""

    pos_called: np.ndarray  # per case: one column of the confusion matrix each
    neg_called: np.ndarray
    pos_missed: np.ndarray
    neg_cleared: np.ndarray
    score_order: np.ndarray  # cases by decreasing score
    score_starts: np.ndarray  # first index of each run of equal scores in that order
    positive_sorted: np.ndarray  # y in that order, as float
    bin_order: np.ndarray  # cases by calibration bin
    bin_starts: np.ndarray
    residual_sorted: np.ndarray  # (y - p) in bin order


def _arrange(y: np.ndarray, p: np.ndarray, threshold: float, bins: int) -> _Cases:
    called = p >= threshold
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    b = _bin_index(p, bins)
    border = np.argsort(b, kind="stable")
    bs = b[border]
    bstarts = np.flatnonzero(np.r_[True, bs[1:] != bs[:-1]])
    yf = y.astype(np.float64)
    return _Cases(
        pos_called=(y & called).astype(np.float64),
        neg_called=(~y & called).astype(np.float64),
        pos_missed=(y & ~called).astype(np.float64),
        neg_cleared=(~y & ~called).astype(np.float64),
        score_order=order,
        score_starts=starts,
        positive_sorted=yf[order],
        bin_order=border,
        bin_starts=bstarts,
        residual_sorted=(yf - p)[border],
    )


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ranking(w: np.ndarray, c: _Cases) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC (Mann-Whitney, ties one half) and average precision per row of weights ``w``."""
    ws = w[:, c.score_order]
    pos = np.add.reduceat(ws * c.positive_sorted, c.score_starts, axis=1)
    neg = np.add.reduceat(ws, c.score_starts, axis=1) - pos
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = n_neg[:, None] - np.cumsum(neg, axis=1)  # negatives scored strictly lower
    auc = _ratio((pos * (neg_below + 0.5 * neg)).sum(axis=1), n_pos * n_neg)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    precision = np.zeros_like(tp)
    np.divide(tp, tp + fp, out=precision, where=(tp + fp) > 0)
    ap = _ratio((pos * precision).sum(axis=1), n_pos)
    return auc, ap


def _metric_rows(w: np.ndarray, c: _Cases) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each row of case weights ``w`` ``(k, n)`` (NaN: undefined)."""
    tp, fp = w @ c.pos_called, w @ c.neg_called
    fn, tn = w @ c.pos_missed, w @ c.neg_cleared
    n = tp + fp + fn + tn
    auc, ap = _ranking(w, c)
    per_bin = np.add.reduceat(w[:, c.bin_order] * c.residual_sorted, c.bin_starts, axis=1)
    return {
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "roc_auc": auc,
        "pr_auc": ap,
        "ece": _ratio(np.abs(per_bin).sum(axis=1), n),
    }


def _point(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, bins: int = 10) -> dict[str, float]:
    rows = _metric_rows(np.ones((1, y.size)), _arrange(y, p, threshold, bins))
    return {k: float(v[0]) for k, v in rows.items()}


# ------------------------------------------------------------ public metrics
def confusion(y: Any, p: Any, threshold: float) -> dict[str, int]:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` when cases with ``p >= threshold`` are called positive."""
    yb, s = binary_inputs(y, p, probabilities=False)
    called = s >= _check_threshold(threshold)
    return {
        "tp": int(np.count_nonzero(yb & called)),
        "fp": int(np.count_nonzero(~yb & called)),
        "tn": int(np.count_nonzero(~yb & ~called)),
        "fn": int(np.count_nonzero(yb & ~called)),
    }


def point_metrics(y: Any, p: Any, threshold: float, bins: int = 10) -> dict[str, float | None]:
    """Every metric of :data:`METRICS` on the whole set (``None`` where undefined)."""
    yb, s = binary_inputs(y, p)
    return {k: _value(v) for k, v in _point(yb, s, _check_threshold(threshold), _check_bins(bins)).items()}


def roc_auc(y: Any, scores: Any) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties one half.

    ``scores`` may be any finite reals (only their order matters); ``None``
    when ``y`` holds one class only.
    """
    yb, s = binary_inputs(y, scores, probabilities=False)
    return _value(float(_ranking(np.ones((1, s.size)), _arrange(yb, s, 0.0, 1))[0][0]))


def average_precision(y: Any, scores: Any) -> float | None:
    """PR AUC as average precision (step-wise over distinct scores); ``None`` with no positive case."""
    yb, s = binary_inputs(y, scores, probabilities=False)
    return _value(float(_ranking(np.ones((1, s.size)), _arrange(yb, s, 0.0, 1))[1][0]))


def _sweep(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct scores, decreasing) and cumulative TP and FP counts at each."""
    order = np.argsort(-s, kind="stable")
    ss, ys = s[order], y[order]
    last = np.r_[ss[1:] != ss[:-1], True]  # the last case of each run of equal scores
    return ss[last], np.cumsum(ys)[last].astype(np.float64), np.cumsum(~ys)[last].astype(np.float64)


def roc_curve(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, from ``(0, 0)`` at threshold ``+inf`` down the distinct scores.

    Raises
    ------
    DataError
        If ``y`` holds one class only (the curve is undefined).
    """
    yb, s = binary_inputs(y, scores, probabilities=False)
    if yb.all() or not yb.any():
        raise DataError("An ROC curve needs both positive and negative cases.")
    th, tp, fp = _sweep(yb, s)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[np.inf, th]


def pr_curve(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall points ``(precision, recall, thresholds)`` at the distinct scores, decreasing.

    Raises
    ------
    DataError
        If ``y`` holds no positive case (recall is undefined).
    """
    yb, s = binary_inputs(y, scores, probabilities=False)
    if not yb.any():
        raise DataError("A precision-recall curve needs at least one positive case.")
    th, tp, fp = _sweep(yb, s)
    return tp / (tp + fp), tp / tp[-1], th


def reliability_curve(y: Any, p: Any, bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability diagram data over ``bins`` equal-width bins of ``[0, 1]``.

    Returns
    -------
    dict
        ``edges`` ``(bins + 1,)``; per bin ``count``, ``mean_predicted`` and
        ``fraction_positive`` (NaN in empty bins).
    """
    yb, s = binary_inputs(y, p)
    bins = _check_bins(bins)
    b = _bin_index(s, bins)
    count = np.bincount(b, minlength=bins).astype(np.int64)
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1),
        "count": count,
        "mean_predicted": _ratio(np.bincount(b, weights=s, minlength=bins), count),
        "fraction_positive": _ratio(np.bincount(b, weights=yb.astype(np.float64), minlength=bins), count),
    }


def expected_calibration_error(y: Any, p: Any, bins: int = 10) -> float:
    """ECE of the positive-class probability over ``bins`` equal-width bins (see the module doc)."""
    yb, s = binary_inputs(y, p)
    return _point(yb, s, 0.5, _check_bins(bins))["ece"]


# -------------------------------------------------------------------- report
def _bootstrap(cases: _Cases, n: int, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Every metric on ``n_boot`` resamples with replacement (NaN where undefined on a resample)."""
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_CELLS // n)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, n_boot, block):
        k = min(block, n_boot - start)
        draws = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        weights = np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        for m, v in _metric_rows(weights, cases).items():
            parts[m].append(v)
    return {m: np.concatenate(v) if v else np.zeros(0) for m, v in parts.items()}


def _interval(samples: np.ndarray) -> tuple[list[float] | None, int]:
    ok = samples[~np.isnan(samples)]
    if ok.size == 0:
        return None, 0
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return [float(lo), float(hi)], int(ok.size)


def classification_report(
    y: Any, p: Any, threshold: float, n_boot: int = 1000, seed: int = 0, bins: int = 10
) -> dict[str, Any]:
    """Held-out metrics at ``threshold`` with percentile-bootstrap 95 % intervals.

    Parameters
    ----------
    y, p : numpy.ndarray
        ``(N,)`` labels (0/1) and positive-class probabilities.
    threshold : float
        The operating threshold (a case is positive when ``p >= threshold``).
    n_boot : int
        Bootstrap resamples (0 to :data:`MAX_BOOTSTRAP`; 0 gives no intervals).
    seed : int
        Seed of the resampling.
    bins : int
        Equal-width calibration bins for the ECE.

    Returns
    -------
    dict
        For each of :data:`METRICS`: ``{"value", "ci95": [lo, hi], "n_boot"}``
        (``n_boot`` the resamples on which it was defined; ``value`` and
        ``ci95`` are ``None`` where undefined); ``confusion`` ``{tp, fp, tn,
        fn}``, ``n``, ``n_positive``, ``threshold``, and ``bootstrap``
        ``{n_boot, seed, method}`` and ``bins``.
    """
    yb, s = binary_inputs(y, p)
    t, bins = _check_threshold(threshold), _check_bins(bins)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or not 0 <= n_boot <= MAX_BOOTSTRAP:
        raise ConfigError(f"n_boot must be an integer in [0, {MAX_BOOTSTRAP}]; got {n_boot!r}.")
    cases = _arrange(yb, s, t, bins)
    point = {k: float(v[0]) for k, v in _metric_rows(np.ones((1, yb.size)), cases).items()}
    boot = _bootstrap(cases, yb.size, int(n_boot), int(seed))
    report: dict[str, Any] = {}
    for m in METRICS:
        ci, used = _interval(boot[m])
        report[m] = {"value": _value(point[m]), "ci95": ci, "n_boot": used}
    report.update(
        confusion=confusion(yb, s, t),
        n=int(yb.size),
        n_positive=int(np.count_nonzero(yb)),
        threshold=t,
        bootstrap={"n_boot": int(n_boot), "seed": int(seed), "method": "percentile"},
        bins=bins,
    )
    return report


def report_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """A report flattened to the numbers a manifest keeps: ``accuracy``, ``accuracy_ci95_lo``, ..., ``tp``, ``n``.

    Undefined values are left out.
    """
    out: dict[str, float] = {}
    for m in METRICS:
        entry = report[m]
        if entry["value"] is not None:
            out[m] = float(entry["value"])
        if entry["ci95"] is not None:
            out[f"{m}_ci95_lo"], out[f"{m}_ci95_hi"] = (float(x) for x in entry["ci95"])
    for k in ("threshold", "n", "n_positive"):
        out[k] = float(report[k])
    out.update({k: float(v) for k, v in report["confusion"].items()})
    return out


# --------------------------------------------------------------------- plots
def write_report_plots(
    y: Any, p: Any, out_dir: Path | str, prefix: str, *, threshold: float | None = None, bins: int = 10
) -> dict[str, Path]:
    """ROC, precision-recall and reliability PNGs in ``out_dir``: ``{"roc": path, "pr": path, "reliability": path}``.

    See :func:`trainer.classification_plots.write_report_plots` (imported
    here on first use, so the metrics never import matplotlib).
    """
    from trainer.classification_plots import write_report_plots as write

    return write(y, p, out_dir, prefix, threshold=threshold, bins=bins)


# ---------------------------------------------------------- medge evaluate
def evaluation_report(
    y: Any,
    p: Any,
    threshold: float,
    out_dir: Path | str | None = None,
    prefix: str = "",
    n_boot: int = 1000,
    seed: int = 0,
    bins: int = 10,
) -> dict[str, Any]:
    """The ``medge evaluate`` hook: :func:`classification_report`, plus its plots when ``out_dir`` is given.

    The plots (:func:`write_report_plots`, operating threshold marked) are
    listed under ``plots`` as ``{name: path string}``, so the report stays
    JSON. Where the held-out set holds one class only, no plot can be drawn:
    ``plots`` is then empty and the reason is logged.
    """
    report = classification_report(y, p, threshold, n_boot=n_boot, seed=seed, bins=bins)
    if out_dir is not None:
        if report["n_positive"] in (0, report["n"]):
            _log.warning("Report plots skipped: the evaluated set holds one class only.")
            report["plots"] = {}
        else:
            paths = write_report_plots(y, p, out_dir, prefix, threshold=threshold, bins=bins)
            report["plots"] = {k: str(v) for k, v in paths.items()}
    return report
