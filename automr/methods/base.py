"""One interface for every recommender, so one evaluator judges them all (RecBole-style).

A method is fitted on a prepared data folder and then ranks the full catalogue for a batch of
samples. It returns the top-k item ids per sample, best first; evaluation never samples
negatives. Methods that can only produce a few items (e.g. constrained beam search) pad with -1.
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

    @abstractmethod
    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Train or load whatever the method needs. `work_dir` is the method's own folder."""

    @abstractmethod
    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        """Return an int64 array (len(samples), k) of item ids, best first, -1 where empty."""

    def last_extras(self) -> dict[str, list[Any]]:
        """Optional per-sample columns of the last `recommend` call, saved with the predictions.

        Retrieval methods return {"retrieved_item": [...], "retrieved_time": [...]} (None where the
        slot stayed empty), row-aligned with that call's samples; the report plots when retrieved
        memories happened. Methods without such information return {} (the default).
        """
        return {}
