"""The data protocol and `prepare`: exact samples, leakage, filters, presets, bad input, scale.

Fixtures are tiny common-format folders written per test. Tests marked shared_data read
../shared/data and are skipped where it is absent.
"""

from __future__ import annotations

import datetime as dt
import gzip
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from automr.config import load_config
from automr.data.common import open_common, scan_common
from automr.data.protocol import PAPER_DEFAULTS, PrepareConfig, add_months, available_presets, load_preset, presets_dir, quantile_boundaries, resolve_prepare
from automr.stages.prepare import run_prepare
from automr.data.samples import SampleSpec, samples_from_interactions
from automr.data.schema import SAMPLE_SCHEMA, SPLITS, PreparedData
from automr.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DAY = 86_400


def ts(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc).timestamp())


def write_folder(
    folder: Path,
    rows: list[tuple[int, int, int, int]] | str,
    titles: dict[int, str] | str | None = None,
    *,
    fmt: str = "csv.gz",
) -> Path:
    """A common-format folder: rows (user, item, timestamp, pos) or raw CSV text; titles default to 'Item <id>'."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, str):
        text = rows
    else:
        text = "user_id,item_id,timestamp,pos\n" + "".join(f"{u},{i},{t},{p}\n" for u, i, t, p in rows)
    if titles is None:
        assert not isinstance(rows, str)
        titles = {i: f"Item {i}" for i in sorted({r[1] for r in rows})}
    items_text = titles if isinstance(titles, str) else "item_id,title\n" + "".join(f'{i},"{t}"\n' for i, t in titles.items())
    if fmt == "parquet":
        pl.read_csv(text.encode()).write_parquet(folder / "interactions.parquet")
        pl.read_csv(items_text.encode()).write_parquet(folder / "items.parquet")
    else:
        with gzip.open(folder / "interactions.csv.gz", "wt") as fh:
            fh.write(text)
        with gzip.open(folder / "items.csv.gz", "wt") as fh:
            fh.write(items_text)
    return folder


def prepare(data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    return run_prepare(load_config(PrepareConfig, None, data=data, out=out, **kw))


def all_samples(root: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(root / "samples" / f"{s}.parquet").with_columns(pl.lit(s).alias("split")) for s in SPLITS])


def as_rows(df: pl.DataFrame) -> list[tuple]:
    cols = ["user_id", "target_item", "target_time", "recent_items", "recent_times", "memory_items", "memory_times"]
    return [tuple(r) for r in df.select(cols).iter_rows()]


NO_FILTERS = dict(min_item_interactions=0, min_sequence_length=0, max_history=0)

# --------------------------------------------------------------------------- exact samples

# user 7: a tie at Jan 5 (pos decides: 102 before 103) and an out-of-order pair (pos 3 has
# Feb 15, pos 4 has Feb 10: time wins, so 105 comes before 104).
JAN1, JAN5, FEB10, FEB15, MAR3 = ts("2020-01-01"), ts("2020-01-05"), ts("2020-02-10"), ts("2020-02-15"), ts("2020-03-03")
EXACT_ROWS = [
    (7, 101, JAN1, 0),
    (7, 103, JAN5, 2),
    (7, 102, JAN5, 1),
    (7, 104, FEB15, 3),
    (7, 105, FEB10, 4),
    (7, 106, MAR3, 5),
    (3, 201, JAN1 + 60, 0),
    (3, 202, FEB10 + 60, 1),
]


def test_exact_samples_hand_computed(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", EXACT_ROWS)
    stats = prepare(data, tmp_path / "out", window_start="2020-01-01", window_end="2020-04-01", recent_k=2, **NO_FILTERS)
    out = PreparedData.load(tmp_path / "out")
    # Hand-computed, K=2: recent = the 2 before the target, memory = the older ones, oldest first.
    assert as_rows(out.split("train")) == [
        (7, 102, JAN5, [101], [JAN1], [], []),
        (7, 103, JAN5, [101, 102], [JAN1, JAN5], [], []),
    ]
    assert as_rows(out.split("valid").sort("user_id", "target_time")) == [
        (3, 202, FEB10 + 60, [201], [JAN1 + 60], [], []),
        (7, 105, FEB10, [102, 103], [JAN5, JAN5], [101], [JAN1]),
        (7, 104, FEB15, [103, 105], [JAN5, FEB10], [101, 102], [JAN1, JAN5]),
    ]
    assert as_rows(out.split("test")) == [(7, 106, MAR3, [105, 104], [FEB10, FEB15], [101, 102, 103], [JAN1, JAN5, JAN5])]
    for s in SPLITS:
        assert dict(out.split(s).schema) == SAMPLE_SCHEMA
    assert stats["out_of_order_timestamps"] == 1
    assert stats["samples"] == {"train": 2, "valid": 3, "test": 1}
    assert stats["targets_without_enough_history"] == 2  # each user's first interaction
    assert (stats["window"]["valid_start"], stats["window"]["test_start"]) == ("2020-02-01", "2020-03-01")
    assert out.items["item_id"].to_list() == [101, 102, 103, 104, 105, 106, 201, 202]
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "stats.json").is_file()
    assert not (tmp_path / "out" / "_work").exists()


def test_repeat_rate_per_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9 A2: stats.json and the summary give each split's share of targets already in the history."""
    d = lambda day: ts(f"2020-{day}")  # noqa: E731
    rows = [
        (1, 10, d("01-01"), 0), (1, 11, d("01-02"), 1), (1, 10, d("01-03"), 2), (1, 12, d("01-04"), 3),  # train: 11, 10 (seen), 12
        (1, 11, d("02-10"), 4), (2, 20, d("01-01"), 0), (2, 21, d("02-10"), 1),  # valid: 11 (seen), 21
        (1, 13, d("03-03"), 5), (2, 20, d("03-03"), 2),  # test: 13, 20 (seen, in memory: recent_k=1)
    ]
    stats = prepare(write_folder(tmp_path / "d", rows), tmp_path / "out", window_start="2020-01-01",
                    window_end="2020-04-01", recent_k=1, **NO_FILTERS)
    assert stats["samples"] == {"train": 3, "valid": 2, "test": 2}
    assert stats["repeat_rate"] == {"train": pytest.approx(1 / 3, abs=1e-6), "valid": 0.5, "test": 0.5}
    printed = " ".join(capsys.readouterr().err.split())  # rich wraps at the terminal width
    assert "repeat rate (target already in the history): train 33.33%, valid 50.00%, test 50.00%" in printed


