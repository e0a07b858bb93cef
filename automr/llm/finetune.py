"""BIGRec fine-tuning: LoRA (or every parameter, `recipe: full`) on the causal LM, loss on the answer
(target title) tokens only. What each recipe trains and saves lives in automr/llm/trained_weights.py.

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
  counter, a resumed run ends with the same adapter as an uninterrupted one. Nothing in a
  checkpoint is a pickle that runs code when loaded: RNG states are JSON and safetensors, the
  optimizer and scheduler files are read with `torch.load(weights_only=True)`.
- The steps read as litgpt's finetune scripts do: the stage's setup builds a `Finetuning` (model,
  optimizer, data), `fit` runs the loop over a `TrainState` (step, early stopping, best weights),
  `validation_loss` is the validation pass and `save_checkpoint` / `save_final` write the files.

Torch and friends are imported inside functions: this module is imported by the CLI to build
`automr finetune --help`, which must stay fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from automr.config import StageConfig, save_config
from automr.errors import UserError
from automr.llm.loading import warn_if_bfloat16_is_slow
from automr.llm.trained_weights import (
    WEIGHTS_DIR,
    WEIGHTS_FILES,
    load_weights,
    restore_weights,
    save_weights,
    tensors_file,
    trained_state,
)
from automr.utils.early_stopping import Criterion, EarlyStopping
from automr.utils.io import atomic_dir, read_json, write_json
from automr.utils.logging import info
from automr.utils.progress import rate_progress

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from automr.llm.answer_loss import AnswerLoss
    from automr.llm.loading import LM
    from automr.llm.slot_finetune import SplitTrainer

IGNORE_INDEX = -100


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


def draw_slot_items(samples: list[EncodedSample], prob: float, seed: int, epoch: int) -> list[int | None]:
    """Per sample for one epoch: an index into its memory_items with probability `prob`, else None.

    A pure function of (seed, epoch), so a resumed run draws the same slots; epoch -1 is the
    fixed validation draw. `slot_mode: states` splices that element's layer-L states.
    """
    import numpy as np

    n = len(samples)
    if prob <= 0 or n == 0:
        return [None] * n
    rng = np.random.default_rng([abs(seed), epoch + 1, 1])
    use = rng.random(n) < prob  # (n,)
    pick = rng.random(n)  # (n,) uniform position in the memory list
    return [int(p * len(s.memory_items)) if u and s.memory_items else None for s, u, p in zip(samples, use, pick)]


def draw_slots(
    samples: list[EncodedSample], prob: float, seed: int, epoch: int, titles: dict[int, str], builder: Any
) -> list[list[int]]:
    """Slot token ids per sample for one epoch (`slot_mode: text`): the drawn older title as text."""
    cache: dict[int, list[int]] = {}
    slots: list[list[int]] = []
    for s, pick in zip(samples, draw_slot_items(samples, prob, seed, epoch)):
        if pick is None:
            slots.append([])
            continue
        item = s.memory_items[pick]
        if item not in cache:
            cache[item] = list(builder.slot_text_ids(titles[item]))
        slots.append(cache[item])
    return slots


def epoch_slots(
    samples: list[EncodedSample], prob: float, seed: int, epoch: int, titles: dict[int, str], builder: Any, states: bool
) -> list[Any]:
    """The slots of one epoch (-1: the validation draw): memory indices for state slots, else text ids."""
    if states:
        return draw_slot_items(samples, prob, seed, epoch)
    return draw_slots(samples, prob, seed, epoch, titles, builder)


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
    """Summed negative log-likelihood of the answer tokens over the vocabulary, and their count."""
    from automr.llm.answer_loss import AnswerLoss

    nll, _, n = answer_losses(model, batch, AnswerLoss())
    return nll, n


def answer_losses(
    model: Any, batch: dict[str, "torch.Tensor"], loss: "AnswerLoss", full_too: bool = False
) -> tuple["torch.Tensor", "torch.Tensor | None", int]:
    """(summed answer NLL under `loss`; the full-vocabulary sum when `full_too`; answer tokens).

    The LM head runs only on the positions that predict an answer token: the model returns its
    final (normed) hidden states and one position of logits (`logits_to_keep=1`, the least HF
    allows), the answer positions are selected and only they go through the 49k-vocabulary head
    (the trie loss runs it on the branching positions only). The head's cost falls from
    (B x (A+1)) rows to the answer tokens (benchmarks/bench_finetune_speed.py measures it). The
    call goes through `model` itself so DDP's forward hooks still run under several processes.
    """
    labels = batch["labels"]  # (B, A)
    A = labels.shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden = out.hidden_states[-1][:, -A - 1 : -1]  # (B, A, H): position t predicts token t+1
    keep = labels != IGNORE_INDEX  # (B, A)
    answers = [row[k].tolist() for row, k in zip(labels, keep)]  # row-major, as hidden[keep] is
    nll, full = loss.sums(output_head(model), hidden[keep], answers, full_too)  # hidden[keep]: (N_answer, H)
    return nll, full, int(keep.sum())


def output_head(model: Any) -> Any:
    """The LM head (lm_head) of a causal LM, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped model in .module
    return inner.get_output_embeddings()


