"""One rule for what a too-long prompt drops (PromptBuilder): every stage keeps the same recent titles.

A tiny model and prepared data (tests/memory_helpers.py) with a max_length that leaves room for only
one to three of the four recent titles. build-memory (its queries z_t and keys z_m), annotate,
BIGRec's and a memory method's inference, and an on-the-fly memory must all cut a sample's window
the same way: the test compares the token ids of their prompt prefixes, captured where each stage
builds them. The titles' answers are 3 or 6 tokens long, so a reserve that followed the sample's own
answer, slot or generation budget (the old rules) would keep different titles.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from memory_helpers import (
    RECENT_K,
    make_tiny_prepared,
    save_tiny_lm,
    single_thread,
    tiny_titles,
)

import automr.memory.annotate as annotate_mod
import automr.stages.build_memory as build_stage
from automr.cli import main
from automr.data.schema import PreparedData
from automr.llm.loading import load_lm
from automr.llm.prompts import DEFAULT_SLOT_TOKENS, PromptBuilder
from automr.memory.build import load_queries, place_samples
from automr.memory.store import MemoryStore
from automr.stages.annotate import AnnotateConfig, run_annotate
from automr.stages.build_memory import BuildMemoryConfig, run_build_memory

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
LM_OPTS = {"num_beams": 2, "progress": False, "device": "cpu", "batch_size": 4}


def _cut_length(lm_dir: Path, titles: int) -> int:
    """A max_length leaving `titles` tokens for recent titles after the instruction, marker and fixed reserve."""
    builder = PromptBuilder.for_lm(load_lm(str(lm_dir)), slot_tokens=DEFAULT_SLOT_TOKENS, answers=tiny_titles().values())
    return len(builder.encode([]).prefix_ids) + len(builder.encode([]).marker_ids) + builder.reserve() + titles


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """build-memory and annotate under a cutting max_length, recording the prompts each stage built."""
    root = tmp_path_factory.mktemp("cut")
    prep = make_tiny_prepared(root / "data")
    lm_dir = save_tiny_lm(root / "lm")
    max_length = _cut_length(lm_dir, 9)  # recent lines take 3 or 6 tokens: 1 to 3 of the 4 titles fit
    jobs: list[Any] = []
    prompts: list[Any] = []
    orig_jobs, orig_encode = build_stage.iter_jobs, annotate_mod.encode_sample

    def spy_jobs(*a: Any, **k: Any) -> Iterator[Any]:
        for job in orig_jobs(*a, **k):
            jobs.append(job)
            yield job

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_stage, "iter_jobs", spy_jobs)
        mp.setattr(annotate_mod, "encode_sample", lambda *a, **k: prompts.append(orig_encode(*a, **k)) or prompts[-1])
        mem = run_build_memory(BuildMemoryConfig(samples=prep, out=root / "mem", model=str(lm_dir), max_length=max_length,
                                                 progress=False))
        ann = run_annotate(AnnotateConfig(samples=prep, memory=mem, model=str(lm_dir), out=root / "ann",
                                          max_length=max_length, progress=False))
    annotated = annotate_mod.load_annotations(ann)["sample_index"].to_list()  # annotate's order: sorted indices
    assert len(prompts) == len(annotated) > 10
    return {"root": root, "prep": prep, "lm_dir": lm_dir, "mem": mem, "max_length": max_length, "jobs": jobs,
            "annotation": dict(zip(annotated, prompts))}


def _fit(cut: dict[str, Any], factory: Any, work: str, **options: Any) -> Any:
    opts = {"model": str(cut["lm_dir"]), "max_length": cut["max_length"], **LM_OPTS, **options}
    rec = factory(opts, 0)
    rec.fit(PreparedData.load(cut["prep"]), cut["root"] / work)
    return rec


def test_query_annotation_and_inference_keep_the_same_recent_titles(cut: dict[str, Any]) -> None:
    from automr.methods.automr import make_recent
    from automr.methods.bigrec import make_bigrec

    train = PreparedData.load(cut["prep"]).split("train")
    ann = cut["annotation"]
    idx = sorted(ann)
    samples = train[idx]
    query = {r: job.prompt_ids for job in cut["jobs"] for s, r in job.query_rows if s == "train"}
    bigrec = _fit(cut, make_bigrec, "w-bigrec")
    recent = _fit(cut, make_recent, "w-recent", memory=str(cut["mem"]))
    plain = bigrec.encode(samples, [None] * samples.height)
    slots = recent.slot_for(samples)
    assert all(s is not None for s in slots)  # annotated samples have a memory: the slot is filled
    memory = recent.encode(samples, slots)
    for j, i in enumerate(idx):
        want = ann[i].prefix_ids
        assert query[i] == want, f"build-memory's query prompt of train row {i} keeps other titles than annotation's"
        assert plain[j].prefix_ids == want, f"BIGRec's prompt of train row {i} keeps other titles than annotation's"
        assert memory[j].prefix_ids == want, f"the memory method's prompt of train row {i} keeps other titles"
    # The cut did happen, and a reserve following each sample's own answer (the old rule) would keep other titles.
    assert {p.n_truncated for p in ann.values()} - {0} and any(p.n_truncated < RECENT_K for p in ann.values())
    old = PromptBuilder.for_lm(load_lm(str(cut["lm_dir"])), max_length=cut["max_length"])
    titles = tiny_titles()
    old_prefix = [old.encode([titles[t] for t in r], answer=titles[a], reserve=DEFAULT_SLOT_TOKENS).prefix_ids
                  for r, a in zip(samples["recent_items"].to_list(), samples["target_item"].to_list())]
    assert any(o != ann[i].prefix_ids for o, i in zip(old_prefix, idx))
    # The memory method's own query states (computed from its prompts) are build-memory's.
    z = recent.query_states(samples)
    np.testing.assert_allclose(z, load_queries(cut["mem"], "train")[idx], atol=1e-5, rtol=1e-5)


def test_memory_keys_are_cut_by_the_same_rule(cut: dict[str, Any]) -> None:
    from automr.methods.bigrec import make_bigrec

    data = PreparedData.load(cut["prep"])
    histories, _, _ = place_samples({s: data.split(s) for s in ("train", "valid", "test")})
    windows = {}
    for job in cut["jobs"]:
        for e in job.elements:
            items = histories[job.user_id].items
            windows[(job.user_id, e.pos)] = (items[max(0, e.pos - RECENT_K + 1) : e.pos + 1], job.prompt_ids)
    assert len(windows) == len(MemoryStore.open(cut["mem"]))
    bigrec = _fit(cut, make_bigrec, "w-bigrec-keys")
    frame = pl.DataFrame({"recent_items": [w for w, _ in windows.values()]})
    prompts = bigrec.encode(frame, [None] * frame.height)
    assert [p.prefix_ids for p in prompts] == [ids for _, ids in windows.values()]
    assert any(p.n_truncated for p in prompts) and all(p.n_truncated < RECENT_K for p in prompts)


def test_on_the_fly_memory_is_cut_like_build_memory(cut: dict[str, Any]) -> None:
    from automr.methods.automr import make_recent

    test = PreparedData.load(cut["prep"]).split("test")
    rec = _fit(cut, make_recent, "w-fly")
    rec.slot_for(test)
    built, fly = MemoryStore.open(cut["mem"]), rec.store
    assert fly is not None and len(fly) > 0
    for u in fly.users().tolist():
        rows = fly.rows_for(u)
        ref = built.rows_for(u, fly.index[rows]["item_id"], fly.index[rows]["time"])
        np.testing.assert_allclose(fly.keys(rows), built.keys(ref), atol=1e-5, rtol=1e-5)


def test_element_whose_own_title_cannot_fit_is_a_user_error(cut: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mem"
    argv = ["build-memory", "--samples", str(cut["prep"]), "--out", str(out), "--model", str(cut["lm_dir"]),
            "--max-length", str(_cut_length(cut["lm_dir"], 2)), "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "an element's window of" in err and "does not fit max_length" in err and "raise max_length" in err
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
