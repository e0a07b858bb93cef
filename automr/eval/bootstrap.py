"""Percentile bootstrap intervals and paired bootstrap tests over per-sample metric values.

Resampling is vectorised (one index matrix per chunk of replicates) and seeded, so the same
seed gives the same interval. Because the resampled indices depend only on (seed, n), two
methods evaluated on the same samples with the same seed are resampled identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Keep each chunk's index matrix around this many entries (int64: ~32 MB).
_CHUNK_ENTRIES = 4_000_000


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of the rows of `values`.

    values: (n,) or (n, m) -- m metrics resampled with the same indices.
    Returns (n_boot,) or (n_boot, m).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of values")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ENTRIES // n)
    out = np.empty((n_boot, *values.shape[1:]), dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (b, n)
        out[start:stop] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Percentile bootstrap interval of the mean: array [lo, hi] (or (m, 2) for (n, m) input)."""
    means = bootstrap_means(values, n_boot, seed)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return np.stack([lo, hi], axis=-1)


@dataclass(frozen=True)
class PairedResult:
    """Mean difference a - b, its percentile interval, and a two-sided bootstrap p-value."""

    diff: float
    ci95: tuple[float, float]
    p_value: float
    n: int

    def to_dict(self) -> dict[str, object]:
        return {"diff": self.diff, "ci95": list(self.ci95), "p_value": self.p_value, "n": self.n}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> PairedResult:
    """Paired bootstrap test of mean(a) - mean(b) on the same samples.

    The samples are resampled once and both methods read the same resample (the test is on
    the per-sample difference). The p-value tests H0 "no difference" by centring the bootstrap
    distribution of the difference on zero (Efron & Tibshirani 1993, sec. 16.4):
    p = (1 + #{|d* - d| >= |d|}) / (n_boot + 1). Identical methods give p = 1; the smallest
    reportable p is 1 / (n_boot + 1).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two (n,) arrays of the same samples, got {a.shape} and {b.shape}")
    d = a - b  # (n,)
    observed = float(d.mean())
    boot = bootstrap_means(d, n_boot, seed)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    # Tolerance so that floating-point noise in an all-zero difference still counts as "as extreme".
    extreme = np.abs(boot - observed) >= abs(observed) - 1e-12
    p = (1.0 + float(extreme.sum())) / (n_boot + 1.0)
    return PairedResult(diff=observed, ci95=(float(lo), float(hi)), p_value=min(1.0, p), n=int(d.shape[0]))
