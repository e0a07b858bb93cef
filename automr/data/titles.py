"""Title cleaning and deterministic handling of items that share a title.

A generative recommender names items by title, so two items with one title are
indistinguishable to it. We keep every item and make titles unique deterministically: the
item with the smallest id keeps the title, later ones get " (2)", " (3)", ... in id order.
"""

from __future__ import annotations

import html
import re

import polars as pl

_WS = re.compile(r"\s+")


def clean_title(raw: str | None) -> str:
    """Unescape HTML entities (twice: Amazon has '&amp;quot;') and collapse whitespace."""
    if raw is None:
        return ""
    text = html.unescape(html.unescape(str(raw)))
    return _WS.sub(" ", text).strip()


def clean_titles(items: pl.DataFrame) -> pl.DataFrame:
    """Return `items` with a cleaned `title` column (the catalogue is small: a Python map is fine)."""
    return items.with_columns(pl.col("title").map_elements(clean_title, return_dtype=pl.Utf8))


def dedupe_titles(items: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Make titles unique by suffixing duplicates in item-id order; returns (items, n_renamed)."""
    ordered = items.sort("item_id").with_columns(
        pl.col("item_id").cum_count().over("title").alias("_dup")
    )
    n_renamed = int((ordered["_dup"] > 1).sum())
    out = ordered.with_columns(
        pl.when(pl.col("_dup") > 1)
        .then(pl.col("title") + " (" + pl.col("_dup").cast(pl.Utf8) + ")")
        .otherwise(pl.col("title"))
        .alias("title")
    ).drop("_dup")
    # A suffixed title could collide with a real one ("X (2)"); resolve by repeating.
    if out["title"].n_unique() < out.height:
        out, more = dedupe_titles(out)
        n_renamed += more
    return out, n_renamed