# ---------------------------------------------------------------------------------------------
# The validation pass (shared with `automr tiny-lm`)
# ---------------------------------------------------------------------------------------------


class MicroNLL(NamedTuple):
    """One micro-batch's answer losses (sums over its answer tokens)."""

    nll: "torch.Tensor"  # under the run's answer loss (full or trie), differentiable
    answer_tokens: int
    input_tokens: int
    full_nll: "torch.Tensor | None" = None  # over the whole vocabulary, when asked for (validation)


def micro_nll(
    model: Any, trainer: SplitTrainer | None, samples: list[EncodedSample], slots: list[Any], pad_id: int, device: Any,
    loss: AnswerLoss | None = None, full_too: bool = False,
) -> MicroNLL:
    """The answer losses of one micro-batch (`loss` None: over the whole vocabulary).

    trainer None: the HF forward on text sequences (`slot_mode: text`, adapters on every layer);
    otherwise the split forward (state slots, cached lower layers; automr/llm/slot_finetune.py).
    """
    from automr.llm.answer_loss import AnswerLoss

    loss = loss or AnswerLoss()
    if trainer is not None:
        nll, full, n, tokens = trainer.answer_losses(samples, slots, loss, full_too)
        return MicroNLL(nll, n, tokens, full)
    batch = collate([sequence(s, slot) for s, slot in zip(samples, slots)], pad_id, device)
    nll, full, n = answer_losses(model, batch, loss, full_too)
    return MicroNLL(nll, n, int(batch["attention_mask"].sum()), full)


def answer_nll_sums(
    model: Any, samples: list[EncodedSample], slots: list[Any], indices: list[int], pad_id: int, device: Any,
    batch_size: int, trainer: SplitTrainer | None = None, loss: AnswerLoss | None = None,
) -> tuple[float, int, float]:
    """(summed answer NLL under `loss`, answer tokens, summed full-vocabulary NLL) over samples[indices],
    `batch_size` at a time, no gradients."""
    import torch

    nll_sum, n_tokens, full_sum = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(indices), batch_size):
            chunk = indices[i : i + batch_size]
            m = micro_nll(model, trainer, [samples[j] for j in chunk], [slots[j] for j in chunk], pad_id, device, loss, True)
            nll_sum, n_tokens, full_sum = nll_sum + float(m.nll), n_tokens + m.answer_tokens, full_sum + float(m.full_nll)
    return nll_sum, n_tokens, full_sum


# ---------------------------------------------------------------------------------------------
# The training run: what setup assembles, what a checkpoint restores
# ---------------------------------------------------------------------------------------------


class LoopSettings(Protocol):
    """The settings the loop reads; the stage's FinetuneConfig has them (the library cannot import stages)."""

    batch_size: int
    grad_accum: int
    epochs: int
    seed: int
    memory_aware_prob: float
    eval_every: int
    checkpoint_every: int | None
    stop_after: int | None
    progress: bool


