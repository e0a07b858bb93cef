"""BIGRec fine-tuning: LoRA on the causal LM, loss on the answer (target title) tokens only.

Why it is written this way:
- Every training sequence is `prefix + slot + marker + answer`, exactly the layout the split
  forward (automr.llm.split) sees at inference, so the model fine-tuned here is the one AutoMR
  splices memories into. The slot is empty (plain BIGRec) or, with `memory_aware_prob`, holds the
  title of a random older interaction as text, so the model learns to read the slot.
- Runs under `accelerate` (one process, or several started by `torchrun` / `accelerate launch`).
  The data order is a pure function of (seed, epoch), each optimizer step's global batch is split
  across processes, and the loss is normalised by the answer-token count of the *global* step,
  so N processes compute the same gradient as one process with an N-times larger micro-batch.
- Checkpoints (adapter, optimizer, scheduler, per-process RNG, step, best-so-far) are written
  atomically every `checkpoint_every` steps; because the data order is recomputed from the step
  counter, a resumed run ends with the same adapter as an uninterrupted one.

Torch and friends are imported inside functions: this module is imported by the CLI to build
`automr finetune --help`, which must stay fast.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from automr.config import StageConfig, load_config, save_config
from automr.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from automr.llm.loading import LM

IGNORE_INDEX = -100
# Config fields that may differ between a run and its resumption.
_RESUME_FREE_FIELDS = {"resume", "stop_after", "device", "progress"}


class FinetuneConfig(StageConfig):
    """LoRA fine-tuning of the generative recommender (BIGRec defaults)."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: adapter/, config.yaml, train_log.jsonl, checkpoint/")
    model: str = Field("smollm2", description="base model: 'smollm2', a Hugging Face folder, or a hub id")
    cache_dir: Path | None = Field(None, description="model cache folder (default: automr's cache)")
    dtype: str = Field("auto", description="weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the accelerator's device; cpu forces CPU")
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
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. q_proj,v_proj")
        return self


# ---------------------------------------------------------------------------------------------
# Data: tokenised samples and the deterministic step plan
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedSample:
    """One training sample as token ids; the slot is chosen per epoch from `memory_items`."""

    prefix_ids: list[int]
    marker_ids: list[int]
    answer_ids: list[int]  # title tokens + eos
    memory_items: list[int]


def encode_samples(samples: Any, titles: dict[int, str], builder: Any, with_slot: bool = False) -> list[EncodedSample]:
    """Tokenise every sample once (the slot is drawn later, per epoch).

    with_slot: leave room in max_length for the longest older title written in the slot.
    """
    missing = set()
    out: list[EncodedSample] = []
    for recent, target, memory in zip(
        samples["recent_items"].to_list(), samples["target_item"].to_list(), samples["memory_items"].to_list()
    ):
        for i in [*recent, target]:
            if i not in titles:
                missing.add(i)
        if missing:
            continue
        mem = [m for m in (memory or []) if m in titles]
        reserve = max((len(builder.slot_text_ids(titles[m])) for m in mem), default=0) if with_slot else 0
        enc = builder.encode([titles[i] for i in recent], answer=titles[target], reserve=reserve)
        out.append(EncodedSample(list(enc.prefix_ids), list(enc.marker_ids), list(enc.answer_ids), mem))
    if missing:
        shown = ", ".join(map(str, sorted(missing)[:10]))
        raise UserError(
            f"{len(missing)} item id(s) used by samples have no title in items.parquet (e.g. {shown}); "
            "re-run `automr prepare` so samples and items come from the same run."
        )
    return out


def draw_slots(
    samples: list[EncodedSample], prob: float, seed: int, epoch: int, titles: dict[int, str], builder: Any
) -> list[list[int]]:
    """Slot token ids per sample for one epoch: a random older title with probability `prob`.

    A pure function of (seed, epoch), so a resumed run draws the same slots.
    """
    import numpy as np

    n = len(samples)
    if prob <= 0 or n == 0:
        return [[] for _ in range(n)]
    rng = np.random.default_rng([abs(seed), epoch + 1, 1])  # epoch -1: the fixed validation draw
    use = rng.random(n) < prob  # (n,)
    pick = rng.random(n)  # (n,) uniform position in the memory list
    cache: dict[int, list[int]] = {}
    slots: list[list[int]] = []
    for s, u, p in zip(samples, use, pick):
        if not u or not s.memory_items:
            slots.append([])
            continue
        item = s.memory_items[int(p * len(s.memory_items))]
        if item not in cache:
            cache[item] = list(builder.slot_text_ids(titles[item]))
        slots.append(cache[item])
    return slots


def seeded_subset(n: int, budget: int | None, seed: int, salt: int) -> "np.ndarray":
    """Sorted indices of a seeded random subset of size min(n, budget)."""
    import numpy as np

    if budget is None or budget >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([abs(seed), salt]).choice(n, size=budget, replace=False))


def epoch_plan(n: int, epoch: int, seed: int, batch_size: int, grad_accum: int, world: int) -> list[list["np.ndarray"]]:
    """Optimizer steps of one epoch, each a list of *global* micro-batches (index arrays).

    A global micro-batch has up to batch_size * world samples and a length divisible by `world`;
    process r takes `micro[r::world]`, so every process runs the same number of forward passes.
    """
    import numpy as np

    perm = np.random.default_rng([abs(seed), epoch, 0]).permutation(n)
    perm = perm[: n - n % world]
    g = batch_size * world
    micros = [perm[i : i + g] for i in range(0, len(perm), g)]
    return [micros[i : i + grad_accum] for i in range(0, len(micros), grad_accum)]


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int) -> int:
    usable = n - n % world
    return math.ceil(math.ceil(usable / (batch_size * world)) / grad_accum)