def test_history_before_window_option(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", EXACT_ROWS)
    common = dict(window_start="2020-02-01", window_end="2020-04-01", recent_k=2, valid_size=1, test_size=1, **NO_FILTERS)
    with pytest.raises(UserError, match="too short"):  # 2 months cannot hold train + valid + test months
        prepare(data, tmp_path / "o0", **common)
    common["window_start"] = "2020-01-03"
    prepare(data, tmp_path / "o1", **common)
    confined = all_samples(tmp_path / "o1")
    # Paper default: January 1 is outside the window, so it is neither target nor history.
    assert confined.filter(pl.col("target_item") == 106)["memory_items"].to_list() == [[102, 103]]
    assert 101 not in set(confined["recent_items"].explode().drop_nulls())
    prepare(data, tmp_path / "o2", history_before_window=True, **common)
    older = all_samples(tmp_path / "o2")
    assert older.filter(pl.col("target_item") == 106)["memory_items"].to_list() == [[101, 102, 103]]
    assert older["target_time"].min() >= ts("2020-01-03")  # targets stay in the window
    assert older.filter(pl.col("target_item") == 103)["recent_items"].to_list() == [[101, 102]]


def test_targets_last(tmp_path: Path) -> None:
    # Five users with 4 interactions each, their last ones on days 10, 20, 30, 40, 50.
    rows = [(u, 10 * u + p, ts("2020-01-01") + (10 * u - 3 + p) * DAY, p) for u in range(1, 6) for p in range(4)]
    data = write_folder(tmp_path / "d", rows)
    prepare(data, tmp_path / "out", window_start="min", window_end="max", split_by="quantile", valid_size=0.2, test_size=0.2, targets="last", recent_k=2, **NO_FILTERS)
    df = all_samples(tmp_path / "out").sort("user_id")
    assert df.select("user_id", "target_item", "split").rows() == [
        (1, 13, "train"), (2, 23, "train"), (3, 33, "train"), (4, 43, "valid"), (5, 53, "test"),
    ]
    assert df["recent_items"].to_list()[0] == [11, 12] and df["memory_items"].to_list()[0] == [10]


# --------------------------------------------------------------------------- filters


def _filter_fixture() -> list[tuple[int, int, int, int]]:
    """Users 1-4 over 2020; items 900 (4 interactions, dropped), 901 (5, kept), 1000+ common."""
    rows = []
    t0 = ts("2020-01-01")

    def user(u: int, items: list[int]) -> None:
        step = (365 * DAY) // (len(items) + 1)
        rows.extend((u, i, t0 + (k + 1) * step, k) for k, i in enumerate(items))

    common = [1000 + (k % 10) for k in range(200)]
    user(1, common[:19] + [900])  # 20 interactions, one on a rare item -> 19 -> dropped by the sequence filter
    user(2, common[:19] + [901])  # 20 -> kept
    user(3, common[:120])  # 120 -> capped to the last 100
    user(4, common[:5] + [900, 900, 900, 901, 901, 901, 901])  # 12 -> dropped
    return rows


def test_filters_item_sequence_and_cap(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", _filter_fixture())
    stats = prepare(data, tmp_path / "out", window_start="2020-01-01", window_end="2021-01-01")  # paper filters 5/20/100
    df = all_samples(tmp_path / "out")
    assert set(df["user_id"].unique()) == {2, 3}
    assert 900 not in set(df["target_item"]) and 900 not in set(df["memory_items"].explode().drop_nulls())
    assert 901 in set(df["target_item"])
    u3 = df.filter(pl.col("user_id") == 3).sort("target_time")
    assert u3.height == 99  # capped to 100: targets are positions 1..99 of the capped sequence
    first_kept = _filter_fixture()[19 + 1 + 20 + 20][2]  # user 3's 21st interaction opens the capped sequence
    assert u3["recent_times"][0].to_list() == [first_kept]
    assert max(len(m) for m in u3["memory_items"].to_list()) == 100 - 1 - 10
    steps = {f["step"]: f for f in stats["filters"]}
    assert steps["item filter"]["interactions_dropped"] == 4 and steps["item filter"]["items_dropped"] == 1
    assert steps["sequence filter"]["users_dropped"] == 2  # user 1 (19 after the item filter) and user 4
    assert steps["history cap"]["interactions_dropped"] == 20 and steps["history cap"]["users_dropped"] == 0


# --------------------------------------------------------------------------- leakage


def assert_no_leakage(root: Path, max_history: int = 100, recent_k: int = 10) -> None:
    """Inputs precede targets (in time and in order) and the splits are ordered in time."""
    df = all_samples(root)
    assert df.height > 0
    for col in ("recent_times", "memory_times"):
        late = df.select((pl.col(col).list.max() > pl.col("target_time")).fill_null(False).sum()).item()
        assert late == 0, f"{col} after target_time in {late} samples"
    # recent holds the K latest, memory the older ones: memory's last <= recent's first
    order = df.select((pl.col("memory_times").list.last() > pl.col("recent_times").list.first()).fill_null(False).sum()).item()
    assert order == 0
    assert df.select((pl.col("recent_items").list.len() > recent_k).sum()).item() == 0
    if max_history:
        assert df.select((pl.col("recent_items").list.len() + pl.col("memory_items").list.len() >= max_history).sum()).item() == 0
    # Consecutive samples of a user: next history = (this history + this target), capped.
    hist = pl.concat_list("memory_items", "recent_items")
    df = df.with_columns(hist.alias("hist"), hist.list.len().alias("hlen")).sort("user_id", "target_time", "hlen")
    nxt = df.with_columns(
        pl.col("hist").shift(-1).over("user_id").alias("next_hist"),
        pl.concat_list("hist", "target_item").alias("grown"),
    ).filter(pl.col("next_hist").is_not_null())
    if max_history:
        nxt = nxt.with_columns(pl.col("grown").list.tail(max_history - 1))
    bad = nxt.filter(pl.col("next_hist") != pl.col("grown")).height
    assert bad == 0, f"{bad} samples whose history is not the previous sample's history + target"
    t = {s: df.filter(pl.col("split") == s)["target_time"] for s in SPLITS}
    assert t["train"].max() < t["valid"].min() and t["valid"].max() < t["test"].min()  # type: ignore[operator]


@given(
    seqs=st.lists(
        st.lists(st.tuples(st.integers(1, 8), st.integers(0, 40)), min_size=0, max_size=25),
        min_size=1,
        max_size=6,
    ),
    k=st.integers(1, 4),
    cap=st.sampled_from([0, 3, 7]),
    min_recent=st.integers(0, 3),
    last=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sample_builder_matches_reference(seqs: list[list[tuple[int, int]]], k: int, cap: int, min_recent: int, last: bool) -> None:
    """Property: the vectorised builder equals a plain-Python reading of the protocol."""
    rows = [(u, item, day * DAY, pos) for u, seq in enumerate(seqs) for pos, (item, day) in enumerate(seq)]
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "pos": pl.Int64}, orient="row")
    got = samples_from_interactions(df, SampleSpec(recent_k=k, min_recent=min_recent, last_only=last), max_history=cap)

    expected = []
    for u, seq in enumerate(seqs):
        ordered = sorted(((day * DAY, pos, item) for pos, (item, day) in enumerate(seq)))
        if cap:
            ordered = ordered[-cap:]
        for i, (t, _, item) in enumerate(ordered):
            if i < min_recent or (last and i != len(ordered) - 1):
                continue
            before = ordered[:i]
            recent, memory = before[max(0, i - k) :], before[: max(0, i - k)]
            expected.append((u, item, t, [x[2] for x in recent], [x[0] for x in recent], [x[2] for x in memory], [x[0] for x in memory]))
    assert as_rows(got) == expected
    # invariants, stated directly
    for r in expected:
        assert all(x <= r[2] for x in r[4] + r[6])


def reference_protocol(rows: list[tuple[int, int, int, int]], start: int, end: int, valid_start: int, test_start: int, *, history_before: bool, min_item: int, min_len: int, cap: int, k: int) -> dict[str, list[tuple]]:
    """The whole protocol in plain Python, written from the docstring of automr/data/protocol.py."""
    from collections import Counter, defaultdict

    scope = [r for r in rows if r[2] < end and (history_before or r[2] >= start)]
    counts = Counter(r[1] for r in scope)
    by_user: dict[int, list] = defaultdict(list)
    for u, i, t, p in scope:
        if counts[i] >= min_item:
            by_user[u].append((t, p, i))
    out: dict[str, list[tuple]] = {s: [] for s in SPLITS}
    for u, seq in by_user.items():
        if len(seq) < min_len:
            continue
        seq = sorted(seq)[-cap:]
        for j, (t, _, i) in enumerate(seq):
            if j < 1 or t < start:
                continue
            before = seq[:j]
            cut = max(0, j - k)
            split = "test" if t >= test_start else "valid" if t >= valid_start else "train"
            out[split].append((u, i, t, [x[2] for x in before[cut:]], [x[0] for x in before[cut:]], [x[2] for x in before[:cut]], [x[0] for x in before[:cut]]))
    return out


@pytest.mark.parametrize("history_before", [False, True])
def test_whole_protocol_matches_reference(tmp_path: Path, history_before: bool) -> None:
    import random

    rng = random.Random(7)
    rows = []
    for u in range(80):
        t = ts("2019-01-01") + rng.randint(0, 500) * DAY
        for p in range(rng.randint(3, 60)):
            t += rng.choice([0, 3600, DAY, 4 * DAY, 9 * DAY])
            rows.append((u, rng.randint(1, 120), t, p))
    data = write_folder(tmp_path / "d", rows)
    prepare(data, tmp_path / "out", window_start="2019-07-01", window_end="2020-07-01", history_before_window=history_before, min_item_interactions=3, min_sequence_length=8, max_history=25, recent_k=4)
    expected = reference_protocol(rows, ts("2019-07-01"), ts("2020-07-01"), ts("2020-05-01"), ts("2020-06-01"), history_before=history_before, min_item=3, min_len=8, cap=25, k=4)
    got = PreparedData.load(tmp_path / "out")
    for s in SPLITS:
        assert sorted(as_rows(got.split(s))) == sorted(expected[s]), s
        assert len(expected[s]) > 20


def test_leakage_and_order_on_random_data(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    rows = []
    for u in range(60):
        n = rng.randint(15, 140)
        t = ts("2019-06-01") + rng.randint(0, 200) * DAY
        for p in range(n):
            t += rng.choice([0, 0, 3600, DAY, 3 * DAY])  # many ties
            rows.append((u, rng.randint(1, 80), t, p))
    data = write_folder(tmp_path / "d", rows)
    prepare(data, tmp_path / "out", window_start="2019-09-01", window_end="2020-09-01", split_by="quantile", history_before_window=True, min_sequence_length=20)
    assert_no_leakage(tmp_path / "out")


def test_result_does_not_depend_on_buckets_or_chunks(tmp_path: Path) -> None:
    import random

    rng = random.Random(1)
    rows = [(u, rng.randint(1, 50), ts("2020-01-01") + p * DAY + rng.randint(0, 5) * 3600, p) for u in range(300) for p in range(rng.randint(5, 60))]
    data = write_folder(tmp_path / "d", rows)
    kw = dict(window_start="2020-01-01", window_end="2020-03-01", split_by="quantile", min_sequence_length=10)
    a = prepare(data, tmp_path / "a", **kw)
    b = prepare(data, tmp_path / "b", bucket_rows=1000, chunk_elements=10_000, **kw)
    assert b["performance"]["buckets"] > 5 and a["performance"]["buckets"] == 1
    for s in SPLITS:
        assert pl.read_parquet(tmp_path / "a" / "samples" / f"{s}.parquet").equals(pl.read_parquet(tmp_path / "b" / "samples" / f"{s}.parquet"))
    assert a["filters"] == b["filters"] and a["memory_length"] == b["memory_length"]


def test_max_users_subsample_is_seeded(tmp_path: Path) -> None:
    rows = [(u, 1 + (p % 7), ts("2020-01-01") + p * DAY, p) for u in range(40) for p in range(50)]
    data = write_folder(tmp_path / "d", rows)
    kw = dict(window_start="2020-01-01", window_end="2020-03-01", split_by="quantile")
    prepare(data, tmp_path / "a", max_users=10, seed=3, **kw)
    prepare(data, tmp_path / "b", max_users=10, seed=3, **kw)
    prepare(data, tmp_path / "c", max_users=10, seed=4, **kw)
    stats = prepare(data, tmp_path / "d", max_users=1000, **kw)
    users = {k: set(all_samples(tmp_path / k)["user_id"].unique()) for k in "abcd"}
    assert len(users["a"]) == 10 and users["a"] == users["b"] and users["a"] != users["c"]
    assert len(users["d"]) == 40 and {f["step"]: f["users_dropped"] for f in stats["filters"]}["max_users"] == 0


def test_parquet_input(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", EXACT_ROWS, fmt="parquet")
    prepare(data, tmp_path / "out", window_start="2020-01-01", window_end="2020-04-01", recent_k=2, **NO_FILTERS)
    assert PreparedData.load(tmp_path / "out").split("test")["target_item"].to_list() == [106]


def test_synthetic_preset_keeps_the_planted_cue(tmp_path: Path) -> None:
    from automr.data.synthetic import write_synthetic
    from automr.stages.synthetic import SyntheticConfig

    write_synthetic(SyntheticConfig(out=tmp_path / "raw", n_users=50, n_series=5, n_filler=60, seed=1), tmp_path / "raw", quiet=True)
    stats = prepare(tmp_path / "raw", tmp_path / "out", preset="synthetic")
    assert sum(stats["samples"].values()) == 50 and stats["samples"]["test"] == 10  # one sample per user, latest 20% test
    planted = pl.read_parquet(tmp_path / "raw" / "planted.parquet")
    df = all_samples(tmp_path / "out").join(planted, on="user_id")
    assert (df["target_item"] == df["target_item_right"]).all()
    assert df.select(pl.col("memory_items").list.contains(pl.col("cue_item")).all()).item()  # the cue is old: in memory
    assert not df.select(pl.col("recent_items").list.contains(pl.col("cue_item")).any()).item()


# --------------------------------------------------------------------------- settings and presets


def test_every_preset_loads_and_validates(tmp_path: Path) -> None:
    names = available_presets()
    data_sets = ["amazon2014-beauty", "amazon2014-books-1m", "amazon2014-toys", "amazon2018-electronics-1m", "food-com", "movielens-100k", "movielens-1m"]
    assert set(data_sets + ["synthetic"]) <= set(names)
    for name in names:
        values = load_preset(name)
        text = (presets_dir() / f"{name}.yaml").read_text()
        assert text.startswith("#") and "automr prepare" in text, f"preset {name} needs a header with its command"
        cfg, sources = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path / "o", preset=name))
        for key, value in values.items():
            assert getattr(cfg, key) == value and sources[key] == f"preset {name}"


def test_defaults_are_the_papers(tmp_path: Path) -> None:
    cfg, sources = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path / "o"))
    assert (cfg.window_start, cfg.window_end, cfg.split_by, cfg.valid_size, cfg.test_size) == ("2017-01-01", "2018-01-01", "months", 1, 1)
    assert (cfg.min_item_interactions, cfg.min_sequence_length, cfg.max_history, cfg.recent_k, cfg.history_before_window) == (5, 20, 100, 10, False)
    assert set(sources.values()) == {"paper default"}
    assert load_preset("paper") == {k: v for k, v in PAPER_DEFAULTS.items() if k in load_preset("paper")}


