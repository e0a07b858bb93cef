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
