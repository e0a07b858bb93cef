"""The sample builder: filters and (user, target) samples from ordered sequences, vectorised.

Everything here works on a polars DataFrame holding *whole users* (prepare feeds one hash
bucket of users at a time), so the same functions serve the streaming pipeline, the tests and
the hypothesis properties. No Python loop runs per interaction or per sample.

Order: a user's interactions are ordered by (timestamp, pos, item_id) -- time first, ties broken
by the stored order `pos` (DESIGN.md: "ties in time are broken by the stored order"), item id
only for determinism if `pos` ties too. Which earlier interactions are a sample's inputs is
`SampleSpec.ties`:
  - "pos" (default): the interactions strictly before its target in that order, so every input
    time is <= the target time, and an input sharing the target's timestamp is one the data
    stored before it (in ml-100k about half the samples' last recent item is such a tie);
  - "strict": only the interactions strictly earlier in time (every input time < the target
    time); the target's ties, whatever their `pos`, are never inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from automr.data.schema import SAMPLE_COLUMNS, SAMPLE_SCHEMA

ORDER: tuple[str, ...] = ("user_id", "timestamp", "pos", "item_id")


def count_out_of_order(df: pl.DataFrame) -> int:
    """Interactions whose timestamp is earlier than the one stored just before (by `pos`).

    Such rows are re-ordered by time (see `order_sequences`), so inputs always precede targets;
    the count is reported because it usually means the data's `pos` is not chronological.
    """
    if df.is_empty():
        return 0
    by_pos = df.select("user_id", "pos", "timestamp").sort("user_id", "pos")
    back = by_pos.select((pl.col("timestamp").diff().over("user_id") < 0).sum()).item()
    return int(back or 0)


def order_sequences(df: pl.DataFrame, user_order: tuple[str, ...] = ()) -> pl.DataFrame:
    """Sort into per-user chronological sequences; `user_order` columns (e.g. a user hash) go first."""
    return df.sort([*user_order, *ORDER])


def filter_items(df: pl.DataFrame, kept_items: pl.Series) -> pl.DataFrame:
    """Keep interactions whose item is in `kept_items` (the items that passed the count filter)."""
    return df.filter(pl.col("item_id").is_in(kept_items.implode()))


def filter_short(df: pl.DataFrame, min_length: int) -> pl.DataFrame:
    """Drop users with fewer than `min_length` interactions (0 or 1 keeps everyone)."""
    if min_length <= 1:
        return df
    return df.filter(pl.len().over("user_id").cast(pl.Int64) >= min_length)


def cap_history(df: pl.DataFrame, max_history: int) -> pl.DataFrame:
    """Keep each user's `max_history` most recent interactions (0 = no cap). `df` must be ordered."""
    if max_history <= 0:
        return df
    n = pl.len().over("user_id").cast(pl.Int64)  # pl.len() is unsigned: n - cap must not wrap
    return df.filter(pl.int_range(pl.len(), dtype=pl.Int64).over("user_id") >= n - max_history)


@dataclass(frozen=True)
class SampleSpec:
    """How targets become samples (see PrepareConfig for the meaning of each field)."""

    recent_k: int = 10
    min_recent: int = 1
    last_only: bool = False
    target_from: int | None = None  # first timestamp a target may have (the window start)
    target_until: int | None = None  # targets must be < this (the window end)
    ties: Literal["pos", "strict"] = "pos"  # inputs: all before the target in order, or only earlier in time


def first_at_time() -> pl.Expr:
    """The position of the user's first interaction at this row's timestamp (needs `idx`)."""
    return pl.col("idx").min().over("user_id", "timestamp")


def input_count(spec: SampleSpec) -> pl.Expr:
    """How many interactions of an ordered sequence frame (with `idx`) are inputs of each row as a target.

    The inputs are always a prefix of the sequence: positions [0, idx) under ties="pos", and
    [0, first position at the target's time) under ties="strict".
    """
    return first_at_time() if spec.ties == "strict" else pl.col("idx")


def target_mask(spec: SampleSpec) -> pl.Expr:
    """Which rows of an ordered, capped sequence frame (with `idx`, `n`) are targets.

    `min_recent` counts the inputs a sample would really have, so under ties="strict" a target
    with no strictly earlier interaction gets no sample.
    """
    cond = input_count(spec) >= spec.min_recent
    if spec.target_from is not None:
        cond = cond & (pl.col("timestamp") >= spec.target_from)
    if spec.target_until is not None:
        cond = cond & (pl.col("timestamp") < spec.target_until)
    if spec.last_only:
        cond = cond & (pl.col("idx") == pl.col("n") - 1)
    return cond


