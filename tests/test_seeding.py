"""One seeded subset (automr.utils.seeding) behind every stage that samples rows or users."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from automr.memory.annotate import eligible_samples
from automr.memory.build import _select_users, sample_subset
from automr.utils.seeding import select_from, select_subset


def _old_unsalted(n: int, k: int, seed: int) -> np.ndarray:
    """The draw BENCHMARKS and the tests were made with (evaluate's subset before the merge)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


@pytest.mark.parametrize(("n", "k", "seed"), [(10, 3, 0), (1000, 64, 1), (37, 36, 12345)])
def test_select_subset_keeps_its_draw(n: int, k: int, seed: int) -> None:
    rows = select_subset(n, k, seed)
    assert rows.dtype == np.int64 and rows.tolist() == _old_unsalted(n, k, seed).tolist()
    for everything in (None, 0, n, n + 5):
        assert select_subset(n, everything, seed).tolist() == list(range(n))


def test_a_salt_gives_finetunes_independent_draws() -> None:
    old = lambda n, k, seed, salt: np.sort(np.random.default_rng([abs(seed), salt]).choice(n, size=k, replace=False))
    train, valid = select_subset(500, 40, -3, salt=7), select_subset(500, 40, -3, salt=8)
    assert train.tolist() == old(500, 40, -3, 7).tolist() and valid.tolist() == old(500, 40, -3, 8).tolist()
    assert train.tolist() != valid.tolist() != select_subset(500, 40, 3).tolist()


def _samples(n: int, empty_every: int = 0) -> pl.DataFrame:
    """n samples of 7 users; every `empty_every`-th one has an empty memory (0: none)."""
    empty = [empty_every > 0 and u % empty_every == 0 for u in range(n)]
    return pl.DataFrame(
        {"user_id": [u % 7 for u in range(n)], "memory_items": [[] if e else [u, u + 1] for u, e in enumerate(empty)]},
        schema={"user_id": pl.Int64, "memory_items": pl.List(pl.Int64)},
    )


@pytest.mark.parametrize("seed", [0, 4])
def test_evaluate_build_memory_and_annotate_pick_the_same_rows(seed: int) -> None:
    df, n, users = _samples(90), 12, np.arange(7)
    evaluated = select_subset(df.height, n, seed)  # automr evaluate --n-eval 12
    built_rows = sample_subset(df, n, seed)["row"].to_numpy()  # build-memory --max-samples 12
    assert built_rows.tolist() == evaluated.tolist()
    # annotate --max-samples 12 where every sample is eligible: the same rows again
    assert select_from(eligible_samples(df, users), n, seed).tolist() == evaluated.tolist()
    # annotate after build-memory --max-samples 12: only (and all) the built samples with a memory
    df = _samples(90, empty_every=3)
    built = np.isin(np.arange(df.height), built_rows)  # samples that got a query state
    has_memory = df["memory_items"].list.len().to_numpy() > 0
    picked = select_from(eligible_samples(df, users, built), n, seed)
    assert picked.tolist() == [r for r in evaluated.tolist() if has_memory[r]]


def test_annotate_and_user_subsets_keep_their_draws() -> None:
    eligible = np.array([2, 5, 9, 11, 40, 41, 77], dtype=np.int64)
    old = np.sort(np.random.default_rng(3).choice(eligible, size=4, replace=False))  # annotate's select_samples
    assert select_from(eligible, 4, 3).tolist() == old.tolist()
    frames = {"train": pl.DataFrame({"user_id": [30, 10, 20, 50, 40, 10]}), "valid": pl.DataFrame({"user_id": [60]})}
    users = [10, 20, 30, 40, 50, 60]
    old_users = sorted(np.asarray(users)[np.random.default_rng(5).choice(6, 3, replace=False)].tolist())
    assert _select_users(frames, 3, 5) == old_users and _select_users(frames, None, 5) == users
