"""build-memory: one element per older interaction, computed once per user, exact keys and values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from memory_helpers import HISTORY_CAP, RECENT_K, make_tiny_prepared, save_tiny_lm, single_thread, tiny_titles, tiny_users

from conftest import DAY, DAY0
from automr.data.schema import PreparedData
from automr.llm.loading import load_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.split import SplitLM
from automr.memory.build import load_queries, place_samples, read_build_stats
from automr.stages.build_memory import run_build_memory
from automr.stages.build_memory import BuildMemoryConfig
from automr.memory.store import MemoryStore

USERS = tiny_users()
_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("build")
    prep = make_tiny_prepared(root / "data", USERS)
    lm_dir = save_tiny_lm(root / "lm")
    out = run_build_memory(BuildMemoryConfig(samples=prep, out=root / "mem", model=str(lm_dir), batch_size=8, progress=False))
    lm = load_lm(str(lm_dir))
    return {"root": root, "prep": prep, "lm_dir": lm_dir, "mem": out, "lm": lm, "split": SplitLM(lm)}


def expected_positions(seq: list[int]) -> set[int]:
    """Absolute positions in some sample's memory (conftest.make_prepared: a sample per position j >= 1)."""
    out: set[int] = set()
    for j in range(1, len(seq)):
        start = max(0, j - HISTORY_CAP)
        n_mem = max(0, (j - start) - RECENT_K)
        out.update(range(start, start + n_mem))
    return out


def test_one_element_per_older_interaction(setup: dict) -> None:
    store = MemoryStore.open(setup["mem"])
    idx = store.index_frame()
    total = 0
    for u, seq in USERS.items():
        rows = idx.filter(pl.col("user_id") == u).sort("pos")
        want = sorted(expected_positions(seq))
        assert rows["pos"].to_list() == want  # each older interaction once, at its position in the user's history
        assert rows["item_id"].to_list() == [seq[p] for p in want]
        assert rows["time"].to_list() == [DAY0 + p * DAY for p in want]
        total += len(want)
    assert len(store) == total
    stats = read_build_stats(setup["mem"])
    # computed once per user: one window per element, shared by every sample that holds it
    assert stats["elements"] == stats["element_windows"] == stats["stored_elements"] == total
    assert stats["prompts"] == stats["element_windows"] + stats["query_windows"]
    n_mem_refs = sum(
        PreparedData.load(setup["prep"]).split(s)["memory_items"].list.len().sum() for s in ("train", "valid", "test")
    )
    assert n_mem_refs > 2 * total  # the dedup mattered: samples share most of their memory
    assert stats["unaligned_slices"] == 0
    assert store.meta.layer == 2 and store.meta.mode == "exact" and store.meta.max_value_tokens == 16


def test_keys_and_values_match_the_window_prompt(setup: dict) -> None:
    store = MemoryStore.open(setup["mem"])
    titles = tiny_titles()
    builder = PromptBuilder.for_lm(setup["lm"])
    split: SplitLM = setup["split"]
    idx = store.index_frame()
    rng = np.random.default_rng(0)
    for r in rng.choice(len(store), 8, replace=False).tolist():
        u, p = int(idx["user_id"][r]), int(idx["pos"][r])
        window = [titles[i] for i in USERS[u][max(0, p - RECENT_K + 1) : p + 1]]
        enc = builder.encode(window)
        key = split.last_token_states([enc.prefix_ids])[0]
        torch.testing.assert_close(torch.from_numpy(store.keys([r])[0]), key.float(), atol=1e-5, rtol=1e-5)
        s, e = enc.title_spans[-1]
        _, vals = split.prompt_states([enc.prefix_ids], [(s, min(e, s + 16))])
        got = torch.from_numpy(np.asarray(store.values([r])[0], np.float32))
        torch.testing.assert_close(got, vals[0].half().float(), atol=2e-3, rtol=2e-3)