@dataclass
class Finetuning:
    """Everything the stage's setup assembles for the loop: accelerator, model, optimizer, data."""

    acc: Any  # accelerate.Accelerator
    peft_model: Any  # the trained model: the PeftModel (recipe lora) or the base model itself (recipe full)
    model: Any  # peft_model as prepared by accelerate (DDP-wrapped under several processes)
    optimizer: Any  # AdamW as prepared by accelerate
    scheduler: Any  # linear warm-up then decay; stepped once per optimizer step, on every process
    train: list[EncodedSample]
    valid: list[EncodedSample]
    valid_slots: list[Any]  # one fixed slot draw (epoch -1): validation losses stay comparable
    titles: dict[int, str]
    builder: Any  # automr.llm.prompts.PromptBuilder
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    base_name: str  # the base model's name, recorded in summary.json
    config: StageConfig  # the stage's config, saved in every checkpoint so a resume can compare settings
    trainer: SplitTrainer | None = None  # the split forward (state slots / cached lower layers); None: HF text path
    answer_loss: AnswerLoss | None = None  # the training and validation rule (None: full vocabulary); answer_loss.py
    trie_loss: AnswerLoss | None = None  # over the title trie, for the validation log whatever the rule (None: not logged)
    recipe: str = "lora"  # what is trained and saved: lora (adapters) or full (every parameter); trained_weights.py

    @property
    def weights_dir(self) -> str:
        """The folder name of the trained weights in the output and its checkpoint (adapter/ or model/)."""
        return WEIGHTS_DIR[self.recipe]

    @property
    def world(self) -> int:
        return int(self.acc.num_processes)

    @property
    def rank(self) -> int:
        return int(self.acc.process_index)

    @property
    def main(self) -> bool:
        return bool(self.acc.is_main_process)


@dataclass
class TrainState:
    """The loop's progress, saved in state.json (and best/) by every checkpoint."""

    stopper: EarlyStopping  # on the validation loss; its best_epoch is the optimizer step
    step: int = 0  # optimizer steps done
    log_lines: int = 0  # rows of train_log.jsonl that belong to this state
    best_weights: dict[str, torch.Tensor] | None = None  # trained weights at the best validation loss

    @classmethod
    def new(cls, patience: int) -> TrainState:
        """A fresh run: a validation loss must beat infinity (a NaN one never counts as best)."""
        return cls(EarlyStopping(patience, "min", best=math.inf))

    def to_json(self, total_steps: int, world: int, finished: bool) -> dict[str, Any]:
        best = self.stopper.best
        return {
            "step": self.step,
            "total_steps": total_steps,
            "best_loss": None if best is None or math.isinf(best) else best,  # type: ignore[arg-type]
            "best_step": self.stopper.best_epoch,
            "bad_evals": self.stopper.bad_updates,
            "log_lines": self.log_lines,
            "num_processes": world,
            "finished": finished,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any], patience: int, best_weights: dict[str, torch.Tensor] | None) -> TrainState:
        best = math.inf if saved["best_loss"] is None else saved["best_loss"]
        stopper = EarlyStopping(patience, "min", best=best, best_epoch=saved["best_step"], bad_updates=saved["bad_evals"])
        return cls(stopper, saved["step"], saved["log_lines"], best_weights)


# ---------------------------------------------------------------------------------------------
# Fit: the plan, one optimizer step, validation, the loop
# ---------------------------------------------------------------------------------------------


