"""Annotation label math and statistics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from automr.errors import UserError
from automr.memory import labels as L


def softmax_by_hand(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_prob_diff_labels_at_visible_scale():
    # P(y|z_t) = 0.2; with the elements 0.5, 0.1, 0.2 -> delta = 0.3, -0.1, 0.0
    le, lc = math.log(0.2), [math.log(0.5), math.log(0.1), math.log(0.2)]
    np.testing.assert_allclose(L.prob_diff(le, lc), [0.3, -0.1, 0.0], atol=1e-15)
    np.testing.assert_allclose(L.prob_diff_labels(le, lc), softmax_by_hand([0.3, -0.1, 0.0]), rtol=1e-12)


def test_prob_diff_labels_are_uniform_but_ordered_at_real_scale():
    """At log P ~ -25 the labels are 1/M to ~1e-11: faithful, and still ordered by the gain."""
    le = -25.0
    g = np.array([2.0, 0.5, -1.0])
    lab = L.prob_diff_labels(le, le + g)
    delta = [math.exp(le) * math.expm1(x) for x in g]  # ~1e-10
    np.testing.assert_allclose(lab, softmax_by_hand(delta), rtol=0, atol=1e-16)
    assert abs(lab.max() - 1 / 3) < 1e-10
    assert lab[0] > lab[1] > lab[2]  # float64 keeps the order that float32 would erase
    assert lab.dtype == np.float64


def test_prob_diff_is_precise_where_probabilities_cancel_and_survives_underflow():
    le = -30.0
    lc = np.array([-30.0 + 1e-9])
    exact = math.exp(-30.0) * math.expm1(1e-9)  # ~9.4e-23; the naive difference loses most digits
    assert L.prob_diff(le, lc)[0] == pytest.approx(exact, rel=1e-9)
    # exp(-800) underflows to 0: delta falls back to the direct difference (finite, ordered)
    d = L.prob_diff(-800.0, np.array([-10.0, -900.0]))
    assert d[0] == pytest.approx(math.exp(-10.0)) and d[1] == 0.0
    lab = L.prob_diff_labels(-800.0, np.array([-10.0, -900.0]))
    assert np.isfinite(lab).all() and lab.sum() == pytest.approx(1.0) and lab[0] > lab[1]


def test_gain_labels_with_temperature():
    le, lc = -24.5, [-22.5, -24.0, -25.5]  # gains 2.0, 0.5, -1.0
    np.testing.assert_allclose(L.gains(le, lc), [2.0, 0.5, -1.0])
    np.testing.assert_allclose(L.gain_labels(le, lc), softmax_by_hand([2.0, 0.5, -1.0]), rtol=1e-12)
    np.testing.assert_allclose(L.gain_labels(le, lc, temperature=0.5), softmax_by_hand([4.0, 1.0, -2.0]), rtol=1e-12)
    np.testing.assert_allclose(L.make_labels("loglik_gain", le, lc, 2.0), softmax_by_hand([1.0, 0.25, -0.5]), rtol=1e-12)
    with pytest.raises(UserError, match="temperature must be > 0"):
        L.gain_labels(le, lc, temperature=0.0)
    with pytest.raises(UserError, match="unknown label_type"):
        L.make_labels("nope", le, lc)


def test_batched_and_masked_labels_match_per_sample():
    le = np.array([-20.0, -30.0])
    lc = np.array([[-19.0, -21.0, -20.5], [-29.0, -31.0, 0.0]])  # second row: last entry is padding
    mask = np.array([[True, True, True], [True, True, False]])
    for kind in L.LABEL_TYPES:
        got = L.make_labels(kind, le, lc, 0.7, mask=mask)
        np.testing.assert_allclose(got[0], L.make_labels(kind, le[0], lc[0], 0.7), rtol=1e-12)
        np.testing.assert_allclose(got[1, :2], L.make_labels(kind, le[1], lc[1, :2], 0.7), rtol=1e-12)
        assert got[1, 2] == 0.0
    with pytest.raises(UserError, match="at least one memory element"):
        L.gain_labels(le, lc, mask=np.zeros_like(mask))


def test_headroom_share_by_hand():
    gains = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.0, 3.0])]
    # sample 1 picks the best (2 - 1 of headroom 1), sample 2 picks a 0 (0 - 1 of headroom 2)
    chosen = L.chosen_gains(gains, [2, 0])
    assert chosen.tolist() == [2.0, 0.0]
    assert L.headroom_share(chosen, gains) == pytest.approx((1 - 1) / (1 + 2))
    assert L.headroom_share(chosen, gains, reduction="mean_of_ratios") == pytest.approx((1.0 - 0.5) / 2)
    assert L.headroom_share([2.0, 3.0], gains) == pytest.approx(1.0)  # the oracle
    assert L.headroom_share([1.0, 1.0], gains) == pytest.approx(0.0)  # exactly the random expectation
    # shift-invariant per sample: log-probabilities work as well as gains
    assert L.headroom_share([2.0 - 25, 0.0 - 30], [g - 25 for g in gains[:1]] + [gains[1] - 30]) == pytest.approx(0.0)
    # a sample without headroom is skipped by mean_of_ratios and adds nothing to ratio_of_means
    flat = gains + [np.array([1.0, 1.0])]
    assert L.headroom_share([2.0, 0.0, 1.0], flat) == pytest.approx(0.0)
    assert L.headroom_share([2.0, 0.0, 1.0], flat, reduction="mean_of_ratios") == pytest.approx(0.25)
    with pytest.raises(UserError, match="exceeds the best gain"):
        L.headroom_share([5.0, 0.0], gains)


def test_label_statistics_by_hand():
    le = [-24.0, -20.0]
    lc = [np.array([-22.0, -24.0, -25.0, -25.0]), np.array([-19.0, -21.0])]
    st = L.label_statistics(le, lc, temperature=1.0)
    # gains: [2, 0, -1, -1] and [1, -1]
    assert st.n_samples == 2 and st.mean_m == 3.0
    assert st.mean_logp_empty == -22.0
    assert st.best_gain == pytest.approx((2 + 1) / 2)
    assert st.random_gain == pytest.approx((0.0 + 0.0) / 2)
    assert st.headroom == pytest.approx(1.5)
    assert st.uniform_prob == pytest.approx((1 / 4 + 1 / 2) / 2)
    p1, p2 = softmax_by_hand([2, 0, -1, -1]), softmax_by_hand([1, -1])
    assert st.max_prob_loglik_gain == pytest.approx((p1[0] + p2[0]) / 2)
    assert st.peak_ratio_loglik_gain == pytest.approx((4 * p1[0] + 2 * p2[0]) / 2)
    ent = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert st.entropy_ratio_loglik_gain == pytest.approx((ent(p1) / math.log(4) + ent(p2) / math.log(2)) / 2)
    # prob_diff labels at these scales are uniform to ~1e-9
    assert st.peak_ratio_prob_diff == pytest.approx(1.0, abs=1e-6)
    assert st.entropy_ratio_prob_diff == pytest.approx(1.0, abs=1e-9)
    assert set(st.as_dict()) >= {"headroom", "max_prob_prob_diff"}