def test_layering_preset_yaml_flags(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"data": str(tmp_path), "out": str(tmp_path / "o"), "preset": "movielens-1m", "min_sequence_length": 7, "recent_k": 5}))
    cfg, src = resolve_prepare(load_config(PrepareConfig, yml, recent_k=3))
    assert (cfg.recent_k, src["recent_k"]) == (3, "config")  # flag beats YAML
    assert (cfg.min_sequence_length, src["min_sequence_length"]) == (7, "config")  # YAML beats preset
    assert (cfg.window_start, src["window_start"]) == ("2000-05-01", "preset movielens-1m")  # preset beats paper
    assert (cfg.targets, src["targets"]) == ("all", "paper default")
    # The window is one group: a user's window replaces the preset's whole window.
    cfg, src = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, preset="movielens-1m", window_last_months=6))
    assert (cfg.window_last_months, cfg.window_start, cfg.window_end) == (6, None, None)
    cfg, _ = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, preset="movielens-1m", window_start="2000-06-01"))
    assert (cfg.window_start, cfg.window_end) == ("2000-06-01", "max")
    # Split: sizes stay with their mode.
    cfg, src = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, preset="synthetic", test_size=0.3))
    assert (cfg.split_by, cfg.valid_size, cfg.test_size) == ("quantile", 0.1, 0.3)
    cfg, src = resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, preset="synthetic", split_by="months"))
    assert (cfg.valid_size, cfg.test_size, src["test_size"]) == (1, 1, "months default")
    # The saved config reproduces itself.
    again, _ = resolve_prepare(PrepareConfig.model_validate(cfg.model_dump()))
    assert again == cfg


