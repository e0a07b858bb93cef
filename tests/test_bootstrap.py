"""Bootstrap intervals and paired tests: seeded, sensible on clear and null cases."""

from __future__ import annotations

import numpy as np
import pytest

from automr.eval.bootstrap import bootstrap_ci, bootstrap_means, paired_bootstrap


def test_interval_contains_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(500) < 0.3).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=1000, seed=0)
    assert lo < x.mean() < hi
    # Binomial standard error sqrt(p(1-p)/n) ~ 0.0205: the 95% interval is about +-1.96 of it.
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / 500), rel=0.15)
    assert bootstrap_ci(x, seed=0).tolist() == [lo, hi]
    assert bootstrap_ci(x, seed=1).tolist() != [lo, hi]


def test_multiple_metrics_share_resamples() -> None:
    x = np.random.default_rng(0).random(100)
    both = bootstrap_means(np.stack([x, 2 * x], 1), n_boot=50, seed=3)  # (50, 2)
    assert both.shape == (50, 2)
    np.testing.assert_allclose(both[:, 1], 2 * both[:, 0])
    np.testing.assert_allclose(both[:, 0], bootstrap_means(x, n_boot=50, seed=3))


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import automr.eval.bootstrap as b

    x = np.random.default_rng(0).random(300)
    whole = b.bootstrap_means(x, n_boot=40, seed=5)
    monkeypatch.setattr(b, "_CHUNK_ENTRIES", 1000)  # 3 replicates per chunk
    chunked = b.bootstrap_means(x, n_boot=40, seed=5)
    # Same generator stream, drawn in pieces: identical replicates.
    np.testing.assert_allclose(whole, chunked)


def test_constant_values() -> None:
    assert bootstrap_ci(np.ones(10)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_paired_identical_methods() -> None:
    x = (np.random.default_rng(2).random(200) < 0.4).astype(float)
    res = paired_bootstrap(x, x.copy(), n_boot=500)
    assert res.diff == 0.0 and res.ci95 == (0.0, 0.0) and res.p_value == 1.0 and res.n == 200


def test_paired_clear_difference() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.6).astype(float)
    b = (rng.random(400) < 0.2).astype(float)
    res = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert res.diff == pytest.approx(a.mean() - b.mean())
    assert res.ci95[0] > 0.25 and res.ci95[1] < 0.55
    assert res.p_value == pytest.approx(1 / 1001)  # no resample as extreme: the smallest p
    assert paired_bootstrap(b, a, n_boot=1000).diff == pytest.approx(-res.diff)


def test_paired_no_real_difference_is_not_significant() -> None:
    rng = np.random.default_rng(4)
    a = (rng.random(300) < 0.3).astype(float)
    b = rng.permutation(a)  # same mean, unrelated per sample
    res = paired_bootstrap(a, b, n_boot=1000)
    assert res.diff == 0.0 and res.p_value > 0.5
    assert res.ci95[0] < 0 < res.ci95[1]


def test_paired_rejects_mismatched_samples() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(4))
