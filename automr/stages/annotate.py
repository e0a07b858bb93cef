"""`automr annotate`: log P(true title) with the empty slot and with each memory element spliced in.

The config and the resumable runner (parts, resume checks); the kernel and label statistics live in
automr/memory/annotate.py and automr/llm/split.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from automr.config import StageConfig
from automr.memory.annotate import (
    _RESUME_FREE,
    META_FILE,
    STATS_FILE,
    _annotate_samples,
    _done_indices,
    _existing_parts,
    _print_stats,
    annotation_statistics,
    built_samples,
    eligible_samples,
    load_annotations,
    select_samples,
    store_fingerprint,
)


class AnnotateConfig(StageConfig):
    """Annotate samples: log P(answer) with the empty slot and with each memory element spliced in."""

    samples: Path = Field(description="prepared data folder (the one the memory store was built from)")
    memory: Path = Field(description="memory store folder (output of `automr build-memory`)")
    out: Path = Field(description="output folder: part-*.parquet (raw log-probabilities), stats.json, config.yaml")
    model: str = Field("smollm2", description="base model: 'smollm2', a Hugging Face folder, or a hub id (must be the store's model)")
    adapter: Path | None = Field(None, description="a `finetune` output folder (base model + LoRA adapter, merged); overrides `model`")
    split: Literal["train", "valid", "test"] = Field("train", description="which samples to annotate (train for training, valid for validation)")
    max_samples: int | None = Field(None, ge=1, description="seeded random subset of the eligible samples (CPU budgets)")
    seed: int = Field(0, description="seed of the sample subset")
    chunk_size: int | None = Field(None, ge=1, description="candidates packed per upper-layer pass (default: about 1024 tokens per pass)")
    part_size: int = Field(64, ge=1, description="samples per part file (the unit of resumption)")
    resume: bool = Field(True, description="keep finished part files of an earlier run with the same settings and do only the rest")
    stop_after: int | None = Field(None, ge=1, description="stop after writing this many part files in this invocation (time-boxed runs; rerun to resume)")
    temperature: float = Field(1.0, gt=0, description="temperature of the log-likelihood-gain labels in the printed statistics")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (default: the model's context)")
    allow_model_mismatch: bool = Field(False, description="annotate even if the store was built with another model name (not advised)")
    device: str = Field("auto", description="auto (each process's accelerator, else CPU), cpu or cuda")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    compile: bool = Field(
        False, description="torch.compile the kernel's layer passes (GPU, large models: 70 -> 50 ms per sample at the "
        "Llama-2-7B shape on an H100; compiling takes about 3 minutes once; no gain on CPU)",
    )
    progress: bool = Field(True, description="show a progress bar")



import shutil

import numpy as np
import polars as pl

from automr.config import load_config, save_config
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.memory.parallel import get_workers, user_shard
from automr.utils.io import OUTPUT_MARKER, read_json, write_json



def annotate_config(folder: str | Path) -> AnnotateConfig:
    """The AnnotateConfig an annotate output was made with."""
    f = Path(folder) / "config.yaml"
    if not f.is_file():
        raise UserError(f"{folder} has no config.yaml; it is not an `automr annotate` output.")
    return load_config(AnnotateConfig, f)


def _check_resume(cfg: AnnotateConfig, out: Path, meta: dict[str, Any]) -> None:
    """Keep the finished parts of an earlier run, or say why they cannot be kept.

    Other settings: refuse (the user may have pointed at the wrong folder). The same settings but a
    rebuilt memory store (e.g. `automr run` re-ran build-memory): the old labels are stale, so start over.
    """
    old_cfg = annotate_config(out)
    diffs = [
        f"{k}: {getattr(old_cfg, k)!r} -> {getattr(cfg, k)!r}"
        for k in AnnotateConfig.model_fields
        if k not in _RESUME_FREE and getattr(old_cfg, k) != getattr(cfg, k)
    ]
    old_meta = read_json(out / META_FILE) if (out / META_FILE).is_file() else {}
    changed = {k: (old_meta.get(k), v) for k, v in meta.items() if old_meta.get(k) != v}
    store_changed = [k for k in changed if k.startswith("store_")]
    diffs += [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in store_changed]
    if diffs:
        raise UserError(
            f"{out} holds annotations made with other settings ({'; '.join(diffs)}). Use another --out, "
            "restore the settings, or pass --no-resume to start over."
        )
    if store_changed:
        print(f"annotate: the memory store {cfg.memory} changed since {out} was annotated "
              f"({', '.join(store_changed)}); its labels are stale, starting over.")
        shutil.rmtree(out)


def run_annotate(cfg: AnnotateConfig) -> Path:
    """The `annotate` stage (see the module docstring). Returns the output folder."""
    from automr.memory.store import MemoryStore

    workers = get_workers(cfg.device)
    out = Path(cfg.out)
    data = PreparedData.load(cfg.samples)
    df = data.split(cfg.split)
    store = MemoryStore.open(cfg.memory)
    built = built_samples(cfg.memory, cfg.split, df.height)
    selected = select_samples(eligible_samples(df, store.users(), built), cfg.max_samples, cfg.seed)
    n_no_memory = int((df["memory_items"].list.len().fill_null(0) == 0).sum())
    if len(selected) == 0:
        n_users = int(df.filter(pl.col("memory_items").list.len() > 0)["user_id"].is_in(store.users().tolist()).sum())
        raise UserError(
            f"no sample of split {cfg.split!r} can be annotated: {df.height} samples, {df.height - n_no_memory} with a "
            f"memory, {n_users} of those from users in the store {cfg.memory} ({len(store.users())} users). Build the "
            f"memory with this split's users (build-memory `splits` including {cfg.split!r}; more or no `max_users`)."
        )
    meta = {
        "split": cfg.split,
        "store_rows": len(store),
        "store_tokens": store.n_tokens,
        "store_model": store.meta.model_name,
        "store_layer": store.meta.layer,
        "store_fingerprint": store_fingerprint(store),
        "samples_in_split": df.height,
        "selected": int(len(selected)),
    }
    if workers.is_main:
        if out.exists() and not cfg.resume:
            if (out / "config.yaml").is_file() or _existing_parts(out):
                shutil.rmtree(out)
            elif any(p.name != OUTPUT_MARKER for p in out.iterdir()):  # the marker alone: claimed by the stage guard
                raise UserError(f"{out} exists and is not an annotate output; choose another --out.")
        if (out / "config.yaml").is_file():
            _check_resume(cfg, out, meta)
        out.mkdir(parents=True, exist_ok=True)
        (out / STATS_FILE).unlink(missing_ok=True)
        save_config(cfg, out)
        write_json(out / META_FILE, meta)
    workers.barrier()

    parts = _existing_parts(out)
    done = _done_indices(parts)
    mine = selected[user_shard(df["user_id"].to_numpy()[selected], workers.world_size) == workers.rank]
    todo = np.setdiff1d(mine, done, assume_unique=False)
    prefix = f"part-r{workers.rank:03d}-"
    k_next = 1 + max((int(p.stem.split("-")[-1]) for p in parts if p.name.startswith(prefix)), default=-1)

    timing = {"samples": 0, "candidates": 0, "seconds": 0.0, "parts": 0}
    stopped = False
    if len(todo):
        timing, stopped = _annotate_samples(cfg, workers, df, data, store, todo, k_next, out)
    write_json(out / f".timing-r{workers.rank:03d}.json", timing | {"stopped": stopped})
    workers.barrier()

    if workers.is_main:
        timings = [read_json(p) for p in sorted(out.glob(".timing-r*.json"))]
        for p in out.glob(".timing-r*.json"):
            p.unlink()
        ann = load_annotations(out, require_complete=False) if _existing_parts(out) else None
        n_done = 0 if ann is None else ann.height
        missing = np.setdiff1d(selected, ann["sample_index"].to_numpy() if ann is not None else np.zeros(0, np.int64))
        tot = {k: sum(t[k] for t in timings) for k in ("samples", "candidates", "parts")}
        secs = max((t["seconds"] for t in timings), default=0.0)
        rate = (
            f"{tot['samples'] / secs:,.2f} samples/s, {tot['candidates'] / secs:,.1f} candidates/s"
            if secs > 0 else "nothing computed in this run"
        )
        from rich.console import Console

        console = Console()
        console.print(
            f"annotate {cfg.split}: {tot['samples']:,} samples ({tot['candidates']:,} candidates) in {tot['parts']} new parts, "
            f"{secs:.1f} s on {workers.world_size} process(es): {rate}; {n_done:,}/{len(selected):,} samples done",
            highlight=False,
        )
        if len(missing):
            console.print(f"stopped with {len(missing):,} samples left; rerun the same command to resume.", highlight=False)
        else:
            assert ann is not None
            stats = annotation_statistics(ann, cfg.temperature)
            stats |= {
                "split": cfg.split,
                "samples_in_split": df.height,
                "skipped_no_memory": n_no_memory,
                "eligible": int(len(eligible_samples(df, store.users(), built))),
                "annotated": ann.height,
                "last_run": {"samples": tot["samples"], "candidates": tot["candidates"], "seconds": round(secs, 3),
                             "samples_per_s": tot["samples"] / secs if secs > 0 else None,
                             "candidates_per_s": tot["candidates"] / secs if secs > 0 else None,
                             "processes": workers.world_size},
            }
            write_json(out / STATS_FILE, stats)
            _print_stats(console, stats)
    workers.barrier()
    store.close()
    return out


