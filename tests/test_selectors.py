"""Memory selectors: random is a per-sample hash (batch-independent), most-recent is the last index."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from automr.data.schema import SAMPLE_SCHEMA
from automr.methods.selectors import (
    MemorySelector,
    MostRecentSelector,
    RandomSelector,
    selected_ages,
    selected_items_and_times,
)


def make_samples(n: int = 200, seed: int = 0) -> pl.DataFrame:
    """n samples over 20 users; memory lengths 0..30 (some empty)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n):
        m = int(rng.integers(0, 31)) if s % 7 else 0
        t0 = 1_000_000 + 1000 * s
        rows.append(
            {
                "user_id": s % 20,
                "target_item": 999,
                "target_time": t0 + 500,
                "recent_items": [1, 2],
                "recent_times": [t0 + 100, t0 + 200],
                "memory_items": [100 + j for j in range(m)],
                "memory_times": [t0 - 10 * (m - j) for j in range(m)],
            }
        )
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


def test_random_in_range_none_on_empty_and_protocol() -> None:
    samples = make_samples()
    sel = RandomSelector(seed=3)
    assert isinstance(sel, MemorySelector)
    idx = sel.select(samples)
    lens = samples["memory_items"].list.len().to_list()
    assert len(idx) == samples.height
    for i, m in zip(idx, lens):
        if m == 0:
            assert i is None
        else:
            assert isinstance(i, int) and 0 <= i < m
    # it really is spread out, not a constant index
    long = [i for i, m in zip(idx, lens) if m >= 20]
    assert len(set(long)) > 5


def test_random_deterministic_and_batch_independent() -> None:
    samples = make_samples()
    a = RandomSelector(seed=3).select(samples)
    assert RandomSelector(seed=3).select(samples) == a
    # shuffled rows and single-row batches give each sample the same element
    perm = np.random.default_rng(1).permutation(samples.height)
    shuffled = RandomSelector(seed=3).select(samples[perm.tolist()])
    assert [shuffled[int(np.where(perm == r)[0][0])] for r in range(samples.height)] == a
    singles = [RandomSelector(seed=3).select(samples[r : r + 1])[0] for r in range(0, samples.height, 17)]
    assert singles == a[::17]
    # another seed changes the draws
    b = RandomSelector(seed=4).select(samples)
    assert sum(x != y for x, y in zip(a, b) if x is not None) > samples.height // 3


def test_random_roughly_uniform() -> None:
    m = 10
    rows = [
        {"user_id": u, "target_item": 0, "target_time": 10_000 + u, "recent_items": [1], "recent_times": [1],
         "memory_items": list(range(m)), "memory_times": list(range(m))}
        for u in range(5000)
    ]
    counts = np.bincount(RandomSelector(seed=0).select(pl.DataFrame(rows, schema=SAMPLE_SCHEMA)), minlength=m)
    assert counts.min() > 400 and counts.max() < 600  # expected 500 each


def test_most_recent_picks_last() -> None:
    samples = make_samples()
    idx = MostRecentSelector().select(samples)
    for i, m in zip(idx, samples["memory_items"].list.len().to_list()):
        assert i == (m - 1 if m else None)


def test_selected_items_times_and_ages() -> None:
    samples = pl.DataFrame(
        [
            {"user_id": 1, "target_item": 9, "target_time": 100, "recent_items": [5], "recent_times": [90],
             "memory_items": [7, 8], "memory_times": [10, 40]},
            {"user_id": 2, "target_item": 9, "target_time": 100, "recent_items": [5], "recent_times": [90],
             "memory_items": [], "memory_times": []},
        ],
        schema=SAMPLE_SCHEMA,
    )
    items, times = selected_items_and_times(samples, [0, None])
    assert items == [7, None] and times == [10, None]
    items, times = selected_items_and_times(samples, MostRecentSelector().select(samples))
    assert items == [8, None] and times == [40, None]
    ages = selected_ages(samples, [1, None])
    assert ages[0] == 60 and np.isnan(ages[1])
    with pytest.raises(ValueError, match="outside its memory"):
        selected_items_and_times(samples, [2, None])
    with pytest.raises(ValueError, match="indices for 2 samples"):
        selected_items_and_times(samples, [0])
