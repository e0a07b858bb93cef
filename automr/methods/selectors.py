"""Memory selectors: which ONE element of a sample's memory goes into the prompt's memory slot.

Every retrieval method (AutoMR's learned retriever, random, most-recent, ReLLa-style semantic
similarity) reduces to the same decision: per sample, an index into its `memory_items` list
(oldest first, see automr/data/schema.py), or None when the memory is empty. Keeping that
decision behind one small protocol lets one recommender fill the slot for all of them and lets
the report compare them on the same footing (headroom captured, age of the chosen memory).

Selectors here are cheap and need no model. The random selector hashes (seed, user, target
time) instead of drawing from a running RNG, so a sample always gets the same element whatever
batch, order or process (sharded evaluation) it is scored in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import polars as pl

from automr.data.schema import PreparedData
from automr.errors import UserError

Selection = list[int | None]  # per sample: index into memory_items, None when memory is empty


@runtime_checkable
class MemorySelector(Protocol):
    """Chooses one memory element per sample."""

    name: str

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Prepare whatever the selector needs (embeddings, a trained model); `work_dir` is its own folder."""

    def select(self, samples: pl.DataFrame) -> Selection:
        """Per sample (row order kept), an index into that sample's memory_items, None if it is empty."""


def memory_lengths(samples: pl.DataFrame) -> np.ndarray:
    """(n,) int64 number of memory elements per sample (a null list counts as empty)."""
    return samples["memory_items"].list.len().fill_null(0).to_numpy().astype(np.int64)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a fixed, well-mixed hash (stable across versions,
    unlike Python's `hash` of str or polars' hash, which are allowed to change)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_hash(samples: pl.DataFrame, seed: int) -> np.ndarray:
    """(n,) uint64 hash of (seed, user_id, target_time) per sample: a per-sample random draw
    that does not depend on which other samples share the batch."""
    users = samples["user_id"].to_numpy().astype(np.int64).view(np.uint64)
    times = samples["target_time"].to_numpy().astype(np.int64).view(np.uint64)
    h = _splitmix64(np.full(samples.height, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    h = _splitmix64(h ^ users)
    return _splitmix64(h ^ times)


class RandomSelector:
    """A uniformly random memory element per sample, deterministic per (seed, user, target_time).

    Two samples of one user at the same target time (ties in the data) get the same draw; the
    schema's samples are one per target interaction, so that only happens for tied targets.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Nothing to learn."""

    def select(self, samples: pl.DataFrame) -> Selection:
        n_mem = memory_lengths(samples)
        h = sample_hash(samples, self.seed)
        # modulo bias is < |M| / 2^64: negligible.
        idx = (h % np.maximum(n_mem, 1).astype(np.uint64)).astype(np.int64)
        return [int(i) if m > 0 else None for i, m in zip(idx, n_mem)]


class MostRecentSelector:
    """The newest memory element (the one just older than the recent history)."""

    name = "recent"

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Nothing to learn."""

    def select(self, samples: pl.DataFrame) -> Selection:
        return [int(m) - 1 if m > 0 else None for m in memory_lengths(samples)]


class OracleSelector:
    """The element whose annotation most raised log P(true next title): the best a retriever could pick
    by the labels it learns from. It reads the target, so it is a diagnostic (how much Recall memory can
    add at all with this recommender), never a method to compare as an equal.

    Samples are matched to `annotations` (an annotate output) by (user, target time, target item);
    evaluate exactly the annotated samples (`automr evaluate --annotated FOLDER`).
    """

    name = "oracle"

    def __init__(self, annotations: Path) -> None:
        self.annotations = Path(annotations)
        self._best: dict[tuple[int, int, int], int] | None = None

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        from automr.memory.annotate import load_annotations

        df = load_annotations(self.annotations)
        keys = zip(df["user_id"].to_list(), df["target_time"].to_list(), df["target_item"].to_list())
        self._best = {(int(u), int(t), int(i)): int(np.argmax(c)) for (u, t, i), c in zip(keys, df["logp_cand"].to_list())
                      if c is not None and len(c)}

    def select(self, samples: pl.DataFrame) -> Selection:
        assert self._best is not None, "call fit() first"
        keys = zip(samples["user_id"].to_list(), samples["target_time"].to_list(), samples["target_item"].to_list())
        out: Selection = []
        missing = 0
        for key, m in zip(keys, memory_lengths(samples)):
            best = self._best.get(tuple(int(v) for v in key))  # type: ignore[arg-type]
            missing += best is None and m > 0
            out.append(best if m > 0 else None)
        if missing:
            raise UserError(
                f"oracle: {missing} of {samples.height} samples with a memory are not in the annotations of "
                f"{self.annotations}; evaluate the annotated samples only (`automr evaluate --annotated {self.annotations}`)"
            )
        _check_indices(samples, out)
        return out


def _check_indices(samples: pl.DataFrame, indices: Selection) -> np.ndarray:
    n_mem = memory_lengths(samples)
    if len(indices) != samples.height:
        raise ValueError(f"got {len(indices)} indices for {samples.height} samples")
    for row, (i, m) in enumerate(zip(indices, n_mem)):
        if i is not None and not 0 <= i < m:
            raise ValueError(f"sample {row}: index {i} is outside its memory of {m} elements")
    return n_mem


def selected_items_and_times(samples: pl.DataFrame, indices: Selection) -> tuple[list[int | None], list[int | None]]:
    """The chosen element's item id and interaction time per sample (None where nothing was chosen).

    Reports plot when retrieved memories happened: age = target_time - time (see `selected_ages`).
    """
    _check_indices(samples, indices)
    items_col = samples["memory_items"].to_list()
    times_col = samples["memory_times"].to_list()
    items: list[int | None] = []
    times: list[int | None] = []
    for i, its, tms in zip(indices, items_col, times_col):
        items.append(None if i is None else int(its[i]))
        times.append(None if i is None else int(tms[i]))
    return items, times


def selected_ages(samples: pl.DataFrame, indices: Selection) -> np.ndarray:
    """(n,) float64 seconds between the chosen memory and the target (NaN where nothing was chosen)."""
    _, times = selected_items_and_times(samples, indices)
    target = samples["target_time"].to_numpy().astype(np.float64)
    chosen = np.array([np.nan if t is None else float(t) for t in times], dtype=np.float64)
    return target - chosen