def with_positions(seq: pl.DataFrame) -> pl.DataFrame:
    """Add idx (0-based position in the user's sequence) and n (the sequence length)."""
    return seq.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("idx"),
        pl.len().over("user_id").cast(pl.Int64).alias("n"),
    )


def build_samples(seq: pl.DataFrame, spec: SampleSpec) -> pl.DataFrame:
    """One row per target: SAMPLE_COLUMNS plus `memory_len` and `tied_before`, users in input order,
    targets in time order.

    seq: user_id, item_id, timestamp, ordered (contiguous users, chronological), already filtered
    and capped. For the target at position i with e = its input count (`input_count`: i, or under
    ties="strict" the first position at its time): recent = positions [max(0, e-K), e), memory =
    [0, max(0, e-K)), both oldest first. `tied_before` counts the user's interactions at the
    target's time stored before it: inputs under "pos", left out under "strict".
    """
    seq = with_positions(seq.select("user_id", "item_id", "timestamp"))
    # The window expressions run over the whole sequence, before the filter keeps the targets.
    seq = seq.with_columns(input_count(spec).alias("end"), (pl.col("idx") - first_at_time()).alias("tied_before"))
    targets = seq.filter(target_mask(spec)).select(
        "user_id",
        pl.col("item_id").alias("target_item"),
        pl.col("timestamp").alias("target_time"),
        "end",
        "tied_before",
    )
    if targets.is_empty():
        return empty_samples()
    lists = (
        seq.filter(pl.col("user_id").is_in(targets["user_id"].unique().implode()))
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").alias("items"), pl.col("timestamp").alias("times"))
    )
    start = (pl.col("end") - spec.recent_k).clip(lower_bound=0)
    # (n_targets,) rows, each holding its user's whole list (n,) once, sliced into recent/memory.
    joined = targets.join(lists, on="user_id", how="left", maintain_order="left")
    out = joined.select(
        "user_id",
        "target_item",
        "target_time",
        pl.col("items").list.slice(start, pl.col("end") - start).alias("recent_items"),
        pl.col("times").list.slice(start, pl.col("end") - start).alias("recent_times"),
        pl.col("items").list.slice(0, start).alias("memory_items"),
        pl.col("times").list.slice(0, start).alias("memory_times"),
        start.alias("memory_len"),
        "tied_before",
    )
    return out.cast(SAMPLE_SCHEMA)  # type: ignore[arg-type]


def empty_samples() -> pl.DataFrame:
    return pl.DataFrame(schema={**SAMPLE_SCHEMA, "memory_len": pl.Int64, "tied_before": pl.Int64})


def split_of(valid_start: int, test_start: int) -> pl.Expr:
    """Split by the target's time: train < valid_start <= valid < test_start <= test."""
    t = pl.col("target_time")
    return pl.when(t >= test_start).then(pl.lit("test")).when(t >= valid_start).then(pl.lit("valid")).otherwise(pl.lit("train"))


def samples_from_interactions(
    df: pl.DataFrame,
    spec: SampleSpec,
    *,
    min_item_interactions: int = 0,
    min_sequence_length: int = 0,
    max_history: int = 0,
) -> pl.DataFrame:
    """The whole per-user protocol on an in-memory frame (item counts taken from `df` itself).

    A convenience for tests and small data: `prepare` runs the same steps bucket by bucket with
    item counts from the whole scope. Returns SAMPLE_COLUMNS (+ memory_len, tied_before).
    """
    seq = order_sequences(df)
    if min_item_interactions > 1:
        counts = seq.group_by("item_id").len()
        seq = filter_items(seq, counts.filter(pl.col("len") >= min_item_interactions)["item_id"])
    seq = cap_history(filter_short(seq, min_sequence_length), max_history)
    return build_samples(seq, spec)


__all__ = [
    "ORDER",
    "SAMPLE_COLUMNS",
    "SampleSpec",
    "build_samples",
    "cap_history",
    "count_out_of_order",
    "empty_samples",
    "filter_items",
    "filter_short",
    "first_at_time",
    "input_count",
    "order_sequences",
    "samples_from_interactions",
    "split_of",
    "target_mask",
    "with_positions",
]
