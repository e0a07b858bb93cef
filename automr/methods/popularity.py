"""Most-popular baseline: rank every item by how often it was interacted with before evaluation.

Counts are distinct interactions (user, item, time), gathered from
  - every training sample: its target and its history (recent + memory), and
  - the histories of validation and test samples, but only interactions strictly before the
    start of the validation period (the earliest validation target time),
so nothing at or after the validation period is ever counted, and an interaction that
appears in the histories of many samples of the same user counts once.

Ranking: count descending, ties by item id ascending; items never seen rank last (by id), so
the ranking covers the whole catalogue and is deterministic.

Dropping items the user already has ("popular and unseen") is the evaluator's `exclude_history`,
applied to every method alike; the old `exclude_history` option here only accepts false.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import Field, field_validator

from automr.config import StageConfig, build_config
from automr.data.schema import PreparedData
from automr.methods.base import Recommender, refuse_method_exclusion
from automr.utils.io import write_json

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.title_trie import TitleTrie
    from automr.llm.trie_prior import TriePrior


class PopularityOptions(StageConfig):
    exclude_history: bool = Field(False, description="moved to `automr evaluate --exclude-history` (only false is accepted)")

    _moved = field_validator("exclude_history")(refuse_method_exclusion)


def _interactions(df: pl.DataFrame, *, with_target: bool) -> pl.DataFrame:
    """(user_id, item_id, time) rows of a samples frame's histories (and targets)."""
    parts = [
        df.select(
            "user_id",
            pl.col(f"{kind}_items").alias("item_id"),
            pl.col(f"{kind}_times").alias("time"),
        ).explode(["item_id", "time"])
        for kind in ("recent", "memory")
    ]
    if with_target:
        parts.append(df.select("user_id", pl.col("target_item").alias("item_id"), pl.col("target_time").alias("time")))
    return pl.concat(parts).drop_nulls()


def popularity_counts(data: PreparedData) -> pl.DataFrame:
    """item_id, count for every catalogue item (0 for unseen), in ranking order."""
    train = data.split("train")
    valid = data.split("valid")
    test = data.split("test")
    if valid.height:
        cutoff = valid["target_time"].min()
    elif test.height:
        cutoff = test["target_time"].min()
    else:
        cutoff = None
    parts = [_interactions(train, with_target=True)]
    if cutoff is not None:
        for df in (valid, test):
            parts.append(_interactions(df, with_target=False).filter(pl.col("time") < cutoff))
    inter = pl.concat(parts).unique()
    counts = inter.group_by("item_id").len("count")
    return (
        data.items.select("item_id")
        .join(counts, on="item_id", how="left")
        .with_columns(pl.col("count").fill_null(0).cast(pl.Int64))
        .sort(["count", "item_id"], descending=[True, False])
    )


def popularity_trie_prior(data: PreparedData, trie: TitleTrie, weight: float = 1.0) -> TriePrior:
    """`weight` x the popularity prior over the title tree from this baseline's counts: the one home of the
    counts that `finetune --answer-prior` trains with and decoding's `popularity_prior` adds, so the two agree."""
    from automr.llm.trie_prior import TriePrior, popularity_prior

    prior = TriePrior.combine([(weight, popularity_prior(trie, dict(popularity_counts(data).iter_rows())))])
    assert prior is not None, "weight 0 asks for no prior"
    return prior


class PopularityRecommender(Recommender):
    """Ranks the catalogue by interaction count before the validation period."""

    name = "popularity"

    def __init__(self, options: PopularityOptions) -> None:
        self.options = options
        self.order: np.ndarray | None = None  # (n_items,) item ids, most popular first
        self.counts: dict[int, int] = {}

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        counts = popularity_counts(data)
        self.order = counts["item_id"].to_numpy().astype(np.int64)
        self.counts = dict(zip(counts["item_id"].to_list(), counts["count"].to_list()))  # the server's scores
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        counts.write_parquet(work_dir / "popularity.parquet")
        write_json(work_dir / "options.json", self.options.model_dump())

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        if self.order is None:
            raise RuntimeError("PopularityRecommender.recommend called before fit")
        out = np.full((samples.height, k), -1, dtype=np.int64)
        top = self.order[:k]
        out[:, : len(top)] = top
        return out


def make(options: dict[str, Any], seed: int) -> PopularityRecommender:
    """Factory for the METHODS registry (popularity is deterministic; `seed` is unused)."""
    return PopularityRecommender(build_config(PopularityOptions, options, source="popularity options"))
