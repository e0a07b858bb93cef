"""Seeded choices shared by every stage, so the same seed picks the same rows everywhere."""

from __future__ import annotations

import numpy as np


def select_subset(n_total: int, n_eval: int, seed: int) -> np.ndarray:
    """Sorted row indices of the evaluated samples: all rows, or a seeded subset of n_eval."""
    if n_eval <= 0 or n_eval >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n_eval, replace=False)).astype(np.int64)


