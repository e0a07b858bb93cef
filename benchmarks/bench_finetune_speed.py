"""Fine-tuning speed on CPU (issue 9 B1): today's path against the faster ones, side by side in one process.

Variants (plain BIGRec rows, empty slot; LoRA r=8 on q_proj, v_proj; AdamW; one optimizer step per
micro-batch of --batch samples):
  baseline      today's path: LoRA on every layer, HF forward, logits for the last A+1 positions of
                every row (A = the longest answer in the batch), cross-entropy on the answer tokens
  head          LoRA on every layer, LM head only on the answer positions (automr.llm.finetune.answer_nll)
  upper_cached  LoRA on layers >= L only, lower-layer outputs computed once per sample and reused
                (automr.llm.slot_finetune.SplitTrainer); the first pass over the samples fills the
                cache and is reported apart ("warm-up")
  upper_shared  upper_cached with the shared first tokens run once through the upper layers
                (SplitLM.upper_answer_states): what `lora_layers: upper` fine-tuning runs now
  split_rows    LoRA on every layer through the split forward (the state-slot recipe's path), each
                row whole (left-padded)
  split_shared  the same with the micro-batch's common first tokens (the instruction) run once
                (SplitLM.answer_states): what `slot_mode: states` fine-tuning runs now
  full_shared   split_shared training every parameter, no LoRA (`recipe: full`, the learning curve's choice)
  *_bf16        split_shared_bf16, full_shared_bf16: the same under bfloat16 autocast over float32 weights
                (`finetune --mixed-precision bf16`)
Steps alternate between the variants (round-robin), so load from other users of the machine hits
them alike: the ratios are what counts. Tokens are input tokens (prompt + answer).

--seconds S also trains baseline and upper_cached from the same initial weights for S seconds of
wall time each and reports their validation loss (answer-token NLL on --valid samples).

Run (data never committed):
  python -m automr.cli prepare --data /work/shared/data/movielens-100k --preset movielens-100k --out /tmp/ft-ml100k
  OMP_NUM_THREADS=2 python benchmarks/bench_finetune_speed.py --samples /tmp/ft-ml100k --threads 1 2 --seconds 180
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

VARIANTS = ("baseline", "head", "upper_cached", "upper_shared", "split_rows", "split_shared", "full_shared",
            "split_shared_bf16", "full_shared_bf16")


def baseline_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Today's loss as it was before the answer-only head (kept here as the reference to beat)."""
    labels = batch["labels"]
    A = labels.shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, logits_to_keep=A + 1)
    logits = out.logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((labels != -100).sum())


class Variant:
    """One way of fine-tuning: its model, optimizer and loss over a list of samples."""

    def __init__(self, name: str, model_name: str, samples: Any, lr: float) -> None:
        from peft import LoraConfig, get_peft_model

        from automr.llm.loading import load_lm
        from automr.llm.slot_finetune import SplitTrainer, upper_layer_indices
        from automr.llm.split import SplitLM

        torch.manual_seed(0)
        self.name = name
        self.amp = name.endswith("_bf16")
        self.lm = load_lm(model_name, device="cpu")
        n = int(self.lm.model.config.num_hidden_layers)
        lora_upper = name.startswith("upper_")
        layers = upper_layer_indices(n, None) if lora_upper else None
        cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                         layers_to_transform=layers, layers_pattern="layers" if layers else None)
        self.model = self.lm.model if name.startswith("full_") else get_peft_model(self.lm.model, cfg)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        split = lora_upper or name.startswith(("split_", "full_"))
        shared = name.removesuffix("_bf16") in ("split_shared", "upper_shared", "full_shared")
        self.trainer = (SplitTrainer(SplitLM(self.lm), None, {}, value_tokens=16, window=10, frozen_lower=lora_upper,
                                     state_slots=False, shared_prefix=shared) if split else None)
        self.pad = int(self.lm.tokenizer.pad_token_id)
        self.time = 0.0
        self.tokens = 0

    def nll(self, batch_samples: list[Any]) -> tuple[torch.Tensor, int, int]:
        from automr.llm.finetune import answer_nll, collate, micro_nll, sequence

        if self.trainer is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp and torch.is_grad_enabled()):  # training only, as finetune
                return micro_nll(self.model, self.trainer, batch_samples, [[]] * len(batch_samples), self.pad, "cpu")[:3]
        batch = collate([sequence(s, []) for s in batch_samples], self.pad, "cpu")
        nll, n = (baseline_nll if self.name == "baseline" else answer_nll)(self.model, batch)
        return nll, n, int(batch["attention_mask"].sum())

    def step(self, batch_samples: list[Any]) -> None:
        t0 = time.perf_counter()
        self.model.train()
        nll, n, tokens = self.nll(batch_samples)
        (nll / n).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.time += time.perf_counter() - t0
        self.tokens += tokens

    def valid_loss(self, samples: list[Any], bs: int) -> float:
        self.model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(samples), bs):
                a, b, _ = self.nll(samples[i : i + bs])
                tot, n = tot + float(a), n + b
        return tot / n


