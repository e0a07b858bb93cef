"""The feature retriever: its cheap features against hand-computed values, that it learns what keys alone
cannot, and that a saved folder says its kind and loads with the same features."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from automr.data.schema import SAMPLE_SCHEMA
from automr.errors import UserError
from automr.memory.retriever import RetrievalData, Retriever, RetrieverConfig, evaluate_retriever, train_retriever
from automr.methods.feature_retriever import BASE_FEATURES, SIMILARITY_FEATURES, ElementFeatures, load_retriever, select_elements
from automr.methods.title_encoder import TitleEmbeddings
from memory_helpers import single_thread

DAY = 86_400
T = 1_700_000_000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from single_thread()


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


def sample(memory: list[int], days_ago: list[float], recent: list[int], user: int = 1) -> dict:
    return {"user_id": user, "target_item": 99, "target_time": T, "recent_items": recent,
            "recent_times": [T - DAY] * len(recent), "memory_items": memory,
            "memory_times": [int(T - d * DAY) for d in days_ago]}


def toy_embeddings() -> TitleEmbeddings:
    """Items 1..4 on unit vectors chosen so the cosines are easy to write down."""
    e = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1]], np.float32)
    return TitleEmbeddings(np.array([1, 2, 3, 4]), e)


def test_features_match_hand_computed_values() -> None:
    ctx = ElementFeatures(np.array([1, 2, 3]), np.array([9, 0, 99]), toy_embeddings())
    assert ctx.names == BASE_FEATURES + SIMILARITY_FEATURES
    f = ctx.compute(frame([sample([3, 4, 1], [30.0, 6.0, 2.0], recent=[1, 2]), sample([], [], recent=[1])]))
    assert f[1].shape == (0, 6)
    got = f[0]
    assert got.shape == (3, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], np.log1p([30.0, 6.0, 2.0]), rtol=1e-6)  # days ago
    np.testing.assert_allclose(got[:, 1], np.log([2 + 3, 2 + 2, 2 + 1]), rtol=1e-6)  # K = 2 recent, then memory newest last
    np.testing.assert_allclose(got[:, 2], np.log1p([99, 0, 9]), rtol=1e-6)  # item 4 unknown to the counts: 0
    np.testing.assert_array_equal(got[:, 3], [0, 0, 1])  # item 1 is also a recent item
    np.testing.assert_allclose(got[:, 4], [0.8, 0.0, 1.0], atol=1e-6)  # max cosine with recent items 1, 2
    np.testing.assert_allclose(got[:, 5], [0.7, 0.0, 0.5], atol=1e-6)  # mean cosine


def test_similarity_features_are_optional_and_unknown_items_are_a_user_error() -> None:
    ctx = ElementFeatures(np.array([1]), np.array([5]))
    f = ctx.compute(frame([sample([1, 7], [3.0, 1.0], recent=[2])]))[0]
    assert ctx.names == BASE_FEATURES and f.shape == (2, len(BASE_FEATURES))
    with pytest.raises(UserError, match="missing from the catalogue"):
        ElementFeatures(np.array([1]), np.array([5]), toy_embeddings()).compute(frame([sample([7], [1.0], recent=[1])]))


def recency_problem(n: int, seed: int) -> tuple[RetrievalData, list[np.ndarray], pl.DataFrame]:
    """Random keys and queries that carry nothing; the gain is 3 nats for the element 20-40 days old, 0 else.

    Only the days-ago feature tells the elements apart, so the paper's retriever is at chance and the
    feature retriever should find it.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, 8)).astype(np.float32)
    keys, lc, rows = [], [], []
    for _ in range(n):
        m = int(rng.integers(4, 10))
        days = np.sort(rng.uniform(0, 300, m))[::-1].copy()
        days[rng.integers(m)] = rng.uniform(20, 40)
        days = np.where((days >= 20) & (days <= 40), days, np.where(days < 20, days / 2, days + 41))
        keys.append(rng.standard_normal((m, 8)).astype(np.float32))
        lc.append(-20.0 + 3.0 * ((days >= 20) & (days <= 40)))
        rows.append(sample(list(range(1, m + 1)), days.tolist(), recent=[50]))
    samples = frame(rows)
    d = RetrievalData.from_key_sets(q, keys, np.full(n, -20.0), lc)
    feats = ElementFeatures(np.array([1]), np.array([1])).compute(samples)
    return RetrievalData(d.queries, d.key_bank, d.memory_rows, d.logp_empty, d.logp_cand, feats), keys, samples


CFG = dict(hidden=32, lr=3e-3, batch_size=32, epochs=25, patience=25, feature_hidden=16)


def test_feature_retriever_learns_what_keys_cannot(tmp_path: Path) -> None:
    (train, _, _), (valid, vkeys, vframe) = recency_problem(300, 0), recency_problem(120, 1)
    ctx = ElementFeatures(np.array([1]), np.array([1]))
    feat = train_retriever(RetrieverConfig(**CFG, features="cheap"), train, valid, progress=False, features=ctx)
    plain = train_retriever(RetrieverConfig(**CFG), strip(train), strip(valid), progress=False)
    f_share = evaluate_retriever(feat.retriever, valid)["headroom_share"]
    p_share = evaluate_retriever(plain.retriever, strip(valid))["headroom_share"]
    assert f_share > 0.8 and p_share < 0.3, (f_share, p_share)

    # the saved folder says its kind, and loads with the same features and the same choices
    feat.retriever.save(tmp_path / "f")
    plain.retriever.save(tmp_path / "p")
    spec = json.loads((tmp_path / "f" / "retriever.json").read_text())
    assert spec["kind"] == "features" and spec["feature_names"] == list(BASE_FEATURES)
    assert json.loads((tmp_path / "p" / "retriever.json").read_text())["kind"] == "paper"
    assert not (tmp_path / "p" / "features.npz").exists()
    back = load_retriever(tmp_path / "f")
    assert back.kind == "features" and load_retriever(tmp_path / "p").kind == "paper"
    want = feat.retriever.select_batch(valid.queries, vkeys, 1, valid.features)
    np.testing.assert_array_equal(select_elements(back, vframe, valid.queries, vkeys, 1), want)
    with pytest.raises(UserError, match="needs the elements' features"):
        Retriever.load(tmp_path / "f").select_batch(valid.queries, vkeys, 1)


def strip(d: RetrievalData) -> RetrievalData:
    return RetrievalData(d.queries, d.key_bank, d.memory_rows, d.logp_empty, d.logp_cand)


def test_features_survive_save_and_load(tmp_path: Path) -> None:
    ctx = ElementFeatures(np.array([1, 2, 3]), np.array([9, 0, 99]), toy_embeddings())
    ctx.save(tmp_path)
    back = ElementFeatures.load(tmp_path)
    f = frame([sample([3, 4, 1], [30.0, 6.0, 2.0], recent=[1, 2])])
    assert back.names == ctx.names
    np.testing.assert_array_equal(back.compute(f)[0], ctx.compute(f)[0])
    with pytest.raises(UserError, match="features cheap"):
        ElementFeatures.load(tmp_path / "nowhere")
