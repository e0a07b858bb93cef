"""Beam search, grounding and constrained decoding (automr.llm.decoding) and the BIGRec method.

All on tiny random Llamas: a toy catalogue of 20 titles where item i is followed by item i+1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.methods.registry import make_method
from automr.llm.decoding import DecodeStats, GroundingIndex, beam_items, beam_search, beams_first, decode_text
from automr.llm.title_trie import TitleTrie, build_trie
from automr.llm.trie_prior import TriePrior
from automr.stages.finetune import FinetuneConfig, run_finetune
from automr.llm.loading import LM, build_tiny_lm, save_lm
from automr.llm.prompts import PromptBuilder
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.llm.split import SplitLM
from automr.llm.toy import make_toy_prepared, memorised_tiny_lm, next_item, toy_titles
from memory_helpers import single_thread

TITLES = toy_titles(20)
CATALOGUE = list(enumerate(TITLES, start=1))  # item ids 1..20 as in make_toy_prepared


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Torch on one thread per test (memory_helpers.single_thread explains why)."""
    yield from single_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return PreparedData.load(make_toy_prepared(tmp_path_factory.mktemp("toy") / "data"))


@pytest.fixture(scope="module")
def random_lm() -> LM:
    return build_tiny_lm(TITLES)


@pytest.fixture(scope="module")
def memorised_lm(data: PreparedData) -> LM:
    """A tiny model trained (all weights) until it maps the toy histories to their next title."""
    torch.set_num_threads(1)
    return memorised_tiny_lm(data.root)


@pytest.mark.parametrize("decoding", ["grounding", "constrained"])
def test_memorised_model_recommends_the_next_item(
    memorised_lm: LM, data: PreparedData, tmp_path: Path, decoding: str
) -> None:
    rec = GenerativeRecommender(GenerativeOptions(decoding=decoding, progress=False), lm=memorised_lm)
    rec.fit(data, tmp_path)
    test = data.split("test")
    recs = rec.recommend(test, k=5)
    assert recs.shape == (test.height, 5) and recs.dtype == np.int64
    expected = [next_item(r[-1], 20) for r in test["recent_items"].to_list()]
    assert recs[:, 0].tolist() == expected == test["target_item"].to_list()
    for h, want in zip(rec.last_hypotheses, expected):  # the generated text itself is the title
        assert decode_text(memorised_lm.tokenizer, h[0].tokens) == data.titles()[want]
    assert all(len(set(r)) == 5 and np.isin(r, np.arange(1, 21)).all() for r in recs)  # 5 distinct items
    if decoding == "constrained":  # 4 beams first, in score order, then the tail by grounding distance
        assert [r[:4].tolist() for r in recs] == [items[:4] for items in beam_items(rec.last_hypotheses)]
    assert rec.stats is not None and rec.stats.tokens > 0


@pytest.mark.parametrize("decoding", ["grounding", "constrained"])
def test_every_decoding_ranks_the_whole_catalogue(memorised_lm: LM, data: PreparedData, tmp_path: Path,
                                                   decoding: str) -> None:
    """Issue 9 A1: k up to the catalogue's size gives k distinct items; constrained puts its 2 beams first
    and continues by grounding distance to the best beam (the same order grounding mode gives)."""
    opts = dict(decoding=decoding, num_beams=2, progress=False)
    rec = GenerativeRecommender(GenerativeOptions(**opts), lm=memorised_lm)
    rec.fit(data, tmp_path)
    test = data.split("test")
    recs = rec.recommend(test, k=20)
    assert all(sorted(r.tolist()) == list(range(1, 21)) for r in recs)
    if decoding == "constrained":
        beams = beam_items(rec.last_hypotheses)
        assert all(len(b) == 2 for b in beams)
        grounded = GenerativeRecommender(GenerativeOptions(**{**opts, "decoding": "grounding"}), lm=memorised_lm)
        grounded.fit(data, tmp_path)
        full = grounded.recommend(test, k=20)  # same model and beams: the best beam's text is the same
        for r, b, g in zip(recs, beams, full):
            assert r[:2].tolist() == b and r[2:].tolist() == [i for i in g.tolist() if i not in b]
    assert rec.recommend(test, k=23)[:, 20:].tolist() == [[-1] * 3] * test.height  # only beyond the catalogue


