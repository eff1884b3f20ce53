"""The operating threshold of a classifier: the highest that keeps a target sensitivity, with a stated confidence.

A case is called positive when its probability ``p >= threshold``. On the
validation set, sensitivity only changes at a positive case's score, so
every candidate threshold is one of those scores: the ``k``-th highest
positive score calls (at least) ``k`` of the ``n`` positives.

Two rules choose ``k`` (:func:`choose_threshold`):

- **Point rule** (``confidence`` 0 or ``None``): the least ``k`` with
  ``k / n >= target``. The validation sensitivity meets the target, but a
  new set of cases misses it about half the time: the validation estimate
  is itself a draw (with 90 positives, one case moves it by 0.011).
- **Confidence bound** (the default, ``confidence`` 0.95): the least ``k``
  whose one-sided exact (Clopper-Pearson) lower confidence bound of the
  sensitivity, :func:`sensitivity_lower_bound`, is at least the target.
  Then the claim "sensitivity >= target" holds with that confidence for
  the population the validation cases were drawn from, whatever the true
  sensitivity: the Clopper-Pearson bound is conservative (its coverage is
  at least the stated confidence). The price is specificity: the threshold
  is never higher than the point rule's.

When even every validation positive called (``k = n``) does not bring the
bound up to the target, the validation set is too small for the claim: the
threshold is then the lowest positive score (the most the set can support),
``target_met`` is false and the shortfall is logged.

The lower bound ``L`` of ``k`` successes in ``n`` trials at confidence
``1 - alpha`` solves ``P(X >= k | n, L) = alpha`` for ``X ~ Binomial(n, L)``
(equivalently, ``L`` is the ``alpha`` quantile of ``Beta(k, n - k + 1)``);
``L = 0`` for ``k = 0`` and ``L = alpha ** (1 / n)`` for ``k = n``. It is
found by bisection on the binomial tail, summed in log space (numpy and
:mod:`math` only: no scipy).

Examples
--------
>>> round(sensitivity_lower_bound(90, 90, 0.95), 4)  # 0.05 ** (1 / 90)
0.9673
>>> round(sensitivity_lower_bound(86, 90, 0.95), 4)
0.9012
>>> import numpy as np
>>> y = np.array([0, 0, 1, 1])
>>> p = np.array([0.1, 0.4, 0.35, 0.8])
>>> choose_threshold(y, p, 0.5, confidence=None)["threshold"]
0.8
>>> r = choose_threshold(y, p, 0.5, confidence=0.95)  # two positives cannot carry the claim
>>> r["threshold"], r["target_met"]
(0.35, False)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from edge.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_TARGET_SENSITIVITY",
    "DEFAULT_THRESHOLD_CONFIDENCE",
    "BOUND_METHOD",
    "check_confidence",
    "sensitivity_lower_bound",
    "choose_threshold",
]

_log = logging.getLogger(__name__)

#: The sensitivity the operating threshold is chosen for by default.
DEFAULT_TARGET_SENSITIVITY = 0.90
#: The confidence of the sensitivity claim by default (0 or ``None``: the point rule).
DEFAULT_THRESHOLD_CONFIDENCE = 0.95
#: The lower confidence bound used (recorded beside the threshold).
BOUND_METHOD = "clopper-pearson"
# Bisection stops when the bracket is this narrow (well below any reported digit).
_BOUND_TOLERANCE = 1e-12
_MAX_BISECTIONS = 200


def check_confidence(confidence: float | None) -> float | None:
    """``confidence`` as a float in ``(0, 1)``, or ``None`` for the point rule (given as 0 or ``None``).

    Raises
    ------
    ConfigError
        If it is not a finite number in ``[0, 1)`` (or ``None``).
    """
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.integer, np.floating)):
        raise ConfigError(f"The threshold confidence must be a number in [0, 1); got {confidence!r}.")
    c = float(confidence)
    if not math.isfinite(c) or not 0.0 <= c < 1.0:
        raise ConfigError(f"The threshold confidence must lie in [0, 1) (0: the point rule); got {confidence!r}.")
    return None if c == 0.0 else c


def _check_target(target_sensitivity: float) -> float:
    """``target_sensitivity`` as a float in ``(0, 1]``; a string or a bool is refused, not converted."""
    if isinstance(target_sensitivity, bool) or not isinstance(
        target_sensitivity, (int, float, np.integer, np.floating)
    ):
        raise ConfigError(f"The target sensitivity must be a number in (0, 1]; got {target_sensitivity!r}.")
    target = float(target_sensitivity)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"The target sensitivity must lie in (0, 1]; got {target_sensitivity!r}.")
    return target


def _log_binomial_coefficients(n: int) -> np.ndarray:
    """``log C(n, i)`` for ``i = 0 .. n``."""
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))))
    return log_fact[n] - log_fact - log_fact[::-1]


def _upper_tail(log_coef: np.ndarray, k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, ``0 < p < 1``, summed in log space."""
    i = np.arange(k, n + 1, dtype=np.float64)
    terms = log_coef[k:] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(terms.max())
    return math.exp(top) * float(np.exp(terms - top).sum())


