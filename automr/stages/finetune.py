"""`automr finetune`: fine-tuning of the generative recommender (BIGRec): LoRA or full, resumable.

The config and the training runner; encoding, batching, the loss and adapter files live in
automr/llm/finetune.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from automr.args import DeviceArgs, LogArgs, ModelNameArgs
from automr.config import load_config, save_config
from automr.errors import UserError
from automr.llm.finetune import (
    EncodedSample,
    Finetuning,
    TrainState,
    _accelerator,
    _barrier,
    check_checkpoint_format,
    encode_samples,
    epoch_slots,
    fit,
    load_checkpoint,
    save_final,
    steps_per_epoch,
)
from automr.llm.trained_weights import ALL_LINEAR, WEIGHTS_DIR, Recipe, expand_target_modules, weights_complete
from automr.utils.logging import info
from automr.utils.seeding import select_subset

# Config fields that may differ between a run and its resumption.
_RESUME_FREE_FIELDS = {"resume", "stop_after", "device", "progress"}


class FinetuneConfig(ModelNameArgs, DeviceArgs, LogArgs):
    """Fine-tuning of the generative recommender: LoRA (BIGRec defaults) or every parameter."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: adapter/ (or model/), config.yaml, train_log.jsonl, checkpoint/")
    cache_dir: Path | None = Field(None, description="model cache folder (default: automr's cache)")
    recipe: Recipe = Field(
        "lora",
        description="what is trained: lora (adapters, saved in adapter/) or full (every parameter, AdamW; saved as a "
        "Hugging Face checkpoint folder model/, float32 weights under dtype auto); every consumer of an adapter "
        "folder loads either",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names that get LoRA adapters; all-linear: every linear layer of the decoder "
        f"({','.join(ALL_LINEAR)})",
    )
    answer_loss: Literal["full", "trie"] = Field(
        "full",
        description="answer loss: full (cross-entropy over the vocabulary) or trie (each answer token's probability "
        "normalised over the tokens the catalogue's title prefix tree allows after the answer's prefix, as "
        "constrained decoding sees them); validation logs both, whichever is trained",
    )
    answer_prior: float = Field(
        0.0, ge=0, description="with answer_loss trie: weight of the popularity prior (log share of the interaction "
        "counts, as the popularity baseline counts them) added to the answer's logits at every branching token, so "
        "the model learns what the history adds to the catalogue's counts; decode with popularity_prior set to it",
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
    slot_mode: Literal["text", "states"] = Field(
        "text",
        description="how memory_aware_prob fills the slot: text (the older title written in the prompt, every layer "
        "sees it) or states (its layer-L title states spliced at layer L, as inference does)",
    )
    lora_layers: Literal["all", "upper"] = Field(
        "all",
        description="decoder layers that get LoRA: all, or upper (layers >= split_layer; the lower layers stay the "
        "base model, their outputs are computed once and reused across epochs: faster, and memory keys and "
        "values do not depend on the adapter)",
    )
    split_layer: int | None = Field(None, ge=0, description="layer L of state slots and upper adapters (default: half the layers)")
    value_tokens: int = Field(16, ge=1, description="state slots: title tokens kept per value (as build-memory's value_tokens)")
    slot_window: int | None = Field(
        None, ge=1, description="state slots: K, titles in the window ending at an element (default: the longest recent history)"
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="bf16: the training forward and backward under bfloat16 autocast (accelerate's mixed precision) "
        "over float32 weights and optimizer: x1.35 (full) to x1.53 (LoRA) the tokens/s on a CPU with AMX "
        "(BENCHMARKS.md \"bfloat16 on the CPU\"); validation stays in the weights' precision, so its losses "
        "compare across runs",
    )
    seed: int = Field(0, description="seed for LoRA init, sub-sampling, data order, slot draws and dropout")
    resume: bool = Field(True, description="continue from OUT/checkpoint when present (same settings required)")
    stop_after: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps in this invocation, keeping a checkpoint (time-boxed runs)"
    )

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one module, e.g. q_proj,v_proj")
        if self.recipe == "full" and self.lora_layers == "upper":
            raise ValueError(
                "recipe full trains every parameter, lora_layers upper freezes the lower layers: choose one "
                "(lora_layers all with recipe full, or recipe lora with lora_layers upper)"
            )
        if self.answer_prior and self.answer_loss != "trie":
            raise ValueError("answer_prior adds a prior over the title prefix tree: it needs answer_loss trie")
        if self.mixed_precision != "no" and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"mixed_precision {self.mixed_precision} computes in bfloat16 over float32 weights; dtype {self.dtype} "
                "sets the weights themselves: use dtype auto (or float32) with it, or mixed_precision no"
            )
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
    """Fine-tune on the prepared samples; returns the weights folder (OUT/adapter, or OUT/model for recipe full).

    Steps: resume or start over, setup (data, model, optimizer), fit (the loop, checkpointing),
    save (the best adapter and summary.json).
    """
    acc = _accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoint"
    # Resume or start over (decided identically on every process: they read the same files).
    resuming = cfg.resume and (ckpt_dir / "state.json").is_file()
    if resuming and _already_finished(cfg, ckpt_dir, acc.is_main_process):
        return out / WEIGHTS_DIR[cfg.recipe]
    _barrier(acc)
    if acc.is_main_process and not resuming:
        _remove_stale_outputs(out)
    _barrier(acc)

    run = _setup(cfg, acc)
    state = load_checkpoint(run, ckpt_dir, cfg.patience) if resuming else TrainState.new(cfg.patience)
    if run.main:
        _start_outputs(cfg, state.log_lines)
        info(
            f"finetune: {len(run.train)} train / {len(run.valid)} valid samples, {run.world} process(es), "
            f"{run.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {run.total_steps} steps"
            + (f", resuming at step {state.step}" if resuming else "")
        )
    stopped_early = fit(run, state, cfg, ckpt_dir, out / "train_log.jsonl")
    if state.step < run.total_steps and not stopped_early:
        if run.main:
            info(f"finetune: stopped at step {state.step}/{run.total_steps}; run again with --resume to continue")
        return ckpt_dir
    if stopped_early and run.main:
        info(
            f"finetune: early stop at step {state.step} (best validation loss {state.stopper.best:.4f} "
            f"at step {state.stopper.best_epoch})"
        )
    return save_final(run, state, out, ckpt_dir, stopped_early)


