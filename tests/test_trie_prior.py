"""Priors over the title prefix tree (automr.llm.trie_prior) and their use by constrained decoding.

Every figure is checked against a direct computation: one full forward per title, or counts by hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from automr.data.schema import PreparedData
from automr.llm.decoding import beam_search
from automr.llm.title_trie import TitleTrie, build_trie
from automr.llm.loading import LM, build_tiny_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.split import SplitLM
from automr.llm.toy import make_toy_prepared, toy_titles
from automr.llm.trie_prior import TriePrior, popularity_prior, reference_prior
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.methods.popularity import popularity_counts
from memory_helpers import single_thread

TITLES = toy_titles(20)
CATALOGUE = list(enumerate(TITLES, start=1))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def lm() -> LM:
    return build_tiny_lm(TITLES)


def _trie_logprob(lm: LM, builder: PromptBuilder, recent: list[str], answer: list[int], answers: list[list[int]]) -> float:
    """log P(answer | prompt), each token renormalised over the next tokens of the answers sharing its prefix
    (found by scanning every answer, not through the trie), from one full forward."""
    enc = builder.encode(recent)
    ids = enc.prefix_ids + enc.marker_ids + answer
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, len(ids) - len(answer) - 1 : -1].double()
    total = 0.0
    for t, y in enumerate(answer):
        allowed = sorted({a[t] for a in answers if len(a) > t and a[:t] == answer[:t]})
        total += float(logits[t, y] - torch.logsumexp(logits[t, allowed], 0))
    return total


def test_popularity_prior_sums_to_each_titles_smoothed_share() -> None:
    """Shared prefixes, a title that is a prefix of another, an item never seen: the path sum is
    log((count + 1) / (total + items)) for every title."""
    seqs = [[5, 6, 9], [5, 6, 7, 9], [5, 8, 9], [4, 9]]  # 9 = EOS; [5, 6] ends one title and begins another
    trie = TitleTrie(seqs, [1, 2, 3, 4])
    counts = {1: 10, 2: 3, 3: 0}  # item 4 never seen
    prior = popularity_prior(trie, counts)
    total = sum(counts.values()) + 4
    for seq, item in zip(seqs, [1, 2, 3, 4]):
        assert prior.path_sum(seq) == pytest.approx(math.log((counts.get(item, 0) + 1) / total))
    assert 0 not in prior.tables or prior.tables[0].shape == (2,)  # the root branches on 4 and 5


def test_reference_prior_is_the_titles_trie_probability_with_no_history(lm: LM) -> None:
    builder = PromptBuilder.for_lm(lm)
    trie = build_trie(builder, CATALOGUE)
    prior = reference_prior(SplitLM(lm), builder, trie, TITLES, batch_size=7)  # batches that split the catalogue
    answers = [builder.answer_ids(t) for t in TITLES]
    for ans in answers:
        assert prior.path_sum(ans) == pytest.approx(_trie_logprob(lm, builder, [], ans, answers), abs=1e-4)
    probs = sum(math.exp(prior.path_sum(a)) for a in answers)
    assert probs == pytest.approx(1.0, abs=1e-4)  # a distribution over the catalogue


def test_beams_with_a_prior_rank_every_title_by_its_score_plus_the_prior(lm: LM) -> None:
    """With beams >= catalogue, the search is exhaustive: each title's score is its trie log-probability
    given the history, minus the weighted reference, plus the weighted popularity, in that order."""
    builder = PromptBuilder.for_lm(lm)
    split = SplitLM(lm)
    trie = build_trie(builder, CATALOGUE)
    counts = {i: (i * 7) % 5 for i, _ in CATALOGUE}
    ref, pop = reference_prior(split, builder, trie, TITLES), popularity_prior(trie, counts)
    prior = TriePrior.combine([(-0.7, ref), (1.5, pop), (0.0, ref)])
    assert prior is not None
    answers = {i: builder.answer_ids(t) for i, t in CATALOGUE}
    recent = TITLES[4:7]
    (hyps,) = beam_search(split, [builder.encode(recent)], [None], num_beams=len(CATALOGUE) + 2,
                          max_new_tokens=trie.max_len, trie=trie, length_penalty=0.0, beam_scores="trie", prior=prior)
    want = {i: _trie_logprob(lm, builder, recent, a, list(answers.values())) - 0.7 * ref.path_sum(a) + 1.5 * pop.path_sum(a)
            for i, a in answers.items()}
    assert sorted(h.item for h in hyps) == sorted(want)
    assert [h.score for h in hyps] == pytest.approx([want[h.item] for h in hyps], abs=1e-4)
    assert [h.item for h in hyps] == sorted(want, key=want.get, reverse=True)


def test_a_prior_needs_trie_scores() -> None:
    assert TriePrior.combine([(0.0, None)]) is None  # type: ignore[list-item]
    with pytest.raises(ValueError, match="beam_scores trie"):
        GenerativeOptions(decoding="constrained", popularity_prior=1.0)
    with pytest.raises(ValueError, match="beam_scores trie"):
        GenerativeOptions(decoding="constrained", beam_scores="model", reference_prior=1.0)
    trie = TitleTrie([[1, 2], [1, 3]], [1, 2])
    with pytest.raises(ValueError, match="beam_scores trie"):
        beam_search(None, [None], [None], trie=trie, prior=popularity_prior(trie, {}))  # type: ignore[arg-type, list-item]
    with pytest.raises(ValueError, match="allowed tokens"):
        TriePrior(trie, {1: torch.zeros(3)})


def test_bigrec_with_priors_ranks_the_whole_catalogue(lm: LM, tmp_path: Path) -> None:
    """The method builds both priors from the prepared data (popularity: the baseline's counts) and
    still returns a full ranking; a very strong popularity prior makes its beams follow the counts."""
    data = PreparedData.load(make_toy_prepared(tmp_path / "data"))
    options = GenerativeOptions(decoding="constrained", beam_scores="trie", length_penalty=0.0, num_beams=3,
                                reference_prior=1.0, popularity_prior=50.0, progress=False)
    rec = GenerativeRecommender(options, lm=lm)
    rec.fit(data, tmp_path / "work")
    assert rec.prior is not None
    test = data.split("test")
    ranked = rec.recommend(test, len(CATALOGUE))
    assert (np.sort(ranked, axis=1) == np.arange(1, len(CATALOGUE) + 1)).all()
    counts = dict(popularity_counts(data).iter_rows())
    best = max(counts.values())
    assert all(counts[int(r[0])] == best for r in ranked)  # popularity dominates the model at weight 50
