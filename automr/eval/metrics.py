"""Full-ranking metrics for single-target next-item samples.

Every sample has exactly one relevant item (its target), so Recall@K equals HitRate@K and the
ideal DCG is 1: NDCG@K = 1 / log2(rank + 2) when the 0-based rank is below K, else 0. Metrics
are computed per sample (not only averaged) so bootstrap intervals and paired tests can reuse
them.
"""

from __future__ import annotations

import numpy as np

from automr.utils.early_stopping import Criterion

KS: tuple[int, ...] = (1, 5, 10)
# The names every method is reported under (metrics.json keys, in this order).
METRIC_NAMES: tuple[str, ...] = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def target_ranks(recs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each target in its row of `recs`, or -1 when it is absent.

    recs: (n, k) item ids, best first, -1 padding. targets: (n,). Returns int64 (n,).
    A duplicated id counts at its first (best) position.
    """
    recs = np.asarray(recs)
    targets = np.asarray(targets)
    if recs.ndim != 2 or targets.shape != (recs.shape[0],):
        raise ValueError(f"expected recs (n, k) and targets (n,), got {recs.shape} and {targets.shape}")
    hit = recs == targets[:, None]  # (n, k)
    # A -1 target never matches padding: padding is not an item.
    hit &= recs >= 0
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1), -1).astype(np.int64)


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-sample Recall@k (= hit@k for one target): 1.0 if 0 <= rank < k."""
    ranks = np.asarray(ranks)
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-sample NDCG@k for one relevant item: 1/log2(rank+2) if 0 <= rank < k, else 0."""
    ranks = np.asarray(ranks)
    inside = (ranks >= 0) & (ranks < k)
    # np.where evaluates both branches: clip so the unused branch never sees log2(<=1).
    return np.where(inside, 1.0 / np.log2(np.clip(ranks, 0, None) + 2.0), 0.0)


def per_sample_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Every reported metric per sample, keyed by METRIC_NAMES (float64 arrays of shape (n,))."""
    out: dict[str, np.ndarray] = {}
    for name in METRIC_NAMES:
        kind, _, k = name.partition("@")
        fn = recall_at if kind == "recall" else ndcg_at
        out[name] = fn(ranks, int(k))
    return out


def max_k() -> int:
    """The depth a ranking must have for every metric to be defined."""
    return max(metric_depth(n) for n in METRIC_NAMES)


def metric_depth(name: str) -> int:
    """The K of a metric name: 'ndcg@10' -> 10."""
    return int(name.partition("@")[2])


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """A validation record of 0-based target ranks: every metric's mean, hits@K per K, the sample count.

    hits@K (targets in the top K) is what a Recall@K or NDCG@K mean rests on; an empty `ranks`
    gives zeros, not NaN.
    """
    per = per_sample_metrics(ranks)
    out = {m: float(per[m].mean()) if len(ranks) else 0.0 for m in METRIC_NAMES}
    out |= {f"hits@{k}": int(per[f"recall@{k}"].sum()) for k in KS}
    out["samples"] = len(ranks)
    return out


def ranking_criterion(name: str, summary: dict[str, float], label: str | None = None) -> Criterion:
    """The early-stopping Criterion of metric `name` in a `rank_summary`: its mean and the hits@K behind it."""
    k = metric_depth(name)
    return Criterion(label or name, summary[name], int(summary["samples"]), int(summary[f"hits@{k}"]), f"hits@{k}")
