"""Ties in time (issue 9, A3): `ties: pos` (inputs may share the target's timestamp, ordered by the
stored pos) against `ties: strict` (only strictly earlier inputs), and the tie rate prepare reports.

The tiny data set below has ties inside a user's history, at the target, and at a user's start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import (
    DAY,
    NO_FILTERS,
    _leftovers,
    _shared,
    all_samples,
    as_rows,
    prepare,
    ts,
    write_folder,
)

from automr.config import load_config
from automr.data.protocol import PrepareConfig, resolve_prepare
from automr.data.samples import SampleSpec, samples_from_interactions
from automr.data.schema import PreparedData

JAN1, JAN5, FEB10, MAR3 = ts("2020-01-01"), ts("2020-01-05"), ts("2020-02-10"), ts("2020-03-03")
# (user, item, timestamp, pos). Months: January train, February valid, March test.
TIED_ROWS = [
    (1, 10, JAN1, 0),
    (1, 11, JAN5, 1),
    (1, 12, JAN5, 2),  # tie with 11
    (1, 13, FEB10, 3),
    (1, 14, FEB10, 4),  # tie with 13
    (1, 15, MAR3, 5),
    (1, 16, MAR3, 6),  # three at MAR3
    (1, 17, MAR3, 7),
    (2, 20, JAN1, 0),
    (2, 21, JAN1, 1),  # tie with the user's first: no strictly earlier interaction
    (2, 22, FEB10, 2),
    (2, 23, MAR3, 3),
]
SETTINGS = dict(window_start="2020-01-01", window_end="2020-04-01", recent_k=2, **NO_FILTERS)

# Hand-computed, K=2, (user, target, time, recent items, recent times, memory items, memory times).
POS_SAMPLES = {
    "train": [
        (1, 11, JAN5, [10], [JAN1], [], []),
        (1, 12, JAN5, [10, 11], [JAN1, JAN5], [], []),
        (2, 21, JAN1, [20], [JAN1], [], []),
    ],
    "valid": [
        (1, 13, FEB10, [11, 12], [JAN5, JAN5], [10], [JAN1]),
        (1, 14, FEB10, [12, 13], [JAN5, FEB10], [10, 11], [JAN1, JAN5]),
        (2, 22, FEB10, [20, 21], [JAN1, JAN1], [], []),
    ],
    "test": [
        (1, 15, MAR3, [13, 14], [FEB10, FEB10], [10, 11, 12], [JAN1, JAN5, JAN5]),
        (1, 16, MAR3, [14, 15], [FEB10, MAR3], [10, 11, 12, 13], [JAN1, JAN5, JAN5, FEB10]),
        (1, 17, MAR3, [15, 16], [MAR3, MAR3], [10, 11, 12, 13, 14], [JAN1, JAN5, JAN5, FEB10, FEB10]),
        (2, 23, MAR3, [21, 22], [JAN1, FEB10], [20], [JAN1]),
    ],
}
STRICT_SAMPLES = {
    "train": [
        (1, 11, JAN5, [10], [JAN1], [], []),
        (1, 12, JAN5, [10], [JAN1], [], []),  # 11 shares its time: left out
    ],  # (2, 21) has nothing strictly earlier: no sample
    "valid": [
        (1, 13, FEB10, [11, 12], [JAN5, JAN5], [10], [JAN1]),
        (1, 14, FEB10, [11, 12], [JAN5, JAN5], [10], [JAN1]),
        (2, 22, FEB10, [20, 21], [JAN1, JAN1], [], []),
    ],
    "test": [
        (1, 15, MAR3, [13, 14], [FEB10, FEB10], [10, 11, 12], [JAN1, JAN5, JAN5]),
        (1, 16, MAR3, [13, 14], [FEB10, FEB10], [10, 11, 12], [JAN1, JAN5, JAN5]),
        (1, 17, MAR3, [13, 14], [FEB10, FEB10], [10, 11, 12], [JAN1, JAN5, JAN5]),
        (2, 23, MAR3, [21, 22], [JAN1, FEB10], [20], [JAN1]),
    ],
}


def _samples(root: Path) -> dict[str, list[tuple]]:
    data = PreparedData.load(root)
    return {s: as_rows(data.split(s).sort("user_id", "target_time", maintain_order=True)) for s in POS_SAMPLES}


def _inputs_at_or_after_target(root: Path) -> int:
    """Samples with a recent or memory item at or after the target's time (checked via item times)."""
    inputs = pl.concat_list("recent_times", "memory_times").list.max()
    return all_samples(root).select((inputs >= pl.col("target_time")).fill_null(False).sum()).item()


def test_pos_is_the_default_and_unchanged(tmp_path: Path) -> None:
    """Without the option, and with ties=pos, the samples are exactly those prepare made before it existed."""
    data = write_folder(tmp_path / "d", TIED_ROWS)
    default = prepare(data, tmp_path / "default", **SETTINGS)
    explicit = prepare(data, tmp_path / "pos", ties="pos", **SETTINGS)
    assert _samples(tmp_path / "default") == _samples(tmp_path / "pos") == POS_SAMPLES
    assert default["settings"]["ties"] == "pos" and default["setting_sources"]["ties"] == "paper default"
    assert explicit["ties"]["targets_without_strict_history"] == 0 and explicit["samples"] == {"train": 3, "valid": 3, "test": 4}
    # tie rate: train 12, 21 of 3; valid 14 of 3; test 16, 17 of 4.
    assert explicit["ties"]["tie_rate"] == {"train": 0.6667, "valid": 0.3333, "test": 0.5}
    assert explicit["ties"]["target_time_shared"] == explicit["ties"]["tie_rate"]
    assert _inputs_at_or_after_target(tmp_path / "pos") == 5  # the five tied samples