def _already_finished(cfg: FinetuneConfig, ckpt_dir: Path, main: bool) -> bool:
    """Check the checkpoint can be resumed; True when its run is already complete (nothing to do)."""
    _check_resumable(cfg, ckpt_dir)
    state = json.loads((ckpt_dir / "state.json").read_text())
    if state.get("finished") and weights_complete(ckpt_dir.parent / WEIGHTS_DIR[cfg.recipe], cfg.recipe):
        if main:
            info(f"finetune: {ckpt_dir.parent} is already complete (step {state['step']}); nothing to do")
        return True
    check_checkpoint_format(ckpt_dir)  # before any model is loaded: an old checkpoint is refused at once
    return False


def _remove_stale_outputs(out: Path) -> None:
    """Starting over: drop what an earlier fine-tuning run wrote in OUT."""
    for stale in ("checkpoint", *WEIGHTS_DIR.values(), "train_log.jsonl"):
        p = out / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _start_outputs(cfg: FinetuneConfig, log_lines: int) -> None:
    """Save the config and cut train_log.jsonl to the rows the checkpoint knows (rank 0)."""
    from automr.utils.io import atomic_write_text

    out = Path(cfg.out)
    save_config(cfg, out)
    log_path = out / "train_log.jsonl"
    kept = log_path.read_text().splitlines()[:log_lines] if log_path.is_file() else []
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def _setup(cfg: FinetuneConfig, acc: Any) -> Finetuning:
    """Data, the model to train (LoRA attached, or every parameter), AdamW and the schedule: everything `fit` needs."""
    import torch
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from automr.data.schema import PreparedData
    from automr.llm.loading import load_lm
    from automr.llm.prompts import DEFAULT_SLOT_TOKENS, PromptBuilder

    data = PreparedData.load(cfg.samples)
    titles = data.titles()
    set_seed(cfg.seed)  # identical LoRA init on every process
    lm = load_lm(cfg.model, dtype=_train_dtype(cfg), device=str(acc.device), cache_dir=cfg.cache_dir)
    builder = PromptBuilder.for_lm(lm, max_length=cfg.max_length, slot_tokens=DEFAULT_SLOT_TOKENS, answers=titles.values())  # inference's cut
    train, valid = _encode_splits(cfg, data, titles, builder, acc.num_processes)
    # Validation uses one fixed slot draw (epoch -1), so its loss is comparable across evaluations.
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    trie_loss = _trie_loss(builder, titles, data, cfg.answer_prior)
    answer_loss = trie_loss if cfg.answer_loss == "trie" else _full_loss()
    peft_model = _trainable_model(cfg, lm.model)
    trainer = _split_trainer(cfg, lm, builder, titles, data)
    states = trainer.state_slots
    valid_slots = epoch_slots(valid, cfg.memory_aware_prob, cfg.seed, -1, titles, builder, states)
    spe = steps_per_epoch(len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes)
    total_steps = spe * cfg.epochs
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to acc.prepare: accelerate would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    model, optimizer = acc.prepare(peft_model, optimizer)
    return Finetuning(
        acc=acc, peft_model=peft_model, model=model, optimizer=optimizer, scheduler=scheduler, train=train, valid=valid,
        valid_slots=valid_slots, titles=titles, builder=builder, pad_id=pad_id, steps_per_epoch=spe,
        total_steps=total_steps, base_name=lm.name, config=cfg, trainer=trainer, recipe=cfg.recipe,
        answer_loss=answer_loss, trie_loss=trie_loss,
    )


