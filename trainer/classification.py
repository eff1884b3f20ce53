"""The classification task's training pieces: losses, sampling, validation and calibration.

- Losses (``medge train --loss``): ``ce`` (binary cross-entropy on the one
  logit; the default), ``weighted`` (the same, each class weighted by
  ``n / (2 n_class)`` from the training set's class frequencies; a batch's
  loss is the weighted mean, as :class:`torch.nn.CrossEntropyLoss` with
  ``weight`` takes it) and ``focal`` (focal loss with gamma 2, no class
  weight).
- Sampling (``--sampler``): ``balanced`` (the default: each epoch's samples
  drawn with replacement, each class with half the probability mass:
  balanced batches on average; seeded by ``(seed, epoch)``) or ``random``
  (a seeded permutation per epoch, as for the other tasks).
- Validation score: ROC AUC of the validation logits.
- Calibration after training (:func:`calibrate`): one temperature fitted on
  the validation logits (:func:`trainer.classification_metrics.fit_temperature`)
  and the operating threshold on the calibrated probability for a target
  sensitivity (:func:`~trainer.operating_point.choose_threshold`; by default
  the highest threshold whose 95 % lower confidence bound of the validation
  sensitivity reaches the target).

The model is binary: one logit, ``p = sigmoid(logit / T)`` is the
probability of the positive class (the manifest's one label).

Examples
--------
>>> import numpy as np
>>> class_weights(np.array([0, 0, 0, 1])).round(3).tolist()
[0.667, 2.0]
>>> epoch_order(np.array([0, 0, 0, 1]), 8, "balanced", seed=0, epoch=1).shape
(8,)
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from edge.errors import ConfigError, DataError
from trainer.classification_metrics import apply_temperature, average_precision, fit_temperature, roc_auc
from trainer.operating_point import DEFAULT_THRESHOLD_CONFIDENCE, choose_threshold

__all__ = [
    "LOSSES",
    "SAMPLERS",
    "DEFAULT_LOSS",
    "DEFAULT_SAMPLER",
    "FOCAL_GAMMA",
    "class_weights",
    "classification_loss",
    "epoch_order",
    "predict_logits",
    "validation_metrics",
    "calibrate",
]

_log = logging.getLogger(__name__)

LOSSES = ("ce", "weighted", "focal")
SAMPLERS = ("random", "balanced")
#: Plain cross-entropy on class-balanced batches: on the synthetic nodule set it learned on
#: every seed tried, where the class-weighted loss on random batches stalled on one of two.
DEFAULT_LOSS = "ce"
DEFAULT_SAMPLER = "balanced"
FOCAL_GAMMA = 2.0

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def class_weights(labels: np.ndarray) -> np.ndarray:
    """``[w_negative, w_positive]`` = ``n / (2 n_class)``; a class absent from ``labels`` gets weight 1.

    Raises
    ------
    DataError
        If ``labels`` is empty.
    """
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise DataError("Class weights need at least one label.")
    counts = np.bincount(y.astype(np.int64), minlength=2)[:2].astype(np.float64)
    return np.where(counts > 0, y.size / (2.0 * np.maximum(counts, 1.0)), 1.0)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, kind: str,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss of one-logit outputs ``[B, 1]`` (or ``[B]``) against 0/1 ``target`` ``[B]``.

    ``kind`` is one of :data:`LOSSES`; ``weights`` ``[2]`` (negative,
    positive) is required for ``weighted``.
    """
    z = logits.float().reshape(-1)
    y = target.float().reshape(-1)
    if kind == "focal":
        p = torch.sigmoid(z)
        loss = -(y * (1 - p) ** FOCAL_GAMMA * F.logsigmoid(z) + (1 - y) * p**FOCAL_GAMMA * F.logsigmoid(-z))
        return loss.mean()
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    if kind == "ce":
        return bce.mean()
    if kind == "weighted":
        if weights is None:
            raise ConfigError("The weighted loss needs class weights.")
        w = torch.where(y > 0.5, weights[1], weights[0]).to(bce.dtype)
        return (w * bce).sum() / w.sum()
    raise ConfigError(f"loss {kind!r} is not one of {', '.join(LOSSES)}.")


