"""Temperature scaling: one scalar ``T`` that calibrates a classifier's probabilities.

The model's logits ``z`` are divided by ``T`` before the sigmoid (binary,
``z`` the logit of the positive class) or the softmax (``C`` classes). ``T``
is fitted on the validation set by minimising the negative log-likelihood;
``T > 1`` softens an over-confident model, ``T < 1`` sharpens an
under-confident one, and the ranking of cases (hence ROC AUC) is unchanged.
Pure numpy; :mod:`trainer.classification_metrics` re-exports both functions.

Examples
--------
>>> import numpy as np
>>> z = np.array([-4.0, -1.0, 0.5, 3.0, 6.0, -2.0])
>>> y = np.array([0, 1, 0, 1, 1, 0])
>>> t = fit_temperature(z, y)
>>> bool(t > 1.0)  # the logits were over-confident
True
>>> apply_temperature(np.array([0.0]), t).tolist()
[0.5]
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from edge.errors import ConfigError, DataError

__all__ = ["TEMPERATURE_RANGE", "fit_temperature", "apply_temperature"]

_log = logging.getLogger(__name__)

#: Temperatures :func:`fit_temperature` searches (a fit at either end is clamped there).
TEMPERATURE_RANGE = (1e-2, 1e2)
# Halvings of the search interval in log(1/T): 80 take its width (about 9.2) below 1e-23.
_BISECTIONS = 80


def _problem(logits: Any, y: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated ``(z, y, binary)``: logits ``(N,)`` with 0/1 labels, or ``(N, C)`` with class indices."""
    z = np.asarray(logits)
    if z.ndim not in (1, 2) or z.shape[0] == 0 or not np.issubdtype(z.dtype, np.number):
        raise DataError(f"Logits must be a non-empty numeric (N,) or (N, C) array; got shape {z.shape}.")
    z = z.astype(np.float64)
    if not np.isfinite(z).all():
        raise DataError("Logits must be finite (no NaN or infinity).")
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    labels = np.asarray(y)
    if labels.shape != (z.shape[0],):
        raise DataError(f"Labels must have shape ({z.shape[0]},); got {labels.shape}.")
    if z.ndim == 1:
        if labels.dtype != bool and not (np.issubdtype(labels.dtype, np.number) and np.isin(labels, (0, 1)).all()):
            raise DataError("Labels of binary logits must be 0 or 1 (1 = the positive class).")
        return z, labels.astype(np.float64), True
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= z.shape[1]:
        raise DataError(f"Class labels must be integers in [0, {z.shape[1] - 1}].")
    return z, labels.astype(np.int64), False


def _nll_slope(inv_t: float, z: np.ndarray, y: np.ndarray, binary: bool) -> float:
    """d NLL / d(1/T) at ``inv_t``; nondecreasing in ``1/T`` because the NLL is convex in it."""
    if binary:
        q = 0.5 * (1.0 + np.tanh(0.5 * inv_t * z))  # the sigmoid, without overflow
        return float(np.mean((q - y) * z))
    a = inv_t * z
    e = np.exp(a - a.max(axis=1, keepdims=True))
    q = e / e.sum(axis=1, keepdims=True)
    return float(np.mean((q * z).sum(axis=1) - z[np.arange(z.shape[0]), y]))


def fit_temperature(logits: Any, y: Any) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``sigmoid(z / T)`` or ``softmax(z / T)``.

    The NLL is convex in ``1 / T``, so the fit is a bisection on the sign of
    its derivative in ``log(1 / T)`` (a fixed number of steps: deterministic).
    A minimum outside :data:`TEMPERATURE_RANGE` (e.g. separable data, where
    the NLL keeps falling as ``T -> 0``) is clamped to that end, with a log.

    Parameters
    ----------
    logits : numpy.ndarray
        Validation logits: ``(N,)`` (or ``(N, 1)``) for a binary model, the
        logit of the positive class; ``(N, C)`` for ``C`` classes.
    y : numpy.ndarray
        ``(N,)`` labels: 0/1 for binary logits, class indices for ``(N, C)``.

    Returns
    -------
    float
        The temperature; divide the logits by it before the sigmoid/softmax.

    Raises
    ------
    DataError
        If the logits are empty or not finite, or the labels do not match them.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0, 4, 20000)
    >>> y = rng.random(20000) < 1 / (1 + np.exp(-z / 2))
    >>> round(fit_temperature(z, y), 1)
    2.0
    """
    z, labels, binary = _problem(logits, y)
    lo, hi = math.log(1.0 / TEMPERATURE_RANGE[1]), math.log(1.0 / TEMPERATURE_RANGE[0])
    if _nll_slope(math.exp(lo), z, labels, binary) >= 0.0:
        _log.info("Temperature fit clamped at T = %g (the NLL is lowest there).", TEMPERATURE_RANGE[1])
        return float(TEMPERATURE_RANGE[1])
    if _nll_slope(math.exp(hi), z, labels, binary) <= 0.0:
        _log.info("Temperature fit clamped at T = %g (the NLL is lowest there).", TEMPERATURE_RANGE[0])
        return float(TEMPERATURE_RANGE[0])
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _nll_slope(math.exp(mid), z, labels, binary) < 0.0:
            lo = mid
        else:
            hi = mid
    return float(math.exp(-0.5 * (lo + hi)))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(z / T)`` for binary logits, else ``softmax(z / T)``.

    Binary logits are ``(N,)`` or have a last axis of length 1 (the shape is
    kept); otherwise the softmax runs over the last axis.

    Raises
    ------
    ConfigError
        If ``temperature`` is not a finite positive number.
    """
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(f"The temperature must be a finite positive number; got {temperature!r}.")
    z = np.asarray(logits, dtype=np.float64) / t
    if z.ndim <= 1 or z.shape[-1] == 1:
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
