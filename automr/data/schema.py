"""The on-disk contract between `prepare` and every later stage.

`prepare` writes, under its output folder OUT:
  OUT/samples/{train,valid,test}.parquet  one row per (user, target interaction)
  OUT/items.parquet                       item_id (int64), title (str, cleaned)
  OUT/stats.json                          statistics of the run
  OUT/config.yaml                         the config that made it

Sample columns (lists are oldest first; every input time is <= target_time and every
input precedes the target in the user's stored order; with `prepare --ties strict`, every
input time is < target_time):
  user_id       int64
  target_item   int64
  target_time   int64   unix seconds
  recent_items  list[int64]  the K most recent interactions before the target
  recent_times  list[int64]
  memory_items  list[int64]  older interactions (history cap minus K), oldest first
  memory_times  list[int64]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from automr.errors import UserError

SPLITS: tuple[str, ...] = ("train", "valid", "test")
SAMPLE_COLUMNS: tuple[str, ...] = (
    "user_id",
    "target_item",
    "target_time",
    "recent_items",
    "recent_times",
    "memory_items",
    "memory_times",
)
SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64,
    "target_item": pl.Int64,
    "target_time": pl.Int64,
    "recent_items": pl.List(pl.Int64),
    "recent_times": pl.List(pl.Int64),
    "memory_items": pl.List(pl.Int64),
    "memory_times": pl.List(pl.Int64),
}
ITEM_SCHEMA: dict[str, pl.DataType] = {"item_id": pl.Int64, "title": pl.Utf8}


@dataclass
class PreparedData:
    """A prepared data folder, loaded lazily split by split."""

    root: Path
    items: pl.DataFrame
    _splits: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: str | Path) -> "PreparedData":
        root = Path(root)
        missing = [str(p) for p in [root / "items.parquet", *(root / "samples" / f"{s}.parquet" for s in SPLITS)] if not p.is_file()]
        if missing:
            raise UserError(
                f"{root} is not a prepared data folder: missing {', '.join(missing)}. "
                "Create it with `automr prepare --data DATA --out OUT`."
            )
        return cls(root=root, items=pl.read_parquet(root / "items.parquet"))

    def split(self, name: str) -> pl.DataFrame:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        if name not in self._splits:
            self._splits[name] = pl.read_parquet(self.root / "samples" / f"{name}.parquet")
        return self._splits[name]

    @property
    def item_ids(self) -> list[int]:
        return self.items["item_id"].to_list()

    def titles(self) -> dict[int, str]:
        return dict(zip(self.items["item_id"].to_list(), self.items["title"].to_list()))


def histories(samples: pl.DataFrame) -> list[list[int]]:
    """Each sample's history: recent_items + memory_items (what history exclusion removes)."""
    both = samples.select(pl.concat_list("recent_items", "memory_items").alias("h"))["h"]
    return [h or [] for h in both.to_list()]
