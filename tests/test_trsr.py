"""TRSR-style summaries: one LLM call per block of 5, recurrent prompts, chained cache on disk."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from automr.methods.trsr import (
    CACHE_FILE,
    TrsrMethodOptions,
    TrsrOptions,
    TrsrRecommender,
    TrsrSummarizer,
    clean_summary,
    make,
    summary_prompt,
)
from automr.data.schema import ITEM_SCHEMA, SAMPLE_SCHEMA, PreparedData
from automr.llm.loading import LM, build_tiny_lm
from automr.errors import UserError
from automr.llm.toy import toy_titles
from conftest import make_prepared

N_ITEMS = 60
TITLES = toy_titles(N_ITEMS)


@pytest.fixture(scope="module")
def lm() -> LM:
    return build_tiny_lm(TITLES, hidden_size=32, num_layers=2)


def data_for(root: Path) -> PreparedData:
    items = pl.DataFrame({"item_id": list(range(N_ITEMS)), "title": TITLES}, schema=ITEM_SCHEMA)
    return PreparedData(root=root, items=items)


def samples(memories: list[tuple[int, list[int]]]) -> pl.DataFrame:
    """(user_id, memory item ids) per sample."""
    return pl.DataFrame(
        [
            {"user_id": u, "target_item": 0, "target_time": 1000 + r, "recent_items": [0], "recent_times": [999],
             "memory_items": mem, "memory_times": list(range(len(mem)))}
            for r, (u, mem) in enumerate(memories)
        ],
        schema=SAMPLE_SCHEMA,
    )


def count_generate(lm: LM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows (prompts) that reach model.generate, per call."""
    rows: list[int] = []
    real = lm.model.generate

    def counted(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", counted)
    return rows


def test_fresh_users_need_ceil_m_over_5_calls_then_cache_hits(lm: LM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = count_generate(lm, monkeypatch)
    summ = TrsrSummarizer(TrsrOptions(max_new_tokens=4, batch_size=4), lm=lm)
    summ.fit(data_for(tmp_path), tmp_path)
    # disjoint item ranges, so no two users share a block prefix
    lengths = {1: 1, 2: 5, 3: 6, 4: 23}
    start = {1: 0, 2: 1, 3: 6, 4: 12}
    fresh = samples([(u, list(range(start[u], start[u] + m))) for u, m in lengths.items()] + [(5, [])])
    out = summ.summaries(fresh)
    assert len(out) == 5 and out[-1] == "" and all(s.startswith("The user likes") for s in out[:4])
    expected = sum(math.ceil(m / 5) for m in lengths.values())  # 1 + 1 + 2 + 5
    assert sum(rows) == expected == summ.stats["generated"] == 9
    assert max(rows) <= 4  # batch_size respected
    assert summ.stats["cache_hits"] == 0

    # user 4 later: its memory extends the earlier one (23 -> 27 items) -> blocks 1-4 reused,
    # blocks 5 ([20, 25)) and 6 ([25, 27)) are new; the same memory again costs nothing.
    rows.clear()
    later = samples([(4, list(range(12, 12 + 27))), (4, list(range(12, 12 + 23)))])
    out2 = summ.summaries(later)
    assert sum(rows) == 2 and summ.stats["generated"] == 11
    assert out2[1] == out[3]

    # persisted: a new summarizer on the same work_dir regenerates nothing
    summ.close()
    rows.clear()
    again = TrsrSummarizer(TrsrOptions(max_new_tokens=4, batch_size=4), lm=lm)
    again.fit(data_for(tmp_path), tmp_path)
    assert again.summaries(fresh) == out and again.summaries(later) == out2
    assert rows == [] and again.stats["cache_hits"] == again.stats["blocks"] > 0
    assert (tmp_path / CACHE_FILE).is_file()

    # another generation setting must not read those entries
    other = TrsrSummarizer(TrsrOptions(max_new_tokens=3, batch_size=8), lm=lm)
    other.fit(data_for(tmp_path), tmp_path)
    other.summaries(samples([(2, list(range(1, 6)))]))
    assert rows == [1]


def test_recurrence_feeds_previous_summary(lm: LM, tmp_path: Path) -> None:
    """summary_i is generated from summary_{i-1} and block i's titles (stub generation)."""
    prompts: list[str] = []
    summ = TrsrSummarizer(TrsrOptions(), lm=lm)
    summ.fit(data_for(tmp_path), tmp_path)

    def fake_generate(batch: list[str]) -> list[str]:
        prompts.extend(batch)
        return [f"summary {len(prompts) - len(batch) + j + 1}" for j in range(len(batch))]

    summ._generate = fake_generate  # type: ignore[method-assign]
    out = summ.summaries(samples([(1, list(range(12)))]))
    assert out == ["summary 3"]
    assert prompts == [
        summary_prompt("", TITLES[0:5]),
        summary_prompt("summary 1", TITLES[5:10]),
        summary_prompt("summary 2", TITLES[10:12]),
    ]
    assert prompts[0].startswith("Previous summary: (none yet)\nNew items: Silent River; ")
    assert prompts[2].endswith("Update the summary of the user's preferences in one sentence:")


def test_clean_summary() -> None:
    assert clean_summary("\n  Likes   sci-fi movies.\nSecond line") == "Likes sci-fi movies."
    assert clean_summary("   \n") == ""


def test_trsr_method_puts_the_summary_in_the_slot(lm: LM, tmp_path: Path) -> None:
    root = make_prepared(
        tmp_path / "d", {1: list(range(0, 24)), 2: list(range(30, 47)), 3: [50, 51, 52]},
        items={i: t for i, t in enumerate(TITLES)}, recent_k=5,
    )
    data = PreparedData.load(root)
    rec = TrsrRecommender(TrsrMethodOptions(progress=False, num_beams=2, summary_max_new_tokens=3), lm=lm)
    rec.fit(data, tmp_path / "w")
    assert rec.summary_lm is lm  # zero-shot: the recommender's model is the base model
    test = data.split("test")
    out = rec.recommend(test, k=3)
    assert out.shape == (test.height, 3) and set(out.ravel().tolist()) <= set(range(N_ITEMS))
    texts = rec.summarizer.summaries(test, quiet=True)
    assert rec.last_extras() == {"summary": texts}
    slots = rec.slot_for(test)
    for mem, text, slot in zip(test["memory_items"].to_list(), texts, slots):
        if mem:
            assert text.startswith("The user likes") and slot == rec.builder.slot_text_ids(text)
        else:
            assert text == "" and slot is None


def test_make_validates_options() -> None:
    assert make({"summary_block_size": 3}, seed=0).options.summary_block_size == 3
    with pytest.raises(UserError, match="summary_blocksize"):
        make({"summary_blocksize": 3}, seed=0)


def test_prompt_style_changes_wording_and_cache_keys(lm: LM, tmp_path: Path) -> None:
    taste = summary_prompt("likes horror", ["A", "B"], "taste")
    assert taste.startswith("A user recently enjoyed: A; B.\nEarlier description of the user's taste: likes horror\n")
    keys = {}
    for style in ("update", "taste"):
        summ = TrsrSummarizer(TrsrOptions(prompt_style=style), lm=lm)
        summ.fit(data_for(tmp_path), tmp_path)
        keys[style] = summ.chain_keys(list(range(7)))
        assert len(keys[style]) == 2
    assert not set(keys["update"]) & set(keys["taste"])
