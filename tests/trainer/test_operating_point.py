"""The classifier's operating threshold: the Clopper-Pearson bound and the two threshold rules."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ConfigError, DataError
from trainer.operating_point import (
    BOUND_METHOD,
    DEFAULT_THRESHOLD_CONFIDENCE,
    check_confidence,
    choose_threshold,
    sensitivity_lower_bound,
)

PROPERTY = settings(
    max_examples=1000 if os.environ.get("MEDGE_HYPOTHESIS_PROFILE") == "release" else 60, deadline=None
)


def exact_tail(k: int, n: int, p: Fraction) -> Fraction:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` in exact rational arithmetic (the reference)."""
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)), Fraction(0))


def scores(n_pos: int, n_neg: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct scores: positives mostly above negatives."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    p = np.r_[rng.uniform(0.2, 1.0, n_pos), rng.uniform(0.0, 0.6, n_neg)]
    return y, p


# ----------------------------------------------------------------- the bound
def test_bound_all_positives_called_is_alpha_to_the_one_over_n() -> None:
    # 90 of 90: P(X >= 90 | L) = L ** 90 = 0.05, so L = 0.05 ** (1 / 90) = 0.96726...
    assert sensitivity_lower_bound(90, 90, 0.95) == pytest.approx(0.05 ** (1 / 90), abs=1e-12)
    assert sensitivity_lower_bound(90, 90, 0.95) == pytest.approx(0.967262, abs=1e-6)
    assert sensitivity_lower_bound(0, 90, 0.95) == 0.0


def test_bound_86_of_90_solves_the_binomial_tail_exactly() -> None:
    lb = sensitivity_lower_bound(86, 90, 0.95)
    assert lb == pytest.approx(0.901179, abs=1e-6)  # below the point estimate 0.956, above 0.90
    # The defining equation, in exact arithmetic: the tail crosses 0.05 between lb -/+ 1e-9.
    below, above = Fraction(lb) - Fraction(1, 10**9), Fraction(lb) + Fraction(1, 10**9)
    assert exact_tail(86, 90, below) < Fraction(1, 20) < exact_tail(86, 90, above)
    # 85 of 90 is not enough for a claim of 0.90 at 95 %: 86 is the least count that is.
    assert sensitivity_lower_bound(85, 90, 0.95) < 0.90 <= lb


def test_bound_one_of_one_and_higher_confidence_is_lower() -> None:
    assert sensitivity_lower_bound(1, 1, 0.95) == pytest.approx(0.05)
    assert sensitivity_lower_bound(50, 60, 0.99) < sensitivity_lower_bound(50, 60, 0.95) < 50 / 60


@pytest.mark.parametrize("k, n, confidence, expected", [
    (9, 10, 0.05, 0.963229), (9, 10, 0.2, 0.916740), (50, 60, 0.3, 0.847867),
])
def test_bound_at_low_confidence_may_exceed_the_point_estimate(k: int, n: int, confidence: float,
                                                              expected: float) -> None:
    """Below ~0.5 confidence the bound is above k / n (the bisection must not stop at k / n)."""
    lb = sensitivity_lower_bound(k, n, confidence)
    assert lb == pytest.approx(expected, abs=2e-6)  # scipy.special.betaincinv(k, n - k + 1, 1 - confidence)
    tail = sum(math.comb(n, i) * lb**i * (1 - lb) ** (n - i) for i in range(k, n + 1))
    assert tail == pytest.approx(1.0 - confidence, rel=1e-6)


@PROPERTY
@given(n=st.integers(1, 120), data=st.data(), confidence=st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99]))
def test_bound_is_the_root_of_the_tail_and_grows_with_the_count(n: int, data: st.DataObject,
                                                              confidence: float) -> None:
    k = data.draw(st.integers(1, n))
    lb = sensitivity_lower_bound(k, n, confidence)
    assert 0.0 < lb < k / n or (k == n and lb < 1.0)
    alpha = 1.0 - confidence
    tail = sum(math.comb(n, i) * lb**i * (1 - lb) ** (n - i) for i in range(k, n + 1))
    assert tail == pytest.approx(alpha, rel=1e-6)
    if k > 1:
        assert sensitivity_lower_bound(k - 1, n, confidence) < lb


