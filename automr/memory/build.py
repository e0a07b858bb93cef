"""build-memory: compute every memory element (key z_m, value) and every sample's query z_t once.

For user u and an older interaction m (one that appears in some sample's memory_items):
  key    z_m = layer-L state at the last token of the prompt whose recent window is the K
               interactions ending at m (m is its last title) -- the query that prompt would have had
  value  the layer-L states of m's title tokens inside that prompt (the first `value_tokens`,
         float16), or the key itself as a 1-token value (value_kind="key_vector")
and, per sample, the query z_t = layer-L state at the last token of the sample's own prompt.

Why elements are placed on a reconstructed history
  A user's samples all show slices of one chronological sequence (memory + recent + target), so
  the same interaction appears in many samples. We merge the slices into one sequence per user
  and give each interaction its position `pos` there; an element is computed once per (user, pos)
  and every sample of the user shares it (the store dedupes by (user, item, time, pos)). The
  window ending at m is taken from the merged sequence, so it is complete even in a sample whose
  history cap cut it short. A window is also shared between an element and a query when they are
  the same K interactions (the query of the sample right after m equals z_m by construction).

Modes
  exact    one forward per window (what the paper defines).
  chunked  one forward per `chunk_items` consecutive interactions of the user's history; the key
           of m is the state at the end of m's line in its chunk and the value its title states
           there. About K times fewer tokens; an element early in its chunk sees less context,
           which benchmarks/bench_memory_build.py measures (cosine vs exact). Queries are always exact.

Where max_length cuts, a query's or element's window drops its oldest titles by the prompt
builder's one rule (reserve: the store's value tokens for the slot + the catalogue's longest
answer), exactly as annotation and inference cut the same window; a chunk must fit whole.

Only lower layers [0, L) run (the states are taken at L), so building costs about half a forward.

Output folder: the MemoryStore files + queries/{split}.npy (float32 [n_rows, H], aligned with
samples/{split}.parquet, NaN rows for samples whose user was not built) + queries/meta.json +
build_stats.json + config.yaml. Under torchrun each process builds the users it owns
(automr.memory.parallel) into a shard; rank 0 merges them with `merge_stores`.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.utils.io import read_json, write_json
from automr.utils.seeding import select_subset
from automr.utils.logging import info
from automr.utils.progress import rate_progress
from automr.utils.seeding import select_from

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM
    from automr.memory.store import MemoryStore

QUERIES_DIR = "queries"
BUILD_STATS = "build_stats.json"


# ---------------------------------------------------------------------- user histories
@dataclass
class UserHistory:
    """One user's interactions merged from all the samples' slices, oldest first."""

    user_id: int
    items: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)


@dataclass
class Placement:
    """Where a sample sits in its user's merged history (positions into UserHistory)."""

    split: str
    row: int
    user_id: int
    memory_start: int  # position of memory_items[0]
    n_memory: int
    n_recent: int

    @property
    def recent_start(self) -> int:
        return self.memory_start + self.n_memory


