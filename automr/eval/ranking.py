"""What the evaluator asks of every method, and the one history exclusion applied to all of them.

Every method ranks the catalogue (issue 9 A1): asked for `depth` items it must return `depth`
distinct catalogue items per sample, best first, or the evaluator refuses it with a UserError
naming it. Methods that produce only a few items themselves (constrained beam search) rank the
rest of the catalogue after them, so Recall@K and NDCG@K are never capped by the method's width.

Excluding the user's history (issue 9 A2) is a setting of the evaluator, never of a method: the
evaluator asks every method for k + (the longest history) items, drops each sample's recent +
memory items from the ranking, and keeps the first k. `auto` decides from the training split's
repeat rate (the share of targets already in their history, reported by `prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from automr.data.schema import PreparedData, histories
from automr.data.tally import repeated_targets
from automr.errors import UserError
from automr.utils.io import read_json

ExcludeHistory = bool | Literal["auto"]

# `auto` excludes the history when at most this share of training targets repeat an item of their
# history. Excluding makes exactly those targets unreachable, so it costs every method at most this
# much Recall@K / NDCG@K, while a method that spends its top K on seen items can lose far more
# (18 to 29% of the LLM methods' top 10 on MovieLens, where no target repeats).
AUTO_MAX_REPEAT_RATE = 0.01


@dataclass(frozen=True)
class RankingSpec:
    """The ranking every method is asked for, and what the evaluator keeps of it."""

    k: int  # items kept per sample (the saved ranking; >= the deepest metric)
    depth: int  # items asked of each method: k, plus the longest history when excluding; at most the catalogue
    exclude_history: bool
    catalogue: np.ndarray  # (n_items,) sorted item ids: what a ranking may hold
    longest: int = 0  # the longest history among the samples (when excluding)

    @classmethod
    def for_samples(cls, data: PreparedData, samples: pl.DataFrame, k: int, exclude_history: bool) -> RankingSpec:
        """The spec for ranking `samples`: deep enough that k items are left after removing any history."""
        catalogue = np.unique(data.items["item_id"].to_numpy().astype(np.int64))
        longest = max((len(h) for h in histories(samples)), default=0) if exclude_history else 0
        return cls(k, min(len(catalogue), k + longest), exclude_history, catalogue, longest)

    def describe(self) -> str:
        """Why `depth` items are asked for (error messages)."""
        extra = f", plus the longest history ({self.longest}) that exclude_history removes" if self.exclude_history else ""
        why = f"k={self.k} (the saved ranking, >= the deepest metric){extra}"
        if self.depth < self.k + self.longest:
            return f"the whole catalogue ({self.depth} items; {why} would be more)"
        return why


def check_ranking(name: str, got: np.ndarray, samples: pl.DataFrame, spec: RankingSpec) -> None:
    """Refuse a ranking that is not `spec.depth` distinct catalogue items per sample (UserError naming the method)."""
    need = (samples.height, spec.depth)
    how = (f"Every method must rank at least {spec.depth} distinct catalogue items per sample, best first: "
           f"{spec.describe()}. A method that produces fewer items itself must rank the rest of the catalogue "
           "after them (constrained decoding: its beams, then the other items by grounding distance).")
    if got.shape != need:
        raise UserError(f"method {name!r} returned rankings of shape {got.shape} for {samples.height} samples; "
                        f"expected {need}. {how}")
    bad = ~np.isin(got, spec.catalogue)
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        what = "-1 padding" if got[row, col] == -1 else f"item {got[row, col]}, which is not in items.parquet"
        raise UserError(f"method {name!r} ranked {what} at position {col + 1} for user {samples['user_id'][row]} "
                        f"({int(bad.any(axis=1).sum())} of {samples.height} samples affected). {how}")
    ordered = np.sort(got, axis=1)
    dup = ordered[:, 1:] == ordered[:, :-1]
    if dup.any():
        row, col = (int(x) for x in np.argwhere(dup)[0])
        raise UserError(f"method {name!r} ranked item {ordered[row, col]} more than once for user "
                        f"{samples['user_id'][row]}. {how}")


def keep_ranking(got: np.ndarray, samples: pl.DataFrame, spec: RankingSpec) -> tuple[np.ndarray, int]:
    """(n, k) rankings the metrics see, and how many of the method's own top-k items were already seen.

    With exclude_history each row loses its sample's history items before the first k are kept;
    -1 fills a row only where the catalogue minus the history has fewer than k items.
    """
    out = np.full((samples.height, spec.k), -1, dtype=np.int64)
    top = min(spec.k, got.shape[1])
    seen_in_top = 0
    for i, hist in enumerate(histories(samples)):
        row = got[i]
        seen = np.isin(row, np.asarray(hist, dtype=np.int64)) if hist else np.zeros(row.shape, dtype=bool)
        seen_in_top += int(seen[:top].sum())
        kept = row[~seen][: spec.k] if spec.exclude_history else row[:top]
        out[i, : len(kept)] = kept
    return out, seen_in_top


def top1_in_history(got: np.ndarray, samples: pl.DataFrame) -> np.ndarray:
    """(n,) bool: whether each method's own first item (before any exclusion) repeats the sample's history."""
    return np.array([bool(h) and int(row[0]) in set(h) for row, h in zip(got, histories(samples))], dtype=bool)


def resolve_exclude_history(setting: ExcludeHistory, data: PreparedData) -> tuple[bool, str]:
    """`exclude_history` as a bool, and a sentence saying how it was chosen (printed, saved in eval.json).

    auto reads the *training* split's repeat rate, so the evaluated split's targets never choose the
    protocol it is measured by.
    """
    if isinstance(setting, bool):
        return setting, f"exclude_history={str(setting).lower()} (set in the config)"
    rate, source = train_repeat_rate(data)
    exclude = rate <= AUTO_MAX_REPEAT_RATE
    verdict = "every method's ranking drops the sample's history" if exclude else "rankings keep the history"
    return exclude, (
        f"exclude_history=auto: {rate:.2%} of training targets are already in their history ({source}); "
        f"{'at most' if exclude else 'above'} {AUTO_MAX_REPEAT_RATE:.0%}, so {verdict}. "
        "Set --exclude-history true/false to override."
    )


def train_repeat_rate(data: PreparedData) -> tuple[float, str]:
    """The training split's repeat rate from stats.json, or counted from the samples where it is not there."""
    stats_path = Path(data.root) / "stats.json"
    if stats_path.is_file():
        rate = (read_json(stats_path).get("repeat_rate") or {}).get("train")
        if rate is not None:
            return float(rate), f"{stats_path}"
    train = data.split("train")
    if train.height == 0:
        raise UserError(
            f"exclude_history=auto needs training samples to measure the repeat rate, and {data.root} has none; "
            "set exclude_history to true or false"
        )
    return repeated_targets(train) / train.height, f"counted from {data.root}/samples/train.parquet"
