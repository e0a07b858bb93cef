"""`automr finetune`: LoRA fine-tuning of the generative recommender (BIGRec), resumable.

The config and the training runner; encoding, batching, the loss and adapter files live in
automr/llm/finetune.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from automr.args import DeviceArgs, LogArgs, ModelNameArgs
from automr.config import load_config, save_config
from automr.errors import UserError
from automr.llm.finetune import (
    _accelerator,
    _adapter_state,
    _barrier,
    _load_adapter_weights,
    _nullcontext,
    _rng_state,
    _save_adapter,
    _set_rng_state,
    answer_nll,
    collate,
    draw_slots,
    encode_samples,
    epoch_plan,
    sequence,
    steps_per_epoch,
)
from automr.utils.logging import info
from automr.utils.seeding import select_subset

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch



# Config fields that may differ between a run and its resumption.
_RESUME_FREE_FIELDS = {"resume", "stop_after", "device", "progress"}


class FinetuneConfig(ModelNameArgs, DeviceArgs, LogArgs):
    """LoRA fine-tuning of the generative recommender (BIGRec defaults)."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: adapter/, config.yaml, train_log.jsonl, checkpoint/")
    cache_dir: Path | None = Field(None, description="model cache folder (default: automr's cache)")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="module names that get LoRA adapters"
    )
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps, then linear decay to 0")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch per process")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    epochs: int = Field(3, ge=1, description="passes over the (sub-sampled) training samples")
    max_train_samples: int | None = Field(
        None, ge=1, description="seeded random subset of training samples (BIGRec used 1024; CPU runs need a budget)"
    )
    max_valid_samples: int | None = Field(256, ge=0, description="seeded random subset of validation samples (0: no validation)")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (oldest recent titles are dropped first)")
    eval_every: int = Field(50, ge=1, description="optimizer steps between validation losses")
    checkpoint_every: int | None = Field(None, ge=1, description="optimizer steps between checkpoints (default: eval_every)")
    patience: int = Field(5, ge=1, description="stop after this many validations without a better validation loss")
    memory_aware_prob: float = Field(
        0.0, ge=0, le=1, description="probability of filling the slot with a random older title (0: plain BIGRec)"
    )
    seed: int = Field(0, description="seed for LoRA init, sub-sampling, data order, slot draws and dropout")
    resume: bool = Field(True, description="continue from OUT/checkpoint when present (same settings required)")
    stop_after: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps in this invocation, keeping a checkpoint (time-boxed runs)"
    )

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. q_proj,v_proj")
        return self


def _resume_key(cfg: FinetuneConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RESUME_FREE_FIELDS}


def _check_resumable(cfg: FinetuneConfig, ckpt: Path) -> None:
    saved = load_config(FinetuneConfig, ckpt / "config.yaml")
    a, b = _resume_key(saved), _resume_key(cfg)
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        details = "; ".join(f"{k}: checkpoint {a[k]!r}, now {b.get(k)!r}" for k in diff)
        raise UserError(
            f"{cfg.out} holds a checkpoint made with other settings ({details}). Use the same settings, "
            "pass --no-resume to start over (the checkpoint is discarded), or choose another --out."
        )


