"""BIGRec-style prompts with a memory slot, tokenized segment by segment.

A prompt is laid out as

    [BOS] instruction  title_1 ... title_K  | slot |  response-marker  answer-title EOS
    `------------------ prefix_ids ---------'        `- marker_ids -'  `- answer_ids -'

Every segment (instruction, each title, each separator, the marker, the answer) is tokenized on
its own and the ids are concatenated. That costs a little naturalness at segment borders but buys
the property everything downstream relies on: a title has the *same* token ids wherever it
appears (as a recent item, in the slot, as the answer), so the prefix tree of answers used by
constrained decoding, the memory values cut out of recent-title spans and the answers scored
during annotation all agree token for token.

The slot sits between the prefix and the marker, so the prompt's KV cache is shared by every
candidate memory element (DESIGN.md "Combine"). An empty slot is plain BIGRec.

What a too-long prompt drops (one rule for every stage; see `PromptBuilder`): the oldest recent
titles, until the prompt fits in max_length minus a *fixed* reserve, the same for the query state
z_t and the keys z_m (build-memory), annotation, inference and fine-tuning of one model and store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from automr.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


DEFAULT_SLOT_TOKENS = 16
"""Tokens a memory value keeps (build-memory's default `value_tokens`): the slot reserve of prompts
built without a store (BIGRec, fine-tuning), so by default they drop what AutoMR's prompts drop."""

DEFAULT_INSTRUCTION = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
    "Given the items a user interacted with recently, listed from oldest to newest, "
    "predict the next item the user will interact with.\n\n"
    "### Input:\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    """The words around the titles. Frozen so it can key caches and be saved with a config.

    Titles are written one per line (prefix "" and suffix "\\n" by default) so that a title
    starts a line: for byte-level BPE tokenizers the separately tokenized title then matches the
    way the model saw such text in pre-training.
    """

    instruction: str = DEFAULT_INSTRUCTION
    """Text before the recent titles (BIGRec's instruction and input header)."""
    item_prefix: str = ""
    """Written before each recent title."""
    item_suffix: str = "\n"
    """Written after each recent title."""
    slot_intro: str = ""
    """Written before the slot's text when the slot holds text (not when it holds states).
    Empty by default so a title written as text and a title's spliced states occupy the same tokens."""
    slot_suffix: str = ""
    """Written after the slot's text when the slot holds text."""
    response_marker: str = "\n### Response:\n"
    """Placed after the slot; the answer follows it."""
    bos: Literal["auto", "always", "never"] = "auto"
    """Start with the tokenizer's BOS token: "auto" does so when the tokenizer itself adds one."""

    def words(self) -> list[str]:
        """Every fixed string of the template (to train a toy tokenizer that covers them)."""
        return [self.instruction, self.item_prefix, self.item_suffix, self.slot_intro, self.slot_suffix,
                self.response_marker]


@dataclass
class EncodedPrompt:
    """Token ids of one prompt, split where the memory slot goes."""

    prefix_ids: list[int]
    """BOS + instruction + the recent titles: ends exactly where the memory slot starts."""
    marker_ids: list[int]
    """The response marker, placed after the slot."""
    answer_ids: list[int]
    """Target title tokens + EOS ([] when no answer was given)."""
    title_spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) of each (kept) recent title's tokens inside prefix_ids, oldest first."""
    n_truncated: int = 0
    """How many of the oldest recent titles were dropped to fit max_length."""

    def input_ids(self, slot_ids: Sequence[int] = ()) -> list[int]:
        """The whole sequence with `slot_ids` written in the slot (text slot), answer included."""
        return [*self.prefix_ids, *slot_ids, *self.marker_ids, *self.answer_ids]

    def __len__(self) -> int:
        return len(self.prefix_ids) + len(self.marker_ids) + len(self.answer_ids)


class PromptBuilder:
    """Turns recent titles (and an optional answer title) into an `EncodedPrompt`.

    What a prompt that exceeds `max_length` drops -- one rule, so that the query state z_t and the
    memory keys z_m (build-memory), annotation, inference (BIGRec and every memory method) and
    fine-tuning of one model and store all see the *same* recent titles of a sample:

        kept = the newest recent titles that fit in
               max_length - instruction - marker - reserve(slot, answer)
        reserve(slot, answer) = max(slot_tokens, slot) + max(answer_tokens, answer)

    `slot_tokens` (the store's max_value_tokens; DEFAULT_SLOT_TOKENS without a store) and
    `answer_tokens` (the longest answer, title + EOS, among `answers`: pass the catalogue) are
    fixed per builder, so the titles kept depend neither on this sample's answer nor on whether
    its slot is filled. `slot` / `answer` (the tokens this prompt really puts there) only grow the
    reserve where they exceed the fixed one (several values side by side, a long text slot, a
    `max_new_tokens` above the longest title): the prompt still fits, at the cost of more titles.
    Titles are dropped oldest first, whole. A builder made without them reserves only what each
    call asks for (the rule before the budget existed).
    """

    def __init__(
        self,
        tokenizer: "PreTrainedTokenizerBase",
        template: PromptTemplate = PromptTemplate(),
        max_length: int | None = None,
        *,
        slot_tokens: int = 0,
        answers: Iterable[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        if max_length is None:
            tml = getattr(tokenizer, "model_max_length", None)
            max_length = int(tml) if isinstance(tml, int) and 0 < tml < 1_000_000 else None
        self.max_length = max_length
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token; answers need one to end. Set tokenizer.eos_token.")
        self._cache: dict[str, list[int]] = {}
        self._bos: list[int] = self._bos_ids()
        self._head: list[int] = self._bos + self._tok(template.instruction)
        self._marker: list[int] = self._tok(template.response_marker)
        self.slot_tokens = int(slot_tokens)
        """Fixed slot reserve: the memory store's max_value_tokens."""
        self.answer_tokens = self._longest_answer(answers)
        """Fixed answer reserve: the longest answer (title + EOS) among `answers`, 0 without them."""

    @classmethod
    def for_lm(
        cls, lm: Any, template: PromptTemplate = PromptTemplate(), max_length: int | None = None, *,
        slot_tokens: int = 0, answers: Iterable[str] = (),
    ) -> "PromptBuilder":
        """A builder whose default max_length is the model's context (max_position_embeddings).

        slot_tokens and answers fix the reserve (see the class docstring): every stage passes the
        store's max_value_tokens and the catalogue's titles, so they all drop the same titles.
        """
        if max_length is None:
            max_length = getattr(lm.model.config, "max_position_embeddings", None)
        return cls(lm.tokenizer, template, max_length, slot_tokens=slot_tokens, answers=answers)

    # -- tokenization -----------------------------------------------------------------------
    def _tok(self, text: str) -> list[int]:
        """Token ids of one segment, without special tokens (memoised: titles repeat a lot)."""
        if not text:
            return []
        ids = self._cache.get(text)
        if ids is None:
            if len(self._cache) > 500_000:
                self._cache.clear()
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = ids
        return ids

    def _longest_answer(self, titles: Iterable[str]) -> int:
        """Tokens of the longest answer (title + EOS) among `titles`, 0 for none.

        Tokenized in batches of uncached titles: a catalogue can hold 100k+ titles and one
        tokenizer call per batch is far cheaper than one per title; the ids are cached for later.
        """
        titles = list(dict.fromkeys(titles))
        todo = [t for t in titles if t and t not in self._cache]
        for i in range(0, len(todo), 4096):
            chunk = todo[i : i + 4096]
            for text, ids in zip(chunk, self.tokenizer(chunk, add_special_tokens=False)["input_ids"]):
                if len(self._cache) <= 500_000:
                    self._cache[text] = list(ids)
        return max((len(self.answer_ids(t)) for t in titles), default=0)

    def _bos_ids(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        mode = self.template.bos
        if mode == "never" or bos is None:
            if mode == "always" and bos is None:
                raise UserError("PromptTemplate.bos='always' but the tokenizer has no BOS token; use 'auto' or 'never'.")
            return []
        if mode == "always":
            return [bos]
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return [bos] if ids and ids[0] == bos else []

    def _item_ids(self, title: str) -> tuple[list[int], int, int]:
        """Ids of one recent-title line and the [start, end) of the title inside them."""
        pre = self._tok(self.template.item_prefix)
        body = self._tok(title)
        return pre + body + self._tok(self.template.item_suffix), len(pre), len(pre) + len(body)

    # -- public API -------------------------------------------------------------------------
    def answer_ids(self, title: str) -> list[int]:
        """Answer tokens of a title (+EOS) exactly as `encode` writes them (for prefix trees)."""
        return self._tok(title) + [int(self.tokenizer.eos_token_id)]

    def title_ids(self, title: str) -> list[int]:
        """A title's tokens (no EOS): identical in recent lists, slots and answers."""
        return list(self._tok(title))

    def slot_text_ids(self, text: str) -> list[int]:
        """Tokens that fill the slot with text (memory-aware fine-tuning, summaries, ablations)."""
        t = self.template
        return self._tok(t.slot_intro) + self._tok(text) + self._tok(t.slot_suffix)

    def reserve(self, slot: int = 0, answer: int = 0) -> int:
        """Tokens kept free after the recent titles for a prompt whose slot holds `slot` tokens and
        whose answer (or generation) takes `answer`: the fixed reserve unless these exceed it."""
        return max(self.slot_tokens, slot) + max(self.answer_tokens, answer)

    def encode(
        self, recent_titles: Sequence[str], answer: str | None = None, *, reserve: int = 0, new_tokens: int = 0,
    ) -> EncodedPrompt:
        """Encode a prompt; drop the oldest recent titles while it exceeds max_length (the class's rule).

        reserve: tokens this prompt puts in the slot. new_tokens: tokens to be generated after the
        marker (decoding). Neither changes the titles kept while within the builder's fixed reserve.
        """
        answer_ids = self.answer_ids(answer) if answer is not None else []
        items = [self._item_ids(t) for t in recent_titles]
        free = self.reserve(reserve, max(len(answer_ids), new_tokens))
        fixed = len(self._head) + len(self._marker) + free
        n_drop = 0
        if self.max_length is not None:
            total = fixed + sum(len(ids) for ids, _, _ in items)
            while total > self.max_length and n_drop < len(items):
                total -= len(items[n_drop][0])
                n_drop += 1
            if total > self.max_length:
                raise UserError(
                    f"the prompt needs {total} tokens without any recent title (instruction "
                    f"{len(self._head)}, marker {len(self._marker)}, reserved for the slot and the answer {free}: "
                    f"slot {max(self.slot_tokens, reserve)}, answer {free - max(self.slot_tokens, reserve)}) but the "
                    f"model takes at most {self.max_length}. Shorten the template's instruction or the titles, use "
                    "fewer value tokens, or raise max_length."
                )
        prefix = list(self._head)
        spans: list[tuple[int, int]] = []
        for ids, a, b in items[n_drop:]:
            spans.append((len(prefix) + a, len(prefix) + b))
            prefix.extend(ids)
        return EncodedPrompt(prefix, list(self._marker), answer_ids, spans, n_drop)
