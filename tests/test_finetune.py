"""LoRA fine-tuning (automr.llm.finetune) on a tiny random Llama and a toy data set.

Pins: the loss on answer tokens goes down; an interrupted run resumed from its checkpoint ends
with exactly the weights of an uninterrupted one; a checkpoint holds no pickle that could run
code, and an old one with a pickled RNG state is refused; the memory-aware option writes an
older title into the slot; two processes under torchrun compute what one process computes on
the same global batches; a finished output loads back as a merged model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.llm.finetune import (
    RNG_JSON,
    RNG_TENSORS,
    _load_rng_state,
    _rng_state,
    _save_rng_states,
    _set_rng_state,
    collate,
    draw_slots,
    encode_samples,
    epoch_plan,
    load_finetuned,
    sequence,
)
from automr.stages.finetune import FinetuneConfig, run_finetune
from automr.llm.loading import build_tiny_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.toy import toy_titles
from automr.utils.seeding import select_subset
from memory_helpers import single_thread, toy_data_and_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Torch on one thread per test (memory_helpers.single_thread explains why)."""
    yield from single_thread()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared data folder, tiny base model folder)."""
    return toy_data_and_model(tmp_path_factory.mktemp("ft"))


def _cfg(toy: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    data, base = toy
    defaults = dict(
        samples=data, out=out, model=str(base), device="cpu", progress=False, batch_size=4, grad_accum=2,
        epochs=2, max_train_samples=16, max_valid_samples=8, eval_every=1, lr=1e-2, warmup_steps=0,
    )
    return FinetuneConfig(**(defaults | kw))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_output_loads(toy: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    run_finetune(_cfg(toy, out, epochs=3, max_train_samples=32, grad_accum=1, batch_size=8, patience=100))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["valid_loss"] < log[0]["valid_loss"] - 0.5, [r["valid_loss"] for r in log]
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in log)
    # The full rule's validation loss is the full-vocabulary one; the trie loss is logged beside it (issue 10).
    assert all(r["valid_loss"] == r["valid_loss_full"] > r["valid_loss_trie"] for r in log)
    assert (out / "config.yaml").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    best = min(log, key=lambda r: r["valid_loss"])
    assert summary["best_step"] == best["step"]

    # The saved adapter is the best one, and load_finetuned merges it into the base model.
    lm = load_finetuned(out, device="cpu")
    assert "+lora-" in lm.name and not hasattr(lm.model, "peft_config")
    data = PreparedData.load(toy[0])
    builder = PromptBuilder.for_lm(lm)
    subset = select_subset(data.split("valid").height, 8, seed=0, salt=8)  # the run's validation samples
    valid = encode_samples(data.split("valid")[subset.tolist()], data.titles(), builder)
    batch = collate([sequence(s, []) for s in valid], lm.tokenizer.pad_token_id, "cpu")
    from automr.llm.finetune import answer_nll

    with torch.no_grad():
        nll, n = answer_nll(lm.model, batch)
    assert float(nll) / n == pytest.approx(best["valid_loss"], rel=1e-4)


def test_resume_after_interruption_gives_identical_weights(toy: tuple[Path, Path], tmp_path: Path) -> None:
    # Dropout and memory-aware slots are on, so RNG and slot draws must be restored too.
    kw = dict(lora_dropout=0.1, memory_aware_prob=0.5, checkpoint_every=1)
    run_finetune(_cfg(toy, tmp_path / "a", **kw))
    run_finetune(_cfg(toy, tmp_path / "b", stop_after=3, **kw))
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and not state["finished"] and not (tmp_path / "b" / "adapter").exists()
    run_finetune(_cfg(toy, tmp_path / "b", **kw))  # resume (the default)

    for part in ("adapter", "checkpoint/adapter"):
        wa = load_file(tmp_path / "a" / part / "adapter_model.safetensors")
        wb = load_file(tmp_path / "b" / part / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{part}:{k} differs after resume"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(_log(tmp_path / "a")) == strip(_log(tmp_path / "b"))

    # Resuming with other settings is a clear user error, not a silent mix.
    with pytest.raises(UserError, match="lr"):
        run_finetune(_cfg(toy, tmp_path / "b", lr=5e-3, **kw))


def test_early_stopping_keeps_the_best_adapter(toy: tuple[Path, Path], tmp_path: Path) -> None:
    # A learning rate far below float32 resolution: the validation loss never improves after step 1.
    out = tmp_path / "es"
    run_finetune(_cfg(toy, out, lr=1e-12, patience=2, epochs=2, eval_every=1))
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]  # 4 steps planned, stopped after 2 evaluations without gain
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped"] and summary["best_step"] == 1 and summary["total_steps"] == 4
    best = load_file(out / "checkpoint" / "best" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    # Running it again is a no-op: the output is complete.
    run_finetune(_cfg(toy, out, lr=1e-12, patience=2, epochs=2, eval_every=1))
    assert len(_log(out)) == 3


def _stopped_run(toy: tuple[Path, Path], out: Path) -> Path:
    """A one-epoch run stopped after its first step; returns its checkpoint folder."""
    run_finetune(_cfg(toy, out, epochs=1, stop_after=1))
    return out / "checkpoint"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the stage guard's ownership marker (written when it claims a folder of ours)."""
    from automr.utils.io import OUTPUT_MARKER

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != OUTPUT_MARKER}


