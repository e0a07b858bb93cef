"""One catalogue hash (automr.utils.fingerprint.catalogue_hash) keys every title-dependent cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import torch
from memory_helpers import single_thread

from automr.llm.decoding import GroundingIndex
from automr.llm.loading import build_tiny_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.toy import toy_titles
from automr.utils.fingerprint import catalogue_hash

TITLES = toy_titles(12)
CATALOGUE = list(enumerate(TITLES, start=1))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


def test_a_frame_and_its_pairs_hash_alike_in_any_order() -> None:
    frame = pl.DataFrame({"item_id": [i for i, _ in CATALOGUE], "title": TITLES})
    h = catalogue_hash(frame)
    assert h == catalogue_hash(CATALOGUE) == catalogue_hash(CATALOGUE[::-1]) == catalogue_hash(frame.reverse())
    assert catalogue_hash(CATALOGUE[:-1]) != h
    assert catalogue_hash([(1, TITLES[1])] + CATALOGUE[1:]) != h  # a changed title is another catalogue


def test_grounding_cache_is_keyed_by_the_catalogue_hash_and_rows_follow_the_ids(tmp_path: Path) -> None:
    lm = build_tiny_lm(TITLES)
    builder = PromptBuilder.for_lm(lm)
    first = GroundingIndex.build(lm, builder, CATALOGUE, cache_dir=tmp_path)
    (cached,) = (tmp_path / "item_embeddings").glob("*.npy")
    assert cached.stem.endswith(f"-{catalogue_hash(CATALOGUE)}")
    # The same catalogue listed the other way round hits that cache, each row still its item's.
    again = GroundingIndex.build(lm, builder, CATALOGUE[::-1], cache_dir=tmp_path)
    assert list((tmp_path / "item_embeddings").glob("*.npy")) == [cached]
    assert again.item_ids.tolist() == [i for i, _ in CATALOGUE[::-1]]
    assert torch.equal(again.embeddings, first.embeddings.flip(0))