def load_samples(root: Path, model_name: str, n_train: int, n_valid: int) -> tuple[list[Any], list[Any]]:
    from automr.data.schema import PreparedData
    from automr.llm.finetune import encode_samples
    from automr.llm.loading import load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.utils.seeding import select_subset

    data = PreparedData.load(root)
    titles = data.titles()
    builder = PromptBuilder.for_lm(load_lm(model_name, device="cpu"))
    tr, va = data.split("train"), data.split("valid")
    train = encode_samples(tr[select_subset(tr.height, n_train, 0, salt=7).tolist()], titles, builder)
    valid = encode_samples(va[select_subset(va.height, n_valid, 0, salt=8).tolist()], titles, builder)
    return train, valid


def speed(variants: list[Variant], train: list[Any], bs: int, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    batches = [train[i : i + bs] for i in range(0, len(train) - bs + 1, bs)]
    for v in [v for v in variants if v.trainer is not None and v.trainer.frozen_lower and not v.trainer._lower]:  # fill the lower cache, timed apart
        t0 = time.perf_counter()
        for b in batches:
            with torch.no_grad():
                v.nll(b)
        print(f"  threads={threads} {v.name:13s} warm-up pass (forward only, fills caches): {time.perf_counter() - t0:.1f}s")
        v.time, v.tokens = 0.0, 0
    for k in range(steps):
        for v in variants:
            v.step(batches[k % len(batches)])
    base = variants[0].tokens / variants[0].time
    for v in variants:
        tps = v.tokens / v.time
        print(f"  threads={threads} {v.name:13s} {tps:8.0f} tokens/s  x{tps / base:.2f} vs baseline")


def quality(variants: list[Variant], train: list[Any], valid: list[Any], bs: int, seconds: float) -> None:
    batches = [train[i : i + bs] for i in range(0, len(train) - bs + 1, bs)]
    for v in variants:
        v.time, k = 0.0, 0
        while v.time < seconds:
            v.step(batches[k % len(batches)])
            k += 1
        print(f"  {v.name:13s} {k} steps in {v.time:.0f}s, validation loss {v.valid_loss(valid, bs):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True, help="prepared data folder (automr prepare)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train", type=int, default=64, help="training samples")
    ap.add_argument("--valid", type=int, default=64, help="validation samples (--seconds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant per thread count")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=0, help="equal-time training for the validation-loss check")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                    help="which to run (the first is the baseline of the ratios)")
    args = ap.parse_args()
    train, valid = load_samples(args.samples, args.model, args.train, args.valid)
    mean_len = sum(len(s.prefix_ids) + len(s.marker_ids) + len(s.answer_ids) for s in train) / len(train)
    print(f"{len(train)} train samples, {mean_len:.0f} tokens each on average; batch {args.batch}")
    if args.steps:  # --steps 0: only the equal-time check
        variants = [Variant(n, args.model, train, args.lr) for n in args.variants]
        for t in args.threads:
            speed(variants, train, args.batch, args.steps, t)
    if args.seconds:
        fresh = [Variant(n, args.model, train, args.lr) for n in args.variants if n != "head"]
        quality(fresh, train, valid, args.batch, args.seconds)


if __name__ == "__main__":
    main()
