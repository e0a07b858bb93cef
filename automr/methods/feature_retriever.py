"""Cheap per-element features for the feature retriever, and the one function that scores memory.

The paper's retriever scores element m only by MLP(z_t)^T z_m. Measured on ml-100k (issue 10), an
element's gain also goes with things the two states may not carry: how far back it lies, how
popular its item is, whether it brings something the recent window lacks. The feature retriever
(`train-retriever --features cheap`, automr/memory/retriever.py) adds a small MLP over these,
per element of memory_items (oldest first):

  log_days_ago          log1p(days between the element and the target time)
  log_interactions_ago  log(recent K + positions after it in memory_items): 1 + K for the newest
  log_popularity        log1p(its item's interaction count before the validation period;
                        automr.methods.popularity.popularity_counts, the popularity baseline's)
  repeats_recent        1 if its item is also among the recent items, else 0
  sim_max_recent        max cosine between its title and the recent titles (MiniLM;
  sim_mean_recent       mean cosine                                         optional)

`ElementFeatures` holds what those need beyond the sample itself (the popularity counts and, when
the similarities are on, the catalogue's title embeddings) and is saved inside the retriever
folder (features.npz), so training, `automr headroom`, inference and serving compute the *same*
numbers from the same arrays, through the same `compute`. Standardisation of the features lives in
the retriever (buffers fitted on the training samples). `load_retriever` loads either kind of
retriever folder; `select_elements` is the one scoring entry point every caller goes through.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from automr.errors import UserError
from automr.memory.retriever_config import FEATURES_FILE
from automr.utils.logging import warn

if TYPE_CHECKING:  # pragma: no cover
    from automr.data.schema import PreparedData
    from automr.memory.retriever import Retriever
    from automr.methods.title_encoder import TitleEmbeddings

BASE_FEATURES = ("log_days_ago", "log_interactions_ago", "log_popularity", "repeats_recent")
SIMILARITY_FEATURES = ("sim_max_recent", "sim_mean_recent")
DAY = 86_400.0
Similarity = Literal["auto", "yes", "no"]


def encoder_installed() -> bool:
    from automr.methods.title_encoder import ENCODER_PACKAGE

    return importlib.util.find_spec(ENCODER_PACKAGE) is not None


@dataclass
class ElementFeatures:
    """What the cheap features need beyond a sample: popularity counts and (optionally) title embeddings."""

    pop_items: np.ndarray  # (P,) int64, sorted
    pop_counts: np.ndarray  # (P,) int64
    embeddings: "TitleEmbeddings | None" = None  # None: no similarity features

    @property
    def names(self) -> tuple[str, ...]:
        return BASE_FEATURES + (SIMILARITY_FEATURES if self.embeddings is not None else ())

    @classmethod
    def build(cls, data: "PreparedData", similarity: Similarity = "auto", cache_dir: Path | None = None,
              progress: bool = False) -> "ElementFeatures":
        """From a prepared folder: its training-period popularity and, unless off, its titles' embeddings.

        similarity "auto" uses the encoder when its package is installed (warns and goes without
        otherwise); "yes" requires it; "no" leaves the similarity features out.
        """
        import tempfile

        from automr.methods.popularity import popularity_counts
        from automr.methods.title_encoder import cached_title_embeddings

        pop = popularity_counts(data).sort("item_id")
        emb = None
        if similarity == "yes" or (similarity == "auto" and encoder_installed()):
            with tempfile.TemporaryDirectory(prefix="automr-emb-") as tmp:
                emb = cached_title_embeddings(data.items, Path(cache_dir) if cache_dir else Path(tmp), progress=progress)
        elif similarity == "auto":
            warn("the sentence encoder is not installed: the feature retriever goes without the title-similarity features")
        return cls(pop["item_id"].to_numpy().astype(np.int64), pop["count"].to_numpy().astype(np.int64), emb)

    def popularity(self, items: np.ndarray) -> np.ndarray:
        """(n,) int64 counts of item ids (0 for items the counts do not know)."""
        pos = np.minimum(np.searchsorted(self.pop_items, items), max(len(self.pop_items) - 1, 0))
        known = (self.pop_items[pos] == items) if len(self.pop_items) else np.zeros(len(items), bool)
        return np.where(known, self.pop_counts[pos] if len(self.pop_items) else 0, 0)

    def compute(self, samples: pl.DataFrame) -> list[np.ndarray]:
        """Per sample (row order kept), float32 [|M|, F] features of its memory_items, columns `names`."""
        cols = samples.select("target_time", "recent_items", "memory_items", "memory_times").iter_rows()
        return [self._one(t, recent or [], mem or [], times or []) for t, recent, mem, times in cols]

    def _one(self, target_time: int, recent: list[int], memory: list[int], times: list[int]) -> np.ndarray:
        n = len(memory)
        if n == 0:
            return np.zeros((0, len(self.names)), np.float32)
        items = np.asarray(memory, np.int64)
        days = np.maximum(target_time - np.asarray(times, np.float64), 0.0) / DAY  # (n,)
        ago = len(recent) + n - np.arange(n, dtype=np.float64)  # (n,) interactions back from the target
        cols = [np.log1p(days), np.log(ago), np.log1p(self.popularity(items).astype(np.float64)),
                np.isin(items, np.asarray(recent, np.int64)).astype(np.float64)]
        if self.embeddings is not None:
            if recent:
                e_m = self.embeddings.emb[self.embeddings.rows(items)]  # (n, d)
                e_r = self.embeddings.emb[self.embeddings.rows(np.asarray(recent, np.int64))]  # (K, d)
                cos = e_m @ e_r.T  # (n, K)
                cols += [cos.max(1), cos.mean(1)]
            else:
                cols += [np.zeros(n), np.zeros(n)]
        return np.stack(cols, axis=1).astype(np.float32)  # (n, F)

    def save(self, folder: str | Path) -> Path:
        """Write features.npz into a retriever folder (atomically)."""
        from automr.utils.io import atomic_file

        arrays: dict[str, Any] = {"pop_items": self.pop_items, "pop_counts": self.pop_counts,
                                  "names": np.asarray(self.names)}
        if self.embeddings is not None:
            arrays |= {"emb_items": self.embeddings.item_ids, "emb": self.embeddings.emb}
        path = Path(folder) / FEATURES_FILE
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ElementFeatures":
        from automr.methods.title_encoder import TitleEmbeddings

        path = Path(folder) / FEATURES_FILE
        if not path.is_file():
            raise UserError(f"the feature retriever {folder} has no {FEATURES_FILE}; train it again with "
                            "`automr train-retriever --features cheap`.")
        with np.load(path) as z:
            emb = TitleEmbeddings(z["emb_items"], z["emb"]) if "emb" in z.files else None
            return cls(z["pop_items"], z["pop_counts"], emb)


def load_retriever(folder: str | Path) -> "Retriever":
    """Either kind of train-retriever output: the paper's, or one with its ElementFeatures attached."""
    from automr.memory.retriever import Retriever

    r = Retriever.load(folder)
    if r.feature_names:
        r.features = ElementFeatures.load(folder)
        if tuple(r.features.names) != tuple(r.feature_names):
            raise UserError(f"{folder}: {FEATURES_FILE} holds features {list(r.features.names)} but the retriever was "
                            f"trained on {list(r.feature_names)}; train it again.")
    return r


