"""Seeded synthetic data with a planted long-term interest, to test the memory mechanism.

The catalogue has two-part *series* ("The Silver Harbor Mysteries, Part 1" / "..., Part 2") and
standalone *filler* items with readable titles. Every user's sequence is

    filler ... CUE (series S, Part 1) ... filler (at least the K most recent) ... TARGET (S, Part 2)

The target is the user's last interaction; the cue is strictly older than the K interactions just
before it, and no other series item appears in the user's history. The K recent items are filler
drawn at random, so the target is predictable from long-term memory only: a recommender that sees
just the K recent titles is at chance, one that retrieves the cue can name the target exactly.

Each user's final timestamp is spread evenly over [start, end] (users in random order), so a
temporal split by target time assigns whole users to train/valid/test. Same seed -> byte-identical
files (tested).

Output (common format, see automr/data/readers.py): interactions.parquet, items.parquet, plus
planted.parquet (user_id, cue_item, target_item, cue_pos, target_pos, series), stats.json and
config.yaml.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from automr.config import StageConfig, save_config

# Word lists: series and filler draw from disjoint vocabularies, so no filler title looks like a
# series part and titles stay unique by construction.
SERIES_ADJECTIVES = (
    "Silver", "Crimson", "Hidden", "Northern", "Broken", "Golden", "Quiet", "Burning", "Frozen", "Distant",
    "Forgotten", "Iron", "Amber", "Midnight", "Scarlet", "Wandering", "Hollow", "Emerald", "Shattered", "Velvet",
    "Ancient", "Restless", "Copper", "Twilight", "Silent", "Wild", "Lonely", "Bright", "Winter", "Cobalt",
)
SERIES_PLACES = (
    "Harbor", "Valley", "Forest", "Tower", "River", "Mountain", "Desert", "Island", "Garden", "Castle",
    "Lighthouse", "Meadow", "Canyon", "Citadel", "Marsh", "Orchard", "Bridge", "Abbey", "Station", "Coast",
    "Glacier", "Prairie", "Cathedral", "Fjord", "Lagoon", "Monastery", "Quarry", "Reef", "Summit", "Vineyard",
)
SERIES_KINDS = (
    "Mysteries", "Chronicles", "Saga", "Adventures", "Legends", "Files", "Diaries", "Tales", "Letters", "Quest",
)
FILLER_ADJECTIVES = (
    "Gentle", "Curious", "Patient", "Careless", "Clever", "Brave", "Humble", "Proud", "Restful", "Sudden",
    "Honest", "Lucky", "Modern", "Simple", "Tiny", "Vast", "Warm", "Cold", "Early", "Late",
    "Little", "Secret", "Painted", "Paper", "Glass", "Stone", "Wooden", "Open", "Empty", "Crowded",
    "Green", "Blue", "Yellow", "Purple", "Gray", "Hungry", "Sleepy", "Noisy", "Happy", "Strange",
)
FILLER_NOUNS = (
    "Compass", "Lantern", "Kitchen", "Teacher", "Gardener", "Detective", "Sailor", "Violin", "Bicycle", "Notebook",
    "Window", "Mirror", "Letterbox", "Umbrella", "Pianist", "Baker", "Painter", "Carpenter", "Shepherd", "Engineer",
    "Clockmaker", "Pilot", "Doctor", "Astronomer", "Librarian", "Neighbor", "Stranger", "Traveler", "Cartographer", "Fisherman",
    "Rooftop", "Hallway", "Market", "Railway", "Chessboard", "Typewriter", "Telescope", "Suitcase", "Candle", "Kettle",
)
FILLER_SETTINGS = (
    "Paris", "Lisbon", "Kyoto", "Cairo", "Oslo", "Dublin", "Havana", "Prague", "Vienna", "Quebec",
    "Tangier", "Bergen", "Seville", "Naples", "Krakow", "Istanbul", "Lima", "Hanoi", "Nairobi", "Reykjavik",
    "Spring", "Summer", "Autumn", "December", "the Night", "the Morning", "the Storm", "the Fair", "the Holidays", "the Weekend",
)


class SyntheticSpec(StageConfig):
    """What to generate: catalogue size, sequence shape, timeline and seed (`automr synthetic` adds `out`)."""

    n_users: int = Field(600, ge=1, description="Number of users (one planted cue -> target pair each).")
    n_series: int = Field(40, ge=1, description="Number of two-part series; users are spread evenly over them.")
    n_filler: int = Field(400, ge=1, description="Number of standalone filler items.")
    min_history: int = Field(16, ge=2, description="Fewest interactions before the target (cue included).")
    max_history: int = Field(30, ge=2, description="Most interactions before the target (cue included).")
    recent_k: int = Field(10, ge=0, description="The K most recent interactions before the target are filler only.")
    min_cue_gap: int | None = Field(
        None, description="Fewest steps from the cue to the target (target_pos - cue_pos); default recent_k + 1."
    )
    max_cue_gap: int | None = Field(
        None, description="Most steps from the cue to the target; default: the whole history (cue may be first)."
    )
    start: dt.date = Field(dt.date(2017, 1, 1), description="Earliest final (target) date, UTC.")
    end: dt.date = Field(dt.date(2017, 12, 31), description="Latest final (target) date, UTC.")
    min_step_s: int = Field(600, ge=1, description="Fewest seconds between consecutive interactions of a user.")
    max_step_s: int = Field(3 * 86_400, ge=1, description="Most seconds between consecutive interactions of a user.")
    seed: int = Field(0, description="Random seed: same seed, byte-identical output.")

    @model_validator(mode="after")
    def _consistent(self) -> "SyntheticSpec":
        problems = []
        gap_lo = self.min_cue_gap if self.min_cue_gap is not None else self.recent_k + 1
        if self.max_history < self.min_history:
            problems.append(f"max_history ({self.max_history}) < min_history ({self.min_history})")
        if gap_lo <= self.recent_k:
            problems.append(f"min_cue_gap ({gap_lo}) must exceed recent_k ({self.recent_k}) so the cue is older than the K recent")
        if gap_lo > self.min_history:
            problems.append(
                f"min_cue_gap ({gap_lo}) > min_history ({self.min_history}): the shortest histories cannot hold the cue; "
                "raise min_history or lower recent_k/min_cue_gap"
            )
        if self.max_cue_gap is not None and self.max_cue_gap < gap_lo:
            problems.append(f"max_cue_gap ({self.max_cue_gap}) < min_cue_gap ({gap_lo})")
        if self.n_filler < self.max_history - 1:
            problems.append(f"n_filler ({self.n_filler}) must be >= max_history - 1 ({self.max_history - 1}): no filler repeats within a user")
        if self.n_series > len(series_title_pool()):
            problems.append(f"n_series ({self.n_series}) exceeds the {len(series_title_pool())} distinct series titles")
        if self.n_filler > len(filler_title_pool()):
            problems.append(f"n_filler ({self.n_filler}) exceeds the {len(filler_title_pool())} distinct filler titles")
        if self.end <= self.start:
            problems.append(f"end ({self.end}) must be after start ({self.start})")
        if self.max_step_s < self.min_step_s:
            problems.append(f"max_step_s ({self.max_step_s}) < min_step_s ({self.min_step_s})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def series_title_pool() -> list[str]:
    """Every possible series name ("The Silver Harbor Mysteries"), in a fixed order."""
    return [f"The {a} {p} {k}" for a, p, k in itertools.product(SERIES_ADJECTIVES, SERIES_PLACES, SERIES_KINDS)]


def filler_title_pool() -> list[str]:
    """Every possible filler title, in a fixed order; none contains "Part"."""
    pairs = [f"The {a} {n}" for a, n in itertools.product(FILLER_ADJECTIVES, FILLER_NOUNS)]
    settings = [f"{'An' if n[0] in 'AEIOU' else 'A'} {n} in {s}" for n, s in itertools.product(FILLER_NOUNS, FILLER_SETTINGS)]
    return pairs + settings


def generate(cfg: SyntheticSpec) -> dict[str, Any]:
    """Build the three tables in memory: {"interactions", "items", "planted"} polars frames."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(cfg.seed)
    series_pool, filler_pool = series_title_pool(), filler_title_pool()
    series_names = [series_pool[i] for i in rng.choice(len(series_pool), size=cfg.n_series, replace=False)]
    filler_titles = [filler_pool[i] for i in rng.choice(len(filler_pool), size=cfg.n_filler, replace=False)]

    # Item ids 1..N in a random order, so an id says nothing about series / filler / part.
    titles = [f"{s}, Part 1" for s in series_names] + [f"{s}, Part 2" for s in series_names] + filler_titles
    ids = rng.permutation(len(titles)) + 1
    part1 = ids[: cfg.n_series]
    part2 = ids[cfg.n_series : 2 * cfg.n_series]
    filler = ids[2 * cfg.n_series :]

    # Users spread evenly over series, and final times evenly over [start, end] in random user order.
    user_series = rng.permutation(np.resize(np.arange(cfg.n_series), cfg.n_users))
    t0 = _unix(cfg.start)
    span = _unix(cfg.end) - t0
    final_rank = rng.permutation(cfg.n_users)
    final_time = t0 + (span * (2 * final_rank + 1)) // (2 * cfg.n_users)  # (n_users,)

    gap_lo = cfg.min_cue_gap if cfg.min_cue_gap is not None else cfg.recent_k + 1
    users, items, times, poss = [], [], [], []
    planted: dict[str, list[int]] = {k: [] for k in ("user_id", "cue_item", "target_item", "cue_pos", "target_pos", "series")}
    from automr.utils.progress import track

    for u in track(range(cfg.n_users), "users", "synthetic users", disable=cfg.n_users < 50_000, transient=True):
        n_hist = int(rng.integers(cfg.min_history, cfg.max_history + 1))  # interactions before the target
        gap_hi = min(cfg.max_cue_gap or n_hist, n_hist)
        gap = int(rng.integers(gap_lo, gap_hi + 1))
        cue_pos = n_hist - gap  # target at n_hist; cue at least recent_k + 1 steps before it
        seq = list(filler[rng.choice(len(filler), size=n_hist - 1, replace=False)])
        s = int(user_series[u])
        seq.insert(cue_pos, part1[s])
        seq.append(part2[s])
        steps = rng.integers(cfg.min_step_s, cfg.max_step_s + 1, size=n_hist)  # (n_hist,)
        ts = int(final_time[u]) - np.concatenate([np.cumsum(steps[::-1])[::-1], [0]])  # strictly increasing
        user_id = u + 1
        users.extend([user_id] * len(seq))
        items.extend(seq)
        times.extend(ts.tolist())
        poss.extend(range(len(seq)))
        for key, value in zip(planted, (user_id, part1[s], part2[s], cue_pos, n_hist, s)):
            planted[key].append(int(value))

    i64 = pl.Int64
    return {
        "interactions": pl.DataFrame(
            {"user_id": users, "item_id": [int(i) for i in items], "timestamp": times, "pos": poss},
            schema={"user_id": i64, "item_id": i64, "timestamp": i64, "pos": i64},
        ),
        "items": pl.DataFrame({"item_id": ids.tolist(), "title": titles}, schema={"item_id": i64, "title": pl.Utf8}).sort("item_id"),
        "planted": pl.DataFrame(planted, schema={k: i64 for k in planted}),
    }


def write_synthetic(cfg: SyntheticSpec, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Generate and write the folder `out` atomically; returns its stats."""
    import time

    from automr.utils.io import atomic_dir, write_json

    t_start = time.perf_counter()
    tables = generate(cfg)
    inter = tables["interactions"]
    stats = {
        "kind": "synthetic",
        "users": cfg.n_users,
        "items": tables["items"].height,
        "series": cfg.n_series,
        "filler_items": cfg.n_filler,
        "interactions": inter.height,
        "time_min": int(inter["timestamp"].min()),  # type: ignore[arg-type]
        "time_max": int(inter["timestamp"].max()),  # type: ignore[arg-type]
        "seed": cfg.seed,
    }
    with atomic_dir(Path(out)) as tmp:
        for name, df in tables.items():
            df.write_parquet(tmp / f"{name}.parquet", compression="zstd", statistics=True)
        write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp)
    seconds = time.perf_counter() - t_start
    if not quiet:
        from automr.utils.logging import get_console

        get_console(stderr=True).print(
            f"synthetic: {cfg.n_users:,} users, {stats['items']:,} items, {inter.height:,} interactions "
            f"({inter.height / seconds:,.0f} interactions/s) -> {out}"
        )
    return stats



def _unix(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