def test_bad_settings_are_clear(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown preset 'nope'.*movielens-1m"):
        resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, preset="nope"))
    with pytest.raises(UserError, match="either window_last_months or window_start"):
        load_config(PrepareConfig, None, data=tmp_path, out=tmp_path, window_last_months=3, window_start="2020-01-01")
    with pytest.raises(UserError, match="window_start.*ISO date"):
        load_config(PrepareConfig, None, data=tmp_path, out=tmp_path, window_start="last tuesday")
    with pytest.raises(UserError, match="whole months"):
        resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, valid_size=0.5))
    with pytest.raises(UserError, match=r"in \(0, 1\)"):
        resolve_prepare(PrepareConfig(data=tmp_path, out=tmp_path, split_by="quantile", test_size=2))
    bad = tmp_path / "p.yaml"
    bad.write_text("recent_k: 0\nwindow_size: 3\n")
    with pytest.raises(UserError, match="2 problem"):
        load_preset(str(bad))


def test_calendar_helpers() -> None:
    assert add_months(ts("2020-03-31"), -1) == ts("2020-02-29")
    assert add_months(ts("2018-01-01"), -12) == ts("2017-01-01")
    tc = pl.DataFrame({"target_time": [1, 2, 3, 4, 5, 5, 5, 8, 9, 10], "len": [1] * 10}, schema={"target_time": pl.Int64, "len": pl.UInt32})
    assert quantile_boundaries(tc, 0.2, 0.2) == (5, 9)  # test = latest 20% {9, 10}; the ties at 5 stay together in valid
    assert quantile_boundaries(tc, 0.1, 0.1) == (9, 10)