def run_finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune LoRA adapters on the prepared samples; returns the adapter folder."""
    import torch
    from accelerate.utils import gather_object, set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    from automr.data.schema import PreparedData
    from automr.llm.loading import load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.utils.io import atomic_dir, atomic_write_text, write_json
    from automr.utils.progress import rate_progress

    acc = _accelerator(cpu=cfg.device == "cpu")
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoint"
    ckpt_every = cfg.checkpoint_every or cfg.eval_every

    # Resume or start over (decided identically on every process: they read the same files).
    resuming = cfg.resume and (ckpt_dir / "state.json").is_file()
    if resuming:
        _check_resumable(cfg, ckpt_dir)
        state = json.loads((ckpt_dir / "state.json").read_text())
        if state.get("finished") and (out / "adapter" / "adapter_config.json").is_file():
            if main:
                info(f"finetune: {out} is already complete (step {state['step']}); nothing to do")
            return out / "adapter"
    _barrier(acc)
    if main and not resuming:
        for stale in ("checkpoint", "adapter", "train_log.jsonl"):
            p = out / stale
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    _barrier(acc)

    # Data.
    data = PreparedData.load(cfg.samples)
    titles = data.titles()
    set_seed(cfg.seed)  # identical LoRA init on every process
    lm = load_lm(cfg.model, dtype=cfg.dtype, device=str(acc.device), cache_dir=cfg.cache_dir)
    builder = PromptBuilder.for_lm(lm, max_length=cfg.max_length)
    train_df = data.split("train")
    valid_df = data.split("valid")
    train_idx = select_subset(train_df.height, cfg.max_train_samples, cfg.seed, salt=7)
    # max_valid_samples 0 means no validation (to select_subset, 0 means every row)
    valid_idx = select_subset(valid_df.height, cfg.max_valid_samples, cfg.seed, salt=8) if cfg.max_valid_samples != 0 else train_idx[:0]
    aware = cfg.memory_aware_prob > 0
    train = encode_samples(train_df[train_idx.tolist()], titles, builder, aware)
    valid = encode_samples(valid_df[valid_idx.tolist()], titles, builder, aware) if len(valid_idx) else []
    if len(train) < world:
        raise UserError(f"{cfg.samples}: {len(train)} training sample(s) for {world} processes; prepare more data")
    # Validation uses one fixed slot draw (epoch -1), so its loss is comparable across evaluations.
    valid_slots = draw_slots(valid, cfg.memory_aware_prob, cfg.seed, -1, titles, builder)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id

    # Model, optimizer, schedule.
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
    )
    try:
        peft_model = get_peft_model(lm.model, lora)
    except ValueError as exc:
        raise UserError(f"cannot attach LoRA to {cfg.model} with target_modules={cfg.target_modules}: {exc}") from None
    spe = steps_per_epoch(len(train), cfg.batch_size, cfg.grad_accum, world)
    total_steps = spe * cfg.epochs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to acc.prepare: accelerate would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    model, optimizer = acc.prepare(peft_model, optimizer)

    step, best_loss, best_step, bad_evals, log_lines = 0, math.inf, -1, 0, 0
    best_weights: dict[str, torch.Tensor] | None = None
    if resuming:
        set_peft_model_state_dict(peft_model, _load_adapter_weights(ckpt_dir / "adapter"))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=acc.device))
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt"))
        rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
        if len(rngs) != world:
            raise UserError(f"checkpoint in {ckpt_dir} was made with {len(rngs)} process(es), this run has {world}")
        _set_rng_state(rngs[rank])
        step, best_loss, best_step = state["step"], state["best_loss"], state["best_step"]
        bad_evals, log_lines = state["bad_evals"], state["log_lines"]
        if best_loss is None:
            best_loss = math.inf
        if (ckpt_dir / "best").is_dir():
            best_weights = _load_adapter_weights(ckpt_dir / "best")
    if main:
        save_config(cfg, out)
        log_path = out / "train_log.jsonl"
        kept = log_path.read_text().splitlines()[:log_lines] if log_path.is_file() else []
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))

    def log(row: dict[str, Any]) -> None:
        nonlocal log_lines
        log_lines += 1
        if main:
            with open(out / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def validate() -> float:
        """Mean answer-token NLL over the validation samples, sharded across processes."""
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (nll, tokens)
        mine = list(range(rank, len(valid), world))
        with torch.no_grad():
            for i in range(0, len(mine), cfg.batch_size):
                chunk = mine[i : i + cfg.batch_size]
                batch = collate([sequence(valid[j], valid_slots[j]) for j in chunk], pad_id, acc.device)
                nll, ntok = answer_nll(model, batch)
                tot += torch.tensor([float(nll), ntok], dtype=torch.float64, device=acc.device)
        model.train()
        tot = acc.reduce(tot, reduction="sum")
        return float(tot[0] / tot[1].clamp(min=1))

    def checkpoint(finished: bool = False) -> None:
        rngs = gather_object([_rng_state()])  # one entry per process, in rank order
        if main:
            with atomic_dir(ckpt_dir) as tmp:
                _save_adapter(peft_model, _adapter_state(peft_model), tmp / "adapter")
                if best_weights is not None:
                    _save_adapter(peft_model, best_weights, tmp / "best")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rngs, tmp / "rng.pt")
                save_config(cfg, tmp)
                st = {
                    "step": step,
                    "total_steps": total_steps,
                    "best_loss": None if math.isinf(best_loss) else best_loss,
                    "best_step": best_step,
                    "bad_evals": bad_evals,
                    "log_lines": log_lines,
                    "num_processes": world,
                    "finished": finished,
                }
                write_json(tmp / "state.json", st)
        _barrier(acc)

    def planned_steps(start: int) -> Iterator[tuple[int, int, list[np.ndarray], list[list[int]]]]:
        slots: list[list[int]] = []
        for epoch in range(start // spe, cfg.epochs):
            plan = epoch_plan(len(train), epoch, cfg.seed, cfg.batch_size, cfg.grad_accum, world)
            slots = draw_slots(train, cfg.memory_aware_prob, cfg.seed, epoch, titles, builder)
            for k, micros in enumerate(plan):
                if epoch * spe + k >= start:
                    yield epoch, epoch * spe + k, micros, slots

    if main:
        info(
            f"finetune: {len(train)} train / {len(valid)} valid samples, {world} process(es), "
            f"{spe} steps/epoch x {cfg.epochs} epochs = {total_steps} steps"
            + (f", resuming at step {step}" if resuming else "")
        )
    model.train()
    stopped_early = step < total_steps and bad_evals >= cfg.patience
    run_steps, tokens_seen, t0 = 0, 0, time.perf_counter()
    progress = rate_progress("steps", fields=("loss", "tps"), disable=not (cfg.progress and main))
    with progress:
        task = progress.add_task("finetune", total=total_steps, completed=step, tps="", loss="")
        for epoch, gstep, micros, slots in ([] if stopped_early else planned_steps(step)):
            # The loss is normalised by the answer tokens of the whole global step: every process
            # knows the plan, so no communication is needed, and N processes = one big batch.
            step_tokens = sum(len(train[j].answer_ids) for m in micros for j in m)
            local = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (nll, input tokens)
            for mi, micro in enumerate(micros):
                mine = micro[rank::world]
                batch = collate([sequence(train[j], slots[j]) for j in mine], pad_id, acc.device)
                ctx = acc.no_sync(model) if mi < len(micros) - 1 else _nullcontext()
                with ctx:
                    nll, _ = answer_nll(model, batch)
                    acc.backward(nll * world / step_tokens)  # DDP averages gradients over processes
                local += torch.tensor([float(nll.detach()), float(batch["attention_mask"].sum())], dtype=torch.float64, device=acc.device)
            lr_used = scheduler.get_last_lr()[0]  # the rate this step was taken with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = gstep + 1
            run_steps += 1
            tot = acc.reduce(local, reduction="sum")
            loss = float(tot[0]) / step_tokens
            tokens_seen += int(tot[1])
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
                "lr": lr_used,
                "loss": loss,
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            }
            if valid and (step % cfg.eval_every == 0 or step == total_steps):
                vloss = validate()
                row["valid_loss"] = vloss
                if vloss < best_loss:
                    best_loss, best_step, bad_evals = vloss, step, 0
                    best_weights = _adapter_state(peft_model)
                else:
                    bad_evals += 1
            log(row)
            progress.update(task, completed=step, tps=f"{row['tokens_per_s']:.0f} tok/s", loss=f"loss {loss:.3f}")
            stopped_early = bad_evals >= cfg.patience
            interrupted = cfg.stop_after is not None and run_steps >= cfg.stop_after
            if stopped_early or interrupted or step == total_steps or step % ckpt_every == 0:
                checkpoint(finished=(stopped_early or step == total_steps) and not interrupted)
            if stopped_early or interrupted:
                break
    elapsed = time.perf_counter() - t0
    if main and run_steps:
        info(f"finetune: {run_steps} steps in {elapsed:.1f}s, {tokens_seen / max(elapsed, 1e-9):.0f} tokens/s")
    if step < total_steps and not stopped_early:
        if main:
            info(f"finetune: stopped at step {step}/{total_steps}; run again with --resume to continue")
        return ckpt_dir
    if stopped_early and main:
        info(f"finetune: early stop at step {step} (best validation loss {best_loss:.4f} at step {best_step})")

    # Final outputs: the best adapter by validation loss (or the last one without validation).
    final = best_weights if best_weights is not None else _adapter_state(peft_model)
    if main:
        with atomic_dir(out / "adapter") as tmp:
            _save_adapter(peft_model, final, tmp)
        write_json(
            out / "summary.json",
            {
                "steps": step,
                "total_steps": total_steps,
                "best_step": best_step,
                "best_valid_loss": None if math.isinf(best_loss) else best_loss,
                "early_stopped": stopped_early and step < total_steps,
                "train_samples": len(train),
                "valid_samples": len(valid),
                "num_processes": world,
                "base_model": lm.name,
            },
        )
        checkpoint_state = json.loads((ckpt_dir / "state.json").read_text())
        checkpoint_state["finished"] = True
        write_json(ckpt_dir / "state.json", checkpoint_state)
    _barrier(acc)
    return out / "adapter"


