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
from memory_helpers import single_thread, toy_data_and_model
from safetensors.torch import load_file

from automr.data.schema import PreparedData
from automr.llm.finetune import (
    IGNORE_INDEX,
    _accelerator,
    answer_nll,
    collate,
    draw_slots,
    encode_samples,
    epoch_slots,
    micro_nll,
    sequence,
)
from automr.llm.loading import build_tiny_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.toy import toy_titles
from automr.stages.finetune import FinetuneConfig, _setup, run_finetune


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared data folder, tiny base model folder)."""
    return toy_data_and_model(tmp_path_factory.mktemp("slotft"))



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


def _cfg(toy: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    data, base = toy
    defaults = dict(
        samples=data, out=out, model=str(base), device="cpu", progress=False, batch_size=4, grad_accum=2,
        epochs=2, max_train_samples=16, max_valid_samples=8, eval_every=1, lr=1e-2, warmup_steps=0,
    )
    return FinetuneConfig(**(defaults | kw))


@pytest.mark.parametrize("lora_layers", ["upper", "all"])
def test_state_slot_loss_equals_the_split_forward(toy: tuple[Path, Path], tmp_path: Path, lora_layers: str) -> None:
    """The training loss of a row with a state slot is the NLL that annotation's kernel computes for it."""
    cfg = _cfg(toy, tmp_path / "ft", memory_aware_prob=1.0, slot_mode="states", lora_layers=lora_layers, lora_dropout=0.0)
    run = _setup(cfg, _accelerator(cpu=True))
    torch.manual_seed(1)
    for p in run.peft_model.parameters():  # non-zero LoRA B: the adapter changes the outputs
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    run.model.eval()
    trainer = run.trainer
    slots = epoch_slots(run.train, 1.0, 0, 0, run.titles, run.builder, states=True)
    j = next(i for i, c in enumerate(slots) if c is not None)
    sample, pick = run.train[j], slots[j]
    with torch.no_grad():
        nll, n_ans, _ = trainer.answer_nll([sample], [pick])
        states = trainer.slot_states(sample, pick)
        ref = trainer.split.score_candidates(sample, [states], include_empty=False)[0]
        ref_row = trainer.split.answer_logprob([sample], [states])[0]
    assert states.shape[0] > 0 and n_ans == len(sample.answer_ids)
    assert float(nll) == pytest.approx(-float(ref), abs=1e-5, rel=1e-5)
    assert float(nll) == pytest.approx(-float(ref_row), abs=1e-5, rel=1e-5)
    # The value is m's title states in the window ending at m, as build-memory stores them.
    window = sample.memory_items[max(0, pick - trainer.window + 1) : pick + 1]
    enc = run.builder.encode([run.titles[i] for i in window])
    s0, s1 = enc.title_spans[-1]
    h = trainer.split.hidden_states([list(enc.prefix_ids)])[0][0]
    torch.testing.assert_close(states, h[s0 : min(s1, s0 + cfg.value_tokens)].half().float())


@pytest.mark.parametrize("lora_layers", ["all", "upper"])
def test_the_shared_instruction_runs_once_with_the_same_loss_and_gradients(toy: tuple[Path, Path], tmp_path: Path,
                                                                          lora_layers: str) -> None:
    """Issue 9 B1: a micro-batch's common first tokens run once (SplitLM.answer_states, and with frozen
    lower layers `upper_answer_states`) and the loss and every LoRA gradient equal the per-row
    left-padded forward's, for rows with state slots and without."""
    cfg = _cfg(toy, tmp_path / "ft", memory_aware_prob=0.5, slot_mode="states", lora_layers=lora_layers, lora_dropout=0.0,
               target_modules=["all-linear"])
    run = _setup(cfg, _accelerator(cpu=True))
    torch.manual_seed(2)
    lora = [p for p in run.peft_model.parameters() if p.requires_grad]
    for p in lora:  # non-zero LoRA B: gradients reach every layer
        p.data.normal_(0, 0.05)
    trainer = run.trainer
    slots = epoch_slots(run.train, 0.5, 0, 0, run.titles, run.builder, states=True)
    samples, picks = run.train[:8], slots[:8]
    assert any(c is None for c in picks) and any(c is not None for c in picks)
    rows = [trainer.split.plan(s, trainer.slot(s, c)) for s, c in zip(samples, picks)]
    from automr.llm.split import _shared_length

    assert _shared_length(rows) > 0, "the rows share the instruction"
    grads, losses = [], []
    for shared in (False, True):
        trainer.shared_prefix = shared
        run.peft_model.zero_grad(set_to_none=True)
        nll, n_ans, _ = trainer.answer_nll(samples, picks)
        nll.backward()
        losses.append(float(nll.detach()))
        grads.append([p.grad.clone() for p in lora])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(*grads):  # float32 sums in another order: equal to rounding
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
        assert float((b - a).norm()) <= 1e-5 * max(float(a.norm()), 1e-12) + 1e-7
    assert any(float(g.abs().sum()) > 0 for g in grads[1])


