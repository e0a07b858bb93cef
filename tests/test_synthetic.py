"""Synthetic data with a planted long-term interest: the planted property, timeline and determinism."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from automr.config import load_config
from automr.data.synthetic import filler_title_pool, write_synthetic
from automr.stages.synthetic import SyntheticConfig
from automr.errors import UserError


def _load(out: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return (
        pl.read_parquet(out / "interactions.parquet"),
        pl.read_parquet(out / "items.parquet"),
        pl.read_parquet(out / "planted.parquet"),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},  # the defaults: 600 users, 40 series, K = 10, histories 16..30
        {"n_users": 97, "n_series": 7, "n_filler": 40, "min_history": 12, "max_history": 14, "recent_k": 5, "min_cue_gap": 8, "max_cue_gap": 9},
    ],
    ids=["defaults", "custom-gap"],
)
def test_planted_property(tmp_path: Path, options: dict) -> None:
    cfg = SyntheticConfig(out=tmp_path / "syn", **options)
    write_synthetic(cfg, cfg.out, quiet=True)
    inter, items, planted = _load(cfg.out)
    titles = dict(zip(items["item_id"], items["title"]))
    assert items["title"].n_unique() == items.height == 2 * cfg.n_series + cfg.n_filler
    series_items = {i for i, t in titles.items() if ", Part " in t}
    assert len(series_items) == 2 * cfg.n_series
    gap_lo = cfg.min_cue_gap or cfg.recent_k + 1
    gap_hi = cfg.max_cue_gap or cfg.max_history

    assert planted.height == cfg.n_users == inter["user_id"].n_unique()
    plant = {r["user_id"]: r for r in planted.iter_rows(named=True)}
    for (user,), seq in inter.sort("user_id", "pos").group_by("user_id", maintain_order=True):
        p = plant[user]
        items_ = seq["item_id"].to_list()
        times = seq["timestamp"].to_list()
        assert seq["pos"].to_list() == list(range(len(items_)))
        assert all(a < b for a, b in zip(times, times[1:])), "timestamps strictly increasing"
        assert cfg.min_history <= len(items_) - 1 <= cfg.max_history
        # Target = the last interaction = Part 2 of the cue's series.
        assert items_[-1] == p["target_item"] and p["target_pos"] == len(items_) - 1
        assert titles[p["cue_item"]].endswith(", Part 1") and titles[p["target_item"]].endswith(", Part 2")
        assert titles[p["cue_item"]][: -len("1")] == titles[p["target_item"]][: -len("2")]
        # Exactly one series item in the history: the cue, strictly older than the K recent.
        history = items_[:-1]
        assert [i for i in history if i in series_items] == [p["cue_item"]]
        assert history[p["cue_pos"]] == p["cue_item"]
        assert p["cue_pos"] < len(history) - cfg.recent_k
        assert gap_lo <= p["target_pos"] - p["cue_pos"] <= gap_hi
        assert len(set(history)) == len(history), "no repeats within a user"
    # Users spread evenly over the series.
    counts = planted.group_by("series").len()["len"]
    assert counts.len() == cfg.n_series and counts.max() - counts.min() <= 1  # type: ignore[operator]


def test_final_times_spread_evenly(tmp_path: Path) -> None:
    cfg = SyntheticConfig(out=tmp_path / "syn", n_users=120, start=dt.date(2017, 1, 1), end=dt.date(2017, 12, 31))
    write_synthetic(cfg, cfg.out, quiet=True)
    inter, _, planted = _load(cfg.out)
    last = inter.group_by("user_id").agg(pl.col("timestamp").max())["timestamp"].sort().to_list()
    start = int(dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    end = int(dt.datetime(2017, 12, 31, tzinfo=dt.timezone.utc).timestamp())
    assert start <= last[0] and last[-1] <= end
    steps = {b - a for a, b in zip(last, last[1:])}
    assert max(steps) - min(steps) <= 1  # evenly spaced (integer rounding)
    # A temporal split by target time assigns whole users: the last 2 of 12 months hold ~1/6 of them.
    test_valid = sum(t >= start + (end - start) * 10 // 12 for t in last)
    assert test_valid in (19, 20, 21)


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    files = ("interactions.parquet", "items.parquet", "planted.parquet", "stats.json")
    a, b, c = (tmp_path / n for n in "abc")
    write_synthetic(SyntheticConfig(out=a, n_users=80, seed=7), a, quiet=True)
    write_synthetic(SyntheticConfig(out=b, n_users=80, seed=7), b, quiet=True)
    write_synthetic(SyntheticConfig(out=c, n_users=80, seed=8), c, quiet=True)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "interactions.parquet").read_bytes() != (c / "interactions.parquet").read_bytes()
    assert not pl.read_parquet(a / "planted.parquet").equals(pl.read_parquet(c / "planted.parquet"))


def test_titles_readable() -> None:
    pool = filler_title_pool()
    assert len(pool) == len(set(pool)) and not any("Part" in t for t in pool)
    assert "An Engineer in Oslo" in pool and "The Gentle Compass" in pool


def test_config_problems_reported_together(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_config(
            SyntheticConfig, out=tmp_path / "x", recent_k=20, min_history=16, n_filler=5, end="2016-01-01"
        )
    msg = str(info.value)
    assert "min_cue_gap (21) > min_history (16)" in msg
    assert "n_filler (5) must be >= max_history - 1 (29)" in msg
    assert "end (2016-01-01) must be after start (2017-01-01)" in msg
    with pytest.raises(UserError, match=r"min_cue_gap \(10\) must exceed recent_k \(10\)"):
        load_config(SyntheticConfig, out=tmp_path / "x", min_cue_gap=10)


def test_cli_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "-m", "automr.cli", "synthetic", "--out", str(out), "--n-users", "30", "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "interactions/s" in proc.stderr
    assert pl.read_parquet(out / "planted.parquet").height == 30
    assert "seed: 3" in (out / "config.yaml").read_text()