def test_no_memory_element_is_later_than_the_target(setup: dict) -> None:
    store = MemoryStore.open(setup["mem"])
    data = PreparedData.load(setup["prep"])
    idx = store.index
    checked = 0
    for s in ("train", "valid", "test"):
        df = data.split(s)
        for u, mi, mt, tt in zip(df["user_id"], df["memory_items"], df["memory_times"], df["target_time"]):
            if not len(mi):
                continue
            rows = store.rows_for(u, mi, mt)
            assert (idx["item_id"][rows] == np.asarray(mi)).all()
            assert (idx["time"][rows] < tt).all()
            # the element's window ends at the element itself, so nothing after it leaks into z_m
            pos = idx["pos"][rows]
            assert (np.asarray(USERS[u])[pos] == np.asarray(mi)).all()
            checked += 1
    assert checked > 20


def test_queries_are_the_samples_prompt_states(setup: dict) -> None:
    data = PreparedData.load(setup["prep"])
    titles = tiny_titles()
    builder = PromptBuilder.for_lm(setup["lm"])
    for s in ("train", "test"):
        df = data.split(s)
        q = load_queries(setup["mem"], s)
        assert q.shape == (df.height, 64) and not np.isnan(q).any()
        for i in (0, df.height - 1):
            enc = builder.encode([titles[t] for t in df["recent_items"][i]])
            z = setup["split"].last_token_states([enc.prefix_ids])[0]
            np.testing.assert_allclose(q[i], z.numpy(), atol=1e-5, rtol=1e-5)


def test_chunked_mode_matches_exact_at_chunk_ends(setup: dict, tmp_path: Path) -> None:
    out = run_build_memory(
        BuildMemoryConfig(samples=setup["prep"], out=tmp_path / "c", model=str(setup["lm_dir"]), mode="chunked",
                          queries=False, progress=False)
    )
    ex, ch = MemoryStore.open(setup["mem"]), MemoryStore.open(out)
    assert ch.meta.mode == "chunked" and len(ch) == len(ex)
    ie, ic = ex.index_frame(), ch.index_frame()
    assert ie.select("user_id", "item_id", "time", "pos").equals(ic.select("user_id", "item_id", "time", "pos"))
    stats = read_build_stats(out)
    assert stats["element_windows"] < stats["elements"] / 2  # one forward per chunk of K interactions
    pos = ie["pos"].to_numpy()
    end = pos % RECENT_K == RECENT_K - 1  # a chunk's last element has exactly its exact window
    np.testing.assert_allclose(ch.key_matrix[end], ex.key_matrix[end], atol=1e-5, rtol=1e-5)
    assert not np.allclose(ch.key_matrix[~end], ex.key_matrix[~end], atol=1e-3)
    for r in np.flatnonzero(end)[:3]:
        np.testing.assert_array_equal(np.asarray(ch.values([r])[0]), np.asarray(ex.values([r])[0]))
    assert not (tmp_path / "c" / "queries").exists()


def test_key_vector_values_and_user_subset(setup: dict, tmp_path: Path) -> None:
    out = run_build_memory(
        BuildMemoryConfig(samples=setup["prep"], out=tmp_path / "k", model=str(setup["lm_dir"]), value_kind="key_vector",
                          max_users=2, splits=["train"], progress=False)
    )
    st = MemoryStore.open(out)
    users = st.users().tolist()
    assert len(users) == 2 and st.meta.value_kind == "key_vector"
    assert (st.index["length"] == 1).all()
    np.testing.assert_allclose(np.asarray(st.value_tokens, np.float32), st.key_matrix, rtol=1e-3, atol=1e-3)
    df = PreparedData.load(setup["prep"]).split("train")
    q = load_queries(out, "train")
    built = df["user_id"].is_in(users).to_numpy()
    assert not np.isnan(q[built]).any() and np.isnan(q[~built]).all()
    with pytest.raises(Exception, match="no query states"):
        load_queries(out, "valid")