def test_strict_keeps_only_strictly_earlier_inputs(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", TIED_ROWS)
    stats = prepare(data, tmp_path / "out", ties="strict", **SETTINGS)
    assert _samples(tmp_path / "out") == STRICT_SAMPLES
    assert _inputs_at_or_after_target(tmp_path / "out") == 0
    assert stats["samples"] == {"train": 2, "valid": 3, "test": 4}
    assert stats["targets_without_enough_history"] == 2  # each user's first interaction, as under pos
    assert stats["ties"]["targets_without_strict_history"] == 1  # (2, 21): its only earlier one shares its time
    assert stats["ties"]["tie_rate"] == {"train": 0.0, "valid": 0.0, "test": 0.0}
    # samples whose tied inputs were left out: train 12 of 2; valid 14 of 3; test 16, 17 of 4
    assert stats["ties"]["target_time_shared"] == {"train": 0.5, "valid": 0.3333, "test": 0.5}
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert saved["ties"] == stats["ties"] and saved["settings"]["ties"] == "strict"
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["ties"] == "strict"


def test_tie_warning_under_pos_only(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", TIED_ROWS)
    pos = prepare(data, tmp_path / "pos", **SETTINGS)
    (warning,) = [w for w in pos["warnings"] if "shares the target's timestamp" in w]
    assert "train 67%, valid 33%, test 50%" in warning and "--ties strict" in warning
    strict = prepare(data, tmp_path / "strict", ties="strict", **SETTINGS)
    assert not [w for w in strict["warnings"] if "timestamp" in w]


def test_ties_layering_preset_yaml_flag(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("ties: strict\n")
    cfg, src = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path / "o", preset=str(preset)))
    assert (cfg.ties, src["ties"]) == ("strict", f"preset {preset}")
    cfg, src = resolve_prepare(load_config(PrepareConfig, None, data=tmp_path, out=tmp_path / "o", preset=str(preset), ties="pos"))
    assert (cfg.ties, src["ties"]) == ("pos", "config")


def test_cli_ties_flag(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", TIED_ROWS)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    cmd = [sys.executable, "-m", "automr.cli", "prepare", "--data", str(data), *flags]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "o"), "--ties", "strict"], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ties=strict" in res.stderr and "1 targets without a strictly earlier history skipped" in res.stderr
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "bad"), "--ties", "time"], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "ties" in bad.stderr and "'pos' or 'strict'" in bad.stderr
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def _reference(seqs: list[list[tuple[int, int]]], k: int, min_recent: int, strict: bool) -> list[tuple]:
    """The sample rule in plain Python: inputs = the earlier interactions (strict: earlier in time).

    Each row: the seven sample columns, then how many earlier-stored interactions share the target's time.
    """
    out = []
    for u, seq in enumerate(seqs):
        ordered = sorted((day * DAY, pos, item) for pos, (item, day) in enumerate(seq))
        for i, (t, _, item) in enumerate(ordered):
            before = [x for x in ordered[:i] if x[0] < t] if strict else ordered[:i]
            if len(before) < min_recent:
                continue
            cut = max(0, len(before) - k)
            recent, memory = before[cut:], before[:cut]
            tied = sum(1 for x in ordered[:i] if x[0] == t)
            out.append((u, item, t, [x[2] for x in recent], [x[0] for x in recent], [x[2] for x in memory], [x[0] for x in memory], tied))
    return out


@given(
    seqs=st.lists(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 6)), max_size=15), min_size=1, max_size=5),
    k=st.integers(1, 4),
    min_recent=st.integers(0, 2),
    strict=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_builder_matches_reference_with_ties(seqs: list[list[tuple[int, int]]], k: int, min_recent: int, strict: bool) -> None:
    """Property (few distinct days, so many ties): the builder equals the plain reading of both rules."""
    rows = [(u, item, day * DAY, pos) for u, seq in enumerate(seqs) for pos, (item, day) in enumerate(seq)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "pos": pl.Int64}, orient="row")
    got = samples_from_interactions(df, SampleSpec(recent_k=k, min_recent=min_recent, ties="strict" if strict else "pos"))
    expected = _reference(seqs, k, min_recent, strict)
    assert [(*r, t) for r, t in zip(as_rows(got), got["tied_before"].to_list())] == expected
    if strict:  # the invariant, stated directly: no input shares or follows the target's time
        assert all(x < r[2] for r in expected for x in r[4] + r[6])


@pytest.mark.shared_data
def test_movielens_100k_strict(tmp_path: Path) -> None:
    """On ml-100k about half the samples' last recent item is a tie; strict leaves none at or after the target."""
    stats = prepare(_shared("movielens-100k"), tmp_path / "out", preset="movielens-100k", ties="strict")
    assert _inputs_at_or_after_target(tmp_path / "out") == 0
    assert all(n >= 1000 for n in stats["samples"].values()), stats["samples"]
    assert all(r > 0.3 for r in stats["ties"]["target_time_shared"].values()), stats["ties"]
    assert stats["ties"]["targets_without_strict_history"] > 0
