"""Classification metrics, bootstrap intervals, calibration and threshold (trainer/classification_metrics.py).

Each metric is checked on a small case computed by hand, and against a
from-the-definition reference (pairwise Mann-Whitney U for ROC AUC, a loop
over distinct scores for average precision, a naive resample loop for the
bootstrap); hypothesis checks the invariants. scikit-learn is not a
dependency: where it happens to be installed it is one more reference.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ConfigError, DataError
from trainer.classification_metrics import (
    METRICS,
    TEMPERATURE_RANGE,
    apply_temperature,
    average_precision,
    choose_threshold,
    classification_report,
    confusion,
    evaluation_report,
    expected_calibration_error,
    fit_temperature,
    point_metrics,
    pr_curve,
    reliability_curve,
    report_scalars,
    roc_auc,
    roc_curve,
    write_report_plots,
)

PROPERTY = settings(
    max_examples=2000 if os.environ.get("MEDGE_HYPOTHESIS_PROFILE") == "release" else 100, deadline=None
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ references
def mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
    """U / (n_pos n_neg) from its definition: every (positive, negative) pair, a tie counting 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    u = sum(float(a > b) + 0.5 * float(a == b) for a in pos for b in neg)
    return u / (pos.size * neg.size)


def reference_ap(y: np.ndarray, s: np.ndarray) -> float:
    """sum_k (R_k - R_{k-1}) P_k over the distinct scores, highest first."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        called = s >= t
        tp = float(np.sum(called & (y == 1)))
        recall, precision = tp / float(np.sum(y == 1)), tp / float(np.sum(called))
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def sample_set(n: int, seed: int, prevalence: float = 0.2, separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a decent classifier (logits shifted by ``separation`` for positives)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    z = rng.normal(0.0, 1.0, n) + separation * y - 1.0
    return y, 1.0 / (1.0 + np.exp(-z))


def nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.where(y == 1, p, 1 - p))))


# --------------------------------------------------------- confusion metrics
Y8 = np.array([1, 1, 1, 0, 0, 0, 0, 1])
P8 = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.8])


def test_confusion_metrics_match_a_hand_count() -> None:
    # At 0.65: called .9 .7 .8 -> TP 2 (.9 .8), FP 1 (.7); missed .6 .3 -> FN 2; TN 3 (.2 .1 .4).
    assert confusion(Y8, P8, 0.65) == {"tp": 2, "fp": 1, "tn": 3, "fn": 2}
    m = point_metrics(Y8, P8, 0.65)
    assert m["accuracy"] == 5 / 8
    assert m["sensitivity"] == 2 / 4
    assert m["specificity"] == 3 / 4
    assert m["ppv"] == 2 / 3
    assert m["npv"] == 3 / 5


def test_a_score_equal_to_the_threshold_is_called_positive() -> None:
    assert confusion(Y8, P8, 0.6) == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    m = point_metrics(Y8, P8, 0.6)
    assert m["sensitivity"] == 3 / 4 and m["ppv"] == 3 / 4
    assert classification_report(Y8, P8, 0.6, n_boot=0)["confusion"] == confusion(Y8, P8, 0.6)


def test_undefined_metrics_are_none_not_nan() -> None:
    m = point_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.7, 0.9]), 0.95)
    assert m["sensitivity"] is None and m["ppv"] is None and m["roc_auc"] is None and m["pr_auc"] is None
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0 and m["npv"] == 1.0
    assert roc_auc(np.ones(3, int), np.array([0.1, 0.5, 0.9])) is None


# ------------------------------------------------------------- ranking metrics
def test_roc_auc_and_average_precision_by_hand() -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(3 / 4, abs=1e-15)  # .8 beats both negatives, .35 beats .1 only
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-15)
    # A positive tied with a negative: the pair counts one half, and the tie is one precision step.
    y, s = np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.9, 0.1])
    assert roc_auc(y, s) == pytest.approx(3.5 / 4, abs=1e-15)
    assert average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-15)


def test_ranking_metrics_match_their_definitions_with_many_ties() -> None:
    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.3).astype(int)
    s = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # 10 distinct values: ties everywhere
    assert roc_auc(y, s) == pytest.approx(mann_whitney_auc(y, s), rel=1e-12)
    assert average_precision(y, s) == pytest.approx(reference_ap(y, s), rel=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(mann_whitney_auc(y, s), rel=1e-12)


def test_against_scikit_learn_where_installed() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    y, p = sample_set(500, 3)
    p = np.round(p, 2)
    assert roc_auc(y, p) == pytest.approx(metrics.roc_auc_score(y, p), rel=1e-12)
    assert average_precision(y, p) == pytest.approx(metrics.average_precision_score(y, p), rel=1e-12)


def test_curves_run_from_the_highest_threshold() -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    fpr, tpr, th = roc_curve(y, s)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert th[0] == np.inf and th[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    precision, recall, _ = pr_curve(y, s)
    assert recall.tolist() == [0.5, 0.5, 1.0, 1.0] and precision.tolist() == [1.0, 0.5, 2 / 3, 0.5]
    with pytest.raises(DataError):
        roc_curve(np.ones(2, int), np.array([0.2, 0.3]))


# ----------------------------------------------------------------- calibration
def test_ece_and_reliability_by_hand() -> None:
    y, p = np.array([0, 1, 1, 1]), np.array([0.05, 0.15, 0.95, 0.85])
    # One case per bin (0, 1, 9, 8): (|0 - .05| + |1 - .15| + |1 - .95| + |1 - .85|) / 4
    assert expected_calibration_error(y, p) == pytest.approx(1.1 / 4, abs=1e-12)
    r = reliability_curve(y, p, bins=10)
    assert r["edges"].tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert r["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert np.isnan(r["mean_predicted"][2]) and r["fraction_positive"][8] == 1.0
    assert expected_calibration_error(np.array([1, 0, 0, 0]), np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-15)
    # p == 1 falls in the last bin; two bins that average out are not one bin.
    assert reliability_curve(np.array([1]), np.array([1.0]), bins=4)["count"].tolist() == [0, 0, 0, 1]
    assert expected_calibration_error(np.array([1, 0]), np.array([0.2, 0.7]), bins=2) == pytest.approx(0.75)


def test_ece_is_the_weighted_gap_of_the_reliability_bins() -> None:
    y, p = sample_set(400, 11)
    r = reliability_curve(y, p, bins=15)
    full = r["count"] > 0
    gap = np.abs(r["fraction_positive"][full] - r["mean_predicted"][full])
    assert expected_calibration_error(y, p, bins=15) == pytest.approx(float(np.sum(r["count"][full] * gap) / 400))


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_intervals_are_the_naive_percentile_bootstrap() -> None:
    y, p = sample_set(60, 5)
    rep = classification_report(y, p, 0.4, n_boot=200, seed=9)
    rng = np.random.default_rng(9)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(200):
        idx = rng.integers(0, 60, size=60)
        for m, v in point_metrics(y[idx], p[idx], 0.4).items():
            if v is not None:
                samples[m].append(v)
    for m in METRICS:
        assert rep[m]["n_boot"] == len(samples[m]), m
        assert rep[m]["ci95"] == pytest.approx(np.percentile(samples[m], [2.5, 97.5]).tolist(), abs=1e-12), m


def test_bootstrap_is_seeded() -> None:
    y, p = sample_set(150, 2)
    a = classification_report(y, p, 0.4, n_boot=300, seed=4)
    assert a == classification_report(y, p, 0.4, n_boot=300, seed=4)
    b = classification_report(y, p, 0.4, n_boot=300, seed=5)
    assert a["roc_auc"]["ci95"] != b["roc_auc"]["ci95"]
    assert a["roc_auc"]["value"] == b["roc_auc"]["value"]


def test_intervals_hold_the_estimate_and_narrow_with_n() -> None:
    small_y, small_p = sample_set(200, 21)
    large_y, large_p = sample_set(3200, 21)
    small = classification_report(small_y, small_p, 0.35, n_boot=300, seed=1)
    large = classification_report(large_y, large_p, 0.35, n_boot=300, seed=1)
    for m in METRICS:
        for rep in (small, large):
            lo, hi = rep[m]["ci95"]
            assert lo <= rep[m]["value"] <= hi, m
        assert np.diff(large[m]["ci95"])[0] < 0.6 * np.diff(small[m]["ci95"])[0], m


def test_resamples_without_positives_are_skipped_and_counted() -> None:
    y = np.zeros(30, int)
    y[[3, 17]] = 1  # P(no positive in a resample) = (28/30)^30, about 0.13
    p = np.linspace(0.05, 0.95, 30)
    rep = classification_report(y, p, 0.5, n_boot=400, seed=0)
    assert rep["accuracy"]["n_boot"] == rep["specificity"]["n_boot"] == rep["ece"]["n_boot"] == 400
    for m in ("sensitivity", "roc_auc", "pr_auc"):
        assert 250 < rep[m]["n_boot"] < 400, m
        lo, hi = rep[m]["ci95"]
        assert 0.0 <= lo <= hi <= 1.0


def test_report_shape_and_scalars() -> None:
    y, p = sample_set(100, 8)
    rep = classification_report(y, p, 0.5, n_boot=0)
    assert rep["n"] == 100 and rep["n_positive"] == int(y.sum()) and rep["threshold"] == 0.5
    assert sum(rep["confusion"].values()) == 100
    assert all(rep[m]["ci95"] is None and rep[m]["n_boot"] == 0 for m in METRICS)
    flat = report_scalars(classification_report(y, p, 0.5, n_boot=50))
    assert {"accuracy", "accuracy_ci95_lo", "accuracy_ci95_hi", "ece_ci95_hi", "tp", "n", "threshold"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: classification_report(Y8, P8 + 0.5, 0.5), DataError),
        (lambda: classification_report(Y8, P8[:-1], 0.5), DataError),
        (lambda: classification_report(Y8 * 2, P8, 0.5), DataError),
        (lambda: classification_report(Y8, np.r_[P8[:-1], np.nan], 0.5), DataError),
        (lambda: classification_report(Y8, P8, 0.5, n_boot=10**6), ConfigError),
        (lambda: classification_report(Y8, P8, 0.5, bins=0), ConfigError),
        (lambda: choose_threshold(Y8, P8, target_sensitivity=0.0), ConfigError),
        (lambda: choose_threshold(np.zeros(8, int), P8), DataError),
        (lambda: fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 3])), DataError),
    ],
)
def test_bad_input_is_an_explicit_error(call, error) -> None:
    with pytest.raises(error):
        call()


# ------------------------------------------------------------------ threshold
def test_choose_threshold_by_hand() -> None:
    # Positive scores .9 .8 .6 .3: 0.75 sensitivity needs 3 of them, so the 3rd highest, 0.6.
    got = choose_threshold(Y8, P8, target_sensitivity=0.75, confidence=None)
    assert got == {"threshold": 0.6, "sensitivity": 0.75, "specificity": 0.75, "target_sensitivity": 0.75,
                   "confidence": None, "method": "point", "sensitivity_lower_bound": None, "target_met": True}
    assert choose_threshold(Y8, P8, target_sensitivity=1.0, confidence=0)["threshold"] == 0.3
    assert choose_threshold(Y8, P8, target_sensitivity=0.76, confidence=0)["threshold"] == 0.3


def test_choose_threshold_exact_fraction_is_not_overshot() -> None:
    y = np.r_[np.ones(25, int), np.zeros(5, int)]
    p = np.r_[np.linspace(0.95, 0.5, 25), np.full(5, 0.1)]
    got = choose_threshold(y, p, target_sensitivity=0.28, confidence=None)  # 0.28 * 25 is 7.000000000000001 in floating point
    assert got["threshold"] == p[6] and got["sensitivity"] == 7 / 25 == 0.28


def test_choose_threshold_is_the_highest_meeting_the_target() -> None:
    y, p = sample_set(500, 13)
    got = choose_threshold(y, p, 0.9, confidence=None)

    def sens(t: float) -> float:
        return float(np.mean(p[y == 1] >= t))

    assert got["sensitivity"] >= 0.9 and got["sensitivity"] == sens(got["threshold"])
    above = p[(y == 1) & (p > got["threshold"])]
    assert above.size and sens(above.min()) < 0.9


# --------------------------------------------------------------- temperature
def binary_logits(t_true: float, n: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    return z, (rng.random(n) < 1.0 / (1.0 + np.exp(-z / t_true))).astype(int)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_is_recovered_binary(t_true: float) -> None:
    z, y = binary_logits(t_true)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.1)  # standard error about 1.5 % at n = 40000
    assert fit_temperature(z[:, None], y) == t  # (N, 1) is the binary case
    assert fit_temperature(z, y) == t  # deterministic


def test_temperature_is_recovered_multiclass() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, (30_000, 4))
    q = apply_temperature(z, 2.0)
    y = (np.cumsum(q, axis=1) < rng.random((30_000, 1))).sum(axis=1)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)


def test_temperature_lowers_the_nll_of_overconfident_logits() -> None:
    z, y = binary_logits(3.0, n=5000, seed=2)  # the model's logits are 3x too large
    t = fit_temperature(z, y)
    assert t > 1.5
    assert nll(apply_temperature(z, t), y) < nll(apply_temperature(z, 1.0), y) - 0.05


def test_apply_temperature_shapes() -> None:
    z = np.array([[-2.0], [0.0], [3.0]])
    assert apply_temperature(z, 2.0).shape == (3, 1)
    assert apply_temperature(z, 2.0)[:, 0] == pytest.approx(apply_temperature(z[:, 0], 2.0), abs=1e-15)
    q = apply_temperature(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 900.0]]), 0.5)
    assert q.sum(axis=1) == pytest.approx([1.0, 1.0]) and q[1, 2] == 1.0
    with pytest.raises(ConfigError):
        apply_temperature(z, 0.0)
    with pytest.raises(DataError):
        fit_temperature(np.array([0.5, -0.5]), np.array([2, 0]))


def test_separable_data_clamp_the_temperature() -> None:
    z = np.array([-3.0, -1.0, 2.0, 5.0])
    assert fit_temperature(z, np.array([0, 0, 1, 1])) == TEMPERATURE_RANGE[0]


# ---------------------------------------------------------------- properties
labels_scores = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n),
    )
)


@PROPERTY
@given(labels_scores, st.floats(0.0, 1.0))
def test_every_metric_lies_in_the_unit_interval(data, threshold: float) -> None:
    y, p = np.array(data[0]), np.array(data[1])
    m = point_metrics(y, p, threshold)
    assert all(v is None or 0.0 <= v <= 1.0 for v in m.values())
    assert (m["sensitivity"] is None) == (y.sum() == 0)
    assert sum(confusion(y, p, threshold).values()) == y.size


@PROPERTY
@given(labels_scores)
def test_auc_is_symmetric_and_is_mann_whitney(data) -> None:
    y, p = np.array(data[0]), np.array(data[1])
    auc = roc_auc(y, p)
    if 0 < y.sum() < y.size:
        assert auc == pytest.approx(mann_whitney_auc(y, p), abs=1e-12)
        assert roc_auc(y, -p) == pytest.approx(1.0 - auc, abs=1e-12)  # ties count 1/2 either way
        assert average_precision(y, p) == pytest.approx(reference_ap(y, p), abs=1e-12)
    else:
        assert auc is None


@PROPERTY
@given(labels_scores, st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_threshold_falls_as_the_target_rises(data, a: float, b: float) -> None:
    y, p = np.array(data[0]), np.array(data[1])
    if y.sum() == 0:
        return
    lo, hi = sorted((a, b))
    at_lo, at_hi = choose_threshold(y, p, lo, confidence=None), choose_threshold(y, p, hi, confidence=None)
    assert at_hi["threshold"] <= at_lo["threshold"]
    assert at_lo["sensitivity"] >= lo and at_hi["sensitivity"] >= hi
    assert at_hi["sensitivity"] >= at_lo["sensitivity"]
    higher = p[(y == 1) & (p > at_lo["threshold"])]  # the next positive score up misses the target
    assert higher.size == 0 or np.mean(p[y == 1] >= higher.min()) < lo
    # The confidence-bound rule (the default) falls with the target too.
    assert choose_threshold(y, p, hi)["threshold"] <= choose_threshold(y, p, lo)["threshold"]


# ---------------------------------------------------------------------- plots
def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_plots_are_three_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    y, p = sample_set(200, 4)
    paths = write_report_plots(y, p, tmp_path / "plots", "fp32", threshold=0.4)
    assert sorted(paths) == ["pr", "reliability", "roc"]
    for name, path in paths.items():
        assert path.name == f"fp32-{name}.png"
        w, h = png_size(path)
        assert w > 0 and h > 0
    with pytest.raises(DataError):
        write_report_plots(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), tmp_path, "")


def test_evaluation_report_hook(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    y, p = sample_set(120, 6)
    rep = evaluation_report(y, p, 0.45, out_dir=tmp_path, prefix="", n_boot=100)
    assert set(rep["plots"]) == {"roc", "pr", "reliability"}
    assert all(png_size(tmp_path / f"{k}.png")[0] > 0 for k in rep["plots"])
    assert {k: v for k, v in rep.items() if k != "plots"} == classification_report(y, p, 0.45, n_boot=100)
    assert "plots" not in evaluation_report(y, p, 0.45, n_boot=0)
    assert evaluation_report(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), 0.5, out_dir=tmp_path, n_boot=0)["plots"] == {}