def test_checkpoint_holds_no_pickle(toy: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = _stopped_run(toy, tmp_path / "ft")
    assert not (ckpt / "rng.pt").exists()
    procs = json.loads((ckpt / RNG_JSON).read_text())["processes"]  # python and numpy states: plain JSON
    assert len(procs) == 1 and {"python", "numpy"} <= set(procs[0])
    tensors = load_file(ckpt / RNG_TENSORS)  # torch (and CUDA) states: uint8 tensors
    assert tensors["torch.0"].dtype == torch.uint8
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(ckpt / name, weights_only=True)  # tensors and plain values only: loads without unpickling code
    assert {p.suffix for p in ckpt.rglob("*") if p.is_file()} <= {".json", ".yaml", ".safetensors", ".pt"}


def test_rng_states_round_trip_exactly(tmp_path: Path) -> None:
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.gauss(0, 1)  # a cached gaussian is part of python's state
    _save_rng_states([_rng_state()], tmp_path)
    want = draws()
    draws()
    _set_rng_state(_load_rng_state(tmp_path, rank=0, world=1))
    assert draws() == want
    with pytest.raises(UserError, match="1 process"):
        _load_rng_state(tmp_path, rank=0, world=2)


class _Planted:
    """A pickle that runs code when loaded: it makes a folder (what a hostile checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def test_resume_does_not_run_code_from_a_checkpoint(toy: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt = _stopped_run(toy, tmp_path / "ft")
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)  # the plant works: unpickling it runs code
    assert marker.is_dir()
    marker.rmdir()
    (tmp_path / "planted.pt").replace(ckpt / "optimizer.pt")
    before = _files(tmp_path)
    with pytest.raises(UserError, match="--no-resume"):
        run_finetune(_cfg(toy, tmp_path / "ft", epochs=1))
    assert not marker.exists()
    assert _files(tmp_path) == before  # nothing written or deleted


def test_old_checkpoint_with_pickled_rng_is_refused(toy: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "ft"
    ckpt = _stopped_run(toy, out)
    (ckpt / RNG_JSON).unlink()
    (ckpt / RNG_TENSORS).unlink()
    torch.save([{"python": random.getstate()}], ckpt / "rng.pt")  # what older versions wrote
    before = _files(tmp_path)
    data, base = toy
    cmd = [
        sys.executable, "-m", "automr.cli", "finetune", "--samples", str(data), "--out", str(out), "--model", str(base),
        "--device", "cpu", "--no-progress", "--batch-size", "4", "--grad-accum", "2", "--epochs", "1",
        "--max-train-samples", "16", "--max-valid-samples", "8", "--eval-every", "1", "--lr", "0.01", "--warmup-steps", "0",
    ]
    path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": path}, cwd=tmp_path, timeout=120)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "older format" in message and "rng.pt" in message and "--no-resume" in message
    assert "Traceback" not in proc.stderr
    assert _files(tmp_path) == before  # the checkpoint is left as it was


def test_memory_aware_slot_holds_an_older_title(toy: tuple[Path, Path]) -> None:
    data = PreparedData.load(toy[0])
    titles = data.titles()
    lm = build_tiny_lm(toy_titles(20))
    builder = PromptBuilder.for_lm(lm)
    samples = encode_samples(data.split("train"), titles, builder, with_slot=True)
    with_mem = [s for s in samples if s.memory_items]
    assert with_mem, "the toy data must have samples with older interactions"

    assert all(s == [] for s in draw_slots(samples, 0.0, 0, 0, titles, builder))
    slots = draw_slots(samples, 1.0, 0, 0, titles, builder)
    for s, slot in zip(samples, slots):
        if not s.memory_items:
            assert slot == []
            continue
        options = {tuple(builder.slot_text_ids(titles[m])) for m in s.memory_items}
        assert tuple(slot) in options
        # The slot sits between the recent history and the response marker.
        ids, n_ans = sequence(s, slot)
        assert ids == s.prefix_ids + slot + s.marker_ids + s.answer_ids and n_ans == len(s.answer_ids)
    # Which older title is drawn varies across samples and epochs, deterministically.
    assert len({tuple(x) for x in slots if x}) > 3
    assert draw_slots(samples, 1.0, 0, 0, titles, builder) == slots
    assert draw_slots(samples, 1.0, 0, 1, titles, builder) != slots
    half = draw_slots(samples, 0.5, 0, 0, titles, builder)
    share = sum(bool(x) for x in half) / sum(bool(s.memory_items) for s in samples)
    assert 0.3 < share < 0.7


def test_epoch_plan_shards_evenly() -> None:
    plan1 = epoch_plan(10, epoch=0, seed=3, batch_size=4, grad_accum=2, world=1)
    plan2 = epoch_plan(10, epoch=0, seed=3, batch_size=2, grad_accum=2, world=2)
    flat = lambda p: [int(i) for step in p for m in step for i in m]  # noqa: E731
    assert sorted(flat(plan1)) == list(range(10))
    assert flat(plan1) == flat(plan2)  # same global batches for 1 x 4 and 2 x 2
    for step in plan2:
        for micro in step:
            assert len(micro) % 2 == 0  # every process gets the same number of samples
    assert flat(epoch_plan(10, 1, 3, 4, 2, 1)) != flat(plan1)  # a new order each epoch


def test_two_processes_under_torchrun_match_one_process(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """torchrun starts 2 CPU processes (accelerate launch --cpu started only one on this setup)."""
    common = dict(lora_dropout=0.0, grad_accum=1, epochs=1, max_train_samples=16, max_valid_samples=8, eval_every=2)
    run_finetune(_cfg(toy, tmp_path / "one", batch_size=4, **common))
    data, base = toy
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "automr.cli",
        "finetune", "--samples", str(data), "--out", str(tmp_path / "two"), "--model", str(base),
        "--device", "cpu", "--no-progress", "--batch-size", "2", "--grad-accum", "1", "--epochs", "1",
        "--max-train-samples", "16", "--max-valid-samples", "8", "--eval-every", "2", "--lr", "0.01",
        "--warmup-steps", "0", "--lora-dropout", "0",
    ]
    path = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "2 process(es)" in proc.stdout
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):  # gathered losses: the same global batch, the same numbers
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b.get("valid_loss", 0) == pytest.approx(a.get("valid_loss", 0), rel=1e-4)
    wa = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for k in wa:  # Adam turns float-order noise in near-zero gradients into ~lr-sized steps: loose atol
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


def test_each_validation_logs_its_loss_with_the_samples_and_tokens_behind_it(
    toy: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 A9: BIGRec stops on the validation loss (a mean over every answer token, smooth) by default,
    on a validation subset; every validation says what it averaged over, and summary.json records it."""
    assert FinetuneConfig.model_fields["max_valid_samples"].default == 256  # validation is on by default
    out = tmp_path / "ft"
    run_finetune(_cfg(toy, out, epochs=1, max_train_samples=8, grad_accum=1, batch_size=4, eval_every=1))
    summary = json.loads((out / "summary.json").read_text())
    lm = load_finetuned(out, device="cpu")
    data = PreparedData.load(toy[0])
    subset = select_subset(data.split("valid").height, 8, seed=0, salt=8)  # the run's validation samples
    valid = encode_samples(data.split("valid")[subset.tolist()], data.titles(), PromptBuilder.for_lm(lm))
    tokens = sum(len(s.answer_ids) for s in valid)
    assert (summary["valid_samples"], summary["valid_answer_tokens"]) == (8, tokens)
    printed = capsys.readouterr().out
    for row in _log(out):
        assert f"finetune step {row['step']}: valid loss {row['valid_loss']:.4f} over 8 samples ({tokens:,} answer tokens)" in printed
    assert "finetune step 1: " in printed and ", best so far" in printed


# -- recipes: full fine-tuning and all-linear LoRA ---------------------------------------------------


def _valid_loss_of(lm, toy: tuple[Path, Path]) -> float:
    """Mean answer NLL of `lm` on the run's validation samples (what the loop logs as valid_loss)."""
    from automr.llm.finetune import answer_nll

    data = PreparedData.load(toy[0])
    subset = select_subset(data.split("valid").height, 8, seed=0, salt=8)
    valid = encode_samples(data.split("valid")[subset.tolist()], data.titles(), PromptBuilder.for_lm(lm))
    batch = collate([sequence(s, []) for s in valid], lm.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        nll, n = answer_nll(lm.model, batch)
    return float(nll) / n


def test_full_recipe_trains_every_weight_saves_a_checkpoint_folder_and_reloads(toy: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from automr.llm.finetune import adapter_problem
    from automr.llm.loading import load_lm

    out = tmp_path / "full"
    got = run_finetune(_cfg(toy, out, recipe="full", lr=1e-3, patience=100))
    assert got == out / "model" and not (out / "adapter").exists()
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert adapter_problem(out) is None
    base = load_lm(str(toy[1]), device="cpu")
    saved = load_file(out / "model" / "model.safetensors")
    params = dict(base.model.named_parameters())
    assert saved.keys() == params.keys()
    changed = [k for k in saved if not torch.equal(saved[k], params[k].detach())]
    assert len(changed) == len(saved), f"unchanged by full fine-tuning: {sorted(set(saved) - set(changed))[:5]}"

    # load_finetuned (every consumer's path) and a plain Hugging Face load give the same logits, and they are
    # the best weights: their validation loss is the one the loop logged as best.
    lm = load_finetuned(out, device="cpu")
    assert "+full-" in lm.name
    hf = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ids = torch.tensor([lm.tokenizer("Toy Story (1995) Heat (1995)", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b, c = lm.model(ids).logits, hf(ids).logits, base.model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    best = min(_log(out), key=lambda r: r["valid_loss"])
    assert _valid_loss_of(lm, toy) == pytest.approx(best["valid_loss"], rel=1e-4)
    assert json.loads((out / "summary.json").read_text())["recipe"] == "full"

    (out / "model" / "model.safetensors").unlink()
    assert "model/model.safetensors" in adapter_problem(out)


def test_full_recipe_resumes_to_the_same_weights(toy: tuple[Path, Path], tmp_path: Path) -> None:
    kw = dict(recipe="full", lr=1e-3, checkpoint_every=1, epochs=1)
    run_finetune(_cfg(toy, tmp_path / "a", **kw))
    run_finetune(_cfg(toy, tmp_path / "b", stop_after=1, **kw))
    assert (tmp_path / "b" / "checkpoint" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "b" / "model").exists()
    run_finetune(_cfg(toy, tmp_path / "b", **kw))
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UserError, match="recipe"):  # a LoRA run cannot resume a full one
        run_finetune(_cfg(toy, tmp_path / "b", **(kw | {"recipe": "lora"})))


def test_mixed_precision_computes_in_bfloat16_over_float32_weights(toy: tuple[Path, Path], tmp_path: Path) -> None:
    """mixed_precision bf16: the same run as without it up to bfloat16 rounding (the first step's loss is taken on
    the same initial weights), float32 weights saved, and a float32 run after it in the same process still works
    (accelerate keeps one process-wide state; automr/llm/finetune.py _accelerator)."""
    kw = dict(recipe="full", lr=1e-3, epochs=1, patience=100)
    run_finetune(_cfg(toy, tmp_path / "bf16", mixed_precision="bf16", **kw))
    run_finetune(_cfg(toy, tmp_path / "fp32", **kw))
    amp, ref = _log(tmp_path / "bf16"), _log(tmp_path / "fp32")
    assert len(amp) == len(ref)
    assert amp[0]["loss"] != ref[0]["loss"]  # autocast took effect...
    assert amp[0]["loss"] == pytest.approx(ref[0]["loss"], rel=0.02)  # ...and only rounds
    assert amp[-1]["valid_loss"] == pytest.approx(ref[-1]["valid_loss"], rel=0.05)
    assert amp[-1]["valid_loss"] < amp[0]["valid_loss"]  # it learns
    saved = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    with pytest.raises(ValueError, match="mixed_precision bf16 computes in bfloat16 over float32 weights"):
        _cfg(toy, tmp_path / "x", mixed_precision="bf16", dtype="bfloat16")


def test_all_linear_puts_lora_on_every_linear_layer_of_the_decoder(toy: tuple[Path, Path], tmp_path: Path) -> None:
    from automr.llm.trained_weights import ALL_LINEAR

    out = tmp_path / "all"
    run_finetune(_cfg(toy, out, target_modules=["all-linear"], epochs=1, max_train_samples=8, grad_accum=1))
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    n_layers = json.loads((toy[1] / "config.json").read_text())["num_hidden_layers"]
    found = {(k.split(".layers.")[1].split(".")[0], k.split(".lora_")[0].rsplit(".", 1)[1]) for k in weights if "lora_A" in k}
    assert found == {(str(i), m) for i in range(n_layers) for m in ALL_LINEAR}
    assert not any("lm_head" in k for k in weights)
    lm = load_finetuned(out, device="cpu")
    assert "+lora-" in lm.name


def test_full_recipe_with_upper_layers_only_is_refused(toy: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recipe full"):
        _cfg(toy, tmp_path / "x", recipe="full", lora_layers="upper")


def test_full_weights_of_a_model_with_tied_embeddings_round_trip(tmp_path: Path) -> None:
    """SmolLM2 ties lm_head to the input embedding: the tied parameter is saved once, under the name
    Hugging Face's save_pretrained uses, and a plain from_pretrained of the folder ties it again."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from automr.llm.trained_weights import restore_weights, save_weights, trained_state

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    weights = trained_state(model, "full")
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    save_weights(model, weights, tmp_path / "model", "full")
    ids = torch.tensor([[1, 5, 7, 3]])
    torch.manual_seed(1)
    other = LlamaForCausalLM(cfg).eval()
    restore_weights(other, trained_state(model, "full"), "full")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(other(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()  # still tied
    with pytest.raises(UserError, match="another base model"):
        restore_weights(other, {k: v for k, v in weights.items() if "layers.1." not in k}, "full")


def test_mixed_precision_on_a_cpu_without_bfloat16_units_warns(monkeypatch, capsys) -> None:
    from automr.llm import finetune, loading

    for slow in (True, False):
        monkeypatch.setattr(loading, "cpu_lacks_bfloat16", lambda device, slow=slow: slow)
        finetune._accelerator(True, "bf16")
        assert ("mixed_precision bf16 computes in bfloat16" in capsys.readouterr().err) is slow
    monkeypatch.setattr(loading, "cpu_lacks_bfloat16", lambda device: True)
    finetune._accelerator(True, "no")
    assert "bfloat16" not in capsys.readouterr().err