def _trie_loss(builder: Any, titles: dict[int, str], data: Any, prior_weight: float) -> Any:
    """The answer loss over the prefix tree constrained decoding builds (every item's answer tokens): the `trie`
    rule, and a validation figure of every run; with `prior_weight`, over logits plus the weighted popularity prior."""
    from automr.llm.answer_loss import AnswerLoss
    from automr.llm.title_trie import build_trie
    from automr.methods.popularity import popularity_trie_prior

    trie = build_trie(builder, sorted(titles.items()))
    return AnswerLoss(trie, popularity_trie_prior(data, trie, prior_weight) if prior_weight else None)


def _full_loss() -> Any:
    from automr.llm.answer_loss import AnswerLoss

    return AnswerLoss()


def _train_dtype(cfg: FinetuneConfig) -> str:
    """Recipe full keeps float32 weights under dtype auto: AdamW steps of lr-size on bfloat16 weights (auto's
    choice on a GPU, 8 bits of mantissa) are mostly rounded away; so does mixed precision, whose point is bfloat16
    compute over float32 weights. LoRA otherwise keeps the configured dtype."""
    return "float32" if (cfg.recipe == "full" or cfg.mixed_precision != "no") and cfg.dtype == "auto" else cfg.dtype


def _split_trainer(cfg: FinetuneConfig, lm: Any, builder: Any, titles: dict[int, str], data: Any) -> Any:
    """The split-forward trainer that every run trains through (text slots and plain rows too).

    It computes the Hugging Face forward's loss and gradients (tests/test_slot_finetune.py) but runs a
    micro-batch's shared instruction once, and with `lora_layers: upper` reuses the lower layers'
    outputs: 1.7-3.3x the tokens per second on CPU (BENCHMARKS.md, issue 9 B1). Inference splits the
    model the same way, so it supports every model automr can decode with.
    """
    from automr.llm.slot_finetune import SplitTrainer
    from automr.llm.split import SplitLM

    window = cfg.slot_window or int(data.split("train")["recent_items"].list.len().max() or 1)  # build-memory's default K
    return SplitTrainer(
        SplitLM(lm, cfg.split_layer), builder, titles, value_tokens=cfg.value_tokens, window=window,
        frozen_lower=cfg.lora_layers == "upper", state_slots=cfg.slot_mode == "states",
    )


def _encode_splits(cfg: FinetuneConfig, data: Any, titles: dict[int, str], builder: Any, world: int) -> tuple[list[EncodedSample], list[EncodedSample]]:
    """The seeded train and validation subsets, tokenised; an error when there is too little to train on."""
    train_df, valid_df = data.split("train"), data.split("valid")
    train_idx = select_subset(train_df.height, cfg.max_train_samples, cfg.seed, salt=7)
    # max_valid_samples 0 means no validation (to select_subset, 0 means every row)
    valid_idx = select_subset(valid_df.height, cfg.max_valid_samples, cfg.seed, salt=8) if cfg.max_valid_samples != 0 else train_idx[:0]
    aware = cfg.memory_aware_prob > 0
    train = encode_samples(train_df[train_idx.tolist()], titles, builder, aware)
    valid = encode_samples(valid_df[valid_idx.tolist()], titles, builder, aware) if len(valid_idx) else []
    if len(train) < world:
        raise UserError(f"{cfg.samples}: {len(train)} training sample(s) for {world} processes; prepare more data")
    return train, valid


def _trainable_model(cfg: FinetuneConfig, model: Any) -> Any:
    """What the optimizer trains: the model with every parameter trainable (recipe full), or LoRA attached."""
    if cfg.recipe == "full":
        model.requires_grad_(True)
        return model
    return _attach_lora(cfg, model)


def _attach_lora(cfg: FinetuneConfig, model: Any) -> Any:
    """The base model wrapped with fresh LoRA adapters (a clear error for module names it lacks)."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if cfg.lora_layers == "upper":
        from automr.llm.slot_finetune import upper_layer_indices

        n = int(model.config.num_hidden_layers)
        if cfg.split_layer is not None and cfg.split_layer >= n:
            raise UserError(f"split_layer {cfg.split_layer} leaves no upper layer for LoRA: {cfg.model} has {n} layers")
        layers = upper_layer_indices(n, cfg.split_layer)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        layers_to_transform=layers,
        layers_pattern="layers" if layers else None,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=expand_target_modules(list(cfg.target_modules)),
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"cannot attach LoRA to {cfg.model} with target_modules={cfg.target_modules}: {exc}") from None
