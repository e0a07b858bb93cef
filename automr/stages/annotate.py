"""`automr annotate`: log P(true title) with the empty slot and with each memory element spliced in.

The config and the resumable runner (parts, resume checks); the kernel and label statistics live in
automr/memory/annotate.py and automr/llm/split.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from automr.config import load_config, save_config
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.args import DeviceArgs, LogArgs, ModelArgs
from automr.memory.annotate import (
    _RESUME_FREE,
    META_FILE,
    STATS_FILE,
    _annotate_samples,
    _existing_parts,
    _print_stats,
    annotate_meta,
    annotation_statistics,
    built_samples,
    collect_timings,
    eligible_samples,
    load_annotations,
    remaining_samples,
    samples_without_memory,
)
from automr.memory.parallel import get_workers
from automr.utils.io import read_json, write_json

if TYPE_CHECKING:  # pragma: no cover
    from automr.memory.store import MemoryStore


class AnnotateConfig(ModelArgs, DeviceArgs, LogArgs):
    """Annotate samples: log P(answer) with the empty slot and with each memory element spliced in."""

    samples: Path = Field(description="prepared data folder (the one the memory store was built from)")
    memory: Path = Field(description="memory store folder (output of `automr build-memory`)")
    out: Path = Field(description="output folder: part-*.parquet (raw log-probabilities), stats.json, config.yaml")
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
    compile: bool = Field(
        False, description="torch.compile the kernel's layer passes (GPU, large models: 70 -> 50 ms per sample at the "
        "Llama-2-7B shape on an H100; compiling takes about 3 minutes once; no gain on CPU)",
    )

    def seed_affects_output(self) -> bool:
        """The seed only picks the max_samples subset: annotating every eligible sample is the same for every seed."""
        return self.max_samples is not None





from automr.utils.logging import get_console, warn
from automr.utils.seeding import select_from
from automr.utils.io import OUTPUT_MARKER



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
        warn(f"annotate: the memory store {cfg.memory} changed since {out} was annotated "
             f"({', '.join(store_changed)}); its labels are stale, starting over.")
        shutil.rmtree(out)


def run_annotate(cfg: AnnotateConfig) -> Path:
    """The `annotate` stage (see the module docstring). Returns the output folder.

    Steps: select the samples, prepare OUT (resume checks, rank 0), annotate this process's
    remaining samples in parts, finish (rank 0: coverage, statistics).
    """
    from automr.memory.store import MemoryStore

    workers = get_workers(cfg.device)
    out = Path(cfg.out)
    data = PreparedData.load(cfg.samples)
    df = data.split(cfg.split)
    store = MemoryStore.open(cfg.memory)
    built = built_samples(cfg.memory, cfg.split, df.height)
    selected = _select(cfg, df, store, built)
    if workers.is_main:
        _prepare_out(cfg, out, annotate_meta(cfg.split, store, df.height, len(selected)))
    workers.barrier()

    todo, k_next = remaining_samples(out, selected, df["user_id"].to_numpy(), workers.rank, workers.world_size)
    timing = {"samples": 0, "candidates": 0, "seconds": 0.0, "parts": 0}
    stopped = False
    if len(todo):
        timing, stopped = _annotate_samples(cfg, workers, df, data, store, todo, k_next, out)
    write_json(out / f".timing-r{workers.rank:03d}.json", timing | {"stopped": stopped})
    workers.barrier()

    if workers.is_main:
        _finish(cfg, workers.world_size, out, df, selected, len(eligible_samples(df, store.users(), built)))
    workers.barrier()
    store.close()
    return out


def _select(cfg: AnnotateConfig, df: pl.DataFrame, store: MemoryStore, built: np.ndarray | None) -> np.ndarray:
    """The samples to annotate (a seeded subset of the eligible ones), or an error saying why there are none."""
    selected = select_from(eligible_samples(df, store.users(), built), cfg.max_samples, cfg.seed)
    if len(selected) == 0:
        n_no_memory = samples_without_memory(df)
        n_users = int(df.filter(pl.col("memory_items").list.len() > 0)["user_id"].is_in(store.users().tolist()).sum())
        raise UserError(
            f"no sample of split {cfg.split!r} can be annotated: {df.height} samples, {df.height - n_no_memory} with a "
            f"memory, {n_users} of those from users in the store {cfg.memory} ({len(store.users())} users). Build the "
            f"memory with this split's users (build-memory `splits` including {cfg.split!r}; more or no `max_users`)."
        )
    return selected


def _prepare_out(cfg: AnnotateConfig, out: Path, meta: dict[str, Any]) -> None:
    """Rank 0: start over (--no-resume) or check the earlier run can be resumed; write config.yaml and the meta."""
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


def _finish(cfg: AnnotateConfig, world: int, out: Path, df: pl.DataFrame, selected: np.ndarray, n_eligible: int) -> None:
    """Rank 0: report this run's speed and coverage; once every selected sample is done, write stats.json."""

    tot, secs = collect_timings(out)
    ann = load_annotations(out, require_complete=False) if _existing_parts(out) else None
    n_done = 0 if ann is None else ann.height
    missing = np.setdiff1d(selected, ann["sample_index"].to_numpy() if ann is not None else np.zeros(0, np.int64))
    rate = (
        f"{tot['samples'] / secs:,.2f} samples/s, {tot['candidates'] / secs:,.1f} candidates/s"
        if secs > 0 else "nothing computed in this run"
    )
    console = get_console()
    console.print(
        f"annotate {cfg.split}: {tot['samples']:,} samples ({tot['candidates']:,} candidates) in {tot['parts']} new parts, "
        f"{secs:.1f} s on {world} process(es): {rate}; {n_done:,}/{len(selected):,} samples done",
        highlight=False,
    )
    if len(missing):
        console.print(f"stopped with {len(missing):,} samples left; rerun the same command to resume.", highlight=False)
        return
    assert ann is not None
    stats = annotation_statistics(ann, cfg.temperature)
    stats |= {
        "split": cfg.split,
        "samples_in_split": df.height,
        "skipped_no_memory": samples_without_memory(df),
        "eligible": n_eligible,
        "annotated": ann.height,
        "last_run": {"samples": tot["samples"], "candidates": tot["candidates"], "seconds": round(secs, 3),
                     "samples_per_s": tot["samples"] / secs if secs > 0 else None,
                     "candidates_per_s": tot["candidates"] / secs if secs > 0 else None,
                     "processes": world},
    }
    write_json(out / STATS_FILE, stats)
    _print_stats(console, stats)
