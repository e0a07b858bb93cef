"""A content hash of the item catalogue, to key caches that depend on item titles.

Embeddings (ReLLa) and LLM summaries (TRSR) are functions of the titles behind item ids; a
cache keyed by this hash is never reused against a different catalogue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import polars as pl


def catalogue_hash(items: pl.DataFrame | Iterable[tuple[int, str]], length: int = 16) -> str:
    """Hex digest of (item_id, title) pairs in id order; independent of the rows' order.

    items: an items frame (item_id, title columns) or (item_id, title) pairs; both give one hash.
    """
    if not isinstance(items, pl.DataFrame):
        items = pl.DataFrame(list(items), schema={"item_id": pl.Int64, "title": pl.String}, orient="row")
    rows = items.select("item_id", "title").sort("item_id")
    h = hashlib.blake2b(digest_size=16)
    for item_id, title in zip(rows["item_id"].to_list(), rows["title"].to_list()):
        h.update(f"{item_id}\t{title}\n".encode())
    return h.hexdigest()[:length]
