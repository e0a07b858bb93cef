"""Metrics against hand-computed values, plus properties that must hold for any ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automr.eval.metrics import (
    METRIC_NAMES,
    metric_depth,
    ndcg_at,
    per_sample_metrics,
    rank_summary,
    ranking_criterion,
    recall_at,
    target_ranks,
)


def test_ranks_by_hand() -> None:
    recs = np.array(
        [
            [5, 7, 9, -1],  # target 5 at rank 0
            [1, 2, 3, 4],  # target 4 at rank 3
            [1, 2, -1, -1],  # target 9 absent
            [3, 3, 8, 3],  # duplicates: first position counts
            [-1, -1, -1, -1],  # nothing recommended; a -1 target must not match padding
        ]
    )
    targets = np.array([5, 4, 9, 3, -1])
    assert target_ranks(recs, targets).tolist() == [0, 3, -1, 0, -1]


def test_metric_values_by_hand() -> None:
    # ranks: 0 (top), 2, 4 (5th), 7 (8th), 12 (outside top 10), -1 (absent)
    ranks = np.array([0, 2, 4, 7, 12, -1])
    m = per_sample_metrics(ranks)
    assert set(METRIC_NAMES) <= set(m)
    assert m["recall@1"].tolist() == [1, 0, 0, 0, 0, 0]
    assert m["recall@5"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["recall@10"].tolist() == [1, 1, 1, 1, 0, 0]
    assert m["ndcg@5"] == pytest.approx([1.0, 1 / math.log2(4), 1 / math.log2(6), 0, 0, 0])
    assert m["ndcg@10"] == pytest.approx([1.0, 0.5, 1 / math.log2(6), 1 / math.log2(9), 0, 0])
    # Means as reported: recall@10 = 4/6; ndcg@10 = (1 + 0.5 + 0.386853 + 0.315465) / 6
    assert m["recall@10"].mean() == pytest.approx(4 / 6)
    assert m["ndcg@10"].mean() == pytest.approx((1 + 0.5 + 0.3868528 + 0.3154649) / 6, abs=1e-6)


def test_rank_summary_counts_the_hits_behind_each_mean() -> None:
    """Early stopping's record (issue 9 A9): the same ranks as above, with hits@K and the sample count."""
    s = rank_summary(np.array([0, 2, 4, 7, 12, -1]))
    assert (s["hits@1"], s["hits@5"], s["hits@10"], s["samples"]) == (1, 3, 4, 6)
    assert s["ndcg@10"] == pytest.approx((1 + 0.5 + 0.3868528 + 0.3154649) / 6, abs=1e-6) and s["recall@1"] == pytest.approx(1 / 6)
    c = ranking_criterion("ndcg@10", s)
    assert (c.name, c.value, c.samples, c.hits, c.hit_name) == ("ndcg@10", s["ndcg@10"], 6, 4, "hits@10")
    assert ranking_criterion("recall@1", s, label="AutoMR pipeline recall@1").describe() == (
        "valid AutoMR pipeline recall@1 0.1667 from 1 hits@1 of 6 samples"
    )
    empty = rank_summary(np.zeros(0, dtype=np.int64))  # no NaN from an empty validation set
    assert empty["ndcg@10"] == 0.0 and empty["hits@10"] == 0 and empty["samples"] == 0
    assert [metric_depth(m) for m in METRIC_NAMES] == [1, 5, 10, 5, 10]


def test_shapes_checked() -> None:
    with pytest.raises(ValueError):
        target_ranks(np.zeros((3, 2)), np.zeros(4))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-1, max_value=30), min_size=1, max_size=50))
def test_properties(ranks_list: list[int]) -> None:
    ranks = np.array(ranks_list)
    ks = [1, 2, 5, 10, 20]
    for k in ks:
        r, n = recall_at(ranks, k), ndcg_at(ranks, k)
        assert ((r >= 0) & (r <= 1)).all() and ((n >= 0) & (n <= 1)).all()
        assert (n <= r + 1e-12).all()  # one relevant item: ndcg <= hit
    for k1, k2 in zip(ks, ks[1:]):
        assert (recall_at(ranks, k1) <= recall_at(ranks, k2)).all()
        assert (ndcg_at(ranks, k1) <= ndcg_at(ranks, k2) + 1e-12).all()
    assert (ndcg_at(ranks, 1) == recall_at(ranks, 1)).all()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_ranks_agree_with_position(data: st.DataObject) -> None:
    """A target placed at position p of a duplicate-free list is found at rank p."""
    k = data.draw(st.integers(1, 12))
    items = data.draw(st.lists(st.integers(0, 100), min_size=k, max_size=k, unique=True))
    p = data.draw(st.integers(0, k))  # k = absent
    target = items[p] if p < k else 1000
    rank = target_ranks(np.array([items]), np.array([target]))[0]
    assert rank == (p if p < k else -1)
