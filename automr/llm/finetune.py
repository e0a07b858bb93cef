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

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from automr.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from automr.llm.loading import LM

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



# ---------------------------------------------------------------------------------------------
# Loading a fine-tuned model for inference
# ---------------------------------------------------------------------------------------------


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
    model_name, cache_dir = adapter_base(folder)
    base = load_lm(model_name, dtype=dtype, device=device, cache_dir=cache_dir)
    model = PeftModel.from_pretrained(base.model, str(adapter))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return dataclasses.replace(base, model=model, name=f"{base.name}+lora-{digest}")
