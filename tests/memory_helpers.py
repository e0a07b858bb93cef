"""Shared tiny fixtures for the memory-stage tests (build-memory, annotate, train-retriever).

A 4-layer random Llama (build_tiny_lm) saved to a folder so the stages load it by path like any
model, and a prepared folder of a few users with a short history cap, so samples show truncated
slices of their users' histories (the case build-memory must merge).
"""

from __future__ import annotations

import random
from pathlib import Path

from conftest import make_prepared

from automr.llm.toy import toy_titles

N_ITEMS = 30
RECENT_K = 4
HISTORY_CAP = 9


def tiny_users(n_users: int = 6, seed: int = 0) -> dict[int, list[int]]:
    """Users with 9..15 interactions over 30 items (repeats allowed, as in real data)."""
    rng = random.Random(seed)
    return {u: [rng.randint(1, N_ITEMS) for _ in range(rng.randint(9, 15))] for u in range(1, n_users + 1)}


def tiny_titles() -> dict[int, str]:
    return {i + 1: t for i, t in enumerate(toy_titles(N_ITEMS))}


def make_tiny_prepared(root: Path, users: dict[int, list[int]] | None = None) -> Path:
    return make_prepared(
        root, users or tiny_users(), items=tiny_titles(), recent_k=RECENT_K, history_cap=HISTORY_CAP
    )


def save_tiny_lm(folder: Path) -> Path:
    from automr.llm.loading import build_tiny_lm, save_lm

    save_lm(build_tiny_lm(list(tiny_titles().values())), folder)
    return folder


def single_thread():
    """Generator for a module fixture: torch on one thread while the module runs.

    The tiny model's ops are microseconds; on a busy 2-core machine two OpenMP threads spin
    against other processes and make them ~30x slower. Restores the previous setting after.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def toy_data_and_model(root: Path) -> tuple[Path, Path]:
    """(prepared toy data folder, tiny base model folder) under `root`: the fine-tuning tests' inputs."""
    from automr.llm.loading import build_tiny_lm, save_lm
    from automr.llm.toy import make_toy_prepared

    data = make_toy_prepared(root / "data")
    save_lm(build_tiny_lm(toy_titles(20)), root / "base")
    return data, root / "base"