def sequence(s: EncodedSample, slot: list[int]) -> tuple[list[int], int]:
    """Full token sequence and its answer length."""
    return s.prefix_ids + slot + s.marker_ids + s.answer_ids, len(s.answer_ids)


def collate(seqs: list[tuple[list[int], int]], pad_id: int, device: Any) -> dict[str, "torch.Tensor"]:
    """Left-pad so every answer ends at the last position (then logits are needed only there).

    Returns input_ids, attention_mask, position_ids (B, T) and labels (B, A) for the last A
    positions, A = longest answer; -100 marks positions that are not answer tokens.
    """
    import torch

    T = max(len(ids) for ids, _ in seqs)
    A = max(a for _, a in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), A), IGNORE_INDEX, dtype=torch.long)
    for r, (seq, a) in enumerate(seqs):
        ids[r, T - len(seq) :] = torch.tensor(seq)
        mask[r, T - len(seq) :] = 1
        labels[r, A - a :] = torch.tensor(seq[-a:])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": pos.to(device),
        "labels": labels.to(device),
    }


def answer_nll(model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", int]:
    """Summed negative log-likelihood of the answer tokens and their count."""
    import torch.nn.functional as F

    labels = batch["labels"]  # (B, A)
    A = labels.shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=A + 1,
    )
    logits = out.logits[:, :-1].float()  # (B, A, V): position t predicts token t+1
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _adapter_state(model: Any) -> dict[str, "torch.Tensor"]:
    """The trainable LoRA weights, copied to CPU (for the best-so-far and checkpoints)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def _save_adapter(model: Any, weights: dict[str, "torch.Tensor"], folder: Path) -> None:
    """Write `weights` as a peft adapter folder (loadable by PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"))


def _load_adapter_weights(folder: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


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
    import numpy as np
    import torch
    from accelerate.utils import gather_object, set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    from automr.data.schema import PreparedData
    from automr.io import atomic_dir, atomic_write_text, write_json
    from automr.llm.loading import load_lm
    from automr.llm.prompts import PromptBuilder

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
                print(f"finetune: {out} is already complete (step {state['step']}); nothing to do")
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
    train_idx = seeded_subset(train_df.height, cfg.max_train_samples, cfg.seed, salt=7)
    valid_idx = seeded_subset(valid_df.height, cfg.max_valid_samples, cfg.seed, salt=8)
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
        print(
            f"finetune: {len(train)} train / {len(valid)} valid samples, {world} process(es), "
            f"{spe} steps/epoch x {cfg.epochs} epochs = {total_steps} steps"
            + (f", resuming at step {step}" if resuming else "")
        )
    model.train()
    stopped_early = step < total_steps and bad_evals >= cfg.patience
    run_steps, tokens_seen, t0 = 0, 0, time.perf_counter()
    progress = _progress(enabled=cfg.progress and main)
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
        print(f"finetune: {run_steps} steps in {elapsed:.1f}s, {tokens_seen / max(elapsed, 1e-9):.0f} tokens/s")
    if step < total_steps and not stopped_early:
        if main:
            print(f"finetune: stopped at step {step}/{total_steps}; run again with --resume to continue")
        return ckpt_dir
    if stopped_early and main:
        print(f"finetune: early stop at step {step} (best validation loss {best_loss:.4f} at step {best_step})")

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


def _accelerator(cpu: bool) -> Any:
    """An Accelerator on the requested device.

    accelerate keeps one process-wide state: once a GPU run happened in this process, a later
    `Accelerator(cpu=True)` raises (seen on an H100 when a CPU run followed a GPU run in one
    pytest session). A single process (no torchrun / accelerate launch environment) owns no
    process group, so its stale state is dropped; launched processes keep theirs.
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and PartialState._shared_state:
        if (PartialState().device.type == "cpu") != cpu:
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu)


def _barrier(acc: Any) -> None:
    """Wait for every process.

    For CPU processes (gloo) this calls the plain barrier: accelerate's `wait_for_everyone` passes
    `device_ids=[local rank]`, which on a machine that also has a GPU makes torch look for CUDA
    device <rank> (seen failing on a 1-GPU H100 box with 2 CPU processes under torchrun).
    """
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.MULTI_CPU and dist.is_available() and dist.is_initialized():
        dist.barrier()
    else:
        acc.wait_for_everyone()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[tps]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


# ---------------------------------------------------------------------------------------------
# Loading a fine-tuned model for inference
# ---------------------------------------------------------------------------------------------


def load_finetuned(
    folder: str | Path, *, device: str = "auto", dtype: str = "auto", merge: bool = True
) -> "LM":
    """Base model + the adapter from a `finetune` output folder, merged for fast inference.

    The returned LM's `name` identifies base + adapter weights, so caches keyed by it (item
    embeddings, memory stores) never mix models.
    """
    import dataclasses
    import hashlib

    from peft import PeftModel

    from automr.llm.loading import load_lm

    folder = Path(folder)
    adapter = folder / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (folder / "config.yaml").is_file():
        raise UserError(
            f"{folder} is not a finished fine-tuning output (expected adapter/ and config.yaml). "
            "Create it with `automr finetune --samples DATA --out DIR` and let it finish (or resume it)."
        )
    cfg = load_config(FinetuneConfig, folder / "config.yaml")
    base = load_lm(cfg.model, dtype=dtype, device=device, cache_dir=cfg.cache_dir)
    model = PeftModel.from_pretrained(base.model, str(adapter))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return dataclasses.replace(base, model=model, name=f"{base.name}+lora-{digest}")
