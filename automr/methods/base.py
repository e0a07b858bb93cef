"""One interface for every recommender, so one evaluator judges them all (RecBole-style).

A method is fitted on a prepared data folder and then ranks the full catalogue for a batch of
samples. It returns the top-k item ids per sample, best first; evaluation never samples
negatives. Asked for k items, a method returns k distinct catalogue items (fewer, or -1 padding,
only where the catalogue itself is smaller than k): the evaluator refuses anything shorter
(automr/eval/ranking.py). A method that produces only a few items itself (constrained beam search)
ranks the rest of the catalogue after them. Removing the user's history is the evaluator's job
(`automr evaluate --exclude-history`), done alike for every method, so no method filters its output;
the evaluator tells each method it will (`ranking_excludes_history`), so that a method that can only
rank a few items itself (beams) does not spend them on items that will be removed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from automr.data.schema import PreparedData


class Recommender(ABC):
    """Base class of every method (popularity, SASRec, BIGRec, AutoMR, retrieval baselines)."""

    name: str = "recommender"
    ranking_excludes_history: bool = False
    """Set by the evaluator (and the serving API) before `recommend`: each sample's history (recent +
    memory items) will be removed from the ranking, so a method may spend no effort on those items
    (constrained decoding keeps its beams off them). What `recommend` returns is asked of it as before."""

    @abstractmethod
    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Train or load whatever the method needs. `work_dir` is the method's own folder."""

    @abstractmethod
    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        """Return an int64 array (len(samples), k) of distinct item ids, best first (-1 only past the catalogue)."""

    def last_extras(self) -> dict[str, list[Any]]:
        """Optional per-sample columns of the last `recommend` call, saved with the predictions.

        Retrieval methods return {"retrieved_item": [...], "retrieved_time": [...]} (None where the
        slot stayed empty), row-aligned with that call's samples; the report plots when retrieved
        memories happened. Methods without such information return {} (the default).
        """
        return {}


def refuse_method_exclusion(value: bool) -> bool:
    """Validator of the old per-method `exclude_history` option: only False (the default) is accepted.

    Excluding history in one method but not in others made their metrics incomparable; the
    evaluator now does it for every method alike (issue 9 A2).
    """
    if value:
        raise ValueError(
            "exclude_history moved from the method to the evaluator, which applies it to every method alike: "
            "drop it here and set `exclude_history: true` in the evaluate config (or --exclude-history true)"
        )
    return value