def test_sample_subset_builds_only_the_evaluated_samples(setup: dict, tmp_path: Path) -> None:
    """max_samples builds the rows `evaluate --n-eval` scores (same seed), and annotate picks only from them."""
    from automr.utils.seeding import select_subset
    from automr.memory.annotate import load_annotations
    from automr.stages.annotate import run_annotate
    from automr.stages.annotate import AnnotateConfig

    out = run_build_memory(
        BuildMemoryConfig(samples=setup["prep"], out=tmp_path / "s", model=str(setup["lm_dir"]), max_samples=3,
                          seed=1, splits=["train"], progress=False)
    )
    df = PreparedData.load(setup["prep"]).split("train")
    rows = select_subset(df.height, 3, 1)
    q = load_queries(out, "train")
    has_query = ~np.isnan(q[:, 0])
    assert np.flatnonzero(has_query).tolist() == rows.tolist()
    np.testing.assert_allclose(q[rows], load_queries(setup["mem"], "train")[rows], rtol=1e-4, atol=1e-5)
    # the store holds exactly the elements of those samples' memories
    picked = df[rows.tolist()]
    want = {(u, i) for u, items in zip(picked["user_id"].to_list(), picked["memory_items"].to_list()) for i in items or []}
    idx = MemoryStore.open(out).index_frame()
    assert set(zip(idx["user_id"].to_list(), idx["item_id"].to_list())) == want
    ann = run_annotate(AnnotateConfig(samples=setup["prep"], memory=out, model=str(setup["lm_dir"]), out=tmp_path / "a",
                                      split="train", progress=False))
    annotated = sorted(set(load_annotations(ann)["sample_index"].to_list()))
    mem_lists = df["memory_items"].to_list()
    with_memory = [int(r) for r in rows if mem_lists[int(r)]]
    assert annotated == with_memory and len(annotated) > 0
    # per-split caps: the train split capped, valid built whole
    per = BuildMemoryConfig(samples=setup["prep"], out=tmp_path / "p", model=str(setup["lm_dir"]),
                            max_samples={"train": 3}, seed=1, splits=["train", "valid"])
    assert per.samples_cap("train") == 3 and per.samples_cap("valid") is None
    out = run_build_memory(per.model_copy(update={"progress": False}))
    assert (~np.isnan(load_queries(out, "train")[:, 0])).sum() == 3
    assert not np.isnan(load_queries(out, "valid")).any()
    with pytest.raises(ValueError, match="at least 1"):
        BuildMemoryConfig(samples=setup["prep"], out=tmp_path / "q", max_samples={"train": 0})


def test_place_samples_merges_capped_slices() -> None:
    # Three samples of one user, each with a history cut to the last 3 interactions.
    seq = [(5, 1), (6, 2), (5, 3), (7, 4), (8, 5), (9, 6)]
    rows = []
    for j in (3, 4, 5):
        hist = seq[max(0, j - 3) : j]
        rows.append({"user_id": 1, "target_item": seq[j][0], "target_time": seq[j][1],
                     "memory_items": [i for i, _ in hist[:1]], "memory_times": [t for _, t in hist[:1]],
                     "recent_items": [i for i, _ in hist[1:]], "recent_times": [t for _, t in hist[1:]]})
    from conftest import samples_frame

    hist, places, unaligned = place_samples({"train": samples_frame(rows)})
    assert unaligned == 0
    assert list(zip(hist[1].items, hist[1].times)) == seq
    assert [p.memory_start for p in places] == [0, 1, 2]


def test_exact_is_the_default_mode(tmp_path: Path) -> None:
    """The paper's z_m unless a config asks for chunked (whose first element of a chunk sees one title)."""
    from automr.config import build_config

    assert BuildMemoryConfig(samples=tmp_path, out=tmp_path / "m").mode == "exact"
    assert build_config(BuildMemoryConfig, {"samples": str(tmp_path), "out": "m"}, source="yaml").mode == "exact"
    assert "worth it only when exact does not fit" in BuildMemoryConfig.model_fields["mode"].description