def epoch_order(labels: np.ndarray, n_draws: int, sampler: str, seed: int, epoch: int) -> np.ndarray:
    """The ``n_draws`` sample indices of one epoch (every rank computes the same, then takes its shard).

    ``random``: the epoch's seeded permutation, repeated to length;
    ``balanced``: drawn with replacement, each class with half the mass.
    """
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([int(seed), int(epoch)])
    if sampler == "random":
        return np.resize(rng.permutation(y.size), n_draws)
    if sampler != "balanced":
        raise ConfigError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}.")
    counts = np.bincount(y.astype(np.int64), minlength=2).astype(np.float64)
    w = 1.0 / counts[y.astype(np.int64)]
    return rng.choice(y.size, size=n_draws, replace=True, p=w / w.sum())


def predict_logits(run: Runner, inputs: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The positive-class logit ``(N,)`` of every input, in batches of ``batch_size``."""
    out = []
    for i in range(0, len(inputs), batch_size):
        z = np.asarray(run(inputs[i : i + batch_size])["logits"], np.float64)
        if z.ndim != 2 or z.shape[1] != 1:
            raise DataError(f"A binary classifier's logits are [N, 1]; got {list(z.shape)}.")
        out.append(z[:, 0])
    return np.concatenate(out) if out else np.zeros(0)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """ROC AUC (the validation score), PR AUC and the mean BCE of validation logits."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(bool)
    bce = np.logaddexp(0.0, z) - y * z  # -log sigmoid(z) for positives, -log(1 - sigmoid(z)) for negatives
    return {
        "n": int(y.size),
        "n_positive": int(np.count_nonzero(y)),
        "roc_auc": roc_auc(y, z),
        "pr_auc": average_precision(y, z),
        "loss": float(bce.mean()) if y.size else math.nan,
    }


def calibrate(logits: np.ndarray, labels: np.ndarray, target_sensitivity: float,
              confidence: float | None = DEFAULT_THRESHOLD_CONFIDENCE) -> dict[str, Any]:
    """Temperature and operating threshold from validation logits.

    The threshold is :func:`~trainer.operating_point.choose_threshold`'s:
    with ``confidence`` (default 0.95) the highest whose one-sided
    Clopper-Pearson lower bound of the validation sensitivity reaches
    ``target_sensitivity``; with 0 or ``None`` the highest whose validation
    sensitivity does (the point rule).

    Returns ``temperature``, ``threshold`` (on ``sigmoid(logit / T)``),
    ``target_sensitivity``, ``target_confidence`` (``None``: point rule),
    ``method``, and on the validation set the ``sensitivity``, its
    ``sensitivity_lower_bound`` (``None`` for the point rule),
    ``target_met``, the ``specificity`` at the threshold, ``n`` and
    ``n_positive``.

    Raises
    ------
    DataError
        If the validation set lacks a class (nothing to calibrate against).
    ConfigError
        If the target or the confidence is out of range.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(np.int64)
    n_pos = int(np.count_nonzero(y))
    if n_pos in (0, y.size):
        raise DataError(
            f"The validation set has {n_pos} positive case(s) of {y.size}; calibration needs both classes."
        )
    temperature = fit_temperature(z, y)
    p = apply_temperature(z, temperature)
    chosen = choose_threshold(y, p, target_sensitivity, confidence)
    _log.info("Calibration on %d validation cases: T = %.4g, threshold %.4g (%s rule: sensitivity %.3f, "
              "lower bound %s, specificity %s)", y.size, temperature, chosen["threshold"], chosen["method"],
              chosen["sensitivity"], chosen["sensitivity_lower_bound"], chosen["specificity"])
    return {
        "temperature": float(temperature),
        "threshold": float(chosen["threshold"]),
        "target_sensitivity": float(target_sensitivity),
        "target_confidence": chosen["confidence"],
        "method": chosen["method"],
        "sensitivity": chosen["sensitivity"],
        "sensitivity_lower_bound": chosen["sensitivity_lower_bound"],
        "target_met": chosen["target_met"],
        "specificity": chosen["specificity"],
        "n": int(y.size),
        "n_positive": n_pos,
    }
