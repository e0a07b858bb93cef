"""The trie answer loss (issue 10): each answer token's probability normalised over the tokens the title
prefix tree allows after the answer's prefix.

Pins: it equals a per-sample loop over the vocabulary masked by hand (allowed tokens found by scanning
every title, not through TitleTrie) on the HF text path, on the split path with state slots and with
upper-only adapters; forced positions cost 0; the full-vocabulary loss reported beside it is the
ordinary cross-entropy; a fine-tuning run with it logs both validation losses, and its best one is what
the saved model scores by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from memory_helpers import single_thread, toy_data_and_model

from automr.data.schema import PreparedData
from automr.llm.answer_loss import AnswerLoss
from automr.llm.title_trie import TitleTrie
from automr.llm.finetune import _accelerator, draw_slots, encode_samples, epoch_slots, load_finetuned, micro_nll, sequence
from automr.llm.prompts import PromptBuilder
from automr.stages.finetune import FinetuneConfig, _setup, run_finetune
from automr.utils.seeding import select_subset


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return toy_data_and_model(tmp_path_factory.mktemp("trie"))


def _cfg(toy: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    data, base = toy
    defaults = dict(
        samples=data, out=out, model=str(base), device="cpu", progress=False, batch_size=4, grad_accum=2,
        epochs=2, max_train_samples=16, max_valid_samples=8, eval_every=1, lr=1e-2, warmup_steps=0,
        answer_loss="trie", lora_dropout=0.0,
    )
    return FinetuneConfig(**(defaults | kw))


def _hand_nll(logits: torch.Tensor, answer: Sequence[int], catalogue: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(trie NLL, full NLL) of one answer from its logits (A, V): each position masked by hand to the next
    tokens of every catalogue answer that shares the prefix so far."""
    trie = full = 0.0
    for t, y in enumerate(answer):
        allowed = sorted({a[t] for a in catalogue if len(a) > t and list(a[:t]) == list(answer[:t])})
        row = logits[t].double()
        trie -= float(row[y] - torch.logsumexp(row[allowed], 0))
        full -= float(row[y] - torch.logsumexp(row, 0))
    return trie, full


def _catalogue(run) -> list[list[int]]:
    return [run.builder.answer_ids(t) for _, t in sorted(run.titles.items())]


def _perturb(run) -> None:
    """Non-zero LoRA B: the adapter changes the outputs."""
    torch.manual_seed(1)
    for p in run.peft_model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    run.model.eval()


def test_forced_positions_cost_nothing_and_branching_ones_match_by_hand() -> None:
    answers = [[1, 2, 9], [1, 3, 9], [4, 5, 6, 9]]  # after 4: 5, 6 and 9 are forced
    loss = AnswerLoss(TitleTrie(answers, [10, 11, 12]))
    assert [k for k, _ in loss.branching([4, 5, 6, 9])] == [0]
    assert [k for k, _ in loss.branching([1, 3, 9])] == [0, 1]
    torch.manual_seed(0)
    hidden = torch.randn(7, 12, requires_grad=True)  # logits of [1, 3, 9] then [4, 5, 6, 9]; head = identity
    nll, full = loss.sums(lambda h: h, hidden, [[1, 3, 9], [4, 5, 6, 9]], full_too=True)
    t1, f1 = _hand_nll(hidden[:3].detach(), [1, 3, 9], answers)
    t2, f2 = _hand_nll(hidden[3:].detach(), [4, 5, 6, 9], answers)
    assert float(nll.detach()) == pytest.approx(t1 + t2, rel=1e-6) and float(full) == pytest.approx(f1 + f2, rel=1e-6)
    nll.backward()
    assert hidden.grad[[2, 4, 5, 6]].abs().sum() == 0  # forced positions get no gradient
    only = AnswerLoss(TitleTrie([[4, 5, 9]], [10]))  # one title: every token is forced
    forced, _ = only.sums(lambda h: h, hidden[:3].detach().requires_grad_(), [[4, 5, 9]])
    assert float(forced.detach()) == 0.0
    forced.backward()  # still a graph
    with pytest.raises(ValueError, match="leaves the title trie"):
        loss.branching([1, 5])


