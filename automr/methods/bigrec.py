"""BIGRec as a `Recommender`, built so every slot-filling method reuses it.

`GenerativeRecommender` owns the model, the prompt builder, the split forward and the decoder
(grounding or constrained beam search). Subclasses only decide what goes into the memory slot
by overriding `slot_for(samples)`: None for plain BIGRec, layer-L states for AutoMR, a random or
most-similar memory element for the retrieval baselines, summary text for TRSR.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from automr.args import DeviceArgs, LogArgs, ModelArgs
from automr.config import build_config
from automr.data.schema import PreparedData, histories
from automr.errors import UserError
from automr.methods.base import Recommender
from automr.utils.logging import info
from automr.utils.progress import rate_progress

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.decoding import DecodeStats, GroundingIndex, Hypothesis
    from automr.llm.title_trie import TitleTrie
    from automr.llm.loading import LM
    from automr.llm.prompts import EncodedPrompt, PromptBuilder
    from automr.llm.split import Slot, SplitLM
    from automr.llm.trie_prior import TriePrior


class GenerativeOptions(ModelArgs, DeviceArgs, LogArgs):
    """Options of the generative recommender (the `bigrec` method and the ones built on it)."""

    decoding: Literal["grounding", "constrained"] = Field(
        "grounding", description="grounding: generate, then rank all items by L2 distance (BIGRec); "
        "constrained: beam search restricted to catalogue titles, its beams first, then the other items by L2 "
        "distance to the best beam"
    )
    num_beams: int = Field(4, ge=1, description="beams (BIGRec: 4); in constrained decoding, the items ranked by the model's own scores")
    batch_size: int = Field(16, ge=1, description="samples decoded together")
    length_penalty: float = Field(
        1.0, description="beam score = sum log-prob / length ** length_penalty; 0: the plain sum, no length "
        "normalisation (with beam_scores trie: D3's fix for the amplification bias)"
    )
    beam_scores: Literal["model", "trie"] = Field(
        "model", description="constrained decoding's per-token log-probabilities: model (over the whole vocabulary) "
        "or trie (renormalised over the title prefix tree's allowed tokens, so forced tokens cost 0)"
    )
    reference_prior: float = Field(
        0.0, description="constrained decoding with beam_scores trie: weight of the title's log-probability under the "
        "same instruction with no history, subtracted from each beam's score (1: pointwise mutual information with the "
        "history; counters a model that answers its own marginal whatever the history: automr/llm/trie_prior.py)"
    )
    popularity_prior: float = Field(
        0.0, description="constrained decoding with beam_scores trie: weight of the log of the title's share of the "
        "interaction counts before the validation period (the popularity baseline's counts), added to each beam's score"
    )
    beams_skip_history: bool = Field(
        True, description="constrained decoding, when the evaluation removes each user's history from the ranking: "
        "keep the beams off those items (a beam spent on one is removed after decoding); false: beams may end on them")
    max_new_tokens: int | None = Field(None, ge=1, description="generation budget (default: the longest title + EOS)")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (default: the model's context)")
    slot_tokens: int | None = Field(
        None, ge=0, description="tokens kept free for the memory slot where max_length cuts the prompt, so every method "
        "drops the same recent titles (default: the memory store's value tokens; 16, build-memory's default, without one)"
    )
    split_layer: int | None = Field(None, ge=0, description="layer where the slot is spliced (default: half the layers)")
    grounding_model: Literal["base", "finetuned"] = Field(
        "base", description="which model embeds texts for grounding (BIGRec: the base model)"
    )
    cache_dir: Path | None = Field(
        None, description="item-embedding cache (default: `cache` beside the method's work folder, shared by the "
        "methods of one evaluation); every run also shares them through the user cache, keyed by the weights' content "
        "($AUTOMR_GROUNDING_CACHE, else grounding/ in ~/.cache/automr)"
    )

    @model_validator(mode="after")
    def _trie_scores_need_a_trie(self) -> "GenerativeOptions":
        if self.beam_scores == "trie" and self.decoding != "constrained":
            raise ValueError("beam_scores trie renormalises over the title prefix tree: it needs decoding constrained")
        if (self.reference_prior or self.popularity_prior) and self.beam_scores != "trie":
            raise ValueError("reference_prior and popularity_prior add trie-renormalised terms to the beams' scores: "
                             "they need decoding constrained with beam_scores trie")
        return self


class GenerativeRecommender(Recommender):
    """Prompt -> (slot) -> beam search -> grounding or constrained ranking."""

    name = "bigrec"

    def __init__(self, options: GenerativeOptions, seed: int = 0, *, lm: "LM | None" = None,
                 base_lm: "LM | None" = None) -> None:
        """`lm` / `base_lm` inject ready models (tests); otherwise `fit` loads them from the options."""
        self.options = options
        self.seed = seed
        self.lm: LM | None = lm
        self.base_lm: LM | None = base_lm
        self.split: SplitLM | None = None
        self.builder: PromptBuilder | None = None
        self.titles: dict[int, str] = {}
        self._title_tokens: dict[int, int] = {}  # item -> tokens of its title (`_decode_order`), filled lazily
        self.trie: TitleTrie | None = None
        self.prior: TriePrior | None = None  # reference / popularity terms of constrained decoding
        self.grounding: GroundingIndex | None = None
        self.max_new_tokens = 0
        self.stats: DecodeStats | None = None  # the last recommend() call
        self.total_stats: DecodeStats | None = None  # every call since fit()
        # Of the last recommend() call, per sample (the server's "why"): the beams, the ranking and each
        # ranked item's grounding distance to the sample's best beam text.
        self.last_hypotheses: list[list[Hypothesis]] = []
        self.last_ranking = np.zeros((0, 0), dtype=np.int64)
        self.last_distances = np.zeros((0, 0), dtype=np.float32)
        # Seconds of the last recommend() call by step (the server's "why": slot, prefill, decode, rank).
        self.timings: dict[str, float] = {}

    # -- hooks for methods that fill the slot -----------------------------------------------
    def slot_for(self, samples: pl.DataFrame) -> list["Slot"]:
        """What goes into the memory slot of each sample: None (plain BIGRec), token ids or (S, H) states."""
        return [None] * samples.height

    def slot_budget(self) -> int:
        """Slot tokens every prompt reserves where max_length cuts (PromptBuilder's rule): BIGRec keeps the
        room a memory value would take, so its prompts hold the recent titles AutoMR's hold."""
        from automr.llm.prompts import DEFAULT_SLOT_TOKENS

        return DEFAULT_SLOT_TOKENS if self.options.slot_tokens is None else self.options.slot_tokens

    def fit_slots(self, data: PreparedData, work_dir: Path) -> None:
        """Prepare whatever `slot_for` needs (memory store, retriever, ...); called at the end of `fit`."""

    # -- Recommender ------------------------------------------------------------------------
    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Load the model(s) and build the decoder over the catalogue (nothing is trained here)."""
        from automr.llm.decoding import GroundingIndex, max_answer_tokens
        from automr.llm.title_trie import build_trie
        from automr.llm.loading import load_lm
        from automr.llm.prompts import PromptBuilder
        from automr.llm.split import SplitLM

        o = self.options
        work_dir = Path(work_dir)
        if self.lm is None:
            if o.adapter is not None:
                from automr.llm.finetune import load_finetuned

                self.lm = load_finetuned(o.adapter, device=o.device, dtype=o.dtype)
            else:
                self.lm = load_lm(o.model, device=o.device, dtype=o.dtype)
        self.titles = data.titles()
        self.builder = PromptBuilder.for_lm(
            self.lm, max_length=o.max_length, slot_tokens=self.slot_budget(), answers=self.titles.values()
        )
        self.split = SplitLM(self.lm, o.split_layer)
        catalogue = sorted(self.titles.items())
        if not catalogue:
            raise UserError(f"{data.root}/items.parquet holds no items; nothing to recommend")
        self.max_new_tokens = o.max_new_tokens or max_answer_tokens(self.builder, [t for _, t in catalogue])
        if o.decoding == "constrained":
            t0 = time.perf_counter()
            self.trie = build_trie(self.builder, catalogue)
            info(f"constrained decoding: prefix tree of {len(self.trie)} items, {len(self.trie.children)} nodes "
                 f"({time.perf_counter() - t0:.1f}s)")
            self.prior = self._trie_prior(data, catalogue)
        # Both modes ground: grounding ranks everything by it, constrained ranks the beams' tail by it.
        self.grounding = GroundingIndex.build(
            self._grounding_lm(), self.builder, catalogue, o.cache_dir or evaluation_cache_dir(work_dir), batch_size=64,
            progress=o.progress,
        )
        self.fit_slots(data, work_dir)
        from automr.llm.decoding import DecodeStats

        self.total_stats = DecodeStats()

    def _trie_prior(self, data: PreparedData, catalogue: list[tuple[int, str]]) -> "TriePrior | None":
        """The options' weighted reference and popularity priors over the trie (None when both weights are 0)."""
        from automr.llm.trie_prior import TriePrior, reference_prior
        from automr.methods.popularity import popularity_trie_prior

        o = self.options
        assert self.trie is not None and self.split is not None and self.builder is not None
        weighted = []
        if o.reference_prior:
            t0 = time.perf_counter()
            weighted.append((-o.reference_prior, reference_prior(self.split, self.builder, self.trie,
                                                                 [t for _, t in catalogue], o.batch_size)))
            info(f"reference prior: {len(catalogue)} titles scored with no history in {time.perf_counter() - t0:.1f}s")
        if o.popularity_prior:
            weighted.append((1.0, popularity_trie_prior(data, self.trie, o.popularity_prior)))
        return TriePrior.combine(weighted)

    def _grounding_lm(self) -> "LM":
        o = self.options
        assert self.lm is not None
        if o.grounding_model == "finetuned" or o.adapter is None:
            return self.lm
        if self.base_lm is None:
            from automr.llm.finetune import adapter_base
            from automr.llm.loading import load_lm

            model_name, cache_dir = adapter_base(o.adapter)
            self.base_lm = load_lm(model_name, device=o.device, dtype=o.dtype, cache_dir=cache_dir)
        return self.base_lm

    def encode(self, samples: pl.DataFrame, slots: list["Slot"]) -> list["EncodedPrompt"]:
        """Prompts of `samples`, leaving room for each slot and the answer by the builder's one rule: the
        titles kept are annotation's and build-memory's unless a slot or max_new_tokens exceeds its reserve."""
        assert self.builder is not None
        prompts = []
        for recent, slot in zip(samples["recent_items"].to_list(), slots):
            s_len = 0 if slot is None else (int(slot.shape[0]) if hasattr(slot, "shape") else len(slot))
            names = [self.titles[i] for i in recent if i in self.titles]
            prompts.append(self.builder.encode(names, reserve=s_len, new_tokens=self.max_new_tokens))
        return prompts

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        """(n, k) distinct item ids best first (-1 only beyond the catalogue's size); see `_rank`."""
        from automr.llm.decoding import DecodeStats, beam_search

        if self.split is None:
            raise RuntimeError("call fit() before recommend()")
        o = self.options
        n = samples.height
        out = np.full((n, k), -1, dtype=np.int64)
        self.stats = DecodeStats()
        self.last_hypotheses = [[] for _ in range(n)]
        self.last_ranking, self.last_distances = out, np.full((n, k), np.nan, dtype=np.float32)
        if n == 0:
            return out
        order = self._decode_order(samples)
        t0 = time.perf_counter()
        spent = {"slot_s": 0.0, "beam_s": 0.0, "rank_s": 0.0}
        with rate_progress("samples", fields=("tps",), disable=not o.progress) as progress:
            task = progress.add_task(f"{self.name} ({o.decoding})", total=n, tps="")
            for s in range(0, n, o.batch_size):
                idx = order[s : s + o.batch_size]
                batch = samples[idx.tolist()]
                t1 = time.perf_counter()
                slots = self.slot_for(batch)
                prompts = self.encode(batch, slots)
                t2 = time.perf_counter()
                hyps = beam_search(
                    self.split, prompts, slots, num_beams=o.num_beams, max_new_tokens=self.max_new_tokens,
                    length_penalty=o.length_penalty, trie=self.trie, stats=self.stats, beam_scores=o.beam_scores,
                    prior=self.prior, banned=self._banned(batch),
                )
                t3 = time.perf_counter()
                out[idx] = self._rank(hyps, k)
                self.last_distances[idx] = self.grounding.last_distances_of(out[idx])
                spent["slot_s"] += t2 - t1
                spent["beam_s"] += t3 - t2
                spent["rank_s"] += time.perf_counter() - t3
                for j, h in zip(idx, hyps):
                    self.last_hypotheses[int(j)] = h
                progress.update(task, advance=len(idx), tps=f"{self.stats.tokens / max(self.stats.seconds, 1e-9):.0f} tok/s")
        dt = time.perf_counter() - t0
        st = self.stats
        prefill = st.extra.get("prefill_s", 0.0)
        self.timings = {"slot_s": spent["slot_s"], "prefill_s": prefill, "decode_s": spent["beam_s"] - prefill,
                        "rank_s": spent["rank_s"]}
        if self.total_stats is not None:
            self.total_stats.add(st)
        info(f"{self.name}: {n} samples in {dt:.1f}s ({n / dt:.2f} samples/s, {1000 * dt / n:.0f} ms/sample); "
             f"beam search {st.tokens / max(st.seconds, 1e-9):.0f} generated tokens/s over {st.steps} steps")
        return out

    def _banned(self, batch: pl.DataFrame) -> list[list[int]] | None:
        """Per sample, the items its beams must not end on: its history, when the ranking will remove it
        (`ranking_excludes_history`) and `beams_skip_history`; None otherwise or without a title tree."""
        if self.trie is None or not (self.ranking_excludes_history and self.options.beams_skip_history):
            return None
        return histories(batch)

    def _decode_order(self, samples: pl.DataFrame) -> np.ndarray:
        """`decode_order` of the samples' recent items (results go back in the samples' order)."""
        return decode_order(samples["recent_items"].to_list(), self._title_length)

    def _title_length(self, item: int) -> int:
        """Tokens of an item's title (0 for an unknown item, which `encode` leaves out), memoised."""
        assert self.builder is not None
        n = self._title_tokens.get(item)
        if n is None:
            n = self._title_tokens[item] = len(self.builder.title_ids(self.titles[item])) if item in self.titles else 0
        return n

    def _rank(self, hyps: list[list["Hypothesis"]], k: int) -> np.ndarray:
        """(B, k) rankings from the beams: every item by L2 distance of its title's embedding to the best
        beam's text (BIGRec's grounding); constrained decoding puts its beams first, in score order."""
        from automr.llm.decoding import beam_items, decode_text

        assert self.grounding is not None and self.lm is not None
        texts = [decode_text(self.lm.tokenizer, h[0].tokens) if h else "" for h in hyps]
        if self.trie is None:
            return self.grounding.rank(texts, k)
        anchors = [h[0].item if h else None for h in hyps]  # the best beam's item: its embedding is the index's
        return self.grounding.rank(texts, k, first=beam_items(hyps), anchors=anchors)


def decode_order(recent: Sequence[Sequence[int]], title_length: Callable[[int], int]) -> np.ndarray:
    """Sample indices by the token length of their recent titles (+1 per item: its line break), so
    prompts of similar length decode together and the padded prefill wastes little. Ordered by item
    count (until issue 9 B3) the rest of the prompt after the shared instruction padded ~25% on
    ml-100k, where most histories hold the full 10 items."""
    return np.argsort([sum(title_length(i) + 1 for i in r) for r in recent], kind="stable")



def make_bigrec(options: dict[str, Any], seed: int) -> GenerativeRecommender:
    """Factory behind METHODS['bigrec']: validates `options` (all problems at once)."""
    return GenerativeRecommender(build_config(GenerativeOptions, options, source="bigrec options"), seed)


def evaluation_cache_dir(work_dir: Path) -> Path:
    """Where a method keeps its item embeddings by default: `cache` beside its work folder, so the methods
    of one evaluation (work_root/<name>) embed the catalogue once, not once each (67-105 s per method for
    ml-100k's 1,347 titles on this CPU). Safe to share: a file's name holds the embedding model's name
    (base or base + trained weights), the recipe and the catalogue's hash. A run written before this
    keeps its cache in the method's own folder, which is still read."""
    legacy = work_dir / "cache"
    return legacy if legacy.is_dir() else work_dir.parent / "cache"
