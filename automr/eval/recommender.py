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
from automr.errors import UserError


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


# method name -> "module:factory"; factory(options: dict, seed: int) -> Recommender.
METHODS: dict[str, str] = {
    "popularity": "automr.baselines.popularity:make",
    "sasrec": "automr.baselines.sasrec:make",
    "bigrec": "automr.llm.recommender:make_bigrec",
    "automr": "automr.memory.recommender:make_automr",
    "random": "automr.memory.recommender:make_random",
    "recent": "automr.memory.recommender:make_recent",
    "rella": "automr.baselines.rella:make",
    "trsr": "automr.baselines.trsr:make",
}


def make_method(name: str, options: dict[str, Any] | None = None, seed: int = 0) -> Recommender:
    """Build a method by name, with a clear error for an unknown one."""
    import importlib

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    module, _, attr = METHODS[name].partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"method {name!r} is not available in this build ({exc})") from None
    return factory(options or {}, seed)
