"""The funnel counters that `prepare` fills while streaming and turns into stats.json."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from automr.data.common import MalformedRows
from automr.data.schema import SPLITS


class Distinct:
    """Distinct values seen across batches, O(distinct) memory (user or item ids)."""

    def __init__(self) -> None:
        self.parts: list[pl.Series] = []
        self.pending = 0
        self.known = 0

    def add(self, values: pl.Series) -> None:
        u = values.unique()
        self.parts.append(u)
        self.pending += u.len()
        if self.pending > 2 * max(self.known, 50_000):
            self._reduce()

    def _reduce(self) -> None:
        merged = pl.concat(self.parts).unique() if self.parts else pl.Series("v", [], dtype=pl.Int64)
        self.parts, self.known, self.pending = [merged], merged.len(), merged.len()

    def series(self) -> pl.Series:
        self._reduce()
        return self.parts[0]

    def __len__(self) -> int:
        return self.series().len()


@dataclass
class Step:
    """What is left after a protocol step (users are counted per bucket: buckets partition users)."""

    interactions: int = 0
    users: int = 0
    items: Distinct = field(default_factory=Distinct)

    def add(self, df: pl.DataFrame) -> None:
        self.interactions += df.height
        if df.height:
            self.users += df["user_id"].n_unique()
            self.items.add(df["item_id"])

    def triple(self) -> tuple[int, int, int]:
        return self.interactions, self.users, len(self.items)


STEP_NAMES = ("item has no title", "outside the window", "item filter", "sequence filter", "max_users", "history cap", "user has no sample")


@dataclass
class Tally:
    """Counters filled while streaming; turned into stats.json at the end."""

    rows: int = 0
    well_formed: int = 0
    users_read: int = 0
    items_read: Distinct = field(default_factory=Distinct)
    t_min: int | None = None
    t_max: int | None = None
    malformed: MalformedRows = field(default_factory=MalformedRows)
    exact_duplicates: int = 0  # rows equal to an earlier row in every column: dropped
    repeated_user_item_time: int = 0  # rows sharing user, item and timestamp with an earlier one, not exact duplicates: kept
    max_users: dict[str, int] = field(default_factory=dict)  # what the max_users subsample kept (users, items)
    steps: dict[str, Step] = field(default_factory=lambda: {k: Step() for k in STEP_NAMES})
    before_window: int = 0
    after_window: int = 0
    out_of_order: int = 0
    targets_without_history: int = 0
    targets_without_strict_history: int = 0  # ties=strict: enough earlier interactions in order, not in time
    samples: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    split_users: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    memory_hist: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    repeats: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})  # see repeated_targets
    # per split: samples whose last recent item has the target's time / whose target's time is shared
    ties: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {"last_recent_tied": 0, "target_time_shared": 0} for s in SPLITS})


def repeated_targets(samples: pl.DataFrame) -> int:
    """Samples whose target is already in their history (recent + memory): repeat consumption.

    stats.json reports it per split as `repeat_rate`; `automr evaluate --exclude-history auto` reads
    the train split's rate to decide whether to drop seen items from every method's ranking.
    """
    seen = pl.concat_list("recent_items", "memory_items").list.contains(pl.col("target_item"))
    return int(samples.select(seen.sum()).item() or 0)