def test_cli_prepare_with_preset_and_flag(tmp_path: Path) -> None:
    rows = [(u, 100 * u + p, ts("2020-01-01") + (u + p) * DAY, p) for u in range(10) for p in range(5)]
    data = write_folder(tmp_path / "d", rows)
    cmd = [sys.executable, "-m", "automr.cli", "prepare", "--data", str(data), "--out", str(tmp_path / "o"), "--preset", "synthetic", "--recent-k", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["recent_k"] == 2 and saved["targets"] == "last" and saved["preset"] == "synthetic"
    assert "samples" in res.stderr and "interactions/s" in res.stderr
    res = subprocess.run(cmd[:-2] + ["--min-item-interactions", "99", "--targets", "all"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "error" in res.stderr


# --------------------------------------------------------------------------- bad input


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_missing_files_and_columns(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_common(tmp_path / "nowhere")
    only = tmp_path / "only"
    only.mkdir()
    (only / "interactions.csv").write_text("user_id,item_id,timestamp,pos\n1,2,3,0\n")
    with pytest.raises(UserError, match=r"looked for items\.parquet, items\.csv\.gz, items\.csv"):
        open_common(only)
    bad = write_folder(tmp_path / "cols", "user,item_id,Timestamp,pos\n1,2,3,0\n", "item_id,title\n2,x\n")
    with pytest.raises(UserError) as err:
        open_common(bad)
    msg = str(err.value)
    assert "user_id, timestamp" in msg and "Found columns: user, item_id, Timestamp, pos" in msg and "'Timestamp' -> 'timestamp'" in msg
    with pytest.raises(UserError, match="lacks required column"):
        prepare(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_rows_and_untitled_items_are_counted(tmp_path: Path) -> None:
    good = "".join(f"1,{100 + p},{ts('2020-01-01') + p * DAY},{p}\n" for p in range(30))
    text = "user_id,item_id,timestamp,pos,rating\n" + good.replace("\n", ",5\n")
    text += "1,abc,1580000000,99,5\n"  # item id not an integer
    text += "1,101,,98,5\n"  # empty timestamp
    text += "1,101\n"  # too few fields
    text += "1,101,1580000000,97,5,extra\n"  # too many fields
    text += "2,555,1580000000,0,5\n2,556,1580000000,1,5\n"  # items missing from the catalogue
    titles = "item_id,title,genre\n" + "".join(f"{100 + p},Item &amp; {p},x\n" for p in range(30)) + "556,   ,x\n"
    data = write_folder(tmp_path / "d", text, titles)
    stats = prepare(data, tmp_path / "out", window_start="2020-01-01", window_end="2020-03-01", split_by="quantile", **NO_FILTERS)
    assert stats["read"]["rows"] == 36
    assert stats["read"]["malformed_rows_skipped"] == 4 and stats["read"]["wrong_field_count_rows"] == 2
    assert stats["ignored_columns"] == {"interactions": ["rating"], "items": ["genre"]}
    assert stats["catalogue"]["items_without_title"] == 1
    no_title = stats["filters"][0]
    assert no_title["step"] == "item has no title"
    assert (no_title["interactions_dropped"], no_title["users_dropped"], no_title["items_dropped"]) == (2, 1, 2)
    assert sum(stats["samples"].values()) == 29
    assert PreparedData.load(tmp_path / "out").titles()[100] == "Item & 0"  # cleaned


def test_titles_made_unique(tmp_path: Path) -> None:
    rows = [(1, i, ts("2020-01-01") + p * DAY, p) for p, i in enumerate([1, 2, 3, 1, 2, 3, 1, 2, 3, 1])]
    data = write_folder(tmp_path / "d", rows, {1: "Dune", 2: "Dune", 3: "Emma"})
    stats = prepare(data, tmp_path / "out", window_start="2020-01-01", window_end="2020-01-11", split_by="quantile", valid_size=0.2, test_size=0.2, **NO_FILTERS)
    assert stats["titles_made_unique"] == 1
    assert PreparedData.load(tmp_path / "out").titles() == {1: "Dune", 2: "Dune (2)", 3: "Emma"}


def test_empty_results_are_clear_errors_and_leave_nothing(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", EXACT_ROWS)
    out = tmp_path / "runs" / "out"
    with pytest.raises(UserError, match=r"no interactions in the window 2017-01-01 \.\. 2018-01-01.*data spans 2020-01-01"):
        prepare(data, out)  # the paper's 2017 window
    with pytest.raises(UserError, match="too few samples after filtering.*min_sequence_length=50"):
        prepare(data, out, window_start="2020-01-01", window_end="2020-04-01", min_sequence_length=50)
    assert not out.exists() and _leftovers(out.parent) == []
    # A failed run never damages an earlier good output.
    prepare(data, out, window_start="2020-01-01", window_end="2020-04-01", recent_k=2, **NO_FILTERS)
    before = all_samples(out)
    with pytest.raises(UserError):
        prepare(data, out, window_start="2020-01-01", window_end="2020-04-01", min_sequence_length=50)
    assert all_samples(out).equals(before) and _leftovers(out.parent) == []


def test_unreadable_and_empty_inputs(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "interactions.csv.gz").write_bytes(b"not gzip at all")
    (d / "items.csv").write_text("item_id,title\n1,a\n")
    with pytest.raises(UserError, match="cannot be read"):
        open_common(d)
    all_bad = write_folder(tmp_path / "b", "user_id,item_id,timestamp,pos\nx,y,z,w\n", "item_id,title\n1,a\n")
    with pytest.raises(UserError, match="none of its 1 rows"):
        prepare(all_bad, tmp_path / "o")
    untitled = write_folder(tmp_path / "u", "user_id,item_id,timestamp,pos\n1,5,1580000000,0\n", "item_id,title\n1,a\n")
    with pytest.raises(UserError, match="no interaction's item has a title"):
        prepare(untitled, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_scan_common(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp,pos\n1,1,10,0\n1,2,11,1\n1,x,12,2\n2,3,13,0\n"
    data = write_folder(tmp_path / "d", text, "item_id,title\n1,a\n2,b\n2,dup\n")
    lf, items = scan_common(data)
    assert isinstance(lf, pl.LazyFrame)
    assert lf.collect().sort("user_id", "pos").rows() == [(1, 1, 10, 0), (1, 2, 11, 1)]  # malformed and untitled dropped
    assert items.rows() == [(1, "a"), (2, "b")]  # the first row of a duplicated id wins


# --------------------------------------------------------------------------- shared data


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "interactions.csv.gz").is_file():
        pytest.skip(f"{path} is absent (../shared/data is not checked out beside the repository)")
    return path


@pytest.mark.shared_data
def test_movielens_100k_preset(tmp_path: Path) -> None:
    stats = prepare(_shared("movielens-100k"), tmp_path / "out", preset="movielens-100k")
    assert stats["window"]["start"] == "1997-09-01" and stats["window"]["test_start"] == "1998-04-01"
    assert all(n >= 1000 for n in stats["samples"].values()), stats["samples"]
    assert stats["read"]["rows"] == 100_000 and stats["read"]["malformed_rows_skipped"] == 0
    assert stats["titles_made_unique"] > 0  # ml-100k has remakes sharing a bare title
    assert_no_leakage(tmp_path / "out")
    data = PreparedData.load(tmp_path / "out")
    assert data.items["title"].n_unique() == data.items.height
    used = set(all_samples(tmp_path / "out")["target_item"])
    assert used <= set(data.item_ids)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", [pytest.param("movielens-1m", marks=pytest.mark.slow), "amazon2014-books-1m"])
def test_large_presets_have_no_leakage(tmp_path: Path, name: str) -> None:
    """The issue's check: every sample's inputs precede its target, and splits are ordered in time."""
    stats = prepare(_shared(name), tmp_path / "out", preset=name)
    assert stats["samples"]["test"] >= 1000
    assert_no_leakage(tmp_path / "out")