def planned_steps(run: Finetuning, cfg: LoopSettings, start: int) -> Iterator[tuple[int, int, list[np.ndarray], list[list[int]]]]:
    """(epoch, global step, micro-batches, the epoch's slots) for every step from `start` on.

    Recomputed from (seed, epoch), so a resumed run takes exactly the steps it would have taken.
    """
    spe = run.steps_per_epoch
    for epoch in range(start // spe, cfg.epochs):
        plan = epoch_plan(len(run.train), epoch, cfg.seed, cfg.batch_size, cfg.grad_accum, run.world)
        states = run.trainer is not None and run.trainer.state_slots
        slots = epoch_slots(run.train, cfg.memory_aware_prob, cfg.seed, epoch, run.titles, run.builder, states)
        for k, micros in enumerate(plan):
            if epoch * spe + k >= start:
                yield epoch, epoch * spe + k, micros, slots


def train_step(run: Finetuning, micros: list[np.ndarray], slots: list[list[int]]) -> tuple[float, float, int]:
    """One optimizer step on a global batch: (loss per answer token, learning rate used, input tokens of all processes).

    The loss is normalised by the answer tokens of the whole global step: every process knows the
    plan, so no communication is needed, and N processes compute what one big batch would.
    """
    import torch

    acc = run.acc
    step_tokens = sum(len(run.train[j].answer_ids) for m in micros for j in m)
    local = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (nll, input tokens)
    for mi, micro in enumerate(micros):
        mine = micro[run.rank :: run.world]
        with acc.no_sync(run.model) if mi < len(micros) - 1 else contextlib.nullcontext():
            with acc.autocast():  # bfloat16 compute under mixed_precision bf16; a no-op otherwise
                nll, _, tokens, _ = micro_nll(run.model, run.trainer, [run.train[j] for j in mine], [slots[j] for j in mine],
                                              run.pad_id, acc.device, run.answer_loss)
            acc.backward(nll * run.world / step_tokens)  # DDP averages gradients over processes
        local += torch.tensor([float(nll.detach()), float(tokens)], dtype=torch.float64, device=acc.device)
    if run.trainer is not None and run.world > 1:
        _average_gradients(run)
    lr_used = run.scheduler.get_last_lr()[0]  # the rate this step was taken with
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tot = acc.reduce(local, reduction="sum")
    return float(tot[0]) / step_tokens, lr_used, int(tot[1])


def _average_gradients(run: Finetuning) -> None:
    """Average the trainable gradients over processes.

    The split forward calls the decoder layers directly, not through the DDP wrapper, so DDP's
    hooks never all-reduce; this does what they would (each process scaled its loss by `world`).
    """
    import torch.distributed as dist

    for p in run.peft_model.parameters():
        if p.requires_grad and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= run.world


def validation_loss(run: Finetuning, batch_size: int) -> tuple[float, float, float | None]:
    """Mean answer-token NLL over the validation samples (sharded across processes): under the run's answer
    loss, over the whole vocabulary, and over the title trie (None without `run.trie_loss`). All three are
    logged, so runs trained with either rule stay comparable."""
    import torch

    run.model.eval()
    mine = list(range(run.rank, len(run.valid), run.world))
    loss = run.trie_loss or run.answer_loss
    nll, n, full = answer_nll_sums(run.model, run.valid, run.valid_slots, mine, run.pad_id, run.acc.device, batch_size,
                                   run.trainer, loss)
    run.model.train()
    tot = run.acc.reduce(torch.tensor([nll, n, full], dtype=torch.float64, device=run.acc.device), reduction="sum")
    n_all = tot[1].clamp(min=1)
    first, vfull = float(tot[0] / n_all), float(tot[2] / n_all)
    vtrie = first if loss is not None and loss.kind == "trie" else None
    return (vtrie if _uses_trie(run) else vfull), vfull, vtrie


@dataclass
class _Throughput:
    """Steps and input tokens of this invocation, for tokens/s."""

    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int) -> None:
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)


def _validate(run: Finetuning, state: TrainState, batch_size: int) -> dict[str, float]:
    """Validation losses now (the run's rule, full vocabulary, trie); keeps the trained weights when the rule's
    is the best so far (early stopping follows the training rule), and logs what they averaged over."""
    vloss, vfull, vtrie = validation_loss(run, batch_size)
    best = state.stopper.update(vloss, state.step)
    if best:
        state.best_weights = trained_state(run.peft_model, run.recipe)
    if run.main:
        other = f", full-vocabulary loss {vfull:.4f}" if _uses_trie(run) else ("" if vtrie is None else f", trie loss {vtrie:.4f}")
        info(f"finetune step {state.step}: {valid_criterion(run, vloss).describe()}{other}" + (", best so far" if best else ""))
    return {"valid_loss": vloss, "valid_loss_full": vfull} | ({} if vtrie is None else {"valid_loss_trie": vtrie})


def _uses_trie(run: Finetuning) -> bool:
    return run.answer_loss is not None and run.answer_loss.kind == "trie"


def valid_criterion(run: Finetuning, vloss: float) -> Criterion:
    """The validation loss as an early-stopping Criterion: a mean over every answer token of the
    validation samples (smooth, unlike a hit rate), so it is logged with its samples and tokens."""
    name = "trie loss" if _uses_trie(run) else "loss"
    return Criterion(name, vloss, len(run.valid), note=f"{answer_tokens(run.valid):,} answer tokens")


def answer_tokens(samples: list[EncodedSample]) -> int:
    """Answer tokens (title + eos) the loss averages over."""
    return sum(len(s.answer_ids) for s in samples)


