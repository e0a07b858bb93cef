"""Shared test fixtures: tiny hand-made prepared data folders.

`make_prepared` writes a folder in the on-disk contract of automr/data/schema.py (samples
parquet + items.parquet + stats.json + config.yaml) without running `automr prepare`, so
evaluator, baseline and LLM tests do not depend on the data protocol. Two ways to use it:

1. From user sequences (the common case)::

       root = make_prepared(tmp_path / "d", users={1: [10, 11, 12, 13], 2: [11, 12, 13, 14]})

   Every position j >= min_history of a user's chronological list becomes a sample whose target
   is item j; its K=recent_k most recent earlier items are `recent_items` and the older ones,
   up to history_cap in all, `memory_items`. Split: without valid_from/test_from, each user's
   last sample goes to test, the one before to valid and the rest to train (leave-last-out);
   with them, a sample goes to test if target_time >= test_from, else valid if >= valid_from,
   else train. Times default to one day apart per position, identical across users
   (DAY0 + j * 86400), or come from `times` (same shape as `users`).

2. From explicit rows: ``samples={"test": [{"user_id": 1, "target_item": 5, "recent_items":
   [1, 2]}, ...]}`` replaces the generated rows of that split. Missing columns get defaults
   (empty lists, times 0..len-1 before target_time).

Or use the `prepared_factory` fixture, which places each folder under tmp_path.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from automr.data.schema import ITEM_SCHEMA, SAMPLE_SCHEMA, SPLITS

# The sentence encoder's title embeddings (automr/methods/title_encoder.py) and grounding's item embeddings
# (automr/llm/decoding.py) are shared through a user cache: the suite keeps its own, so it neither writes
# into the user's nor reads a stale one.
for _variable in ("AUTOMR_TITLE_CACHE", "AUTOMR_GROUNDING_CACHE"):
    if _variable not in os.environ:
        _cache = tempfile.mkdtemp(prefix=f"automr-test-{_variable.lower()}-")
        os.environ[_variable] = _cache
        atexit.register(shutil.rmtree, _cache, True)

DAY0 = 1_600_000_000  # 2020-09-13, an arbitrary unix time
DAY = 86_400


def _complete_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the columns a hand-written row leaves out, keeping inputs before the target."""
    out = dict(row)
    out.setdefault("user_id", 0)
    out.setdefault("target_time", DAY0 + 1000 * DAY)
    for kind in ("recent", "memory"):
        items = list(out.setdefault(f"{kind}_items", []))
        if f"{kind}_times" not in out:
            # Memory is older than recent; both strictly before the target.
            base = out["target_time"] - (2 if kind == "recent" else 3) * len(items) * DAY - DAY
            out[f"{kind}_times"] = [base + i * DAY for i in range(len(items))]
    return out


def samples_frame(rows: Sequence[Mapping[str, Any]] | pl.DataFrame) -> pl.DataFrame:
    """A samples DataFrame with exactly SAMPLE_SCHEMA (an empty input gives an empty frame)."""
    if isinstance(rows, pl.DataFrame):
        return rows.select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA)  # type: ignore[arg-type]
    full = [_complete_row(r) for r in rows]
    return pl.DataFrame(full, schema=SAMPLE_SCHEMA).select(list(SAMPLE_SCHEMA))


def _samples_from_users(
    users: Mapping[int, Sequence[int]],
    times: Mapping[int, Sequence[int]] | None,
    recent_k: int,
    history_cap: int,
    min_history: int,
    valid_from: int | None,
    test_from: int | None,
) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    temporal = valid_from is not None or test_from is not None
    for user, seq in users.items():
        seq = list(seq)
        ts = list(times[user]) if times is not None else [DAY0 + j * DAY for j in range(len(seq))]
        assert len(ts) == len(seq), f"user {user}: {len(seq)} items but {len(ts)} times"
        positions = list(range(min_history, len(seq)))
        for order, j in enumerate(positions):
            hist_items = seq[:j][-history_cap:]
            hist_times = ts[:j][-history_cap:]
            n_mem = max(0, len(hist_items) - recent_k)
            row = {
                "user_id": user,
                "target_item": seq[j],
                "target_time": ts[j],
                "recent_items": hist_items[n_mem:],
                "recent_times": hist_times[n_mem:],
                "memory_items": hist_items[:n_mem],
                "memory_times": hist_times[:n_mem],
            }
            if temporal:
                if test_from is not None and ts[j] >= test_from:
                    split = "test"
                elif valid_from is not None and ts[j] >= valid_from:
                    split = "valid"
                else:
                    split = "train"
            else:
                from_end = len(positions) - 1 - order
                split = "test" if from_end == 0 else "valid" if from_end == 1 else "train"
            rows[split].append(row)
    return rows


def make_prepared(
    root: Path,
    users: Mapping[int, Sequence[int]] | None = None,
    *,
    times: Mapping[int, Sequence[int]] | None = None,
    items: Mapping[int, str] | Sequence[int] | None = None,
    recent_k: int = 10,
    history_cap: int = 100,
    min_history: int = 1,
    valid_from: int | None = None,
    test_from: int | None = None,
    samples: Mapping[str, Sequence[Mapping[str, Any]] | pl.DataFrame] | None = None,
) -> Path:
    """Write a prepared data folder at `root` and return `root` (see the module docstring).

    items: {item_id: title}, or a list of ids (titled "Item <id>"); by default every item that
    appears anywhere in the samples.
    """
    root = Path(root)
    rows = _samples_from_users(users or {}, times, recent_k, history_cap, min_history, valid_from, test_from)
    frames = {s: samples_frame(rows[s]) for s in SPLITS}
    for split, given in (samples or {}).items():
        assert split in SPLITS, f"unknown split {split!r}"
        frames[split] = samples_frame(given)

    if items is None:
        seen: set[int] = set()
        for df in frames.values():
            seen.update(df["target_item"].to_list())
            for col in ("recent_items", "memory_items"):
                seen.update(df[col].explode().drop_nulls().to_list())
        items = sorted(seen)
    if not isinstance(items, Mapping):
        items = {int(i): f"Item {int(i)}" for i in items}
    items_df = pl.DataFrame(
        {"item_id": list(items.keys()), "title": list(items.values())}, schema=ITEM_SCHEMA
    ).sort("item_id")

    (root / "samples").mkdir(parents=True, exist_ok=True)
    for split, df in frames.items():
        df.write_parquet(root / "samples" / f"{split}.parquet")
    items_df.write_parquet(root / "items.parquet")
    stats = {s: frames[s].height for s in SPLITS} | {"items": items_df.height, "made_by": "tests/conftest.py"}
    (root / "stats.json").write_text(json.dumps(stats, indent=2))
    (root / "config.yaml").write_text(yaml.safe_dump({"made_by": "tests/conftest.py:make_prepared"}))
    return root


@pytest.fixture
def prepared_factory(tmp_path: Path) -> Callable[..., Path]:
    """`prepared_factory(users=..., **kw)` -> a new prepared folder under tmp_path each call."""
    counter = iter(range(10_000))

    def factory(users: Mapping[int, Sequence[int]] | None = None, **kwargs: Any) -> Path:
        return make_prepared(tmp_path / f"prepared{next(counter)}", users, **kwargs)

    return factory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run (data, random-init model, exact memory, retriever, evaluate folder), built once per
    session for the serving tests (tests/serve_helpers.py)."""
    import torch

    from serve_helpers import build_tiny_run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_run(tmp_path_factory.mktemp("tiny-run"))
    finally:
        torch.set_num_threads(before)
