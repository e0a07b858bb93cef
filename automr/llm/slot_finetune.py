"""The fine-tuning forward through the split model: state slots and cached lower layers (issue 9 A4, B1).

Why it exists:
- State slots (A4). At inference the slot holds an element's layer-L title states, spliced at
  layer L: the lower layers of marker and answer never see it (automr/llm/split.py). Fine-tuning
  with the title written as text (`slot_mode: text`) trains a different model from the one that
  is used; `slot_mode: states` fills the slot exactly as build-memory and annotation do: the value
  is the layer-L states of m's title tokens in the prompt of the window ending at m (the first
  `value_tokens`, rounded through float16 as the store keeps them), and the loss is
  `SplitLM.answer_logprob` of the same row.
- Upper-only adapters (B1). With LoRA only on layers >= L (`lora_layers: upper`) the lower layers
  are the frozen base model, so a row's lower-layer output, and every slot value, is a pure
  function of its tokens and positions: computed once (no gradient) and reused across epochs,
  and the memory keys and values build-memory computes stay independent of the adapter. Only the
  upper layers run forward and backward.

The cache is keyed by the EncodedSample object (they live for the whole run) and the slot
(its length for states, since it moves the marker's and answer's lower positions; its ids for
text). A lower output costs n_tokens x hidden x dtype bytes (SmolLM2: about 0.45 MB per 200-token
row in float32); at most (1 + epochs x memory_aware_prob) rows per sample are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from automr.llm.answer_loss import AnswerLoss

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.split import SplitLM

# automr.llm.finetune.EncodedSample (not imported: finetune imports this module's type)
EncodedSample = Any

# A drawn slot: text ids (slot_mode text), an index into memory_items (slot_mode states), or None.
SlotChoice = list[int] | int | None


class SplitTrainer:
    """Answer NLL of training rows through SplitLM, with state slots and (frozen lower) cached lower layers."""

    def __init__(self, split: SplitLM, builder: Any, titles: dict[int, str], *, value_tokens: int, window: int,
                 frozen_lower: bool, state_slots: bool, shared_prefix: bool = True) -> None:
        self.split = split
        self.shared_prefix = shared_prefix  # the batch's common first tokens run once (SplitLM.answer_states)
        self.state_slots = state_slots  # slots drawn as memory indices (states) rather than text ids
        self.builder = builder
        self.titles = titles
        self.value_tokens = value_tokens
        self.window = window  # K: titles in the window ending at an element (build-memory's `window`)
        self.frozen_lower = frozen_lower
        self._values: dict[tuple[int, ...], torch.Tensor] = {}
        self._lower: dict[tuple[int, Any], torch.Tensor] = {}

    def slot_states(self, sample: EncodedSample, pick: int) -> torch.Tensor:
        """m = memory_items[pick]: its title's layer-L states in the prompt of the window ending at m (S, H).

        The window is taken from the sample's own older interactions (build-memory takes it from the
        merged user history, which differs only for the first K-1 elements of a capped history).
        """
        window = tuple(sample.memory_items[max(0, pick - self.window + 1) : pick + 1])
        cached = self._values.get(window)
        if cached is not None:
            return cached
        enc = self.builder.encode([self.titles[i] for i in window])
        s0, s1 = enc.title_spans[-1]
        with torch.no_grad():
            h = self.split.lower(torch.as_tensor([list(enc.prefix_ids)]))  # (1, T, H)
        value = h[0, s0 : min(s1, s0 + self.value_tokens)].to(torch.float16).to(h.dtype)  # as the store keeps it
        if self.frozen_lower:
            self._values[window] = value
        return value

    def slot(self, sample: EncodedSample, choice: SlotChoice) -> torch.Tensor | list[int] | None:
        """What `SplitLM.plan` takes for a drawn slot choice."""
        if isinstance(choice, int):
            return self.slot_states(sample, choice)
        return choice or None

    def answer_nll(self, samples: Sequence[EncodedSample], choices: Sequence[SlotChoice]) -> tuple[torch.Tensor, int, int]:
        """(summed answer-token NLL over the vocabulary, answer tokens, input tokens) of a micro-batch, differentiable."""
        nll, _, n_answer, n_input = self.answer_losses(samples, choices, AnswerLoss())
        return nll, n_answer, n_input

    def answer_losses(self, samples: Sequence[EncodedSample], choices: Sequence[SlotChoice], loss: AnswerLoss,
                      full_too: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """(summed NLL under `loss`, differentiable; full-vocabulary sum when `full_too`; answer tokens; input tokens)."""
        slots = [self.slot(s, c) for s, c in zip(samples, choices)]
        rows = [self.split.plan(s, slot) for s, slot in zip(samples, slots)]  # EncodedSample has the prompt's fields
        if self.frozen_lower:
            lower = [self._lower_row(s, c, r) for s, c, r in zip(samples, choices, rows)]
            if self.shared_prefix:
                hidden = self.split.upper_answer_states(lower, rows)
            else:
                hidden = self.split.answer_hidden(self.split.upper_forward(lower, rows), rows)  # (N_answer, H)
        elif self.shared_prefix:
            hidden = self.split.answer_states(rows)
        else:
            out, _ = self.split._forward_rows(rows)
            hidden = self.split.answer_hidden(out, rows)
        nll, full = loss.sums(self.split._logits, hidden, [r.answer_ids for r in rows], full_too)
        return nll, full, sum(r.n_answer for r in rows), sum(r.upper_len for r in rows)

    def _lower_row(self, sample: EncodedSample, choice: SlotChoice, row: Any) -> torch.Tensor:
        """The row's lower-layer output (n_low, H), computed once per (sample, slot) without gradient."""
        slot_len = 0 if row.states is None else int(row.states.shape[0])  # moves the marker's lower positions
        key = (id(sample), slot_len, tuple(choice) if isinstance(choice, list) else ())
        cached = self._lower.get(key)
        if cached is None:
            ids = torch.as_tensor([row.lower_ids])
            with torch.no_grad():
                cached = self.split.lower(ids, None, torch.as_tensor([row.lower_pos]))[0]
            self._lower[key] = cached
        return cached


def upper_layer_indices(num_layers: int, split_layer: int | None) -> list[int]:
    """Decoder layers >= L (L defaults to half, as SplitLM's): where `lora_layers: upper` puts adapters."""
    L = num_layers // 2 if split_layer is None else int(split_layer)
    return list(range(L, num_layers))