def test_text_path_equals_the_hand_masked_vocabulary(toy: tuple[Path, Path], tmp_path: Path) -> None:
    run = _setup(_cfg(toy, tmp_path / "ft", memory_aware_prob=0.5), _accelerator(cpu=True))
    assert not run.trainer.state_slots and run.answer_loss.kind == "trie"
    _perturb(run)
    samples = run.train[:8]
    slots = draw_slots(samples, 0.5, 0, 0, run.titles, run.builder)
    assert any(slots) and not all(slots)
    with torch.no_grad():  # the HF forward (trainer None) and the split forward that training runs
        paths = [micro_nll(run.model, t, samples, slots, run.pad_id, "cpu", run.answer_loss, full_too=True)
                 for t in (None, run.trainer)]
        trie = full = 0.0
        for s, slot in zip(samples, slots):
            ids, A = sequence(s, slot)
            logits = run.model(input_ids=torch.tensor([ids])).logits[0, len(ids) - A - 1 : -1]  # (A, V)
            t, f = _hand_nll(logits, s.answer_ids, _catalogue(run))
            trie, full = trie + t, full + f
    for m in paths:
        assert m.answer_tokens == sum(len(s.answer_ids) for s in samples)
        assert float(m.nll) == pytest.approx(trie, rel=1e-5)
        assert float(m.full_nll) == pytest.approx(full, rel=1e-5)
    assert trie < full


