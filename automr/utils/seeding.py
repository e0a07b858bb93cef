"""Seeded choices shared by every stage, so the same seed picks the same rows everywhere.

`select_subset` is the one seeded subset of automr. `evaluate --n-eval N`, `build-memory
--max-samples N` (samples and users), `annotate --max-samples N`, SASRec's validation subset
and the retriever's pipeline-metric subset (--recall-n) call it unsalted, so with one seed they agree on the rows;
fine-tuning salts it (one salt per split) so its training and validation draws are independent.
"""

from __future__ import annotations

import numpy as np


def select_subset(n_total: int, n: int | None, seed: int, *, salt: int | None = None) -> np.ndarray:
    """Sorted indices (int64) of a seeded random subset of n of range(n_total); all of them when n
    is None, <= 0 or >= n_total.

    Unsalted, the generator is default_rng(seed) (the draws of BENCHMARKS and the tests); with a
    salt it is default_rng([|seed|, salt]), an independent stream per salt.
    """
    if n is None or n <= 0 or n >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed if salt is None else [abs(seed), salt])
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def select_from(values: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """`select_subset` applied to an array: its entries at the chosen (sorted) positions.

    Picking n of k sorted eligible rows this way equals choosing among range(k), so when every
    row is eligible it is exactly `select_subset(k, n, seed)`.
    """
    values = np.asarray(values)
    return values[select_subset(len(values), n, seed)]