def select_elements(retriever: "Retriever", samples: pl.DataFrame, queries: np.ndarray, key_sets: Sequence[np.ndarray],
                    k: int, available: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The one way to score a memory: (n, k) int64 indices into key_sets (-1 padding), best first.

    queries [n, H]; key_sets[i] [m_i, H] the keys of sample i's memory elements at positions
    `available[i]` of its memory_items (all of them when None). A feature retriever computes the
    features of those elements with its own ElementFeatures.
    """
    return retriever.select_batch(queries, key_sets, k, element_features(retriever, samples, available))


def element_features(retriever: "Retriever", samples: pl.DataFrame,
                     available: Sequence[np.ndarray] | None = None) -> list[np.ndarray] | None:
    """The features a retriever scores (None for the paper's): [m_i, F] per sample, for the elements at
    positions `available[i]` of its memory_items (all of them when None)."""
    if not retriever.feature_names:
        return None
    if retriever.features is None:
        raise UserError("this retriever scores element features; load it with "
                        "automr.methods.feature_retriever.load_retriever")
    feats = retriever.features.compute(samples)
    return feats if available is None else [f[a] for f, a in zip(feats, available)]


__all__ = ["BASE_FEATURES", "FEATURES_FILE", "SIMILARITY_FEATURES", "ElementFeatures", "element_features",
           "encoder_installed", "load_retriever", "select_elements"]