@pytest.mark.parametrize("lora_layers", ["upper", "all"])
def test_split_path_with_state_slots_equals_the_hand_masked_vocabulary(
    toy: tuple[Path, Path], tmp_path: Path, lora_layers: str
) -> None:
    cfg = _cfg(toy, tmp_path / "ft", memory_aware_prob=1.0, slot_mode="states", lora_layers=lora_layers)
    run = _setup(cfg, _accelerator(cpu=True))
    _perturb(run)
    split, trainer = run.trainer.split, run.trainer
    picks = epoch_slots(run.train, 1.0, 0, 0, run.titles, run.builder, states=True)[:6]
    samples = run.train[:6]
    assert any(p is not None for p in picks)
    with torch.no_grad():
        nll, full, n_ans, _ = trainer.answer_losses(samples, picks, run.answer_loss, full_too=True)
        rows = [split.plan(s, trainer.slot(s, p)) for s, p in zip(samples, picks)]
        out, _ = split._forward_rows(rows)  # no cached lower layers: the whole split forward
        logits = split._logits(out)  # (B, Tu, V): every position
        trie = ref_full = 0.0
        for b, s in enumerate(samples):
            A, Tu = len(s.answer_ids), logits.shape[1]
            t, f = _hand_nll(logits[b, Tu - A - 1 : Tu - 1], s.answer_ids, _catalogue(run))
            trie, ref_full = trie + t, ref_full + f
        logp = split.answer_logprob(samples, [trainer.slot(s, p) for s, p in zip(samples, picks)])
    assert n_ans == sum(len(s.answer_ids) for s in samples)
    assert float(nll) == pytest.approx(trie, rel=1e-5)
    assert float(full) == pytest.approx(ref_full, rel=1e-5) == pytest.approx(-float(logp.sum()), rel=1e-5)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_trie_run_logs_both_losses_and_its_best_is_what_the_saved_model_scores(toy: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    run_finetune(_cfg(toy, out, patience=100, epochs=3, max_train_samples=32, grad_accum=1, batch_size=8))
    log = _log(out)
    assert all(r["valid_loss"] == r["valid_loss_trie"] < r["valid_loss_full"] for r in log)
    assert log[-1]["valid_loss"] < log[0]["valid_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answer_loss"] == "trie"
    best = min(log, key=lambda r: r["valid_loss"])
    assert summary["best_step"] == best["step"]

    lm = load_finetuned(out, device="cpu")
    data = PreparedData.load(toy[0])
    builder = PromptBuilder.for_lm(lm)
    subset = select_subset(data.split("valid").height, 8, seed=0, salt=8)
    valid = encode_samples(data.split("valid")[subset.tolist()], data.titles(), builder)
    catalogue = [builder.answer_ids(t) for _, t in sorted(data.titles().items())]
    trie = full = 0.0
    with torch.no_grad():
        for s in valid:
            ids, A = sequence(s, [])
            t, f = _hand_nll(lm.model(input_ids=torch.tensor([ids])).logits[0, len(ids) - A - 1 : -1], s.answer_ids, catalogue)
            trie, full = trie + t, full + f
    n = sum(len(s.answer_ids) for s in valid)
    assert trie / n == pytest.approx(best["valid_loss"], rel=1e-4)
    assert full / n == pytest.approx(best["valid_loss_full"], rel=1e-4)


def test_a_trie_run_with_state_slots_and_upper_adapters_learns(toy: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "up"
    run_finetune(_cfg(toy, out, memory_aware_prob=0.5, slot_mode="states", lora_layers="upper", patience=100, epochs=3,
                      max_train_samples=32, grad_accum=1, batch_size=8))
    log = _log(out)
    assert log[-1]["valid_loss"] < log[0]["valid_loss"]
    assert all(r["valid_loss"] < r["valid_loss_full"] for r in log)


def test_a_prior_is_added_to_the_logits_of_every_branching_token() -> None:
    """With a prior, each branching position scores logit + prior over the allowed tokens (by hand), and a
    head that knows nothing (zero logits) scores exactly the prior's own NLL."""
    from automr.llm.trie_prior import popularity_prior

    answers = [[1, 2, 9], [1, 3, 9], [4, 5, 6, 9]]
    trie = TitleTrie(answers, [10, 11, 12])
    prior = popularity_prior(trie, {10: 5, 11: 1, 12: 2})
    loss = AnswerLoss(trie, prior)
    torch.manual_seed(0)
    hidden = torch.randn(7, 12, requires_grad=True)  # [1, 3, 9] then [4, 5, 6, 9]; head = identity
    nll, _ = loss.sums(lambda h: h, hidden, [[1, 3, 9], [4, 5, 6, 9]])
    log_share = {tok: float(b) for tok, b in zip(trie.allowed(0).tolist(), prior.tables[0])}  # root: 1 or 4
    after_1 = {tok: float(b) for tok, b in zip(trie.allowed(trie.advance(0, 1)).tolist(), prior.tables[trie.advance(0, 1)])}
    h = hidden.detach().double()
    by_hand = 0.0
    for row, (pos_tok, table) in zip((h[0], h[1], h[3]), ((1, log_share), (3, after_1), (4, log_share))):
        scores = {t: float(row[t]) + b for t, b in table.items()}
        by_hand -= scores[pos_tok] - torch.logsumexp(torch.tensor(list(scores.values())), 0).item()
    assert float(nll.detach()) == pytest.approx(by_hand, rel=1e-6)
    nll.backward()
    assert hidden.grad[[2, 4, 5, 6]].abs().sum() == 0
    zero, _ = loss.sums(lambda h: h * 0, hidden.detach(), [[1, 3, 9], [4, 5, 6, 9]])
    assert float(zero) == pytest.approx(-(prior.path_sum([1, 3, 9]) + prior.path_sum([4, 5, 6, 9])), rel=1e-6)
    with pytest.raises(ValueError, match="trie loss"):
        AnswerLoss(None, prior)


def test_a_run_with_the_popularity_prior_validates_on_logits_plus_prior(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """answer_prior needs the trie loss; a run with it trains and validates the prior-added loss, which for
    untouched LoRA (B = 0) differs from the plain run's by the prior alone."""
    with pytest.raises(ValueError, match="answer_loss trie"):
        _cfg(toy, tmp_path / "x", answer_loss="full", answer_prior=1.0)
    plain = _setup(_cfg(toy, tmp_path / "a"), _accelerator(cpu=True))
    prior = _setup(_cfg(toy, tmp_path / "b", answer_prior=1.0), _accelerator(cpu=True))
    assert prior.answer_loss.prior is not None and prior.trie_loss is prior.answer_loss and plain.answer_loss.prior is None
    samples = prior.valid[:4]
    slots = [[] for _ in samples]  # empty text slots
    a = micro_nll(plain.model, plain.trainer, samples, slots, plain.pad_id, "cpu", plain.answer_loss)
    b = micro_nll(prior.model, prior.trainer, samples, slots, prior.pad_id, "cpu", prior.answer_loss)
    assert float(a.nll.detach()) != pytest.approx(float(b.nll.detach()), rel=1e-3)
    cfg = _cfg(toy, tmp_path / "ft", answer_prior=1.0, epochs=1)
    run_finetune(cfg)
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert any("valid_loss" in r for r in log)
