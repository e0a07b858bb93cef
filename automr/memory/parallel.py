"""Process layout shared by the memory stages: who am I, which users are mine, which model to load.

build-memory and annotate are embarrassingly parallel over users. Under `torchrun` (or
`accelerate launch`) each process takes the users with `user_shard(user) == rank`, writes its own
shard files, and rank 0 merges them after a barrier. The partition uses a fixed integer hash
(splitmix64), not Python's `hash`, so it is the same in every process and every run.

Why torchrun: on these CPU machines `accelerate launch --cpu --num_processes 2` started a single
process (DESIGN.md "Scale"), while `torchrun --nproc_per_node 2` with accelerate's
`PartialState(cpu=True)` inside gives two processes that can wait for each other. On GPUs either
launcher works and each process takes its own device (`PartialState().device`).

Without a launcher (WORLD_SIZE unset or 1) nothing distributed is initialised at all.

Note: the other processes wait at a barrier while rank 0 merges; torch's process-group timeout
(30 minutes by default) bounds that merge, which streams the shards and takes minutes even for
millions of elements.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of int64 values (uint64 out), identical on every platform."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def user_shard(user_ids: Any, world_size: int) -> np.ndarray:
    """The process (0..world_size-1) that owns each user: splitmix64(user) % world_size, int64 [n]."""
    u = np.atleast_1d(np.asarray(user_ids, dtype=np.int64))
    if world_size <= 1:
        return np.zeros(len(u), np.int64)
    return (_splitmix64(u) % np.uint64(world_size)).astype(np.int64)


@dataclass
class Workers:
    """This process's place in the job: rank, world size and a barrier."""

    rank: int = 0
    world_size: int = 1
    device: str = "auto"
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for a single process)."""
        if self._state is not None and self.world_size > 1:
            self._state.wait_for_everyone()

    def owns(self, user_ids: Any) -> np.ndarray:
        """Bool mask [n]: which of these users this process handles."""
        return user_shard(user_ids, self.world_size) == self.rank

    def tag(self) -> str:
        """A file-name tag for this process's shard, e.g. 'r001-of-004'."""
        return f"r{self.rank:03d}-of-{self.world_size:03d}"


def get_workers(device: str = "auto") -> Workers:
    """Detect the launcher: torchrun / accelerate set WORLD_SIZE; then accelerate's PartialState.

    device: "auto" (each process's accelerator when there is one, else CPU), "cpu" or "cuda".
    Returns the device string each process should load its model on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Workers(0, 1, device)
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    dev = "cpu" if cpu else str(state.device)
    return Workers(int(state.process_index), int(state.num_processes), dev, state)


def work_dir(out: Path, stage: str) -> Path:
    """Scratch folder beside `out` where processes write their shards before the merge."""
    out = Path(out)
    return out.parent / f".{out.name}.{stage}-work"


def load_stage_lm(model: str, adapter: Path | None, *, device: str = "auto", dtype: str = "auto") -> "LM":
    """The stage's model: `adapter` (a finetune output: base + merged LoRA) if given, else `model`."""
    if adapter is not None:
        from automr.llm.finetune import load_finetuned

        return load_finetuned(adapter, device=device, dtype=dtype)
    from automr.llm.loading import load_lm

    return load_lm(model, device=device, dtype=dtype)
