"""`automr headroom`: the share of the oracle headroom each retrieval method captures (DESIGN.md).

On annotated samples (held-out test samples by default) every memory element's gain
g_m = log P(y | z_t, z_m) - log P(y | z_t) is known, so a retrieval method can be judged without
decoding: per sample it picks one element, and

    share = sum_i (g_i[chosen_i] - mean_m g_i[m]) / sum_i (max_m g_i[m] - mean_m g_i[m])

(automr.memory.labels.headroom_share): 1 = always the best element (the oracle), 0 = no better
than a random element (its expectation), negative = worse than random. It is the most direct
measure of a retriever: the nats it gains over random retrieval, as a share of what a perfect
retriever would gain. Methods: automr (the trained retriever on the stored query z_t and the
memory keys), random (the seeded draw the `random` method makes; its expectation is 0), recent
(the newest element), oldest, rella (the element whose title is most similar to the recent
titles). Intervals: 95% percentile bootstrap over samples.

Which samples. A share measured on the validation annotations that chose the retriever's epoch is
in-sample (early stopping kept the epoch where it was highest), so every table names its split
(`split_label`): held-out numbers come from the test split, and validation numbers the retriever
early-stopped on say "seen by early stopping".

Outputs: headroom.json, headroom.md and config.yaml in `out`.
"""

from __future__ import annotations

from typing import Any

HEADROOM_METHODS = ("automr", "random", "recent", "oldest", "rella")
SEEN_BY_EARLY_STOPPING = "seen by early stopping"


def split_label(split: str, seen_by_early_stopping: bool) -> str:
    """How a table names the samples a share was measured on, e.g. "test (held out)" or
    "valid (seen by early stopping)": readers must not take an in-sample share for a held-out one."""
    if seen_by_early_stopping:
        return f"{split} ({SEEN_BY_EARLY_STOPPING})"
    return {"test": "test (held out)", "valid": "valid (not seen by early stopping)"}.get(split, split)


def share_with_interval(chosen: Any, gains: list[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Headroom share (ratio of sums) with a 95% percentile bootstrap interval over samples.

    chosen[i]: gain of the element the method chose for sample i; gains[i]: all its elements' gains.
    Also returns the mean chosen gain (nats over the empty slot), the per-sample share averaged
    over samples with headroom ("mean_of_ratios") and how often the choice is the best element.
    """
    import numpy as np

    from automr.memory import labels as L

    c = np.asarray(chosen, np.float64)
    mean = np.array([np.mean(g) for g in gains])
    best = np.array([np.max(g) for g in gains])
    num, den = c - mean, best - mean
    rng = np.random.default_rng(seed)
    n = len(c)
    boots = np.empty(n_boot)
    step = max(1, 2_000_000 // max(n, 1))
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))
        d = den[idx].sum(1)
        boots[s : s + len(idx)] = np.where(d > 0, num[idx].sum(1) / np.where(d > 0, d, 1.0), np.nan)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (float("nan"), float("nan"))
    return {
        "share": L.headroom_share(c, gains),
        "ci95": [float(lo), float(hi)],
        "share_mean_of_ratios": L.headroom_share(c, gains, reduction="mean_of_ratios"),
        "chosen_gain": float(c.mean()),
        "picks_best": float(np.mean(c >= best - 1e-9)),
        "n": int(n),
    }