def test_beams_first_keeps_beam_order_and_drops_their_duplicates() -> None:
    order = np.array([[5, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    assert beams_first([[3, 5], []], order, 4).tolist() == [[3, 5, 1, 2], [1, 2, 3, 4]]


def test_constrained_decoding_only_yields_catalogue_items(random_lm: LM) -> None:
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    prompts = [builder.encode(TITLES[i : i + 3]) for i in range(6)]
    slots = [None, None, builder.slot_text_ids(TITLES[9]), None, None, None]
    hyps = beam_search(split, prompts, slots, num_beams=6, max_new_tokens=trie.max_len, trie=trie)
    by_id = dict(CATALOGUE)
    for p, slot, hs in zip(prompts, slots, hyps):
        assert len(hs) == 6 and len({h.item for h in hs}) == 6
        assert [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        for h in hs:
            assert h.finished and h.item in by_id
            assert h.tokens + [random_lm.tokenizer.eos_token_id] == builder.answer_ids(by_id[h.item])
        # The beam's log-prob is the model's log P(title + EOS | prompt, slot).
        enc = builder.encode(TITLES[prompts.index(p) : prompts.index(p) + 3], answer=by_id[hs[0].item])
        with torch.no_grad():
            lp = split.answer_logprob([enc], [slot])
        assert hs[0].logprob == pytest.approx(float(lp[0]), abs=1e-4)
    assert [len(b) for b in beam_items(hyps)] == [6] * 6


def test_grounding_ranks_every_item_and_exact_title_first(random_lm: LM, tmp_path: Path) -> None:
    builder = PromptBuilder.for_lm(random_lm)
    index = GroundingIndex.build(random_lm, builder, CATALOGUE, cache_dir=tmp_path)
    full = index.rank(TITLES)
    assert full.shape == (20, 20)
    for row in full:
        assert sorted(row.tolist()) == list(range(1, 21))
    assert full[:, 0].tolist() == list(range(1, 21))  # an exact title is at distance 0 from itself
    d = index.distances([TITLES[3]])[0]
    assert float(d[3]) == pytest.approx(0.0, abs=1e-3) and float(d.min()) == float(d[3])
    assert index.rank(["Silent River", "no such title at all"], k=3).shape == (2, 3)

    # Cached on disk, keyed by model name + catalogue: a second build loads the same embeddings.
    files = list((tmp_path / "item_embeddings").glob("*.npy"))
    assert len(files) == 1 and random_lm.name in files[0].name
    again = GroundingIndex.build(random_lm, builder, CATALOGUE, cache_dir=tmp_path)
    assert torch.equal(again.embeddings, index.embeddings)
    GroundingIndex.build(random_lm, builder, CATALOGUE[:10], cache_dir=tmp_path)
    assert len(list((tmp_path / "item_embeddings").glob("*.npy"))) == 2



def test_grounding_an_anchored_title_uses_the_stored_embedding_without_a_forward(random_lm: LM, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Constrained decoding's best beam spells an item: its distances are the index's own row's, as if embedded again."""
    import automr.llm.decoding as decoding

    builder = PromptBuilder.for_lm(random_lm)
    index = GroundingIndex.build(random_lm, builder, CATALOGUE, cache_dir=tmp_path)
    texts = [TITLES[3], TITLES[7], "no such title at all"]
    embedded = index.distances(texts)
    anchors = [4, 8, None]  # CATALOGUE ids are 1-based
    calls: list[int] = []
    real = decoding.last_token_embeddings
    monkeypatch.setattr(decoding, "last_token_embeddings", lambda lm, seqs, *a, **k: calls.append(len(seqs)) or real(lm, seqs, *a, **k))
    anchored = index.distances(texts, anchors=anchors)
    assert calls == [1]  # only the text without an anchor went through the model
    assert torch.allclose(anchored, embedded, atol=1e-4)
    assert torch.equal(anchored[0], torch.cdist(index.embeddings[3:4], index.embeddings)[0])
    assert (index.rank(texts, anchors=anchors) == index.rank(texts)).all()
    assert index.distances(["x"], anchors=[999])[0].shape == (20,)  # an item the index lacks is embedded


def test_grounding_shares_embeddings_across_runs_by_content(random_lm: LM, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluations (one per seed) embed the catalogue once through the user cache; a weight changed
    under the same model name is a miss, not a stale hit."""
    import dataclasses

    import automr.llm.decoding as decoding_module

    monkeypatch.setenv("AUTOMR_GROUNDING_CACHE", str(tmp_path / "user"))
    embedded: list[int] = []
    embed = decoding_module.last_token_embeddings
    monkeypatch.setattr(decoding_module, "last_token_embeddings",
                        lambda lm, seqs, *a, **kw: (embedded.append(len(seqs)), embed(lm, seqs, *a, **kw))[1])
    builder = PromptBuilder.for_lm(random_lm)
    first = GroundingIndex.build(random_lm, builder, CATALOGUE, cache_dir=tmp_path / "seed0")
    second = GroundingIndex.build(random_lm, builder, CATALOGUE[::-1], cache_dir=tmp_path / "seed1")
    assert embedded == [len(CATALOGUE)]
    assert torch.equal(second.embeddings[np.argsort(second.item_ids)], first.embeddings[np.argsort(first.item_ids)])
    assert len(list((tmp_path / "user").glob("*.npy"))) == 1

    changed = copy.deepcopy(random_lm.model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    rewritten = dataclasses.replace(random_lm, model=changed)  # same name, other weights
    third = GroundingIndex.build(rewritten, builder, CATALOGUE, cache_dir=tmp_path / "seed2")
    assert embedded == [len(CATALOGUE)] * 2
    assert not torch.equal(third.embeddings, first.embeddings)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_beam_search_matches_transformers_generate(random_lm: LM, num_beams: int) -> None:
    """beams=1 is greedy; 4 beams return HF's 4 sequences in HF's order (slot as text included)."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    eos, pad = random_lm.tokenizer.eos_token_id, random_lm.tokenizer.pad_token_id
    prompts = [builder.encode(TITLES[i : i + 2 + i % 3]) for i in range(4)]  # different lengths: padding
    slots = [None, builder.slot_text_ids(TITLES[15]), None, None]
    ours = beam_search(split, prompts, slots, num_beams=num_beams, max_new_tokens=8)
    for p, slot, hs in zip(prompts, slots, ours):
        ids = torch.tensor([p.prefix_ids + (slot or []) + p.marker_ids])
        g = random_lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, num_beams=num_beams,
            num_return_sequences=num_beams, eos_token_id=eos, pad_token_id=pad,
        )
        want = []
        for seq in g[:, ids.shape[1] :].tolist():
            want.append(seq[: seq.index(eos)] if eos in seq else seq)
        assert [h.tokens for h in hs] == want


def test_bigrec_method_from_a_finetune_output(data: PreparedData, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator's path: METHODS['bigrec'] with an adapter folder; grounding uses the base model,
    whose title embeddings the methods of one evaluation (work_root/<name>) compute once and share."""
    import automr.llm.decoding as decoding_module

    monkeypatch.setenv("AUTOMR_GROUNDING_CACHE", str(tmp_path / "user"))  # nothing embedded by another test
    embedded: list[int] = []
    embed = decoding_module.last_token_embeddings
    monkeypatch.setattr(decoding_module, "last_token_embeddings",
                        lambda lm, seqs, *a, **kw: (embedded.append(len(seqs)), embed(lm, seqs, *a, **kw))[1])
    save_lm(build_tiny_lm(TITLES), tmp_path / "base")
    cfg = FinetuneConfig(samples=data.root, out=tmp_path / "ft", model=str(tmp_path / "base"), device="cpu",
                         progress=False, max_train_samples=8, max_valid_samples=4, batch_size=4, grad_accum=1,
                         epochs=1, eval_every=1)
    run_finetune(cfg)
    test = data.split("test")
    for decoding in ("grounding", "constrained"):
        rec = make_method("bigrec", {"adapter": str(tmp_path / "ft"), "decoding": decoding, "num_beams": 2,
                                     "batch_size": 5, "device": "cpu", "progress": False})
        rec.fit(data, tmp_path / "methods" / decoding)
        recs = rec.recommend(test, k=3)
        assert recs.shape == (test.height, 3)
        assert np.isin(recs, np.arange(1, 21)).all() and all(len(set(r)) == 3 for r in recs)
        # Both decodings ground with the base model (constrained: the tail after its 2 beams).
        assert rec.base_lm is not None and rec.base_lm.name != rec.lm.name and "+lora-" in rec.lm.name
        assert list((tmp_path / "methods" / "cache" / "item_embeddings").glob(f"{rec.base_lm.name}-*.npy"))
    assert embedded.count(len(CATALOGUE)) == 1  # the catalogue embedded once: the second method read the first's
    with pytest.raises(UserError, match="num_beams"):
        make_method("bigrec", {"num_beams": 0, "nonsense": 1})


def test_evaluation_cache_dir_reads_a_legacy_per_method_cache(tmp_path: Path) -> None:
    """Runs written before the shared cache keep theirs in the method's folder; it is still the one read."""
    from automr.methods.bigrec import evaluation_cache_dir

    work = tmp_path / "methods" / "bigrec"
    assert evaluation_cache_dir(work) == tmp_path / "methods" / "cache"
    (work / "cache").mkdir(parents=True)
    assert evaluation_cache_dir(work) == work / "cache"


@pytest.mark.parametrize("num_beams", [3, 10])
def test_constrained_beam_search_matches_transformers_generate(random_lm: LM, num_beams: int) -> None:
    """Issue 9 B3: constrained decoding is HF's beam search with the trie as `prefix_allowed_tokens_fn`
    (same sequences, order and scores), while feeding only live beams: with 10 beams over 20 titles
    samples run out of continuations, and the rows fed per step stop being a multiple of the beams."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    eos, pad = random_lm.tokenizer.eos_token_id, random_lm.tokenizer.pad_token_id
    prompts = [builder.encode(TITLES[i : i + 2 + i % 3]) for i in range(5)]
    fed: list[int] = []
    step = split.step
    split.step = lambda tokens, cache: (fed.append(len(tokens)), step(tokens, cache))[1]  # type: ignore[method-assign]
    ours = beam_search(split, prompts, [None] * 5, num_beams=num_beams, max_new_tokens=trie.max_len, trie=trie)
    for p, hs in zip(prompts, ours):
        ids = torch.tensor([p.prefix_ids + p.marker_ids])

        def allowed(batch_id: int, seq: torch.Tensor, n0: int = ids.shape[1]) -> list[int]:
            node = 0
            for tok in seq[n0:].tolist():
                node = trie.advance(node, tok)
            return trie.allowed(node).tolist() or [pad]  # finished or dead rows: anything

        g = random_lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=trie.max_len, do_sample=False,
            num_beams=num_beams, num_return_sequences=num_beams, eos_token_id=eos, pad_token_id=pad,
            prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True,
        )
        want = [(seq[: seq.index(eos)], score) for seq, score in
                zip(g.sequences[:, ids.shape[1] :].tolist(), g.sequences_scores.tolist()) if eos in seq]
        assert [h.tokens for h in hs] == [w[0] for w in want]
        assert [h.score for h in hs] == pytest.approx([w[1] for w in want], abs=1e-4)
    if num_beams == 10:
        assert any(n % num_beams for n in fed[1:])  # dead beams were not fed (the first step feeds 10 per sample)


def test_recommend_decodes_prompts_of_similar_token_length_together(random_lm: LM, data: PreparedData,
                                                                   tmp_path: Path) -> None:
    """Batches follow the prompts' token length (not their item count), so the padded prefill wastes little."""
    rec = GenerativeRecommender(GenerativeOptions(progress=False), lm=random_lm)
    rec.fit(data, tmp_path)
    test = data.split("test")
    lengths = [len(p) for p in rec.encode(test, [None] * test.height)]
    order = rec._decode_order(test)
    assert sorted(order.tolist()) == list(range(test.height))
    assert [lengths[i] for i in order] == sorted(lengths) != lengths


def _direct_scores(lm: LM, builder: PromptBuilder, recent: list[str], beam_scores: str, length_penalty: float) -> dict[int, float]:
    """Every catalogue title's beam score, computed directly: one full forward per title, each answer token's
    log-probability over the vocabulary (model) or over the next tokens of the titles sharing its prefix, found
    by scanning every title (trie), summed and divided by the answer length ** length_penalty."""
    answers = {i: builder.answer_ids(t) for i, t in CATALOGUE}
    out = {}
    for item, ans in answers.items():
        enc = builder.encode(recent)
        ids = enc.prefix_ids + enc.marker_ids + ans
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, len(ids) - len(ans) - 1 : -1].double()  # (A, V)
        total = 0.0
        for t, y in enumerate(ans):
            allowed = sorted({a[t] for a in answers.values() if len(a) > t and a[:t] == ans[:t]})
            pool = logits[t, allowed] if beam_scores == "trie" else logits[t]
            total += float(logits[t, y] - torch.logsumexp(pool, 0))
        out[item] = total / len(ans) ** length_penalty
    return out


@pytest.mark.parametrize(("beam_scores", "length_penalty"), [("trie", 0.0), ("trie", 1.0), ("model", 0.0), ("model", 1.0)])
def test_beams_over_the_whole_catalogue_rank_every_title_by_its_direct_score(
    random_lm: LM, beam_scores: str, length_penalty: float
) -> None:
    """Issue 10 (D3's amplification bias): with beam_scores trie each step is renormalised over the trie's
    allowed tokens (forced tokens cost 0); with num_beams >= catalogue size the beams are an exhaustive
    scoring: every title, each scored as the direct computation scores it, in that order."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    histories = [TITLES[i : i + 3] for i in (0, 5, 11)]
    prompts = [builder.encode(h) for h in histories]
    hyps = beam_search(split, prompts, [None] * 3, num_beams=len(CATALOGUE) + 2, max_new_tokens=trie.max_len,
                       trie=trie, length_penalty=length_penalty, beam_scores=beam_scores)
    for recent, hs in zip(histories, hyps):
        direct = _direct_scores(random_lm, builder, recent, beam_scores, length_penalty)
        assert sorted(h.item for h in hs) == sorted(direct)  # every title, once
        assert [h.score for h in hs] == pytest.approx([direct[h.item] for h in hs], abs=1e-4)
        assert [h.item for h in hs] == sorted(direct, key=direct.get, reverse=True)
        if beam_scores == "trie":
            assert any(len(trie.allowed(n)) == 1 for n in range(len(trie.children))), "the toy titles have forced tokens"
            model = _direct_scores(random_lm, builder, recent, "model", length_penalty)
            assert all(direct[i] > model[i] for i in direct)  # renormalising over fewer tokens only raises them


def test_title_trie_knows_where_one_item_is_left() -> None:
    trie = TitleTrie([[5, 6, 7, 0], [5, 8, 0], [9, 0]], [1, 2, 3])
    n5 = trie.advance(0, 5)
    assert not trie.settled(0) and not trie.settled(n5)  # two items below "5"
    assert trie.settled(trie.advance(n5, 6)) and trie.settled(trie.advance(0, 9))
    assert trie.settled(trie.advance(trie.advance(n5, 8), 0))  # the item's own node
    assert not trie.settled(-1)


@pytest.mark.parametrize(("num_beams", "length_penalty", "with_prior"), [(3, 0.0, False), (6, 0.0, True), (4, 1.0, False)])
def test_settled_beams_skip_the_model_and_change_nothing(random_lm: LM, num_beams: int, length_penalty: float,
                                                         with_prior: bool) -> None:
    """With trie scores a beam with one item left below it is not fed through the model (its forced
    tokens cost exactly 0): the same hypotheses and scores from fewer rows (on a larger model the
    scores may differ by the rounding of a smaller batch; here they agree to 1e-6)."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    prompts = [builder.encode(TITLES[i : i + 3]) for i in range(0, 14, 2)]
    slots = [None, builder.slot_text_ids(TITLES[9]), None, None, None, None, None]
    prior = None
    if with_prior:
        gen = torch.Generator().manual_seed(0)
        tables = {n: torch.randn(len(trie.allowed(n)), generator=gen) for n in range(len(trie.children))
                  if len(trie.allowed(n)) > 1}
        prior = TriePrior(trie, tables)
    runs = {}
    for skip in (False, True):
        stats = DecodeStats()
        hyps = beam_search(split, prompts, slots, num_beams=num_beams, max_new_tokens=trie.max_len, trie=trie,
                           beam_scores="trie", length_penalty=length_penalty, prior=prior, stats=stats,
                           skip_settled=skip)
        runs[skip] = ([[(h.tokens, h.item, h.finished) for h in hs] for hs in hyps],
                      [[x for h in hs for x in (h.score, h.logprob)] for hs in hyps], stats.tokens)
    assert runs[True][0] == runs[False][0]
    for fast, slow in zip(runs[True][1], runs[False][1]):
        assert fast == pytest.approx(slow, abs=1e-6)
    assert all(len(hs) == num_beams for hs in runs[True][0])
    assert runs[True][2] < runs[False][2] * 0.8, runs  # the toy titles settle after a token or two


def test_model_beam_scores_feed_every_beam(random_lm: LM) -> None:
    """With model scores a forced token still costs its log-probability: nothing is skipped."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    prompts = [builder.encode(TITLES[i : i + 3]) for i in range(3)]
    fed = []
    for skip in (False, True):
        stats = DecodeStats()
        beam_search(split, prompts, [None] * 3, num_beams=4, max_new_tokens=trie.max_len, trie=trie, stats=stats,
                    skip_settled=skip)
        fed.append(stats.tokens)
    assert fed[0] == fed[1] > 0


def test_title_trie_closes_the_nodes_with_only_banned_items_below() -> None:
    trie = TitleTrie([[5, 6, 0], [5, 7, 0], [9, 0]], [1, 2, 3])
    n5 = trie.advance(0, 5)
    assert trie.dead_nodes([1]) == {trie.advance(n5, 6), trie.advance(trie.advance(n5, 6), 0)}
    assert n5 in trie.dead_nodes([1, 2]) and 0 not in trie.dead_nodes([1, 2])
    assert 0 in trie.dead_nodes([1, 2, 3, 99])  # everything banned (99 is no item of the tree)
    assert trie.dead_nodes([]) == set()


@pytest.mark.parametrize("beam_scores", ["model", "trie"])
def test_banned_items_never_take_a_beam(random_lm: LM, beam_scores: str) -> None:
    """Beams over the whole catalogue with some items banned: exactly the other items (model scores: in the
    unbanned search's order with the same scores; trie scores: each renormalised over what is left, so no
    lower than before, and the order may change where a branch lost banned items)."""
    builder = PromptBuilder.for_lm(random_lm)
    split = SplitLM(random_lm)
    trie = build_trie(builder, CATALOGUE)
    prompts = [builder.encode(TITLES[i : i + 3]) for i in (0, 6)]
    banned = [[1, 2, 3, 7, 8], [4, 5, 6, 12, 13, 14, 15]]
    kw = dict(num_beams=len(CATALOGUE) + 2, max_new_tokens=trie.max_len, trie=trie, beam_scores=beam_scores,
              length_penalty=0.0)
    free = beam_search(split, prompts, [None, None], **kw)
    kept = beam_search(split, prompts, [None, None], banned=banned, **kw)
    for f, k, b in zip(free, kept, banned):
        assert sorted(h.item for h in k) == sorted(h.item for h in f if h.item not in b)
        if beam_scores == "model":
            assert [h.item for h in k] == [h.item for h in f if h.item not in b]
            assert [h.score for h in k] == pytest.approx([h.score for h in f if h.item not in b], abs=1e-5)
        else:
            before = {h.item: h.score for h in f}
            assert all(h.score >= before[h.item] - 1e-6 for h in k) and any(h.score > before[h.item] + 1e-3 for h in k)
    none_left = beam_search(split, prompts[:1], [None], banned=[list(range(1, 21))], **kw)
    assert none_left == [[]]


def test_generative_recommender_keeps_beams_off_the_history_it_was_told_about(
    memorised_lm: LM, data: PreparedData, tmp_path: Path
) -> None:
    test = data.split("test")
    hist = [set(r) | set(m) for r, m in zip(test["recent_items"].to_list(), test["memory_items"].to_list())]
    assert all(hist)
    beams = {}
    for told, skip in ((False, True), (True, False), (True, True)):
        rec = GenerativeRecommender(GenerativeOptions(decoding="constrained", num_beams=6, beams_skip_history=skip,
                                                      progress=False), lm=memorised_lm)
        rec.fit(data, tmp_path)
        rec.ranking_excludes_history = told
        recs = rec.recommend(test, k=20)
        assert all(sorted(r.tolist()) == list(range(1, 21)) for r in recs)  # still a full ranking
        beams[told, skip] = beam_items(rec.last_hypotheses)
    assert beams[False, True] == beams[True, False]  # not told, or told and asked not to: as before
    assert any(set(b) & h for b, h in zip(beams[False, True], hist))  # the toy's beams do reach the history
    assert all(not set(b) & h and len(b) == min(6, 20 - len(h)) for b, h in zip(beams[True, True], hist))  # all left


def test_trie_beam_scores_need_constrained_decoding() -> None:
    with pytest.raises(ValueError, match="constrained"):
        GenerativeOptions(beam_scores="trie")
    assert GenerativeOptions(decoding="constrained", beam_scores="trie", length_penalty=0).length_penalty == 0
    with pytest.raises(ValueError, match="beam_scores"):
        beam_search(None, [], [], beam_scores="trie")  # type: ignore[arg-type]