@pytest.mark.parametrize("family,memory_aware_prob", [("llama", 0.0), ("llama", 0.5), ("qwen2", 0.5)])
def test_text_slot_rows_train_through_the_split_forward_as_through_hf(toy: tuple[Path, Path], tmp_path: Path,
                                                                     family: str, memory_aware_prob: float) -> None:
    """Every fine-tuning run takes the split forward (the faster path, issue 9 B1), plain BIGRec rows and text
    slots included: its loss and every LoRA gradient equal the Hugging Face forward's on the same text rows
    (Qwen2 too: biased attention projections)."""
    if family != "llama":
        from automr.llm.loading import save_lm

        save_lm(build_tiny_lm(toy_titles(20), family=family), tmp_path / family)
        toy = (toy[0], tmp_path / family)
    cfg = _cfg(toy, tmp_path / "ft", memory_aware_prob=memory_aware_prob, lora_dropout=0.0, target_modules=["all-linear"])
    run = _setup(cfg, _accelerator(cpu=True))
    assert run.trainer is not None and not run.trainer.state_slots
    torch.manual_seed(3)
    lora = [p for p in run.peft_model.parameters() if p.requires_grad]
    for p in lora:  # non-zero LoRA B: gradients reach every layer
        p.data.normal_(0, 0.05)
    slots = epoch_slots(run.train, memory_aware_prob, 0, 0, run.titles, run.builder, states=False)
    samples, picks = run.train[:8], slots[:8]
    assert (memory_aware_prob == 0) == all(not c for c in picks), "text slots drawn only when asked for"
    losses, grads = [], []
    for trainer in (None, run.trainer):  # None: the HF forward on the text sequences
        run.peft_model.zero_grad(set_to_none=True)
        m = micro_nll(run.model, trainer, samples, picks, run.pad_id, "cpu", run.answer_loss)
        m.nll.backward()
        losses.append(float(m.nll.detach()))
        grads.append([p.grad.clone() for p in lora])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in grads[1])


def test_upper_adapters_leave_the_lower_layers_untouched(toy: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = _cfg(toy, tmp_path / "ft", memory_aware_prob=0.5, slot_mode="states", lora_layers="upper")
    run = _setup(cfg, _accelerator(cpu=True))
    L, N = run.trainer.split.split_layer, run.trainer.split.num_layers
    layer_of = lambda name: int(name.split(".layers.")[1].split(".")[0])
    lora = [name for name, p in run.peft_model.named_parameters() if p.requires_grad]
    assert lora and {layer_of(name) for name in lora} == set(range(L, N))
    slots = epoch_slots(run.train, 0.5, 0, 0, run.titles, run.builder, states=True)
    nll, _, _ = run.trainer.answer_nll(run.train[:4], slots[:4])
    nll.backward()
    for name, p in run.peft_model.named_parameters():
        if ".layers." in name and layer_of(name) < L:
            assert p.grad is None, name
    assert all(run.peft_model.get_parameter(name).grad is not None for name in lora if "lora_B" in name)
    # Lower-layer outputs are computed once per (sample, slot length) and reused.
    cached = len(run.trainer._lower)
    run.trainer.answer_nll(run.train[:4], slots[:4])
    assert len(run.trainer._lower) == cached == 4


def test_state_slot_run_resumes_bitwise(toy: tuple[Path, Path], tmp_path: Path) -> None:
    kw = dict(lora_dropout=0.1, memory_aware_prob=0.5, checkpoint_every=1, slot_mode="states", lora_layers="upper",
              epochs=1, max_train_samples=16, grad_accum=1)
    run_finetune(_cfg(toy, tmp_path / "a", **kw))
    run_finetune(_cfg(toy, tmp_path / "b", stop_after=2, **kw))
    run_finetune(_cfg(toy, tmp_path / "b", **kw))
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["valid_loss"] < log[0]["valid_loss"]
