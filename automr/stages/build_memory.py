"""`automr build-memory`: the AutoMR memory store and each sample's query state.

The config and the runner (sharding, merging, saving); planning and computing the elements live in
automr/memory/build.py, the store in automr/memory/store.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from automr.config import save_config
from automr.args import DeviceArgs, LogArgs, ModelArgs
from automr.data.schema import SPLITS as SPLIT_NAMES
from automr.data.schema import PreparedData
from automr.llm.prompts import DEFAULT_SLOT_TOKENS, PromptBuilder
from automr.memory.build import (
    BUILD_STATS,
    BuildPlan,
    WindowJob,
    _Encoder,
    _print_stats,
    _summarize,
    build_store,
    iter_jobs,
    merge_shards,
    plan_build,
    save_queries,
    save_shard_outputs,
)
from automr.memory.parallel import get_workers, load_stage_lm, work_dir
from automr.utils.io import atomic_dir, write_json

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from automr.llm.split import SplitLM
    from automr.memory.store import MemoryStore


class BuildMemoryConfig(ModelArgs, DeviceArgs, LogArgs):
    """Build the memory store: one element (key z_m, value = title states) per older interaction."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: the memory store, queries/{split}.npy, build_stats.json, config.yaml")
    split_layer: int | None = Field(None, ge=0, description="layer L whose states are stored (default: half the layers)")
    value_tokens: int = Field(DEFAULT_SLOT_TOKENS, ge=1, description="title tokens kept per value (the first ones)")
    value_kind: Literal["title_states", "key_vector"] = Field(
        "title_states", description="value spliced into the slot: the title's layer-L token states, or the key vector as a 1-token value"
    )
    mode: Literal["exact", "chunked"] = Field(
        "exact",
        description="exact (default): one forward per element on the window ending at it, so every key is the paper's z_m; "
        "chunked: one forward per `chunk_items` interactions of a user's history, keys/values read at each title inside "
        "the chunk, so an element early in a chunk sees fewer than K titles (the first sees one). Chunked costs about "
        "1/chunk_items of the forwards: worth it only when exact does not fit the budget (long histories on CPU, e.g. "
        "the 1M presets) and to compare the two (benchmarks/bench_memory_build.py, configs/demo-headroom.yaml)",
    )
    chunk_items: int | None = Field(None, ge=1, description="interactions per chunk in chunked mode (default: the window size K)")
    window: int | None = Field(None, ge=1, description="K, titles in the window ending at an element (default: the longest recent_items in the samples)")
    splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: list(SPLIT_NAMES), description="sample splits whose memories (and queries) are built"
    )
    queries: bool = Field(True, description="also store each sample's query z_t in queries/{split}.npy (row-aligned with the samples parquet)")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")
    max_users: int | None = Field(None, ge=1, description="seeded random subset of users (CPU budgets); samples of other users get NaN queries")
    max_samples: int | dict[Literal["train", "valid", "test"], int] | None = Field(
        None,
        description="build only for a seeded subset of this many samples per split, or {split: n} (their elements and "
        "queries; other samples get NaN queries). With the same seed it is the subset `automr evaluate --n-eval N` scores, "
        "and `annotate` then picks only from it (CPU budgets on long histories)",
    )
    seed: int = Field(0, description="seed of the user and sample subsets")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (default: the model's context)")
    value_dtype: Literal["float16", "float32"] = Field("float16", description="on-disk dtype of the values")

    @model_validator(mode="after")
    def _check(self) -> "BuildMemoryConfig":
        if not self.splits:
            raise ValueError("splits is empty; name at least one of train, valid, test")
        counts = self.max_samples.values() if isinstance(self.max_samples, dict) else [self.max_samples]
        if any(n is not None and n < 1 for n in counts):
            raise ValueError(f"max_samples must be at least 1 (got {self.max_samples!r}); leave it out to build every sample")
        return self

    def samples_cap(self, split: str) -> int | None:
        """max_samples for one split (None: all of its samples)."""
        if isinstance(self.max_samples, dict):
            return self.max_samples.get(split)  # type: ignore[call-overload]
        return self.max_samples

    def seed_affects_output(self) -> bool:
        """The seed only picks the user / sample subsets: without them the store is the same for every seed."""
        return self.max_users is not None or self.max_samples is not None




def run_build_memory(cfg: BuildMemoryConfig) -> Path:
    """The `build-memory` stage (see the module docstring). Returns the output folder.

    Steps: plan (samples, users, this process's placements), load the model, build and save (one
    store, or a shard per process that rank 0 merges), print the statistics.
    """
    from automr.llm.split import SplitLM

    workers = get_workers(cfg.device)
    data = PreparedData.load(cfg.samples)
    plan = plan_build(
        data, {s: cfg.samples_cap(s) for s in cfg.splits}, seed=cfg.seed, max_users=cfg.max_users,
        window=cfg.window, chunk_items=cfg.chunk_items, owns=workers.owns,
    )
    lm = load_stage_lm(cfg.model, cfg.adapter, device=workers.device, dtype=cfg.dtype)
    split_lm = SplitLM(lm, cfg.split_layer)
    # The store's value length and the catalogue fix what a too-long window drops (PromptBuilder's rule),
    # so the queries and keys see the recent titles annotation and inference will see.
    encoder = _Encoder(PromptBuilder.for_lm(lm, max_length=cfg.max_length, slot_tokens=cfg.value_tokens, answers=plan.titles.values()))
    counts: dict[str, int] = {"unaligned_slices": plan.unaligned}  # iter_jobs adds to it as the jobs run
    jobs = iter_jobs(
        plan.mine, plan.histories, plan.by_user, plan.titles, encoder, counts,
        window=plan.window, mode=cfg.mode, chunk_items=plan.chunk_items, queries=cfg.queries,
    )
    stats: dict[str, Any] = {
        "mode": cfg.mode, "value_kind": cfg.value_kind, "window": plan.window, "layer": split_lm.split_layer,
        "model": lm.name, "users": len(plan.users), "processes": workers.world_size,
    }
    wdir = work_dir(cfg.out, "build")
    if workers.is_main and wdir.exists():
        shutil.rmtree(wdir)
    workers.barrier()
    build = partial(_build, cfg, split_lm=split_lm, jobs=jobs, plan=plan, progress=cfg.progress and workers.is_main,
                    description=f"build-memory {cfg.mode}" + (f" [{workers.tag()}]" if workers.world_size > 1 else ""))
    if workers.world_size == 1:
        with atomic_dir(cfg.out) as tmp:
            store, qarr, timing = build(tmp)
            _save_outputs(cfg, tmp, store, qarr, split_lm, stats, [counts], [timing])
    else:
        _build_sharded(cfg, workers, wdir, build, split_lm, plan, stats, counts)
    if workers.is_main:
        _print_stats(stats, cfg.out)
    return Path(cfg.out)


def _build(
    cfg: BuildMemoryConfig, folder: Path, *, split_lm: SplitLM, jobs: Iterable[WindowJob], plan: BuildPlan, progress: bool, description: str,
) -> tuple[MemoryStore, dict[str, np.ndarray], dict[str, float]]:
    """build_store with this config's store settings; the store records the build's settings in `extra`."""
    extra = {
        "window": plan.window, "chunk_items": plan.chunk_items if cfg.mode == "chunked" else None, "splits": list(cfg.splits),
        "samples": str(cfg.samples), "max_users": cfg.max_users, "max_samples": cfg.max_samples, "seed": cfg.seed,
        "num_layers": split_lm.num_layers,
    }
    return build_store(
        folder, split_lm, jobs, plan, value_tokens=cfg.value_tokens, value_dtype=cfg.value_dtype, value_kind=cfg.value_kind,
        mode=cfg.mode, extra=extra, queries=cfg.queries, batch_size=cfg.batch_size, progress=progress, description=description,
    )


def _build_sharded(
    cfg: BuildMemoryConfig, workers: Any, wdir: Path, build: Callable[[Path], tuple], split_lm: SplitLM, plan: BuildPlan,
    stats: dict[str, Any], counts: dict[str, int],
) -> None:
    """Under torchrun: each process builds its users into a shard in `wdir`; rank 0 merges them into OUT."""
    tag = workers.tag()
    store, qarr, timing = build(wdir / f"store-{tag}")
    store.close()
    save_shard_outputs(wdir, tag, qarr, counts, timing)
    workers.barrier()
    if workers.is_main:
        with atomic_dir(cfg.out) as tmp:
            merged, qall, parts = merge_shards(wdir, tmp, plan.rows if cfg.queries else {}, split_lm.hidden_size)
            _save_outputs(cfg, tmp, merged, qall, split_lm, stats, [p["counts"] for p in parts], [p["timing"] for p in parts])
        shutil.rmtree(wdir, ignore_errors=True)
    workers.barrier()


def _save_outputs(
    cfg: BuildMemoryConfig, folder: Path, store: MemoryStore, qarr: dict[str, np.ndarray], split_lm: SplitLM,
    stats: dict[str, Any], counts: list[dict], timings: list[dict],
) -> None:
    """Queries, build_stats.json (`stats` is completed in place) and config.yaml beside the store, which is closed."""
    save_queries(folder, qarr, hidden_size=split_lm.hidden_size, layer=split_lm.split_layer, model=split_lm.lm.name, samples=cfg.samples)
    stats |= _summarize(store, counts, timings)
    store.close()
    write_json(folder / BUILD_STATS, stats)
    save_config(cfg, folder)