def _append_log(run: Finetuning, state: TrainState, path: Path, row: dict[str, Any]) -> None:
    state.log_lines += 1  # counted on every process: the checkpoint saves it
    if run.main:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def fit(run: Finetuning, state: TrainState, cfg: LoopSettings, ckpt_dir: Path, log_path: Path) -> bool:
    """Train from `state.step` to the end of the plan, an early stop or `cfg.stop_after` steps, checkpointing.

    `state` is updated in place. Returns whether training stopped early (in this invocation or the
    one it resumes).
    """
    run.model.train()
    stopped = state.step < run.total_steps and state.stopper.should_stop  # resumed after an early stop
    ckpt_every = cfg.checkpoint_every or cfg.eval_every
    meter = _Throughput()
    progress = rate_progress("steps", fields=("loss", "tps"), disable=not (cfg.progress and run.main))
    with progress:
        task = progress.add_task("finetune", total=run.total_steps, completed=state.step, tps="", loss="")
        for epoch, gstep, micros, slots in ([] if stopped else planned_steps(run, cfg, state.step)):
            loss, lr_used, tokens = train_step(run, micros, slots)
            state.step = gstep + 1
            meter.add(tokens)
            row: dict[str, Any] = {"step": state.step, "epoch": epoch, "lr": lr_used, "loss": loss, "tokens_per_s": meter.tokens_per_s()}
            if run.valid and (state.step % cfg.eval_every == 0 or state.step == run.total_steps):
                row |= _validate(run, state, cfg.batch_size)
            _append_log(run, state, log_path, row)
            progress.update(task, completed=state.step, tps=f"{row['tokens_per_s']:.0f} tok/s", loss=f"loss {loss:.3f}")
            stopped = state.stopper.should_stop
            interrupted = cfg.stop_after is not None and meter.steps >= cfg.stop_after
            last = state.step == run.total_steps
            if stopped or interrupted or last or state.step % ckpt_every == 0:
                save_checkpoint(run, state, ckpt_dir, finished=(stopped or last) and not interrupted)
            if stopped or interrupted:
                break
    elapsed = meter.elapsed()
    if run.main and meter.steps:
        info(f"finetune: {meter.steps} steps in {elapsed:.1f}s, {meter.tokens / max(elapsed, 1e-9):.0f} tokens/s")
    return stopped


# ---------------------------------------------------------------------------------------------
# Checkpoints and the final adapter
# ---------------------------------------------------------------------------------------------

# RNG states are stored without pickle (a checkpoint from someone else must not run code when
# loaded): python's and numpy's as JSON, torch's CPU and CUDA states as uint8 tensors.
RNG_JSON, RNG_TENSORS = "rng.json", "rng.safetensors"
_OLD_RNG = "rng.pt"  # a pickle, written before RNG states moved to RNG_JSON / RNG_TENSORS


def _rng_state() -> dict[str, Any]:
    """This process's RNG states: python and numpy as JSON values, torch (and CUDA) as uint8 tensors."""
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rng_states(states: list[dict[str, Any]], folder: Path) -> None:
    """Every process's RNG states (rank order) as RNG_JSON and RNG_TENSORS."""
    from safetensors.torch import save_file

    tensors = {}
    for r, s in enumerate(states):
        tensors[f"torch.{r}"] = s["torch"]
        tensors.update({f"cuda.{r}.{d}": t for d, t in enumerate(s.get("cuda", []))})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / RNG_TENSORS))
    procs = [{"python": s["python"], "numpy": s["numpy"], "cuda_devices": len(s.get("cuda", []))} for s in states]
    write_json(folder / RNG_JSON, {"processes": procs})


def _load_rng_state(folder: Path, rank: int, world: int) -> dict[str, Any]:
    """Process `rank`'s RNG states from a checkpoint made by `world` processes."""
    from safetensors.torch import load_file

    procs = read_json(folder / RNG_JSON)["processes"]
    if len(procs) != world:
        raise UserError(f"checkpoint in {folder} was made with {len(procs)} process(es), this run has {world}")
    tensors = load_file(str(folder / RNG_TENSORS))
    mine = procs[rank]
    cuda = [tensors[f"cuda.{rank}.{d}"] for d in range(mine["cuda_devices"])]
    return {"python": mine["python"], "numpy": mine["numpy"], "torch": tensors[f"torch.{rank}"], "cuda": cuda}


