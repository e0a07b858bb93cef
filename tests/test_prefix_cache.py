"""Decoding's prefill reads back the prompt prefix it computed last (automr/llm/prefix_cache.py).

What it must never do: give an answer other than a fresh computation's, or reuse keys computed with
other weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _llm_helpers import TITLES
from memory_helpers import single_thread

from automr.llm.decoding import beam_search
from automr.llm.loading import LM, build_tiny_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.split import SplitLM
from automr.llm.title_trie import build_trie


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture()
def lm() -> LM:
    return build_tiny_lm(TITLES)  # per test: one test changes its weights


def _fresh_logits(lm: LM, builder: PromptBuilder, titles: list[str], slot: object = None) -> torch.Tensor:
    """Next-token logits of a SplitLM with nothing cached."""
    return SplitLM(lm).prefill([builder.encode(titles)], [slot])[1]


def test_one_request_at_a_time_reuses_the_instruction_and_the_same_prompt(lm: LM) -> None:
    builder = PromptBuilder.for_lm(lm)
    split = SplitLM(lm)
    first, second = TITLES[:3], TITLES[5:9]
    split.prefill([builder.encode(first)], [None])
    computed = split.prefix_cache.computed_tokens
    logits = split.prefill([builder.encode(second)], [None])[1]  # another user: the instruction is shared
    assert split.prefix_cache.reused_tokens >= len(builder.encode([]).prefix_ids) - 1 > 10
    assert split.prefix_cache.computed_tokens - computed < len(builder.encode(second).prefix_ids)
    torch.testing.assert_close(logits, _fresh_logits(lm, builder, second), atol=1e-5, rtol=1e-5)
    before = split.prefix_cache.reused_tokens
    again = split.prefill([builder.encode(second)], [builder.slot_text_ids(TITLES[12])])[1]  # same user, a slot
    assert split.prefix_cache.reused_tokens - before == len(builder.encode(second).prefix_ids)  # up to the slot
    torch.testing.assert_close(again, _fresh_logits(lm, builder, second, builder.slot_text_ids(TITLES[12])),
                               atol=1e-5, rtol=1e-5)


def test_changed_weights_are_never_served_from_the_cache(lm: LM) -> None:
    builder = PromptBuilder.for_lm(lm)
    split = SplitLM(lm)
    split.prefill([builder.encode(TITLES[:3])], [None])
    with torch.no_grad():  # what an optimizer step or load_state_dict does: weights changed in place
        next(lm.model.parameters()).mul_(1.5)
    reused = split.prefix_cache.reused_tokens
    logits = split.prefill([builder.encode(TITLES[:3])], [None])[1]
    assert split.prefix_cache.reused_tokens == reused
    torch.testing.assert_close(logits, _fresh_logits(lm, builder, TITLES[:3]), atol=1e-5, rtol=1e-5)


def test_beam_search_after_cached_requests_matches_a_fresh_model(lm: LM) -> None:
    builder = PromptBuilder.for_lm(lm)
    trie = build_trie(builder, list(enumerate(TITLES, start=1)))
    split, fresh = SplitLM(lm), SplitLM(lm)
    histories = [TITLES[i : i + 3] for i in (0, 4, 4, 9)]  # the third asks what the second asked
    kw = dict(num_beams=4, max_new_tokens=trie.max_len, trie=trie)
    for h in histories:
        cached = beam_search(split, [builder.encode(h)], [None], **kw)[0]
        fresh.prefix_cache.clear()
        ref = beam_search(fresh, [builder.encode(h)], [None], **kw)[0]
        assert [(x.tokens, x.item) for x in cached] == [(x.tokens, x.item) for x in ref]
        assert [x.score for x in cached] == pytest.approx([x.score for x in ref], abs=1e-5)
    assert split.prefix_cache.reused_tokens > 0


def test_query_states_after_a_prefill_read_the_cached_instruction(lm: LM) -> None:
    """The query state z_t (layer L, last prompt token) of a served request after another's prefill: only
    the tokens after the instruction run, and the states equal a fresh model's."""
    builder = PromptBuilder.for_lm(lm)
    split = SplitLM(lm)
    prompts = [builder.encode(TITLES[i : i + 3]).prefix_ids for i in (2, 7)]
    assert split.last_token_states(prompts) is not None and split.prefix_cache.reused_tokens == 0  # nothing cached
    split.prefill([builder.encode(TITLES[:3])], [None])
    states = split.last_token_states(prompts)
    assert split.prefix_cache.reused_tokens >= len(builder.encode([]).prefix_ids) - 1
    torch.testing.assert_close(states, SplitLM(lm).last_token_states(prompts), atol=1e-5, rtol=1e-5)
    for layer in (1, split.num_layers):
        torch.testing.assert_close(split.last_token_states(prompts, layer),
                                   SplitLM(lm).last_token_states(prompts, layer), atol=1e-5, rtol=1e-5)


