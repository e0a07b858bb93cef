"""annotate: for each sample, log P(answer) with the empty slot and with each memory element spliced in.

Per sample (DESIGN.md "Annotation"): the prompt is encoded with the true answer; its candidates
are the sample's memory elements' values from the store (rows aligned with memory_items); the
shared-prefix kernel `SplitLM.score_candidates` returns [logp_empty, logp_cand_1..M]. Raw
log-probabilities are saved, not labels, so the label type and temperature are chosen later
(automr.memory.labels); the stage prints and saves the label statistics (stats.json).

Resumable, because it is the costliest stage: samples are written in parts of `part_size`
(part-rRRR-KKKKK.parquet, each written to a temporary name and renamed, so a part is either
complete or absent). A rerun with the same settings reads which sample indices the finished
parts hold and computes only the others; a sample's log-probabilities do not depend on which
part or process computed it, so an interrupted-and-resumed run gives the same labels as an
uninterrupted one.

Under torchrun each process annotates the samples of the users it owns (automr.memory.parallel)
and writes its own parts; after a barrier rank 0 checks coverage and writes stats.json.

Output columns (one row per sample):
  sample_index   int64  row in samples/{split}.parquet
  user_id, target_item, target_time
  logp_empty     float64           log P(y | z_t), nats
  logp_cand      list[float64] [M] log P(y | z_t, z_m), aligned with memory_items
  memory_rows    list[int64] [M]   store rows of the sample's memory elements
  answer_tokens, prompt_tokens     int32
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.memory import labels as L
from automr.memory.parallel import load_stage_lm, user_shard
from automr.utils.io import read_json
from automr.utils.io import atomic_file

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.prompts import EncodedPrompt
    from automr.memory.store import MemoryStore

ANNOTATION_SCHEMA: dict[str, pl.DataType] = {
    "sample_index": pl.Int64,
    "user_id": pl.Int64,
    "target_item": pl.Int64,
    "target_time": pl.Int64,
    "logp_empty": pl.Float64,
    "logp_cand": pl.List(pl.Float64),
    "memory_rows": pl.List(pl.Int64),
    "answer_tokens": pl.Int32,
    "prompt_tokens": pl.Int32,
}
META_FILE = "annotate_meta.json"
STATS_FILE = "stats.json"
PART_GLOB = "part-r*.parquet"
# Settings that may change between a run and its resumption (they do not change any label).
_RESUME_FREE = {"resume", "stop_after", "progress", "device", "part_size", "chunk_size", "temperature", "out", "compile"}


# ---------------------------------------------------------------------- sample selection
def eligible_samples(df: pl.DataFrame, store_users: np.ndarray, built: np.ndarray | None = None) -> np.ndarray:
    """Indices of samples that can be annotated: a non-empty memory, a user in the store, and (where
    the store kept per-sample query states) a sample the memory was built for: build-memory's
    `max_samples` builds only a subset, and the retriever can only train on samples with a query."""
    has_mem = (df["memory_items"].list.len().fill_null(0) > 0).to_numpy()
    in_store = np.isin(df["user_id"].to_numpy(), store_users)
    ok = has_mem & in_store
    if built is not None:
        ok &= built
    return np.flatnonzero(ok).astype(np.int64)


def built_samples(memory: str | Path, split: str, n_samples: int) -> np.ndarray | None:
    """Mask [n] of the split's samples that have a stored query state, or None where none were stored."""
    f = Path(memory) / "queries" / f"{split}.npy"
    if not f.is_file():
        return None
    q = np.load(f, mmap_mode="r")
    if q.shape[0] != n_samples:
        return None  # another prepared folder: the store-users rule alone applies (train-retriever reports the mismatch)
    return ~np.isnan(np.asarray(q[:, 0]))


# ---------------------------------------------------------------------- one sample
def sample_candidates(store: "MemoryStore", user_id: int, memory_items: Any, memory_times: Any) -> tuple[np.ndarray, list[Any]]:
    """Store rows [M] of a sample's memory (aligned with memory_items) and their values as float32 tensors [S_i, H]."""
    import torch

    rows = store.rows_for(int(user_id), memory_items, memory_times)
    values = [torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in store.values(rows)]
    return rows, values


def encode_sample(builder: Any, titles: dict[int, str], recent_items: Any, target_item: int, reserve: int) -> "EncodedPrompt":
    """The sample's prompt with the true answer, leaving `reserve` tokens for the slot.

    The titles kept follow the builder's rule (PromptBuilder): with the store's max_value_tokens as
    its slot_tokens and the catalogue as its answers, neither `reserve` (up to that) nor this
    answer's length changes them, so they are the ones the query state and inference saw.
    """
    return builder.encode([titles[int(i)] for i in recent_items], answer=titles[int(target_item)], reserve=reserve)


# ---------------------------------------------------------------------- parts on disk
def _part_name(rank: int, k: int) -> str:
    return f"part-r{rank:03d}-{k:05d}.parquet"


