"""Bad data is named, not absorbed: duplicates, wrong time units, malformed rows, empty memories,
degenerate splits, max_users and truncated files (house issue items 7, 11-16).

Each bad input asserts the message, the count, and for errors the exit (UserError = exit 2) and
that nothing was written; warnings are asserted in stats.json `warnings` and, once through the
CLI, on stderr with exit 0.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import make_prepared
from test_protocol import DAY, _leftovers, all_samples, prepare, ts, write_folder

from automr.data.schema import SPLITS
from automr.errors import UserError

JAN1 = ts("2020-01-01")
WINDOW = dict(window_start="2020-01-01", window_end="2021-01-01", split_by="quantile", min_item_interactions=0, min_sequence_length=0)
HEADER = "user_id,item_id,timestamp,pos,rating\n"


def _rows(n_users: int = 50, n: int = 30, seed: int = 0) -> list[str]:
    """CSV lines (with a rating column) of n_users users with n daily interactions each: enough
    samples (>= 100 per split) that a clean run has no warning."""
    rng = random.Random(seed)
    return [f"{u},{rng.randint(1, 40)},{JAN1 + p * DAY + u},{p},{rng.randint(1, 5)}\n" for u in range(n_users) for p in range(n)]


def _titles(items: range = range(1, 41)) -> str:
    return "item_id,title\n" + "".join(f"{i},Item {i}\n" for i in items)


def _folder(path: Path, lines: list[str], titles: str | None = None) -> Path:
    return write_folder(path, HEADER + "".join(lines), titles or _titles())


def _only(warnings: list[str], text: str) -> str:
    found = [w for w in warnings if text in w]
    assert len(found) == 1, (text, warnings)
    return found[0]


# --------------------------------------------------------------------------- 11: duplicates


def test_exact_duplicates_are_dropped_before_any_filter_and_reported(tmp_path: Path) -> None:
    lines = _rows()
    clean = prepare(_folder(tmp_path / "clean", lines), tmp_path / "a", **WINDOW)
    assert clean["warnings"] == [] and clean["read"]["exact_duplicates_dropped"] == 0
    # Every row of the first ten users twice, shuffled in: the copies must vanish without a trace.
    doubled = lines + lines[:300]
    random.Random(1).shuffle(doubled)
    dup = prepare(_folder(tmp_path / "dup", doubled), tmp_path / "b", **WINDOW)
    assert dup["read"]["exact_duplicates_dropped"] == 300 and dup["read"]["rows"] == 1800
    for s in SPLITS:
        a = pl.read_parquet(tmp_path / "a" / "samples" / f"{s}.parquet")
        assert a.equals(pl.read_parquet(tmp_path / "b" / "samples" / f"{s}.parquet")), s
    assert dup["filters"] == clean["filters"]  # dropped before the first filter counts anything
    warning = _only(dup["warnings"], "exact duplicates")
    assert warning.startswith("300 rows of ") and "every other column" in warning
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["warnings"] == dup["warnings"]


def test_rows_differing_in_another_column_are_kept_and_counted(tmp_path: Path) -> None:
    lines = _rows()
    u, i, t, p, r = lines[5].strip().split(",")
    other_rating = f"{u},{i},{t},{p},{int(r) % 5 + 1}\n"  # same user, item, time, pos; another rating
    stats = prepare(_folder(tmp_path / "d", [*lines, other_rating]), tmp_path / "o", **WINDOW)
    assert stats["read"]["exact_duplicates_dropped"] == 0 and stats["read"]["repeated_user_item_time_kept"] == 1
    assert "are kept as separate interactions" in _only(stats["warnings"], "1 rows share user, item and timestamp")
    assert sum(stats["samples"].values()) == sum(prepare(_folder(tmp_path / "c", lines), tmp_path / "c_out", **WINDOW)["samples"].values()) + 1


# --------------------------------------------------------------------------- 12: time units


@pytest.mark.parametrize(("factor", "unit", "divide"), [(1000, "milliseconds", "1,000"), (10**6, "microseconds", "1,000,000")])
def test_timestamps_in_ms_or_us_are_a_clear_error(tmp_path: Path, factor: int, unit: str, divide: str) -> None:
    lines = [",".join([*(f := line.split(","))[:2], str(int(f[2]) * factor), *f[3:]]) for line in _rows(5, 10)]
    data = _folder(tmp_path / "d", lines)
    out = tmp_path / "runs" / "out"
    with pytest.raises(UserError) as err:
        prepare(data, out, **WINDOW)
    msg = str(err.value)
    assert f"look like {unit}, not unix seconds: 50 of 50 rows" in msg and "interactions.csv.gz" in msg
    assert f"divide the timestamp column by {divide}" in msg and "2020-01-01" in msg  # the date it would be
    assert not out.exists() and _leftovers(out.parent) == []


def test_a_few_impossible_timestamps_are_skipped_and_warned(tmp_path: Path) -> None:
    lines = _rows()
    bad = [f"99,1,{JAN1 * 1000},0,5\n", "99,2,-99999999999999,1,5\n"]  # a ms value among seconds; before year 1
    stats = prepare(_folder(tmp_path / "d", lines + bad), tmp_path / "o", **WINDOW)
    assert stats["read"]["malformed"]["timestamp out of range"]["rows"] == 2
    assert stats["read"]["time_max"] == "2020-01-30T00:00:49"  # the window came from the sane rows
    warning = _only(stats["warnings"], "skipped as malformed")
    assert warning.startswith("2 of 1,502 rows") and f"timestamp out of range: 2 (e.g. user_id=99, item_id=1, timestamp={JAN1 * 1000}" in warning


# --------------------------------------------------------------------------- 13: malformed rows


def test_malformed_rows_are_warned_about_with_an_example(tmp_path: Path) -> None:
    lines = _rows() + ["7,abc,1580000000,99,5\n", "7,12\n", "7,13,,98,5\n"]
    stats = prepare(_folder(tmp_path / "d", lines), tmp_path / "o", **WINDOW)
    malformed = stats["read"]["malformed"]
    assert (malformed["value not an integer"]["rows"], malformed["wrong number of fields"]["rows"]) == (2, 1)
    warning = _only(stats["warnings"], "skipped as malformed")
    assert warning.startswith("3 of 1,503 rows of ") and "interactions.csv.gz" in warning
    assert "value not an integer: 2 (e.g. user_id='7', item_id='abc', timestamp='1580000000', pos='99')" in warning
    assert "wrong number of fields: 1 (e.g. '7,12' (2 fields, expected 5))" in warning
    # A clean file read by the fast typed path shows an empty value the same way.
    typed = prepare(_folder(tmp_path / "t", _rows() + ["7,13,,98,5\n"]), tmp_path / "o2", **WINDOW)
    assert "value not an integer: 1 (e.g. user_id=7, item_id=13, timestamp=(empty), pos=98)" in _only(typed["warnings"], "malformed")


def test_no_usable_row_names_the_reasons(tmp_path: Path) -> None:
    data = _folder(tmp_path / "d", ["1,2,2020-01-01,0,5\n", "1,2\n"])
    with pytest.raises(UserError, match="none of its 2 rows has integer") as err:
        prepare(data, tmp_path / "o", **WINDOW)
    assert "value not an integer: 1 (e.g. user_id='1', item_id='2', timestamp='2020-01-01', pos='0')" in str(err.value)
    assert "wrong number of fields: 1 (e.g. '1,2' (2 fields, expected 5))" in str(err.value)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 14: empty memories


def test_empty_memory_warns_at_prepare_and_build_memory_refuses(tmp_path: Path) -> None:
    from automr.stages.build_memory import BuildMemoryConfig, run_build_memory

    stats = prepare(_folder(tmp_path / "d", _rows()), tmp_path / "prep", recent_k=40, **WINDOW)
    assert all(stats["memory_length"][s]["max"] == 0 for s in SPLITS)
    assert "recent_k=40" in _only(stats["warnings"], "every sample of every split has an empty memory")
    mem = tmp_path / "runs" / "mem"
    mem.parent.mkdir()
    with pytest.raises(UserError, match=r"nothing to put in the memory store: all 1,450 selected samples of split\(s\) train, valid, test"):
        run_build_memory(BuildMemoryConfig(samples=tmp_path / "prep", out=mem, progress=False))
    assert not mem.exists() and _leftovers(mem.parent) == []


def test_build_memory_check_accepts_any_memory() -> None:
    from automr.memory.build import check_memory_nonempty

    empty = pl.DataFrame({"memory_items": [[], []]}, schema={"memory_items": pl.List(pl.Int64)})
    some = pl.DataFrame({"memory_items": [[], [4]]}, schema={"memory_items": pl.List(pl.Int64)})
    check_memory_nonempty({"train": empty, "test": some}, "prep")  # one element is enough
    with pytest.raises(UserError, match="all 2 selected samples of split"):
        check_memory_nonempty({"train": empty}, "prep")


# --------------------------------------------------------------------------- 15: degenerate splits


def test_small_valid_and_test_splits_are_warned_with_counts(tmp_path: Path) -> None:
    stats = prepare(_folder(tmp_path / "d", _rows(n_users=5)), tmp_path / "o", **WINDOW)
    n_valid, n_test = stats["samples"]["valid"], stats["samples"]["test"]
    assert 0 < n_valid < 100 and 0 < n_test < 100
    valid = _only(stats["warnings"], "the valid split")
    assert f"has only {n_valid} sample(s) (5 users), fewer than the 100" in valid and "early stopping" in valid
    assert f"moves Recall@K by {100 / n_test:.1f} points" in _only(stats["warnings"], "the test split")


def test_evaluate_says_when_n_eval_exceeds_the_split(tmp_path: Path) -> None:
    from automr.stages.evaluate import EvaluateConfig, run_evaluate

    root = make_prepared(tmp_path / "p", {1: [1, 2, 3, 4], 2: [1, 2, 3, 5], 3: [2, 1, 4, 3]}, items=[1, 2, 3, 4, 5])
    run_evaluate(EvaluateConfig(samples=root, methods=["popularity"], run=tmp_path / "r", n_eval=100, n_boot=20))
    info = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert info["subset"] == "all 3 test samples (n_eval=100 asked for more than the 3 that exist)"
    assert "n_eval=100 asked for more" in (tmp_path / "r" / "metrics.md").read_text()
    run_evaluate(EvaluateConfig(samples=root, methods=["popularity"], run=tmp_path / "r2", n_eval=3, n_boot=20))
    assert json.loads((tmp_path / "r2" / "eval.json").read_text())["subset"] == "all 3 test samples"


# --------------------------------------------------------------------------- 16: max_users


def _users_with_and_without_samples() -> list[str]:
    """20 users with 30 interactions on items of their own (10 each) and 30 users with a single
    interaction, who pass every filter but have no sample (a target needs an earlier interaction)."""
    long = [f"{u},{u * 100 + p % 10},{JAN1 + p * DAY},{p},5\n" for u in range(20) for p in range(30)]
    single = [f"{u},{u * 100},{JAN1},0,5\n" for u in range(20, 50)]
    return long + single


def test_max_users_draws_among_users_with_samples_and_reports_the_catalogue(tmp_path: Path) -> None:
    lines = _users_with_and_without_samples()
    titles = "item_id,title\n" + "".join(f"{i},Item {i}\n" for i in sorted({int(x.split(',')[1]) for x in lines}))
    data = _folder(tmp_path / "d", lines, titles)
    stats = prepare(data, tmp_path / "o", max_users=10, **WINDOW)
    assert all_samples(tmp_path / "o")["user_id"].n_unique() == 10 and stats["users"] == 10
    assert stats["max_users"] == {"requested": 10, "users_with_samples": 20, "items_of_those_users": 200, "users_kept": 10, "items_kept": 100}
    assert "shrinks from 200 to 100 items" in _only(stats["warnings"], "max_users=10 kept 10 of the 20 users with samples")
    many = prepare(data, tmp_path / "o2", max_users=35, **WINDOW)
    assert many["users"] == 20 and "than the 20 that have samples" in _only(many["warnings"], "max_users=35")


# --------------------------------------------------------------------------- 7: truncated files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["items.csv.gz", "interactions.csv.gz"])
def test_truncated_gzip_names_the_file(tmp_path: Path, name: str) -> None:
    data = _folder(tmp_path / "d", _rows())
    _truncate(data / name)
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    with pytest.raises(UserError, match=rf"{data / name} is truncated: .*interrupted download or copy"):
        prepare(data, out, **WINDOW)
    assert not out.exists() and _leftovers(out.parent) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "automr.cli", "prepare", *args, "--window-start", "2020-01-01", "--split-by", "quantile"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})


def test_cli_exit_codes_for_an_error_and_a_warning(tmp_path: Path) -> None:
    broken = _folder(tmp_path / "broken", _rows())
    _truncate(broken / "items.csv.gz")
    res = _cli("--data", str(broken), "--out", str(tmp_path / "o1"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "items.csv.gz is truncated" in " ".join(res.stderr.split())
    assert not (tmp_path / "o1").exists()
    lines = _rows()
    res = _cli("--data", str(_folder(tmp_path / "dup", lines + lines[:10])), "--out", str(tmp_path / "o2"))
    assert res.returncode == 0, res.stderr
    shown = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(shown) == 1 and "10 rows of" in shown[0] and "exact duplicates" in shown[0]  # one line, unwrapped