def sensitivity_lower_bound(hits: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a proportion: ``hits`` of ``n`` at ``confidence``.

    Parameters
    ----------
    hits, n : int
        Positives called and positives in all (``0 <= hits <= n``, ``n >= 1``).
    confidence : float
        In ``(0, 1)``, e.g. 0.95: the bound is below the true sensitivity
        with at least this probability.

    Raises
    ------
    ConfigError
        If ``confidence`` is not in ``(0, 1)``.
    DataError
        If the counts are not integers with ``0 <= hits <= n`` and ``n >= 1``.
    """
    c = check_confidence(confidence)
    if c is None:
        raise ConfigError("A lower confidence bound needs a confidence in (0, 1); got 0 or None.")
    for v in (hits, n):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DataError(f"Counts must be integers; got {v!r}.")
    k, n = int(hits), int(n)
    if n < 1 or not 0 <= k <= n:
        raise DataError(f"A bound needs 0 <= hits <= n and n >= 1; got {k} of {n}.")
    alpha = 1.0 - c
    if k == 0:
        return 0.0
    if k == n:
        return alpha ** (1.0 / n)
    log_coef = _log_binomial_coefficients(n)
    lo, hi = 0.0, 1.0  # the tail is 0 at p = 0 and 1 at p = 1 (k >= 1): the bound lies between, at any alpha
    for _ in range(_MAX_BISECTIONS):
        if hi - lo <= _BOUND_TOLERANCE:
            break
        mid = 0.5 * (lo + hi)
        if _upper_tail(log_coef, k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def _least_count(n: int, target: float, confidence: float | None) -> tuple[int, bool]:
    """The least number of positives called that meets the rule, and whether any count does."""
    if confidence is None:
        k = min(n, math.ceil(target * n))
        while k > 1 and (k - 1) / n >= target:  # ceil may overshoot by one in floating point
            k -= 1
        return max(k, 1), True
    if sensitivity_lower_bound(n, n, confidence) < target:
        return n, False
    lo, hi = 1, n  # the bound grows with the count: binary search for the least count that reaches it
    while lo < hi:
        mid = (lo + hi) // 2
        if sensitivity_lower_bound(mid, n, confidence) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo, True


def choose_threshold(y: Any, p: Any, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                     confidence: float | None = DEFAULT_THRESHOLD_CONFIDENCE) -> dict[str, Any]:
    """The highest threshold on ``p`` whose sensitivity on ``(y, p)`` meets ``target_sensitivity``.

    Parameters
    ----------
    y, p : array_like
        ``(N,)`` labels (0/1) and finite scores (e.g. calibrated probabilities).
    target_sensitivity : float
        In ``(0, 1]``.
    confidence : float or None
        ``None`` or 0: the point rule (validation sensitivity >= target);
        in ``(0, 1)``: its one-sided Clopper-Pearson lower bound at this
        confidence >= target (see the module doc).

    Returns
    -------
    dict
        ``threshold``; on this set ``sensitivity`` and ``specificity``
        (``None`` without negatives); ``target_sensitivity``;
        ``confidence`` (``None`` for the point rule), ``method`` (``point``
        or :data:`BOUND_METHOD`), ``sensitivity_lower_bound`` (at the
        threshold; ``None`` for the point rule) and ``target_met`` (false
        only when the set is too small for the claim: the threshold is then
        the lowest positive score).

    Raises
    ------
    ConfigError
        If the target is not in ``(0, 1]`` or the confidence not in ``[0, 1)``.
    DataError
        If the set has no positive case, or the inputs are malformed.
    """
    from trainer.classification_metrics import binary_inputs, confusion

    target, conf = _check_target(target_sensitivity), check_confidence(confidence)
    yb, s = binary_inputs(y, p, probabilities=False)
    pos = np.sort(s[yb])[::-1]
    if pos.size == 0:
        raise DataError("Choosing a threshold for a sensitivity needs at least one positive case.")
    k, met = _least_count(int(pos.size), target, conf)
    threshold = float(pos[k - 1])
    c = confusion(yb, s, threshold)
    negatives = c["tn"] + c["fp"]
    bound = None if conf is None else sensitivity_lower_bound(c["tp"], int(pos.size), conf)
    if not met:
        _log.warning(
            "%d validation positives cannot support sensitivity >= %.3g at confidence %.3g (the bound with every "
            "positive called is %.3f); the threshold calls them all.", pos.size, target, conf, bound)
    return {
        "threshold": threshold,
        "sensitivity": c["tp"] / pos.size,
        "specificity": c["tn"] / negatives if negatives else None,
        "target_sensitivity": target,
        "confidence": conf,
        "method": "point" if conf is None else BOUND_METHOD,
        "sensitivity_lower_bound": bound,
        "target_met": met,
    }