def place_samples(frames: dict[str, pl.DataFrame]) -> tuple[dict[int, UserHistory], list[Placement], int]:
    """Merge each user's sample slices (memory + recent + target) into one history.

    Slices are contiguous pieces of the user's sequence. Taken in target order, each new slice
    is aligned where its first interaction (item, time) occurs in the history built so far with
    the overlapping part agreeing, and its new tail is appended. Returns the histories, one
    Placement per sample, and the number of slices that could not be aligned (appended as if
    they continued the history; 0 for data written by `automr prepare`).

    Users are processed one at a time (the frames are sorted by user), so only one user's slices
    are ever held as Python objects. A frame may carry a `row` column (the sample's row in its
    parquet file, kept when the frame was filtered); otherwise rows are numbered from 0.
    """
    cols = ["user_id", "target_item", "target_time", "memory_items", "memory_times", "recent_items", "recent_times"]
    parts = [
        df.select(cols + ([pl.col("row").cast(pl.Int64)] if "row" in df.columns else [pl.int_range(pl.len(), dtype=pl.Int64).alias("row")]))
        .with_columns(pl.lit(split).alias("split"))
        for split, df in frames.items()
    ]
    parts = [p for p in parts if p.height]
    histories: dict[int, UserHistory] = {}
    placements: list[Placement] = []
    unaligned = 0
    if not parts:
        return histories, placements, unaligned
    allp = pl.concat(parts).sort(["user_id", "target_time"], maintain_order=True)
    users = allp["user_id"].to_numpy()
    bounds = np.flatnonzero(np.diff(users)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [len(users)]]).tolist()):
        g = allp.slice(lo, hi - lo)
        u = int(users[lo])
        entries = []
        for ti, tt, mi, mt, ri, rt, row, split in zip(*(g[c].to_list() for c in cols[1:] + ["row", "split"])):
            mi, mt, ri, rt = mi or [], mt or [], ri or [], rt or []
            if len(mi) != len(mt) or len(ri) != len(rt):
                raise UserError(
                    f"samples/{split}.parquet row {row}: memory_items/memory_times or recent_items/recent_times differ "
                    "in length; re-run `automr prepare`."
                )
            sl = list(zip(mi, mt)) + list(zip(ri, rt)) + [(ti, tt)]
            entries.append((int(tt), len(sl), split, int(row), sl, len(mi), len(ri)))
        entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        seq: list[tuple[int, int]] = []
        where: dict[tuple[int, int], list[int]] = defaultdict(list)
        for _, _, split, row, sl, n_mem, n_rec in entries:
            start = None
            for p in where.get(sl[0], ()):
                n = min(len(seq) - p, len(sl))
                if seq[p : p + n] == sl[:n]:
                    start = p
                    break
            if start is None:
                unaligned += bool(seq)
                start = len(seq)
            for q in range(len(seq) - start, len(sl)):
                where[sl[q]].append(len(seq))
                seq.append(sl[q])
            placements.append(Placement(split, row, u, start, n_mem, n_rec))
        histories[u] = UserHistory(u, [i for i, _ in seq], [t for _, t in seq])
    return histories, placements, unaligned


# ---------------------------------------------------------------------- forward jobs
@dataclass
class ElementOut:
    """An element read from a job's states: its history position, key token and value span."""

    pos: int
    key_index: int
    value_span: tuple[int, int]


@dataclass
class WindowJob:
    """One prompt to run through the lower layers and what to read from its states."""

    user_id: int
    prompt_ids: list[int]
    elements: list[ElementOut] = field(default_factory=list)
    query_rows: list[tuple[str, int]] = field(default_factory=list)  # samples whose z_t is the last state


class _Encoder:
    """PromptBuilder plus the token offsets of a title inside its line (to find line ends).

    Windows are cut by the builder's one rule (automr.llm.prompts.PromptBuilder): build it with
    the store's value length as `slot_tokens` and the catalogue as `answers`, and a query z_t or
    key z_m keeps exactly the recent titles annotation and inference keep for that window.
    """

    def __init__(self, builder: "PromptBuilder") -> None:
        self.builder = builder
        self.before = len(builder.title_ids(builder.template.item_prefix))  # item_prefix tokens, tokenized alone

    def window(self, titles: Sequence[str], keep: int | None = None) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """Prompt ids, kept title spans and the index of each kept line's last token.

        keep: how many of the newest titles must survive max_length (1 for an element's window,
        whose last title is the element; 0 for a query); None: all of them (a chunk's elements).
        """
        enc = self.builder.encode(list(titles))
        kept = len(titles) - enc.n_truncated
        if kept < (len(titles) if keep is None else keep):
            what = "a chunk" if keep is None else "an element's window"
            raise UserError(
                f"{what} of {len(titles)} titles does not fit max_length={self.builder.max_length} "
                f"({enc.n_truncated} oldest titles would be dropped, leaving {kept}); lower `window`/`chunk_items`, "
                "use fewer value tokens or raise max_length."
            )
        spans = list(enc.title_spans)
        ends = [spans[j + 1][0] - self.before - 1 for j in range(len(spans) - 1)]
        if spans:
            ends.append(len(enc.prefix_ids) - 1)
        return list(enc.prefix_ids), spans, ends