def _existing_parts(out: Path) -> list[Path]:
    return sorted(out.glob(PART_GLOB))


def _done_indices(parts: list[Path]) -> np.ndarray:
    if not parts:
        return np.zeros(0, np.int64)
    return pl.concat([pl.read_parquet(p, columns=["sample_index"]) for p in parts])["sample_index"].to_numpy()


def _write_part(path: Path, records: list[dict[str, Any]]) -> None:
    """Write a part atomically and durably (a finished part is the unit of resumption)."""
    with atomic_file(path, durable=True) as tmp:
        pl.DataFrame(records, schema=ANNOTATION_SCHEMA).write_parquet(tmp)


def annotations_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a finished annotate output (None when it is); reads no parquet. The one wording of
    these mistakes: `load_annotations` raises the same messages."""
    folder = Path(folder)
    if not _existing_parts(folder):
        return f"no annotations in {folder} (no {PART_GLOB} files). Run `automr annotate --out {folder}` first."
    if not (folder / STATS_FILE).is_file():
        return (f"annotations in {folder} are incomplete (no {STATS_FILE}: the run was stopped or is still going). "
                "Rerun the same `automr annotate` command to finish it.")
    return None


def load_annotations(folder: str | Path, *, require_complete: bool = True) -> pl.DataFrame:
    """All annotated samples of an annotate output, sorted by sample_index (ANNOTATION_SCHEMA)."""
    folder = Path(folder)
    parts = _existing_parts(folder)
    problem = annotations_problem(folder)
    if problem is not None and (require_complete or not parts):
        raise UserError(problem)
    df = pl.concat([pl.read_parquet(p) for p in parts]).sort("sample_index")
    if df["sample_index"].is_duplicated().any():
        raise UserError(f"{folder} holds the same sample in two part files; delete the folder and annotate again.")
    return df


# ---------------------------------------------------------------------- the stage
def store_fingerprint(store: "MemoryStore") -> str:
    """A digest of the store's size and of up to 1,024 evenly spaced keys.

    Rebuilding the memory (another adapter, layer or mode) changes every key, so a sample of keys
    tells a rebuilt store from the one earlier labels were computed on, without hashing gigabytes.
    """
    keys = store.key_matrix
    rows = np.unique(np.linspace(0, max(len(keys) - 1, 0), num=min(len(keys), 1024)).astype(np.int64))
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(store)}:{store.n_tokens}".encode())
    if len(rows):
        h.update(np.ascontiguousarray(keys[rows]).tobytes())
    return h.hexdigest()


def _annotate_samples(
    cfg: Any, workers: Any, df: pl.DataFrame, data: PreparedData, store: "MemoryStore",
    todo: np.ndarray, k_next: int, out: Path,
) -> tuple[dict[str, Any], bool]:
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM

    lm = load_stage_lm(cfg.model, cfg.adapter, device=workers.device, dtype=cfg.dtype)
    if store.meta.model_name != lm.name and not cfg.allow_model_mismatch:
        raise UserError(
            f"the memory store {cfg.memory} was built with model {store.meta.model_name!r} but this run loads {lm.name!r}; "
            "states of one model mean nothing to another. Use the same model/adapter as build-memory "
            "(or pass --allow-model-mismatch)."
        )
    split_lm = SplitLM(lm, store.meta.layer, compile=cfg.compile)
    titles = data.titles()
    # The store's value length and the catalogue fix what a too-long prompt drops (PromptBuilder's rule):
    # the recent titles build-memory's query state and inference see.
    builder = PromptBuilder.for_lm(lm, max_length=cfg.max_length, slot_tokens=store.meta.max_value_tokens, answers=titles.values())
    sub = df[todo.tolist()]
    cols = {c: sub[c].to_list() for c in ("user_id", "target_item", "target_time", "recent_items", "memory_items", "memory_times")}
    missing = {int(i) for r, t in zip(cols["recent_items"], cols["target_item"]) for i in [*r, t] if int(i) not in titles}
    if missing:
        raise UserError(
            f"{len(missing)} item id(s) have no title in {data.root}/items.parquet (e.g. {sorted(missing)[:10]}); "
            "re-run `automr prepare`."
        )
    reserve = store.meta.max_value_tokens
    t0 = time.perf_counter()
    n_samples = n_cands = n_parts = 0
    stopped = False
    from automr.utils.progress import rate_progress

    bar = rate_progress("samples", fields=("cps",), disable=not (cfg.progress and workers.is_main))
    with bar:
        task = bar.add_task(f"annotate {cfg.split}", total=len(todo), cps="")
        for p0 in range(0, len(todo), cfg.part_size):
            records = []
            for j in range(p0, min(p0 + cfg.part_size, len(todo))):
                u = cols["user_id"][j]
                rows, values = sample_candidates(store, u, cols["memory_items"][j], cols["memory_times"][j])
                prompt = encode_sample(builder, titles, cols["recent_items"][j], cols["target_item"][j], reserve)
                scores = split_lm.score_candidates(prompt, values, include_empty=True, chunk_size=cfg.chunk_size).double().numpy()
                records.append({
                    "sample_index": int(todo[j]), "user_id": int(u), "target_item": int(cols["target_item"][j]),
                    "target_time": int(cols["target_time"][j]), "logp_empty": float(scores[0]),
                    "logp_cand": scores[1:].tolist(), "memory_rows": rows.tolist(),
                    "answer_tokens": len(prompt.answer_ids), "prompt_tokens": len(prompt.prefix_ids) + len(prompt.marker_ids),
                })
                n_samples += 1
                n_cands += len(rows)
                el = time.perf_counter() - t0
                bar.update(task, advance=1, cps=f"{n_cands / max(el, 1e-9):,.1f} candidates/s")
            _write_part(out / _part_name(workers.rank, k_next + n_parts), records)
            n_parts += 1
            if cfg.stop_after is not None and n_parts >= cfg.stop_after and p0 + cfg.part_size < len(todo):
                stopped = True
                break
    return {"samples": n_samples, "candidates": n_cands, "seconds": time.perf_counter() - t0, "parts": n_parts}, stopped


# ---------------------------------------------------------------------- the stage's steps: plan, merge, finish
def samples_without_memory(df: pl.DataFrame) -> int:
    """Samples with an empty (or missing) memory: nothing to annotate."""
    return int((df["memory_items"].list.len().fill_null(0) == 0).sum())


def annotate_meta(split: str, store: MemoryStore, samples_in_split: int, selected: int) -> dict[str, Any]:
    """What the labels depend on besides the config (annotate_meta.json): the store's identity and the selection."""
    return {
        "split": split,
        "store_rows": len(store),
        "store_tokens": store.n_tokens,
        "store_model": store.meta.model_name,
        "store_layer": store.meta.layer,
        "store_fingerprint": store_fingerprint(store),
        "samples_in_split": samples_in_split,
        "selected": selected,
    }