@pytest.mark.parametrize("args, error", [
    ((5, 4, 0.95), DataError), ((-1, 4, 0.95), DataError), ((1, 0, 0.95), DataError),
    ((1.0, 4, 0.95), DataError), ((1, 4, 1.0), ConfigError), ((1, 4, 0.0), ConfigError),
    ((1, 4, None), ConfigError), ((1, 4, float("nan")), ConfigError),
])
def test_bound_refuses_bad_input(args: tuple, error: type) -> None:
    with pytest.raises(error):
        sensitivity_lower_bound(*args)


@pytest.mark.parametrize("value, expected", [(None, None), (0, None), (0.0, None), (0.95, 0.95), (0.5, 0.5)])
def test_check_confidence(value: object, expected: object) -> None:
    assert check_confidence(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan"), True, "0.95"])
def test_check_confidence_refuses(value: object) -> None:
    with pytest.raises(ConfigError):
        check_confidence(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [0.0, 1.5, -0.1, float("nan"), True, "0.9", None])
def test_choose_threshold_refuses_a_target_that_is_not_a_proportion(target: object) -> None:
    y, p = scores(10, 40)
    with pytest.raises(ConfigError):
        choose_threshold(y, p, target)  # type: ignore[arg-type]


# ------------------------------------------------------------- the threshold
def test_ninety_positives_at_095_need_86_called() -> None:
    y, p = scores(90, 510)
    point = choose_threshold(y, p, 0.90, confidence=None)
    bound = choose_threshold(y, p, 0.90, confidence=0.95)
    pos = np.sort(p[y == 1])[::-1]
    assert point["threshold"] == pos[80] and point["sensitivity"] == 81 / 90  # ceil(0.9 * 90) = 81
    assert bound["threshold"] == pos[85] and bound["sensitivity"] == 86 / 90
    assert bound["method"] == BOUND_METHOD and bound["confidence"] == 0.95 and bound["target_met"]
    assert bound["sensitivity_lower_bound"] == pytest.approx(0.901179, abs=1e-6)
    assert bound["specificity"] <= point["specificity"]
    assert DEFAULT_THRESHOLD_CONFIDENCE == 0.95 and choose_threshold(y, p, 0.90) == bound


def test_too_few_positives_call_them_all_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    y, p = scores(6, 30)
    got = choose_threshold(y, p, 0.90, confidence=0.95)  # 6 of 6 bound: 0.05 ** (1 / 6) = 0.607
    assert got["threshold"] == p[y == 1].min() and got["sensitivity"] == 1.0
    assert not got["target_met"] and got["sensitivity_lower_bound"] == pytest.approx(0.05 ** (1 / 6))
    assert "cannot support" in caplog.text


@PROPERTY
@given(n_pos=st.integers(1, 150), n_neg=st.integers(0, 50), seed=st.integers(0, 2**16),
       target=st.floats(0.05, 1.0), confidence=st.sampled_from([0.5, 0.9, 0.95, 0.99]),
       ties=st.booleans())
def test_bound_rule_is_never_above_the_point_rule(n_pos: int, n_neg: int, seed: int, target: float,
                                                   confidence: float, ties: bool) -> None:
    y, p = scores(n_pos, n_neg, seed)
    if ties:  # coarse scores: runs of equal positive scores
        p = np.round(p, 1)
    point = choose_threshold(y, p, target, confidence=None)
    bound = choose_threshold(y, p, target, confidence=confidence)
    assert bound["threshold"] <= point["threshold"]
    assert bound["sensitivity"] >= point["sensitivity"] >= target - 1e-12
    assert choose_threshold(y, p, target, confidence=0) == point  # 0 is the point rule, exactly
    if bound["target_met"]:
        assert bound["sensitivity_lower_bound"] >= target
        higher = np.unique(p[(y == 1) & (p > bound["threshold"])])
        if higher.size:  # the next higher candidate no longer carries the claim
            hits = int(np.count_nonzero(p[y == 1] >= higher.min()))
            assert sensitivity_lower_bound(hits, n_pos, confidence) < target
    else:
        assert bound["threshold"] == p[y == 1].min()
