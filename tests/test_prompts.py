"""Prompt layout: segments, title spans, truncation and answer tokens that match everywhere."""

from __future__ import annotations

import pytest
from _llm_helpers import TITLES

from automr.errors import UserError
from automr.llm.loading import build_tiny_lm
from automr.llm.prompts import PromptBuilder, PromptTemplate


@pytest.fixture(scope="module")
def lm():
    return build_tiny_lm(TITLES)


def _tok(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_segments_are_tokenized_separately_and_concatenated(lm):
    t = PromptTemplate()
    pb = PromptBuilder(lm.tokenizer)
    recent = TITLES[:3]
    ep = pb.encode(recent, answer=TITLES[5])
    expected = [lm.tokenizer.bos_token_id] + _tok(lm, t.instruction)
    for title in recent:
        expected += _tok(lm, title) + _tok(lm, t.item_suffix)
    assert ep.prefix_ids == expected
    assert ep.marker_ids == _tok(lm, t.response_marker)
    assert ep.answer_ids == _tok(lm, TITLES[5]) + [lm.tokenizer.eos_token_id]
    assert ep.n_truncated == 0
    assert ep.input_ids() == ep.prefix_ids + ep.marker_ids + ep.answer_ids
    assert len(ep) == len(ep.input_ids())
    # The text reads as the template says.
    text = lm.tokenizer.decode(ep.input_ids(), skip_special_tokens=True)
    assert text == t.instruction + "".join(x + "\n" for x in recent) + t.response_marker + TITLES[5]


def test_title_spans_point_at_the_titles(lm):
    pb = PromptBuilder(lm.tokenizer)
    recent = TITLES[2:9]
    ep = pb.encode(recent)
    assert ep.answer_ids == []
    assert len(ep.title_spans) == len(recent)
    for (s, e), title in zip(ep.title_spans, recent):
        assert lm.tokenizer.decode(ep.prefix_ids[s:e]) == title
        assert ep.prefix_ids[s:e] == pb.title_ids(title)
    # Spans are increasing and the last title ends right before the item suffix, at the slot.
    starts = [s for s, _ in ep.title_spans]
    assert starts == sorted(starts)
    assert ep.title_spans[-1][1] + len(_tok(lm, "\n")) == len(ep.prefix_ids)


def test_truncation_drops_oldest_titles_and_counts_them(lm):
    recent = TITLES[:10]
    full = PromptBuilder(lm.tokenizer).encode(recent, answer=TITLES[11])
    per_title = [e - s + 1 for s, e in full.title_spans]  # title + "\n" (one token here)
    assert len(_tok(lm, "\n")) == 1
    # Room for exactly the newest 4 titles.
    budget = len(full) - sum(per_title[:6])
    pb = PromptBuilder(lm.tokenizer, max_length=budget)
    ep = pb.encode(recent, answer=TITLES[11])
    assert ep.n_truncated == 6
    assert len(ep) == budget
    assert [lm.tokenizer.decode(ep.prefix_ids[s:e]) for s, e in ep.title_spans] == recent[6:]
    # One token less: one more title goes.
    ep2 = PromptBuilder(lm.tokenizer, max_length=budget - 1).encode(recent, answer=TITLES[11])
    assert ep2.n_truncated == 7 and len(ep2) <= budget - 1
    # Reserving room for the slot counts against the budget too.
    ep3 = pb.encode(recent, answer=TITLES[11], reserve=per_title[6])
    assert ep3.n_truncated == 7


def test_prompt_that_cannot_fit_is_a_user_error(lm):
    pb = PromptBuilder(lm.tokenizer, max_length=5)
    with pytest.raises(UserError, match="at most 5"):
        pb.encode(TITLES[:3], answer=TITLES[4])


def test_answer_ids_match_the_suffix_of_a_full_encode(lm):
    pb = PromptBuilder(lm.tokenizer)
    for answer in TITLES[:6] + ["A Title Never Seen In Training: Part II"]:
        ep = pb.encode(TITLES[6:10], answer=answer)
        a = pb.answer_ids(answer)
        assert a[-1] == lm.tokenizer.eos_token_id
        assert ep.input_ids()[-len(a):] == a == ep.answer_ids
        # The same title's tokens inside a recent list and in the slot are the answer's tokens.
        ep2 = pb.encode([answer])
        s, e = ep2.title_spans[0]
        assert ep2.prefix_ids[s:e] == a[:-1] == pb.slot_text_ids(answer)


def test_slot_intro_and_bos_modes(lm):
    t = PromptTemplate(slot_intro="Earlier: ", slot_suffix="\n", bos="never")
    pb = PromptBuilder(lm.tokenizer, t)
    assert pb.slot_text_ids("Jaws (1975)") == _tok(lm, "Earlier: ") + _tok(lm, "Jaws (1975)") + _tok(lm, "\n")
    ep = pb.encode(TITLES[:2])
    assert ep.prefix_ids[0] != lm.tokenizer.bos_token_id
    assert ep.prefix_ids == _tok(lm, t.instruction) + [i for x in TITLES[:2] for i in _tok(lm, x) + _tok(lm, "\n")]


def test_for_lm_uses_the_model_context(lm):
    assert PromptBuilder.for_lm(lm).max_length == lm.model.config.max_position_embeddings


# --------------------------------------------------------------------------- the one cutting rule
def _cut_builder(lm, slot_tokens: int = 4, title_room: int = 14) -> PromptBuilder:
    """A builder with the fixed reserve (slot_tokens, the catalogue's longest answer) and room for
    `title_room` tokens of recent lines."""
    free = PromptBuilder(lm.tokenizer, slot_tokens=slot_tokens, answers=TITLES)
    fixed = len(free.encode([]).prefix_ids) + len(free.encode([]).marker_ids) + free.reserve()
    return PromptBuilder(lm.tokenizer, max_length=fixed + title_room, slot_tokens=slot_tokens, answers=TITLES)


def test_answer_tokens_is_the_catalogues_longest_answer(lm):
    pb = PromptBuilder(lm.tokenizer, slot_tokens=4, answers=TITLES + TITLES[:3])
    lengths = [len(_tok(lm, t)) + 1 for t in TITLES]  # title + EOS, each tokenized alone
    assert len(set(lengths)) > 1
    assert pb.answer_tokens == max(lengths) and pb.slot_tokens == 4
    assert [pb.answer_ids(t) for t in TITLES] == [_tok(lm, t) + [lm.tokenizer.eos_token_id] for t in TITLES]
    assert PromptBuilder(lm.tokenizer).answer_tokens == 0  # no catalogue: no fixed answer reserve
    assert pb.reserve() == 4 + max(lengths) and pb.reserve(slot=9, answer=2) == 9 + max(lengths)


def test_fixed_reserve_keeps_the_same_titles_whatever_the_answer_slot_or_generation(lm):
    pb = _cut_builder(lm)
    recent = TITLES[:8]
    short, long_ = min(TITLES, key=lambda t: len(pb.answer_ids(t))), max(TITLES, key=lambda t: len(pb.answer_ids(t)))
    assert len(pb.answer_ids(short)) < len(pb.answer_ids(long_))
    variants = [
        pb.encode(recent),  # the query state's prompt (build-memory)
        pb.encode(recent, answer=short, reserve=pb.slot_tokens),  # annotation
        pb.encode(recent, answer=long_),
        pb.encode(recent, reserve=2, new_tokens=pb.answer_tokens),  # inference with a short slot
    ]
    assert 0 < variants[0].n_truncated < len(recent)
    assert all(v.prefix_ids == variants[0].prefix_ids and v.n_truncated == variants[0].n_truncated for v in variants)
    assert [lm.tokenizer.decode(variants[0].prefix_ids[s:e]) for s, e in variants[0].title_spans] == \
        recent[variants[0].n_truncated:]  # the oldest went first
    # Without the fixed reserve (the old rule) the query's prompt, reserving nothing, kept more titles.
    old = PromptBuilder(lm.tokenizer, max_length=pb.max_length)
    assert old.encode(recent).n_truncated < variants[0].n_truncated


def test_reserve_grows_only_past_the_fixed_one_and_the_prompt_still_fits(lm):
    pb = _cut_builder(lm)
    recent = TITLES[:8]
    base = pb.encode(recent)
    assert pb.encode(recent, reserve=pb.slot_tokens).n_truncated == base.n_truncated
    line = base.title_spans[1][0] - base.title_spans[0][0]  # the oldest kept title's line
    more = pb.encode(recent, reserve=pb.slot_tokens + line)  # several values side by side: one title more goes
    assert more.n_truncated == base.n_truncated + 1
    gen = pb.encode(recent, new_tokens=pb.answer_tokens + line)  # max_new_tokens above the longest title
    assert gen.n_truncated == base.n_truncated + 1
    slot = pb.slot_tokens + line
    assert len(more.prefix_ids) + slot + len(more.marker_ids) + pb.answer_tokens <= pb.max_length


def test_reserve_that_leaves_no_room_names_its_parts(lm):
    pb = _cut_builder(lm, slot_tokens=6, title_room=0)
    assert pb.encode(TITLES[:3]).n_truncated == 3  # nothing but the fixed part fits: every title dropped
    with pytest.raises(UserError, match=f"slot 7, answer {pb.answer_tokens}.*at most {pb.max_length}"):
        pb.encode(TITLES[:3], reserve=7)
