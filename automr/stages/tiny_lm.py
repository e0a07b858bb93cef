"""`automr tiny-lm`: a tiny Llama trained on prepared samples, for CPU tests and demos of the whole pipeline.

The model is `build_tiny_lm` (random init, a byte-level BPE tokenizer trained on the catalogue
titles), then trained on the samples' answers like the finetune stage does (same sequences:
prefix + slot + marker + answer, loss on the answer only, memory-aware slot draws), but with
every weight of the upper layers trained instead of LoRA adapters. The output is an ordinary
model folder: pass it as `model:` to build-memory, annotate and the evaluated methods.

Why not the finetune stage. LoRA on a *random* model (frozen random embeddings and projections)
learned only the answer marginal on the synthetic data within CPU budgets, never to read the slot.

Why the lower layers stay frozen (freeze_below, default L = half the layers). AutoMR splices the
layer-L states of an element's title, computed in the element's own window, into the slot of a
different prompt; memory-aware training writes the title in the slot as text. The two agree when
the lower layers are fairly local, as in a pretrained LM (DESIGN.md: gains correlate at 0.95 on
SmolLM2). Lower layers trained from random init on a few hundred prompts become context-mixing
instead: on synthetic data (300 users, 4 layers, L = 2) the planted cue written as text raised the
target's log-probability from -4.8 to -0.3 nats, but its spliced states only to -4.0. With the
lower layers and embeddings frozen at their random init the spliced states gave -1.0 (text -0.5).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from automr.args import LogArgs
from automr.config import save_config


class TinyLMConfig(LogArgs):
    """Settings of `automr tiny-lm`."""

    samples: Path = Field(description="prepared data folder: its titles train the tokenizer, its train split the model")
    out: Path = Field(description="output model folder (config.json, weights, tokenizer) + train_log.jsonl, summary.json, config.yaml")
    family: Literal["llama", "qwen2"] = Field("llama", description="architecture of the tiny model")
    hidden_size: int = Field(64, ge=8, description="hidden size")
    num_layers: int = Field(4, ge=1, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (byte alphabet + merges)")
    seed: int = Field(0, description="seed of the initialisation, data order and slot draws")
    epochs: int = Field(20, ge=0, description="passes over the training samples (0 = the random model, untrained)")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="samples per step")
    memory_aware_prob: float = Field(
        1.0, ge=0, le=1, description="probability of writing a random older title in the slot (as the finetune stage)"
    )
    freeze_below: int | None = Field(
        None, ge=0, description="layers [0, freeze_below) and the embeddings keep their random init (default: half the layers, the default split layer L)"
    )
    max_train_samples: int | None = Field(None, ge=1, description="seeded random subset of training samples")


def _weights_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass
class _Setup:
    """What `_setup` builds: the random model and the encoded samples it trains and validates on."""

    lm: Any  # automr.llm.loading.LM, on CPU
    builder: Any  # automr.llm.prompts.PromptBuilder
    titles: dict[int, str]
    train: list[Any]  # EncodedSample
    valid: list[Any]
    valid_slots: list[list[int]]  # one fixed slot draw (epoch -1), as finetune validates
    params: list[Any]  # the trainable parameters (layers >= freeze)
    freeze: int  # layers [0, freeze) and the embeddings stay at their random init
    pad: int


def run_tiny_lm(cfg: TinyLMConfig) -> Path:
    """Build, train and save the tiny model; returns the model folder.

    Steps: setup (tokenizer, random model, encoded samples, frozen lower layers), fit, validate, save.
    """
    import torch

    from automr.llm.finetune import answer_nll_sums

    s = _setup(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        log, tokens = _fit(cfg, s)
        s.lm.model.eval()
        valid_loss = None
        if s.valid:
            nll, n, _ = answer_nll_sums(s.lm.model, s.valid, s.valid_slots, list(range(len(s.valid))), s.pad, "cpu", 64)
            valid_loss = nll / max(n, 1)
    seconds = time.perf_counter() - t0
    from automr.utils.logging import get_console

    trained, summary = _save(cfg, s, log, valid_loss, seconds, tokens)
    get_console().print(
        f"tiny-lm: {summary['trainable_parameters']:,} trainable parameters (layers >= {s.freeze}), {len(s.train)} samples x "
        f"{cfg.epochs} epochs in {seconds:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s); train loss "
        f"{summary['final_train_loss'] if log else float('nan'):.3f}, valid loss {valid_loss if valid_loss is not None else float('nan'):.3f} "
        f"-> {cfg.out} ({trained.name})",
        highlight=False,
    )
    return Path(cfg.out)


def _setup(cfg: TinyLMConfig) -> _Setup:
    """The random model (tokenizer trained on the titles), the encoded samples, the frozen lower layers."""
    from automr.data.schema import PreparedData
    from automr.llm.finetune import draw_slots, encode_samples
    from automr.utils.seeding import select_subset
    from automr.llm.loading import build_tiny_lm
    from automr.llm.prompts import PromptBuilder

    data = PreparedData.load(cfg.samples)
    titles = data.titles()
    lm = build_tiny_lm(
        [titles[i] for i in sorted(titles)], family=cfg.family, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, vocab_size=cfg.vocab_size, seed=cfg.seed,
    )
    lm.model.to("cpu")
    builder = PromptBuilder.for_lm(lm)
    train_df = data.split("train")
    train_df = train_df[select_subset(train_df.height, cfg.max_train_samples, cfg.seed, salt=7).tolist()]
    aware = cfg.memory_aware_prob > 0
    train = encode_samples(train_df, titles, builder, aware)
    valid = encode_samples(data.split("valid"), titles, builder, aware)
    freeze = cfg.num_layers // 2 if cfg.freeze_below is None else min(cfg.freeze_below, cfg.num_layers)
    params = _freeze_lower_layers(lm.model, freeze)
    valid_slots = draw_slots(valid, cfg.memory_aware_prob, cfg.seed, -1, titles, builder)
    return _Setup(lm, builder, titles, train, valid, valid_slots, params, freeze, int(lm.tokenizer.pad_token_id))


def _freeze_lower_layers(model: Any, freeze: int) -> list[Any]:
    """Freeze the embeddings and layers [0, freeze) (none when freeze is 0); returns the parameters left to train."""
    params = []
    for name, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.", name)
        frozen = freeze > 0 and ("embed_tokens" in name or (m is not None and int(m.group(1)) < freeze))
        p.requires_grad_(not frozen)
        if not frozen:
            params.append(p)
    return params


def _fit(cfg: TinyLMConfig, s: _Setup) -> tuple[list[dict[str, Any]], int]:
    """Adam over shuffled batches, a fresh slot draw per epoch; returns the per-epoch log and the input tokens seen."""
    import numpy as np
    import torch

    from automr.llm.finetune import answer_nll, collate, draw_slots, sequence
    from automr.utils.progress import rate_progress

    opt = torch.optim.Adam(s.params, lr=cfg.lr)
    log: list[dict[str, Any]] = []
    t0, tokens = time.perf_counter(), 0
    s.lm.model.train()
    bar = rate_progress("samples", transient=True)
    bar.disable = not cfg.progress  # before entering: a started live display would ignore it
    with bar:
        task = bar.add_task("tiny-lm", total=cfg.epochs * len(s.train))
        for epoch in range(cfg.epochs):
            slots = draw_slots(s.train, cfg.memory_aware_prob, cfg.seed, epoch, s.titles, s.builder)
            perm = np.random.default_rng([abs(cfg.seed), epoch, 0]).permutation(len(s.train))
            tot = n = 0.0
            for start in range(0, len(s.train), cfg.batch_size):
                batch = collate([sequence(s.train[j], slots[j]) for j in perm[start : start + cfg.batch_size]], s.pad, "cpu")
                nll, k = answer_nll(s.lm.model, batch)
                (nll / k).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tot, n = tot + float(nll.detach()), n + k
                tokens += int(batch["attention_mask"].sum())
                bar.advance(task, len(batch["input_ids"]))
            log.append({"epoch": epoch, "loss": tot / max(n, 1), "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)})
    return log, tokens


def _save(
    cfg: TinyLMConfig, s: _Setup, log: list[dict[str, Any]], valid_loss: float | None, seconds: float, tokens: int
) -> tuple[Any, dict[str, Any]]:
    """Write the model folder with train_log.jsonl, summary.json and config.yaml; returns (trained LM, summary)."""
    import dataclasses

    from automr.llm.loading import save_lm
    from automr.utils.io import write_json

    for p in s.lm.model.parameters():
        p.requires_grad_(False)
    trained = dataclasses.replace(s.lm, name=f"{s.lm.name}-trained-{_weights_digest(s.lm.model)}" if cfg.epochs else s.lm.name)
    summary = {
        "name": trained.name, "train_samples": len(s.train), "valid_samples": len(s.valid), "epochs": cfg.epochs,
        "frozen_below": s.freeze, "trainable_parameters": sum(p.numel() for p in s.params),
        "final_train_loss": log[-1]["loss"] if log else None, "valid_loss": valid_loss, "seconds": round(seconds, 2),
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }
    out = Path(cfg.out)
    save_lm(trained, out)  # atomic: the model folder appears complete or not at all
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    write_json(out / "summary.json", summary)
    save_config(cfg, out)
    return trained, summary