def check_checkpoint_format(folder: Path) -> None:
    """Refuse a checkpoint whose RNG state is a pickle (written by older versions) before loading anything."""
    if (folder / _OLD_RNG).is_file() or not (folder / RNG_JSON).is_file():
        raise UserError(
            f"{folder} is a checkpoint in an older format: its RNG state ({_OLD_RNG}) is a pickle, which automr no "
            "longer loads (unpickling a file can run code). Pass --no-resume to start over (the checkpoint is "
            "discarded), or choose another --out."
        )


def _load_tensors(path: Path, map_location: Any = None) -> Any:
    """torch.load restricted to tensors and plain containers (weights_only=True): no code runs."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path} holds more than tensors and plain values, so it is not loaded ({str(exc).splitlines()[0]}). "
            "Pass --no-resume to start over, or choose another --out."
        ) from None


def save_checkpoint(run: Finetuning, state: TrainState, folder: Path, finished: bool) -> None:
    """Write the checkpoint atomically (rank 0): weights (adapter/ or model/), best/, optimizer, scheduler, RNG of
    every process, state."""
    import torch
    from accelerate.utils import gather_object

    rngs = gather_object([_rng_state()])  # one entry per process, in rank order
    if run.main:
        with atomic_dir(folder) as tmp:
            save_weights(run.peft_model, trained_state(run.peft_model, run.recipe), tmp / run.weights_dir, run.recipe)
            if state.best_weights is not None:
                save_weights(run.peft_model, state.best_weights, tmp / "best", run.recipe)
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")  # tensors and plain values only
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            _save_rng_states(rngs, tmp)
            save_config(run.config, tmp)
            write_json(tmp / "state.json", state.to_json(run.total_steps, run.world, finished))
    _barrier(run.acc)


def load_checkpoint(run: Finetuning, folder: Path, patience: int) -> TrainState:
    """Restore weights, optimizer, scheduler and this process's RNG from `folder`; return the loop state."""
    check_checkpoint_format(folder)
    restore_weights(run.peft_model, load_weights(folder / run.weights_dir, run.recipe), run.recipe)
    run.optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt", map_location=run.acc.device))
    run.scheduler.load_state_dict(_load_tensors(folder / "scheduler.pt"))
    _set_rng_state(_load_rng_state(folder, run.rank, run.world))
    best = load_weights(folder / "best", run.recipe) if (folder / "best").is_dir() else None
    return TrainState.from_json(read_json(folder / "state.json"), patience, best)


def save_final(run: Finetuning, state: TrainState, out: Path, ckpt_dir: Path, stopped_early: bool) -> Path:
    """Write OUT/adapter (lora) or OUT/model (full): the best weights by validation loss (the last without
    validation), and summary.json."""
    final = state.best_weights if state.best_weights is not None else trained_state(run.peft_model, run.recipe)
    if run.main:
        with atomic_dir(out / run.weights_dir) as tmp:
            save_weights(run.peft_model, final, tmp, run.recipe)
        saved = state.to_json(run.total_steps, run.world, finished=True)
        write_json(
            out / "summary.json",
            {
                "steps": state.step,
                "total_steps": run.total_steps,
                "best_step": saved["best_step"],
                "best_valid_loss": saved["best_loss"],
                "early_stopped": stopped_early and state.step < run.total_steps,
                "train_samples": len(run.train),
                "valid_samples": len(run.valid),
                "valid_answer_tokens": answer_tokens(run.valid),  # what best_valid_loss is a mean over
                "answer_loss": run.answer_loss.kind if run.answer_loss is not None else "full",
                "num_processes": run.world,
                "base_model": run.base_name,
                "recipe": run.recipe,
            },
        )
        checkpoint_state = read_json(ckpt_dir / "state.json")
        checkpoint_state["finished"] = True
        write_json(ckpt_dir / "state.json", checkpoint_state)
    _barrier(run.acc)
    return out / run.weights_dir


# ---------------------------------------------------------------------------------------------
# Accelerate helpers
# ---------------------------------------------------------------------------------------------


