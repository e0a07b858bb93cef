"""`automr build-memory`: the AutoMR memory store and each sample's query state.

The config and the runner (sharding, merging, saving); planning and computing the elements live in
automr/memory/build.py, the store in automr/memory/store.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from automr.args import DeviceArgs, LogArgs, ModelArgs
from automr.data.schema import SPLITS as SPLIT_NAMES
from automr.memory.build import (
    BUILD_STATS,
    QUERIES_DIR,
    _Encoder,
    _print_stats,
    _select_users,
    _summarize,
    _titles_or_error,
    append_elements,
    compute_jobs,
    element_positions,
    group_placements,
    infer_window,
    iter_jobs,
    place_samples,
    sample_subset,
)


class BuildMemoryConfig(ModelArgs, DeviceArgs, LogArgs):
    """Build the memory store: one element (key z_m, value = title states) per older interaction."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: the memory store, queries/{split}.npy, build_stats.json, config.yaml")
    split_layer: int | None = Field(None, ge=0, description="layer L whose states are stored (default: half the layers)")
    value_tokens: int = Field(16, ge=1, description="title tokens kept per value (the first ones)")
    value_kind: Literal["title_states", "key_vector"] = Field(
        "title_states", description="value spliced into the slot: the title's layer-L token states, or the key vector as a 1-token value"
    )
    mode: Literal["exact", "chunked"] = Field(
        "exact",
        description="exact: one forward per element on the window ending at it (the paper's z_m); chunked: one forward "
        "per `chunk_items` interactions of a user's history, keys/values read at each title inside the chunk (cheaper, approximate)",
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



import shutil

import numpy as np
import polars as pl

from automr.config import save_config
from automr.data.schema import PreparedData
from automr.memory.parallel import get_workers, load_stage_lm, work_dir
from automr.utils.io import atomic_dir, read_json, write_json



def run_build_memory(cfg: BuildMemoryConfig) -> Path:
    """The `build-memory` stage (see the module docstring). Returns the output folder."""
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM
    from automr.memory.store import MemoryStore, merge_stores

    workers = get_workers(cfg.device)
    data = PreparedData.load(cfg.samples)
    full = {s: data.split(s) for s in cfg.splits}
    frames = {s: sample_subset(df, cfg.samples_cap(s), cfg.seed) for s, df in full.items()}
    titles = _titles_or_error(data, frames)
    window = cfg.window or infer_window(frames)
    chunk_items = cfg.chunk_items or window
    users = _select_users(frames, cfg.max_users, cfg.seed)
    mine = [u for u, own in zip(users, workers.owns(users)) if own]
    histories, placements, unaligned = place_samples(  # this process's users only
        {s: df.filter(pl.col("user_id").is_in(mine)) for s, df in frames.items()}
    )
    by_user = group_placements(placements)
    n_elements = sum(len(element_positions(by_user.get(u, []))) for u in mine)

    lm = load_stage_lm(cfg.model, cfg.adapter, device=workers.device, dtype=cfg.dtype)
    split_lm = SplitLM(lm, cfg.split_layer)
    encoder = _Encoder(PromptBuilder.for_lm(lm, max_length=cfg.max_length))
    counts: dict[str, int] = {"unaligned_slices": unaligned}
    jobs = iter_jobs(
        mine, histories, by_user, titles, encoder, counts,
        window=window, mode=cfg.mode, chunk_items=chunk_items, queries=cfg.queries,
    )
    H = split_lm.hidden_size
    extra = {
        "window": window, "chunk_items": chunk_items if cfg.mode == "chunked" else None, "splits": list(cfg.splits),
        "samples": str(cfg.samples), "max_users": cfg.max_users, "max_samples": cfg.max_samples, "seed": cfg.seed, "num_layers": split_lm.num_layers,
    }
    wdir = work_dir(cfg.out, "build")
    if workers.is_main and wdir.exists():
        shutil.rmtree(wdir)
    workers.barrier()

    def build_into(folder: Path) -> tuple[MemoryStore, dict[str, np.ndarray], dict[str, float]]:
        store = MemoryStore.create(
            folder, H, cfg.value_tokens, cfg.value_dtype, layer=split_lm.split_layer, model_name=lm.name,
            mode=cfg.mode, value_kind=cfg.value_kind, extra=extra, durable=False,
        )
        qarr = {s: np.full((full[s].height, H), np.nan, np.float32) for s in cfg.splits} if cfg.queries else {}

        def on_batch(els: list, qs: list) -> None:
            append_elements(store, histories, els)
            for (s, r), z in qs:
                qarr[s][r] = z

        timing = compute_jobs(
            split_lm, jobs, total_elements=n_elements, batch_size=cfg.batch_size, value_tokens=cfg.value_tokens, value_kind=cfg.value_kind,
            on_batch=on_batch, progress=cfg.progress and workers.is_main,
            description=f"build-memory {cfg.mode}" + (f" [{workers.tag()}]" if workers.world_size > 1 else ""),
        )
        return store, qarr, timing

    stats: dict[str, Any] = {
        "mode": cfg.mode, "value_kind": cfg.value_kind, "window": window, "layer": split_lm.split_layer,
        "model": lm.name, "users": len(users), "processes": workers.world_size,
    }
    if workers.world_size == 1:
        with atomic_dir(cfg.out) as tmp:
            store, qarr, timing = build_into(tmp)
            _save_queries(tmp, qarr, cfg, H, split_lm.split_layer, lm.name)
            stats |= _summarize(store, [counts], [timing])
            store.close()
            write_json(tmp / BUILD_STATS, stats)
            save_config(cfg, tmp)
    else:
        shard = wdir / f"store-{workers.tag()}"
        store, qarr, timing = build_into(shard)
        store.close()
        for s, a in qarr.items():
            rows = np.flatnonzero(~np.isnan(a[:, 0])) if len(a) else np.zeros(0, np.int64)
            np.savez(wdir / f"queries-{workers.tag()}-{s}.npz", rows=rows, states=a[rows])
        write_json(wdir / f"stats-{workers.tag()}.json", {"counts": counts, "timing": timing})
        workers.barrier()
        if workers.is_main:
            shards = sorted(wdir.glob("store-r*"))
            parts = [read_json(p) for p in sorted(wdir.glob("stats-r*.json"))]
            with atomic_dir(cfg.out) as tmp:
                merged = merge_stores(shards, tmp, overwrite=True, durable=False)
                qall = {}
                for s in (cfg.splits if cfg.queries else []):
                    a = np.full((full[s].height, H), np.nan, np.float32)
                    for f in sorted(wdir.glob(f"queries-r*-{s}.npz")):
                        z = np.load(f)
                        a[z["rows"]] = z["states"]
                    qall[s] = a
                _save_queries(tmp, qall, cfg, H, split_lm.split_layer, lm.name)
                stats |= _summarize(merged, [p["counts"] for p in parts], [p["timing"] for p in parts])
                merged.close()
                write_json(tmp / BUILD_STATS, stats)
                save_config(cfg, tmp)
            shutil.rmtree(wdir, ignore_errors=True)
        workers.barrier()
    if workers.is_main:
        _print_stats(stats, cfg.out)
    return Path(cfg.out)


def _save_queries(folder: Path, qarr: dict[str, np.ndarray], cfg: BuildMemoryConfig, H: int, layer: int, model: str) -> None:
    if not qarr:
        return
    qd = folder / QUERIES_DIR
    qd.mkdir(parents=True, exist_ok=True)
    meta = {"hidden_size": H, "layer": layer, "model": model, "samples": str(cfg.samples), "splits": {}}
    for s, a in qarr.items():
        np.save(qd / f"{s}.npy", a)
        meta["splits"][s] = {"rows": int(a.shape[0]), "built": int((~np.isnan(a[:, 0])).sum()) if len(a) else 0}
    write_json(qd / "meta.json", meta)