def _state_slot(split: SplitLM, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, split.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("starts", [(0,), (0, 5, 10), (5, 5)], ids=["one", "three", "one-prompt-twice"])
def test_prefill_after_the_query_states_runs_only_what_follows_each_prompt(lm: LM, starts: tuple[int, ...]) -> None:
    """AutoMR computes z_t from each prompt's lower layers, then prefills the prompt with its slot: the
    prefill reads the prompt's lower layers back (one request, or one prompt with two slots: the prompt is
    the batch's shared prefix; several: each row's own) and decodes exactly what a fresh model decodes."""
    builder = PromptBuilder.for_lm(lm)
    trie = build_trie(builder, list(enumerate(TITLES, start=1)))
    split, fresh = SplitLM(lm), SplitLM(lm)
    split.prefill([builder.encode(TITLES[20:22])], [None])  # another request: the instruction is cached
    prompts = [builder.encode(TITLES[i : i + 3]) for i in starts]
    slots = [_state_slot(split, 3, 0), _state_slot(split, 2, 3) if starts[1:2] == (5,) else None,
             builder.slot_text_ids(TITLES[13])][: len(starts)]
    split.last_token_states([p.prefix_ids for p in prompts])
    kw = dict(num_beams=4, max_new_tokens=trie.max_len, trie=trie)
    got = beam_search(split, prompts, slots, **kw)
    instruction = len(builder.encode([]).prefix_ids) - 1
    distinct = {tuple(p.prefix_ids) for p in prompts}
    assert split.lower_stash.reused_tokens >= sum(len(p) - instruction - 1 for p in distinct) > 0
    ref = beam_search(fresh, prompts, slots, **kw)
    for g, r in zip(got, ref):
        assert [(x.tokens, x.item) for x in g] == [(x.tokens, x.item) for x in r]
        assert [x.score for x in g] == pytest.approx([x.score for x in r], abs=1e-5)


def test_the_stashed_lower_layers_are_never_read_with_other_weights_or_for_another_prompt(lm: LM) -> None:
    builder = PromptBuilder.for_lm(lm)
    split = SplitLM(lm)
    split.prefill([builder.encode(TITLES[20:22])], [None])
    prompts = [builder.encode(TITLES[i : i + 3]) for i in (0, 5)]
    slots = [_state_slot(split, 2, 1), _state_slot(split, 4, 2)]
    split.last_token_states([prompts[0].prefix_ids])  # the second prompt was never stashed: no row reads back
    split.prefill(prompts, slots)
    assert split.lower_stash.reused_tokens == 0
    split.last_token_states([p.prefix_ids for p in prompts])
    with torch.no_grad():
        next(lm.model.parameters()).mul_(1.5)  # an optimizer step between the two passes
    logits = split.prefill(prompts, slots)[1]
    assert split.lower_stash.reused_tokens == 0
    torch.testing.assert_close(logits, SplitLM(lm).prefill(prompts, slots)[1], atol=1e-5, rtol=1e-5)
