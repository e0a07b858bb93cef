"""ReLLa-style semantic retrieval: put the memory element that looks most like the recent history.

ReLLa (Lin et al. 2024, "ReLLa: Retrieval-enhanced Large Language Models for Lifelong Sequential
Behavior Comprehension in Recommendation") retrieves, from a user's long history, the behaviours
most semantically relevant to the current context, scored by a text encoder. Here the context
is the K recent titles and one element is retrieved (AutoMR's slot holds one):

    e_i   = normalise(encoder(title_i))                       (d,) per catalogue item
    q     = normalise(mean_{r in recent} e_r)                  (d,)  aggregate="mean" (default)
    s_m   = e_m . q                                            cosine similarity of memory item m
    s_m   = max_{r in recent} e_m . e_r                        aggregate="max" (option)
    pick    argmax_m s_m   (ties: the oldest, numpy's argmax)

The encoder is all-MiniLM-L6-v2 (automr/methods/title_encoder.py: located and loaded offline, title
embeddings cached per catalogue under the work_dir).

This is the baseline the paper argues against: what helps the LLM is not necessarily what looks
similar (DESIGN.md, "Measured before building": -4% to 8% of the random-to-oracle headroom).
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (tests patch rella.importlib.util.find_spec)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from automr.args import DEFAULT_DEVICE, Device, DeviceOnlyArgs, LogArgs
from automr.data.schema import PreparedData
from automr.methods.automr import MemoryMethodOptions
from automr.methods.selectors import Selection
from automr.methods.title_encoder import (  # the encoder's one home; names kept here for callers
    ENCODER_DIST,
    ENCODER_PACKAGE,
    TitleEmbeddings,
    cached_title_embeddings,
    encode_titles,
    encoder_folder,
    encoder_version,
    load_encoder,
)

if TYPE_CHECKING:  # pragma: no cover
    from automr.methods.automr import MemoryRecommender

__all__ = ["ENCODER_DIST", "ENCODER_PACKAGE", "RellaMethodOptions", "RellaOptions", "RellaSelector", "TitleEmbeddings",
           "cached_title_embeddings", "encode_titles", "encoder_folder", "encoder_version", "load_encoder", "make"]


class RellaOptions(DeviceOnlyArgs, LogArgs):
    """Options of the ReLLa selector: how the query is formed, and the sentence encoder's batch and device."""

    aggregate: Literal["mean", "max"] = Field(
        "mean",
        description="how recent titles form the query: 'mean' = cosine to the normalised mean of their "
        "embeddings (ReLLa's semantic relevance to the context); 'max' = best cosine to any single recent title",
    )
    batch_size: int = Field(256, ge=1, description="titles per sentence-encoder batch")


class RellaSelector:
    """Selects the memory element most similar (title embeddings) to the recent titles."""

    name = "rella"

    def __init__(self, options: RellaOptions | None = None) -> None:
        self.options = options or RellaOptions()
        self.embeddings: TitleEmbeddings | None = None

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        self.embeddings = cached_title_embeddings(
            data.items, work_dir, batch_size=self.options.batch_size, device=self.options.device,
            progress=self.options.progress,
        )

    def scores(self, samples: pl.DataFrame) -> list[np.ndarray]:
        """Per sample, (|M|,) float32 similarity of each memory element to the recent titles."""
        if self.embeddings is None:
            raise RuntimeError("RellaSelector.scores called before fit")
        emb = self.embeddings
        out: list[np.ndarray] = []
        for recent, memory in zip(samples["recent_items"].to_list(), samples["memory_items"].to_list()):
            memory = memory or []
            recent = recent or []
            if not memory:
                out.append(np.zeros(0, dtype=np.float32))
                continue
            if not recent:  # no context to compare with: all equal, argmax falls back to the oldest
                out.append(np.zeros(len(memory), dtype=np.float32))
                continue
            e_m = emb.emb[emb.rows(np.asarray(memory))]  # (|M|, d)
            e_r = emb.emb[emb.rows(np.asarray(recent))]  # (K, d)
            if self.options.aggregate == "mean":
                q = e_r.mean(axis=0)  # (d,)
                q /= max(float(np.linalg.norm(q)), 1e-12)
                out.append(e_m @ q)  # (|M|,)
            else:
                out.append((e_m @ e_r.T).max(axis=1))  # (|M|, K) -> (|M|,)
        return out

    def select(self, samples: pl.DataFrame) -> Selection:
        return [int(np.argmax(s)) if len(s) else None for s in self.scores(samples)]


# -- the `rella` method: BIGRec with the most similar memory title in the slot ---------------


class RellaMethodOptions(MemoryMethodOptions):
    """Options of METHODS['rella']: the retrieval methods' (memory store, slot states/text) plus the selector's."""

    aggregate: Literal["mean", "max"] = Field("mean", description=RellaOptions.model_fields["aggregate"].description)
    encoder_batch_size: int = Field(256, ge=1, description="titles per sentence-encoder batch")
    encoder_device: Device = Field(DEFAULT_DEVICE, description="torch device for the sentence encoder (auto: sentence-transformers' choice)")


def make(options: dict[str, Any], seed: int) -> "MemoryRecommender":
    """Factory behind METHODS['rella'] (deterministic; `seed` only reaches the recommender).

    The chosen element fills the slot like every retrieval method's (automr.methods.automr):
    its value states from the memory store by default, its title as text with `slot: text`.
    """
    from automr.config import build_config
    from automr.methods.automr import MemoryRecommender

    o = build_config(RellaMethodOptions, options, source="rella options")
    selector = RellaSelector(RellaOptions(aggregate=o.aggregate, batch_size=o.encoder_batch_size, device=o.encoder_device,
                                         progress=o.progress))
    base = MemoryMethodOptions(**o.model_dump(exclude={"aggregate", "encoder_batch_size", "encoder_device"}))
    return MemoryRecommender(base, selector, seed)