def group_placements(placements: Sequence[Placement]) -> dict[int, list[Placement]]:
    by_user: dict[int, list[Placement]] = defaultdict(list)
    for p in placements:
        by_user[p.user_id].append(p)
    return by_user


def element_positions(samples: Sequence[Placement]) -> list[int]:
    """History positions of one user's memory elements: the distinct positions in any sample's memory."""
    return sorted({p for s in samples for p in range(s.memory_start, s.memory_start + s.n_memory)})


def iter_jobs(
    users: Sequence[int],
    histories: dict[int, UserHistory],
    by_user: dict[int, list[Placement]],
    titles: dict[int, str],
    encoder: _Encoder,
    counts: dict[str, int],
    *,
    window: int,
    mode: str,
    chunk_items: int,
    queries: bool,
) -> Iterator[WindowJob]:
    """Every forward pass needed for `users`, user by user in position order (lazily: prompts of
    one user at a time are held). Adds to `counts` as it goes.

    Elements are the distinct (user, pos) in any sample's memory. In exact mode the element
    and query windows are deduplicated together by (user, first pos, last pos).
    """
    for key in ("elements", "element_windows", "query_windows", "queries", "shared_windows"):
        counts.setdefault(key, 0)
    for u in users:
        hist = histories[u]
        samples = by_user.get(u, [])
        needed = element_positions(samples)
        counts["elements"] += len(needed)
        windows: dict[tuple[int, int], WindowJob] = {}
        if mode == "exact":
            for p in needed:
                start = max(0, p - window + 1)
                ids, spans, ends = encoder.window([titles[i] for i in hist.items[start : p + 1]], keep=1)
                windows[(start, p)] = WindowJob(u, ids, [ElementOut(p, ends[-1], spans[-1])])
            counts["element_windows"] += len(needed)
        else:
            chunks = sorted({p // chunk_items for p in needed})
            need = set(needed)
            for c in chunks:
                lo, hi = c * chunk_items, min((c + 1) * chunk_items, len(hist.items))
                ids, spans, ends = encoder.window([titles[i] for i in hist.items[lo:hi]])
                # chunks are never shared with query windows (those must be exact)
                yield WindowJob(u, ids, [ElementOut(p, ends[p - lo], spans[p - lo]) for p in range(lo, hi) if p in need])
            counts["element_windows"] += len(chunks)
        if queries:
            for s in samples:
                key = (s.recent_start, s.recent_start + s.n_recent - 1)
                job = windows.get(key)
                if job is None:
                    ids, _, _ = encoder.window([titles[i] for i in hist.items[key[0] : key[1] + 1]], keep=0)
                    job = windows[key] = WindowJob(u, ids)
                job.query_rows.append((s.split, s.row))
                counts["queries"] += 1
        counts["query_windows"] += sum(1 for j in windows.values() if j.query_rows and not j.elements)
        counts["shared_windows"] += sum(1 for j in windows.values() if j.query_rows and j.elements)
        # exact: element and query windows in position order; chunked: query windows after the chunks
        for _, job in sorted(windows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            yield job


def plan_jobs(
    users: Sequence[int],
    histories: dict[int, UserHistory],
    placements: Sequence[Placement],
    titles: dict[int, str],
    encoder: _Encoder,
    **kw: Any,
) -> tuple[list[WindowJob], dict[str, int]]:
    """`iter_jobs` as a list plus the final counts (small inputs; used by the on-the-fly memory)."""
    counts: dict[str, int] = {}
    jobs = list(iter_jobs(users, histories, group_placements(placements), titles, encoder, counts, **kw))
    return jobs, counts


def _batches(jobs: Iterable[WindowJob], batch_size: int) -> Iterator[list[WindowJob]]:
    batch: list[WindowJob] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------- the stage
def _titles_or_error(data: PreparedData, frames: dict[str, pl.DataFrame]) -> dict[int, str]:
    titles = data.titles()
    used: set[int] = set()
    for df in frames.values():
        for c in ("memory_items", "recent_items"):
            used.update(df[c].explode().drop_nulls().to_list())
    missing = sorted(used - set(titles))
    if missing:
        raise UserError(
            f"{len(missing)} item id(s) in the samples have no title in {data.root}/items.parquet "
            f"(e.g. {', '.join(map(str, missing[:10]))}); re-run `automr prepare` so samples and items match."
        )
    return titles


def check_memory_nonempty(frames: dict[str, pl.DataFrame], samples: str | Path) -> None:
    """Refuse to build a store that would hold no element: every selected sample's memory is empty.

    That happens when the prepare settings leave no interaction older than the recent window
    (e.g. recent_k at or above every history's length); a zero-element store would only move
    the failure to annotate or evaluate, far from its cause.
    """
    n = sum(df.height for df in frames.values())
    if any(df.height and int(df["memory_items"].list.len().max() or 0) > 0 for df in frames.values()):
        return
    raise UserError(
        f"nothing to put in the memory store: all {n:,} selected samples of split(s) {', '.join(frames)} in {samples} have "
        "an empty memory_items (no interaction older than the recent window), so the store would hold zero elements. "
        "Re-run `automr prepare` with a smaller --recent-k or longer histories (--max-history, --history-before-window, a "
        "wider window); `automr prepare` reports the memory length per split."
    )


def infer_window(frames: dict[str, pl.DataFrame]) -> int:
    """K = the longest recent_items list in the samples (the protocol's recent window)."""
    k = 0
    for df in frames.values():
        if df.height:
            k = max(k, int(df["recent_items"].list.len().max() or 0))
    if k == 0:
        raise UserError("no sample has recent items, so the window size K cannot be inferred; pass `window`.")
    return k


def sample_subset(df: pl.DataFrame, max_samples: int | None, seed: int) -> pl.DataFrame:
    """The split's samples with their row index ("row"), cut to the seeded subset `automr evaluate` would score.

    Using the evaluator's own subset function keeps `build-memory --max-samples N` and
    `evaluate --n-eval N` (same seed) on exactly the same rows.
    """
    indexed = df.with_row_index("row")
    if max_samples is None:
        return indexed
    return indexed[select_subset(df.height, max_samples, seed).tolist()]


def _select_users(frames: dict[str, pl.DataFrame], max_users: int | None, seed: int) -> list[int]:
    """The users to build for: all of them, or the seeded subset of max_users (select_subset's draw)."""
    users = sorted({int(u) for df in frames.values() for u in df["user_id"].unique().to_list()})
    return select_from(np.asarray(users, dtype=np.int64), max_users, seed).tolist()


def compute_jobs(
    split_lm: "SplitLM",
    jobs: Iterable[WindowJob],
    *,
    total_elements: int | None = None,
    batch_size: int,
    value_tokens: int,
    value_kind: str,
    on_batch: Any,
    progress: bool = False,
    description: str = "build-memory",
) -> dict[str, float]:
    """Run `jobs` (any iterable, consumed lazily) in batches; call on_batch(elements, queries) after each.

    elements: list of (user, pos, key [H] float32, value [S, H]); queries: list of ((split, row), z_t [H]).
    total_elements sizes the progress bar. Returns token and timing counts.
    """
    total_el = total_elements
    if total_el is None and isinstance(jobs, Sequence):
        total_el = sum(len(j.elements) for j in jobs)
    tokens, n_prompts, t0 = 0, 0, time.perf_counter()
    with rate_progress("elements", fields=("tps",), disable=not progress) as bar:
        task = bar.add_task(description, total=total_el, tps="")
        for batch in _batches(jobs, batch_size):
            h, lens = split_lm.hidden_states([j.prompt_ids for j in batch])  # (B, T, H) right-padded
            h = h.float().cpu()  # one device->host copy per batch
            els, qs = [], []
            n_prompts += len(batch)
            for b, job in enumerate(batch):
                tokens += lens[b]
                for e in job.elements:
                    key = h[b, e.key_index]
                    s0, s1 = e.value_span
                    if value_kind == "key_vector" or s1 <= s0:
                        val = key[None]
                    else:
                        val = h[b, s0 : min(s1, s0 + value_tokens)]
                    els.append((job.user_id, e.pos, key.numpy(), val.numpy()))
                if job.query_rows:
                    z = h[b, lens[b] - 1].numpy()
                    qs.extend((r, z) for r in job.query_rows)
            on_batch(els, qs)
            el = time.perf_counter() - t0
            bar.update(task, advance=sum(len(j.elements) for j in batch), tps=f"{tokens / max(el, 1e-9):,.0f} tok/s")
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "prompts": n_prompts}


def append_elements(store: "MemoryStore", histories: dict[int, UserHistory], els: list) -> None:
    """Append computed elements (user, position, key [H], value [S,H]) to `store`, items and times from the history."""
    if not els:
        return
    hist = [histories[u] for u, _, _, _ in els]
    store.append(
        [u for u, _, _, _ in els], [h.items[p] for h, (_, p, _, _) in zip(hist, els)],
        [h.times[p] for h, (_, p, _, _) in zip(hist, els)], np.stack([k for _, _, k, _ in els]),
        [v for _, _, _, v in els], positions=[p for _, p, _, _ in els],
    )


def history_elements(
    split_lm: "SplitLM",
    builder: "PromptBuilder",
    titles: dict[int, str],
    history: UserHistory,
    positions: Sequence[int],
    *,
    window: int,
    value_tokens: int,
    value_kind: str,
    batch_size: int = 16,
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """The elements (user, pos, key [H], value [S, H]) at `positions` of one history, computed exactly
    as build-memory's exact mode computes them (the same windows, prompts and states).

    Serving calls it when an interaction leaves a user's recent window, and the API for a history
    that no store holds; `append_elements(store, {user: history}, elements)` stores them. `builder`
    must be the recommender's (the store's value length as slot reserve), as in the on-the-fly memory.
    """
    if not positions:
        return []
    placements = [Placement("serve", 0, history.user_id, int(p), 1, 0) for p in positions]
    jobs, _ = plan_jobs(
        [history.user_id], {history.user_id: history}, placements, titles, _Encoder(builder),
        window=window, mode="exact", chunk_items=window, queries=False,
    )
    out: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    compute_jobs(
        split_lm, jobs, batch_size=batch_size, value_tokens=value_tokens, value_kind=value_kind,
        on_batch=lambda els, qs: out.extend(els),
    )
    return out


# ---------------------------------------------------------------------- the stage's steps: plan, build, save, merge
@dataclass
class BuildPlan:
    """What this process builds (build-memory's plan step): its users' merged histories and placements."""

    rows: dict[str, int]  # samples per split in the parquet files: the query arrays have this many rows
    titles: dict[int, str]
    window: int  # K, titles in the window ending at an element
    chunk_items: int  # interactions per chunk in chunked mode
    users: list[int]  # every selected user
    mine: list[int]  # the users this process builds
    histories: dict[int, UserHistory]  # of `mine`
    by_user: dict[int, list[Placement]]
    unaligned: int  # sample slices that could not be aligned to their user's history
    n_elements: int  # elements this process computes (sizes the progress bar)


def plan_build(
    data: PreparedData,
    caps: dict[str, int | None],
    *,
    seed: int,
    max_users: int | None,
    window: int | None,
    chunk_items: int | None,
    owns: Callable[[list[int]], np.ndarray],
) -> BuildPlan:
    """Select the samples (`caps`: split -> sample cap) and users, and place this process's samples.

    owns(users) -> bool mask of the users this process builds (Workers.owns). window and
    chunk_items default to the longest recent window in the samples.
    """
    full = {s: data.split(s) for s in caps}
    frames = {s: sample_subset(df, caps[s], seed) for s, df in full.items()}
    check_memory_nonempty(frames, data.root)
    titles = _titles_or_error(data, frames)
    window = window or infer_window(frames)
    users = _select_users(frames, max_users, seed)
    mine = [u for u, own in zip(users, owns(users)) if own]
    histories, placements, unaligned = place_samples({s: df.filter(pl.col("user_id").is_in(mine)) for s, df in frames.items()})
    by_user = group_placements(placements)
    n_elements = sum(len(element_positions(by_user.get(u, []))) for u in mine)
    rows = {s: df.height for s, df in full.items()}
    return BuildPlan(rows, titles, window, chunk_items or window, users, mine, histories, by_user, unaligned, n_elements)


def build_store(
    folder: Path,
    split_lm: SplitLM,
    jobs: Iterable[WindowJob],
    plan: BuildPlan,
    *,
    value_tokens: int,
    value_dtype: str,
    value_kind: str,
    mode: str,
    extra: dict[str, Any],
    queries: bool,
    batch_size: int,
    progress: bool,
    description: str,
) -> tuple[MemoryStore, dict[str, np.ndarray], dict[str, float]]:
    """Compute `jobs` into a new store at `folder` and fill the query arrays; returns (store, {split: queries [rows, H]}, timing).

    value_tokens, value_dtype, value_kind, mode and extra are the store's settings (MemoryStore.create).
    """
    from automr.memory.store import MemoryStore

    H = split_lm.hidden_size
    store = MemoryStore.create(
        folder, H, value_tokens, value_dtype, layer=split_lm.split_layer, model_name=split_lm.lm.name,
        mode=mode, value_kind=value_kind, extra=extra, durable=False,
    )
    qarr = {s: np.full((n, H), np.nan, np.float32) for s, n in plan.rows.items()} if queries else {}

    def on_batch(els: list, qs: list) -> None:
        append_elements(store, plan.histories, els)
        for (s, r), z in qs:
            qarr[s][r] = z

    timing = compute_jobs(
        split_lm, jobs, total_elements=plan.n_elements, batch_size=batch_size, value_tokens=value_tokens,
        value_kind=value_kind, on_batch=on_batch, progress=progress, description=description,
    )
    return store, qarr, timing


def save_queries(folder: Path, qarr: dict[str, np.ndarray], *, hidden_size: int, layer: int, model: str, samples: Path) -> None:
    """Write queries/{split}.npy and queries/meta.json (nothing when no queries were built)."""
    if not qarr:
        return
    qd = folder / QUERIES_DIR
    qd.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"hidden_size": hidden_size, "layer": layer, "model": model, "samples": str(samples), "splits": {}}
    for s, a in qarr.items():
        np.save(qd / f"{s}.npy", a)
        meta["splits"][s] = {"rows": int(a.shape[0]), "built": int((~np.isnan(a[:, 0])).sum()) if len(a) else 0}
    write_json(qd / "meta.json", meta)


def save_shard_outputs(wdir: Path, tag: str, qarr: dict[str, np.ndarray], counts: dict[str, int], timing: dict[str, float]) -> None:
    """Beside this process's shard store: its built query rows per split and its counts, for the merge."""
    for s, a in qarr.items():
        rows = np.flatnonzero(~np.isnan(a[:, 0])) if len(a) else np.zeros(0, np.int64)
        np.savez(wdir / f"queries-{tag}-{s}.npz", rows=rows, states=a[rows])
    write_json(wdir / f"stats-{tag}.json", {"counts": counts, "timing": timing})


def merge_shards(
    wdir: Path, folder: Path, rows: dict[str, int], hidden_size: int
) -> tuple[MemoryStore, dict[str, np.ndarray], list[dict[str, Any]]]:
    """Merge every process's shard in `wdir` into a store at `folder`; returns (store, {split: queries}, per-process stats).

    rows: samples per split whose queries to merge ({} when no queries were built).
    """
    from automr.memory.store import merge_stores

    shards = sorted(wdir.glob("store-r*"))
    parts = [read_json(p) for p in sorted(wdir.glob("stats-r*.json"))]
    merged = merge_stores(shards, folder, overwrite=True, durable=False)
    qall = {}
    for s, n in rows.items():
        a = np.full((n, hidden_size), np.nan, np.float32)
        for f in sorted(wdir.glob(f"queries-r*-{s}.npz")):
            z = np.load(f)
            a[z["rows"]] = z["states"]
        qall[s] = a
    return merged, qall, parts


def _summarize(store: Any, counts: list[dict], timings: list[dict]) -> dict[str, Any]:
    c = {k: sum(int(x[k]) for x in counts) for k in counts[0]}
    tokens = sum(t["tokens"] for t in timings)
    seconds = max(t["seconds"] for t in timings) if timings else 0.0
    return {
        **c,
        "stored_elements": len(store),
        "prompts": sum(int(t["prompts"]) for t in timings),
        "tokens": int(tokens),
        "seconds": round(seconds, 3),
        "elements_per_s": c["elements"] / seconds if seconds > 0 else math.inf,
        "tokens_per_s": tokens / seconds if seconds > 0 else math.inf,
        "value_tokens_mean": store.n_tokens / len(store) if len(store) else 0.0,
        "bytes_per_element": store.bytes_per_element,
        "total_bytes": store.total_bytes,
    }


def _print_stats(stats: dict[str, Any], out: Path) -> None:
    info(
        f"build-memory ({stats['mode']}, {stats['value_kind']}, layer {stats['layer']}, K={stats['window']}): "
        f"{stats['elements']:,} elements of {stats['users']:,} users, {stats['queries']:,} queries, "
        f"{stats['prompts']:,} prompts, {stats['tokens']:,} tokens in {stats['seconds']:.1f} s on {stats['processes']} process(es) "
        f"-> {stats['elements_per_s']:,.1f} elements/s, {stats['tokens_per_s']:,.0f} tokens/s; "
        f"{stats['bytes_per_element'] / 1024:.1f} KiB per element, {stats['total_bytes'] / 2**20:.1f} MiB in all -> {out}"
    )


# ---------------------------------------------------------------------- readers for later stages
def load_queries(folder: str | Path, split: str) -> np.ndarray:
    """Query states z_t of a split, float32 [n_rows, H] aligned with samples/{split}.parquet (memory-mapped).

    `folder` is a build-memory output (its queries/ is used) or a queries folder itself.
    """
    folder = Path(folder)
    qd = folder / QUERIES_DIR if (folder / QUERIES_DIR).is_dir() else folder
    f = qd / f"{split}.npy"
    if not f.is_file():
        raise UserError(
            f"no query states for split {split!r} at {f}. Build them with `automr build-memory` (queries: true, "
            f"splits including {split}), or point `queries` at the right folder."
        )
    return np.load(f, mmap_mode="r")


def read_build_stats(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / BUILD_STATS).read_text())


__all__ = [
    "Placement",
    "UserHistory",
    "WindowJob",
    "infer_window",
    "load_queries",
    "place_samples",
    "element_positions",
    "iter_jobs",
    "plan_jobs",
]


