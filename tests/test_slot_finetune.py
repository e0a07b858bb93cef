"""Fine-tuning speed-ups and state slots (issue 9, A4 and B1) on a tiny random Llama and toy data.

Pins: the answer-only LM head gives the full-logit loss; a state-slot training loss equals the
split forward's answer NLL with the same states spliced at layer L (what annotation and
inference compute); upper-only adapters leave the lower layers without LoRA and without
gradient; resuming a state-slot run ends bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from automr.data.schema import PreparedData
from automr.llm.finetune import IGNORE_INDEX, answer_nll, collate, draw_slots, encode_samples, sequence
from automr.llm.loading import build_tiny_lm, save_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.toy import make_toy_prepared, toy_titles
from memory_helpers import single_thread


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared data folder, tiny base model folder)."""
    root = tmp_path_factory.mktemp("slotft")
    data = make_toy_prepared(root / "data")
    save_lm(build_tiny_lm(toy_titles(20)), root / "base")
    return data, root / "base"



def test_answer_only_head_matches_full_logits(toy: tuple[Path, Path]) -> None:
    data = PreparedData.load(toy[0])
    titles = data.titles()
    lm = build_tiny_lm(toy_titles(20))
    builder = PromptBuilder.for_lm(lm)
    samples = encode_samples(data.split("train"), titles, builder, with_slot=True)[:12]
    slots = draw_slots(samples, 0.5, 0, 0, titles, builder)
    batch = collate([sequence(s, slot) for s, slot in zip(samples, slots)], lm.tokenizer.pad_token_id, "cpu")
    assert len({len(s.answer_ids) for s in samples}) > 1, "answers of several lengths exercise the padding"
    with torch.no_grad():
        nll, n = answer_nll(lm.model, batch)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).logits  # every position, the whole vocabulary
    A = batch["labels"].shape[1]
    ref = F.cross_entropy(logits[:, -A - 1 : -1].reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == sum(len(s.answer_ids) for s in samples)
    assert float(nll) == pytest.approx(float(ref), rel=1e-6)
