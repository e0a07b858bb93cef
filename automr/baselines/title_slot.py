"""A generative recommender whose memory slot holds the title of one selected memory element, as text.

Any `MemorySelector` (random, most-recent, ReLLa-style) plugs in: the selector picks the element,
the slot receives that item's title tokens (`PromptBuilder.slot_text_ids`), and everything else
(prompt, beam search, grounding) is the BIGRec recommender unchanged. An empty memory leaves the
slot empty, which is plain BIGRec for that sample.

Writing the title as text is one of the two slot representations in DESIGN.md; AutoMR splices the
element's layer-L value states instead. The design notes measured the two to behave alike (gains
correlate at 0.95); a states-based variant of these baselines would take its values from the memory store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from automr.data.schema import PreparedData
from automr.llm.recommender import GenerativeOptions, GenerativeRecommender
from automr.memory.selectors import MemorySelector, selected_items_and_times

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM
    from automr.llm.split import Slot


class TitleSlotRecommender(GenerativeRecommender):
    """BIGRec + the selected memory element's title in the slot."""

    def __init__(
        self,
        options: GenerativeOptions,
        selector: MemorySelector,
        seed: int = 0,
        *,
        lm: "LM | None" = None,
        base_lm: "LM | None" = None,
    ) -> None:
        super().__init__(options, seed, lm=lm, base_lm=base_lm)
        self.selector = selector
        self.name = selector.name
        self._extras: dict[str, list[Any]] = {}

    def fit_slots(self, data: PreparedData, work_dir: Path) -> None:
        self.selector.fit(data, Path(work_dir))

    def slot_for(self, samples: pl.DataFrame) -> list["Slot"]:
        assert self.builder is not None
        items, _ = selected_items_and_times(samples, self.selector.select(samples))
        return [None if i is None else self.builder.slot_text_ids(self.titles[i]) for i in items]

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        # The selection of the whole call, row-aligned, for last_extras (the report plots when the
        # retrieved memories happened). Selectors are per-sample deterministic, so the batches of
        # super().recommend (reordered by length) get the same elements through slot_for.
        items, times = selected_items_and_times(samples, self.selector.select(samples))
        self._extras = {"retrieved_item": items, "retrieved_time": times}
        return super().recommend(samples, k)

    def last_extras(self) -> dict[str, list[Any]]:
        return self._extras