def _accelerator(cpu: bool, mixed_precision: str = "no") -> Any:
    """An Accelerator on the requested device, with `mixed_precision` ("no" or "bf16").

    accelerate keeps one process-wide state: once a GPU run happened in this process, a later
    `Accelerator(cpu=True)` raises (seen on an H100 when a CPU run followed a GPU run in one
    pytest session), and so does another mixed precision than the first run's. A single process
    (no torchrun / accelerate launch environment) owns no process group, so its stale state is
    dropped; launched processes keep theirs.
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    import torch

    if mixed_precision == "bf16" and (cpu or not torch.cuda.is_available()):
        warn_if_bfloat16_is_slow(torch.device("cpu"), "mixed_precision bf16")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and PartialState._shared_state:
        other_precision = AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision
        if (PartialState().device.type == "cpu") != cpu or other_precision:
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


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




# ---------------------------------------------------------------------------------------------
# Loading a fine-tuned model for inference
# ---------------------------------------------------------------------------------------------


def finetune_recipe(folder: str | Path) -> str:
    """The recipe a `finetune` output was trained with (config.yaml; outputs from before recipes are lora)."""
    from automr.config import read_yaml

    f = Path(folder) / "config.yaml"
    recipe = str(read_yaml(f).get("recipe", "lora")) if f.is_file() else "lora"
    if recipe not in WEIGHTS_DIR:
        raise UserError(f"{f} names recipe {recipe!r}; expected one of {', '.join(WEIGHTS_DIR)}")
    return recipe


def adapter_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a finished `finetune` output (None when it is).

    `load_finetuned` raises it; `automr evaluate` and `automr run` call it first, so a bad `adapter`
    path is reported before any method runs. A finished output holds config.yaml and the weights of
    its recipe: adapter/ (lora) or model/ (full).
    """
    folder = Path(folder)
    try:
        recipe = finetune_recipe(folder)  # lora when config.yaml is missing
    except UserError as exc:
        return str(exc)
    sub = WEIGHTS_DIR[recipe]
    missing = [f"{sub}/{f}" for f in WEIGHTS_FILES[recipe] if not (folder / sub / f).is_file()]
    missing += [] if (folder / "config.yaml").is_file() else ["config.yaml"]
    if not missing:
        return None
    found = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
    return (
        f"{folder} is not a finished fine-tuning output: it {found} (expected config.yaml and adapter/, or model/ "
        "for --recipe full). Create it with `automr finetune --samples DATA --out DIR` and let it finish (or resume it)."
    )


def adapter_base(folder: str | Path) -> tuple[str, Path | None]:
    """(base model, model cache folder) a `finetune` output was trained on, from its config.yaml.

    Read as plain YAML so the library needs no stage config (stages/finetune.py owns that).
    """
    from automr.config import read_yaml

    f = Path(folder) / "config.yaml"
    if not f.is_file():
        raise UserError(f"{folder} has no config.yaml; it is not an `automr finetune` output.")
    cfg = read_yaml(f)
    cache_dir = cfg.get("cache_dir")
    return str(cfg.get("model", "smollm2")), Path(cache_dir) if cache_dir else None


def load_finetuned(
    folder: str | Path, *, device: str = "auto", dtype: str = "auto", merge: bool = True
) -> "LM":
    """Base model + the trained weights of a `finetune` output folder, ready for inference.

    Recipe lora: the adapter merged into the base model (`merge`). Recipe full: the base model
    loaded as trained (its tokenizer and settings), every parameter replaced by OUT/model's.
    The returned LM's `name` identifies base + trained weights, so caches keyed by it (item
    embeddings, memory stores) never mix models.
    """
    import dataclasses
    import hashlib

    from automr.llm.loading import load_lm

    folder = Path(folder)
    problem = adapter_problem(folder)
    if problem:
        raise UserError(problem)
    recipe = finetune_recipe(folder)
    weights = folder / WEIGHTS_DIR[recipe]
    model_name, cache_dir = adapter_base(folder)
    base = load_lm(model_name, dtype=dtype, device=device, cache_dir=cache_dir)
    if recipe == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base.model, str(weights))
        if merge:
            model = model.merge_and_unload()
    else:
        model = base.model
        restore_weights(model, load_weights(weights, recipe), recipe)
    model.eval()
    digest = hashlib.sha256(tensors_file(weights, recipe).read_bytes()).hexdigest()[:12]
    return dataclasses.replace(base, model=model, name=f"{base.name}+{recipe}-{digest}")