def remaining_samples(out: Path, selected: np.ndarray, user_ids: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, int]:
    """The selected samples process `rank` owns that no finished part holds yet, and the number of its next part."""
    parts = _existing_parts(out)
    done = _done_indices(parts)
    mine = selected[user_shard(user_ids[selected], world) == rank]
    todo = np.setdiff1d(mine, done, assume_unique=False)
    prefix = f"part-r{rank:03d}-"
    k_next = 1 + max((int(p.stem.split("-")[-1]) for p in parts if p.name.startswith(prefix)), default=-1)
    return todo, k_next


def collect_timings(out: Path) -> tuple[dict[str, int], float]:
    """Sum the processes' .timing-r*.json files (and delete them): totals of samples, candidates, parts; the slowest seconds."""
    files = sorted(out.glob(".timing-r*.json"))
    timings = [read_json(p) for p in files]
    for p in files:
        p.unlink()
    tot = {k: sum(t[k] for t in timings) for k in ("samples", "candidates", "parts")}
    return tot, max((t["seconds"] for t in timings), default=0.0)


# ---------------------------------------------------------------------- statistics
def annotation_statistics(ann: pl.DataFrame, temperature: float = 1.0) -> dict[str, Any]:
    """Label statistics (automr.memory.labels.label_statistics) plus simple retrieval baselines.

    headroom shares: most_recent = always the newest memory element; oldest = the oldest one
    (random retrieval is 0 by definition, the oracle 1).
    """
    le = ann["logp_empty"].to_numpy()
    lc = [np.asarray(c, np.float64) for c in ann["logp_cand"].to_list()]
    st = L.label_statistics(le, lc, temperature).as_dict()
    g = [c - e for e, c in zip(le.tolist(), lc)]
    st["headroom_share_most_recent"] = L.headroom_share([x[-1] for x in g], g)
    st["headroom_share_oldest"] = L.headroom_share([x[0] for x in g], g)
    st["mean_answer_tokens"] = float(ann["answer_tokens"].mean())
    st["mean_prompt_tokens"] = float(ann["prompt_tokens"].mean())
    return st


def _print_stats(console: Any, s: dict[str, Any]) -> None:
    console.print(
        f"labels over {s['n_samples']:,} samples (mean |M| {s['mean_m']:.1f}): log P(y) empty slot {s['mean_logp_empty']:.2f} nats; "
        f"gain of the best element {s['best_gain']:+.3f}, of a random one {s['random_gain']:+.3f} -> headroom {s['headroom']:.3f} nats. "
        f"Peakedness (max label x M; 1 = uniform): prob_diff {s['peak_ratio_prob_diff']:.4f}, "
        f"loglik_gain@T={s['temperature']:g} {s['peak_ratio_loglik_gain']:.3f}. Headroom share of the most recent element "
        f"{s['headroom_share_most_recent']:+.3f}.",
        highlight=False,
    )


__all__ = [
    "ANNOTATION_SCHEMA",
    "annotation_statistics",
    "built_samples",
    "eligible_samples",
    "encode_sample",
    "load_annotations",
    "sample_candidates",
]
