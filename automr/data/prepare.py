"""The streaming engine of `automr prepare` (settings and protocol: automr/data/protocol.py).

Memory stays flat as the input grows because nothing here holds all interactions at once:

  pass 1  read the input once, in batches (pyarrow's streaming CSV reader / Parquet batches),
          count it, and append usable rows to B bucket files. A bucket is a contiguous range
          of a stable hash of user_id, so it holds whole users and the buckets in order list
          users in hash order whatever B is. B = estimated rows / `bucket_rows`.
  pass 2  per bucket: drop exact duplicate rows (a bucket holds whole users, so this is global),
          count what lies outside the window and the items' interactions in scope (the item
          filter needs global counts).
  pass 3  per bucket: order, filter, cap, then build samples for groups of users holding about
          `chunk_elements` list elements, appending to one Parquet writer per split.
(Optional pre-passes over the buckets choose the `max_users` subsample and the quantile split
times.) What is kept across buckets is O(users + items): counters, item ids, item counts.
Bucket files live in OUT's temporary folder and are deleted as they are consumed.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from automr.data import samples as S
from automr.data.common import (
    INTERACTION_COLUMNS,
    ROW_HASH,
    WRONG_FIELDS,
    CommonFiles,
    DirtyValues,
    MalformedRows,
    estimate_rows,
    is_well_formed,
    iter_raw_batches,
    open_common,
    read_catalogue,
    time_unit_error,
)
from automr.data.protocol import (
    PrepareConfig,
    Window,
    available_presets,
    iso,
    quantile_boundaries,
    resolve_data,
    resolve_prepare,
    resolve_window,
)
from automr.data.schema import SAMPLE_COLUMNS, SPLITS
from automr.data.tally import Distinct, Tally, repeated_targets
from automr.errors import UserError

# --------------------------------------------------------------------------- hashing

_GOLDEN = 0x9E3779B97F4A7C15
BUCKET_SEED = 0x5EED  # fixed: the bucket layout and output row order never depend on the user's seed


def stable_hash(expr: pl.Expr, seed: int) -> pl.Expr:
    """splitmix64 of an int64 column as uint64: identical on every polars version (Expr.hash is not)."""

    def lit(v: int) -> pl.Expr:
        return pl.lit(v % 2**64, dtype=pl.UInt64)

    x = expr.cast(pl.Int64).reinterpret(signed=False) + lit((seed + 1) * _GOLDEN)
    x = x.xor(x // lit(2**30)) * lit(0xBF58476D1CE4E5B9)
    x = x.xor(x // lit(2**27)) * lit(0x94D049BB133111EB)
    return x.xor(x // lit(2**31))


def bucket_of(h: pl.Expr, n_buckets: int) -> pl.Expr:
    """floor(h * n / 2^64) without overflow: contiguous hash ranges, numbered in hash order."""
    return ((h // 2**32) * n_buckets // 2**32).cast(pl.Int64)


# --------------------------------------------------------------------------- counting


# --------------------------------------------------------------------------- passes


class _Buckets:
    """B append-only Arrow IPC files (lz4); cheap small appends, read back whole per bucket."""

    def __init__(self, folder: Path, n: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"bucket-{b:05d}.arrows" for b in range(n)]
        self.writers: dict[int, Any] = {}

    def append(self, b: int, df: pl.DataFrame) -> None:
        table = df.to_arrow()
        if b not in self.writers:
            self.writers[b] = _ipc_writer(self.paths[b], table.schema)
        self.writers[b].write_table(table)

    def close(self) -> list[Path]:
        for w in self.writers.values():
            w.close()
        return [p for p in self.paths if p.is_file()]


def _ipc_writer(path: Path, schema: Any) -> Any:
    import pyarrow as pa

    return pa.ipc.new_stream(str(path), schema, options=pa.ipc.IpcWriteOptions(compression="lz4"))


def bucket_pass(files: CommonFiles, titled: pl.Series, n_buckets: int, work: Path, tally: Tally, progress: Any) -> list[Path]:
    """Pass 1: read the input once, count it, and append well-formed rows (flagged titled) to buckets.

    Clean files take pyarrow's fast integer parser; a file with a non-integer value is read again
    value by value as text (see iter_raw_batches), so its bad rows are counted, not fatal.
    """
    try:
        return _bucket_pass(files, titled, n_buckets, work, tally, progress, typed=True)
    except DirtyValues:
        shutil.rmtree(work, ignore_errors=True)
        for name in ("rows", "well_formed"):
            setattr(tally, name, 0)
        tally.items_read, tally.malformed, tally.t_min, tally.t_max = Distinct(), MalformedRows(), None, None
        return _bucket_pass(files, titled, n_buckets, work, tally, progress, typed=False)


def _bucket_pass(
    files: CommonFiles, titled: pl.Series, n_buckets: int, work: Path, tally: Tally, progress: Any, *, typed: bool
) -> list[Path]:
    buckets = _Buckets(work, n_buckets)
    titled_list = titled.implode()
    task = progress.add_task(f"reading {files.interactions.name}", total=None, unit="rows")
    try:
        for batch in iter_raw_batches(files, malformed=tally.malformed, typed=typed, row_hash=True):
            tally.rows += batch.height
            ok = batch.filter(is_well_formed())
            tally.well_formed += ok.height
            if ok.is_empty():
                continue
            tally.items_read.add(ok["item_id"])
            ok = ok.with_columns(pl.col("item_id").is_in(titled_list).alias("titled"))
            times = ok.filter("titled")["timestamp"]
            if times.len():
                lo, hi = int(times.min()), int(times.max())  # type: ignore[arg-type]
                tally.t_min = lo if tally.t_min is None else min(tally.t_min, lo)
                tally.t_max = hi if tally.t_max is None else max(tally.t_max, hi)
            ok = ok.with_columns(bucket_of(stable_hash(pl.col("user_id"), BUCKET_SEED), n_buckets).alias("bucket"))
            for (b,), part in ok.partition_by("bucket", as_dict=True, include_key=False).items():
                buckets.append(int(b), part)  # type: ignore[arg-type]
            progress.advance(task, batch.height)
    finally:
        paths = buckets.close()
        progress.remove_task(task)
    tally.rows += tally.malformed.counts[WRONG_FIELDS]
    return paths


def in_scope(window: Window) -> pl.Expr:
    t = pl.col("timestamp")
    return (t < window.end) & (t >= window.scope_from) if window.scope_from is not None else t < window.end


def scope_pass(paths: list[Path], window: Window, tally: Tally, progress: Any) -> pl.DataFrame:
    """Pass 2: per bucket, count users, titled rows, rows outside the window, and item counts in scope."""
    counts: list[pl.DataFrame] = []
    for path in progress.track(paths, description="counting items in the window"):
        df = drop_exact_duplicates(path, tally)
        tally.users_read += df["user_id"].n_unique()
        df = df.filter("titled").drop("titled")
        tally.steps["item has no title"].add(df)
        if window.scope_from is not None:
            tally.before_window += int((df["timestamp"] < window.scope_from).sum())
        tally.after_window += int((df["timestamp"] >= window.end).sum())
        scoped = df.filter(in_scope(window))
        tally.steps["outside the window"].add(scoped)
        counts.append(scoped.group_by("item_id").len())
        if len(counts) >= 32:
            counts = [pl.concat(counts).group_by("item_id").agg(pl.col("len").sum())]
    if not counts:
        return pl.DataFrame(schema={"item_id": pl.Int64, "len": pl.UInt32})
    return pl.concat(counts).group_by("item_id").agg(pl.col("len").sum())


def drop_exact_duplicates(path: Path, tally: Tally) -> pl.DataFrame:
    """A bucket without exact duplicates (rewritten in place if it had any), counted in `tally`.

    Exact means equal in every column of the file (ROW_HASH stands for the columns beyond the
    four). A bucket holds whole users, so this finds every duplicate of its users. Rows that
    share user, item and timestamp but differ elsewhere are kept and only counted.
    """
    df = pl.read_ipc_stream(path)
    unique = df.unique(subset=[c for c in (*INTERACTION_COLUMNS, ROW_HASH) if c in df.columns], keep="any")
    if unique.height < df.height:
        tally.exact_duplicates += df.height - unique.height
        table = unique.to_arrow()
        writer = _ipc_writer(path, table.schema)
        writer.write_table(table)
        writer.close()
    tally.repeated_user_item_time += unique.height - unique.select(pl.struct("user_id", "item_id", "timestamp").n_unique()).item()
    return unique.drop(ROW_HASH, strict=False)


def read_bucket(path: Path, window: Window) -> pl.DataFrame:
    """A bucket's titled rows in scope, with the user hash `h` that orders users."""
    df = pl.read_ipc_stream(path).filter(pl.col("titled") & in_scope(window)).drop("titled", ROW_HASH, strict=False)
    return df.with_columns(stable_hash(pl.col("user_id"), BUCKET_SEED).alias("h"))


def filtered_bucket(
    path: Path, cfg: PrepareConfig, window: Window, kept_items: pl.Series, keep_hash_upto: int | None, tally: Tally | None
) -> pl.DataFrame:
    """One bucket through scope, ordering and the filters (item, sequence, subsample, cap)."""
    df = read_bucket(path, window)
    if tally is not None:
        tally.out_of_order += S.count_out_of_order(df)
    df = S.order_sequences(df, user_order=("h",))
    df = S.filter_items(df, kept_items)
    _count(tally, "item filter", df)
    df = S.filter_short(df, int(cfg.min_sequence_length or 0))
    _count(tally, "sequence filter", df)
    if cfg.max_users:
        if keep_hash_upto is not None:
            df = df.filter(stable_hash(pl.col("user_id"), int(cfg.seed or 0)) <= keep_hash_upto)
        _count(tally, "max_users", df)
    df = S.cap_history(df, int(cfg.max_history or 0))
    _count(tally, "history cap", df)
    return df


def _count(tally: Tally | None, step: str, df: pl.DataFrame) -> None:
    if tally is not None:
        tally.steps[step].add(df)


def user_chunks(df: pl.DataFrame, budget: int) -> list[pl.DataFrame]:
    """Split an ordered bucket into groups of whole users whose samples hold ~`budget` list elements."""
    # A user with n interactions gives <= n samples whose four lists hold about 2 n^2 elements.
    sizes = df.group_by("user_id", maintain_order=True).len()
    sizes = sizes.with_columns(((2 * pl.col("len").cast(pl.Int64) ** 2).cum_sum() // budget).alias("chunk"))
    if sizes.is_empty() or sizes["chunk"].max() == 0:
        return [df]
    tagged = df.join(sizes.select("user_id", "chunk"), on="user_id", how="left", maintain_order="left")
    return tagged.partition_by("chunk", maintain_order=True, include_key=False)


class SplitWriters:
    """One Parquet writer per split, fed in row groups of ~`max_bytes` (memory-bounded, not row-bounded)."""

    def __init__(self, folder: Path, max_bytes: int = 16 << 20) -> None:
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        self.columns = list(SAMPLE_COLUMNS)
        schema = S.empty_samples().select(self.columns).to_arrow().schema
        self.writers = {s: pq.ParquetWriter(folder / f"{s}.parquet", schema, compression="zstd") for s in SPLITS}
        self.buffers: dict[str, list[pl.DataFrame]] = {s: [] for s in SPLITS}
        self.buffered = {s: 0 for s in SPLITS}
        self.max_bytes = max_bytes

    def add(self, split: str, df: pl.DataFrame) -> None:
        part = df.select(self.columns)
        self.buffers[split].append(part)
        self.buffered[split] += part.estimated_size()
        if self.buffered[split] >= self.max_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if self.buffers[split]:
            self.writers[split].write_table(pl.concat(self.buffers[split]).to_arrow())
        self.buffers[split], self.buffered[split] = [], 0

    def close(self) -> None:
        for split, writer in self.writers.items():
            self._flush(split)
            writer.close()


def emit(chunk: pl.DataFrame, spec: S.SampleSpec, window: Window, writers: SplitWriters, tally: Tally) -> None:
    """Build one chunk's samples, split them by target time, write and count them."""
    samples = S.build_samples(chunk, spec)
    _count_skipped_targets(chunk, spec, samples.height, tally)
    if samples.is_empty():
        return
    assert window.valid_start is not None and window.test_start is not None
    tally.steps["user has no sample"].add(chunk.filter(pl.col("user_id").is_in(samples["user_id"].unique().implode())))
    samples = samples.with_columns(S.split_of(window.valid_start, window.test_start).alias("split"))
    for (split,), part in samples.partition_by("split", as_dict=True, include_key=False).items():
        name = str(split)
        writers.add(name, part)
        tally.samples[name] += part.height
        tally.split_users[name] += part["user_id"].n_unique()
        tally.repeats[name] += repeated_targets(part)
        hist = tally.memory_hist[name]
        for length, count in part.group_by("memory_len").len().iter_rows():
            hist[int(length)] = hist.get(int(length), 0) + int(count)
        _count_ties(part, tally.ties[name])


def _count_skipped_targets(chunk: pl.DataFrame, spec: S.SampleSpec, n_samples: int, tally: Tally) -> None:
    """Targets without a sample: too few earlier interactions in order, or (strict) in time."""

    def n_targets(name: str, **change: Any) -> pl.Expr:
        return S.target_mask(dataclasses.replace(spec, **change)).sum().alias(name)

    n_any, n_pos = S.with_positions(chunk).select(n_targets("any", min_recent=0, ties="pos"), n_targets("pos", ties="pos")).row(0)
    tally.targets_without_history += int(n_any) - int(n_pos)
    tally.targets_without_strict_history += int(n_pos) - n_samples


def _count_ties(part: pl.DataFrame, counts: dict[str, int]) -> None:
    """Per split: samples whose last recent item has the target's time, and whose target shares its time
    with an interaction stored before it (under ties=pos the same samples; under strict those whose ties
    were left out)."""
    last_tied = (pl.col("recent_times").list.last() == pl.col("target_time")).fill_null(False).sum()
    n_last, n_tied = part.select(last_tied, (pl.col("tied_before") > 0).sum().alias("t")).row(0)
    counts["last_recent_tied"] += int(n_last)
    counts["target_time_shared"] += int(n_tied)


# --------------------------------------------------------------------------- the stage


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the protocol on `cfg.data` and write `cfg.out` atomically; returns the stats (stats.json)."""
    from automr.config import save_config
    from automr.data.prepare_report import build_stats, print_summary
    from automr.data.titles import dedupe_titles
    from automr.utils.io import atomic_dir, write_json
    from automr.utils.logging import get_console
    from automr.utils.progress import rate_progress

    t0 = time.perf_counter()
    console = get_console(stderr=True)
    cfg, sources = resolve_prepare(cfg)
    if cfg.preset is None and Path(cfg.data).name in available_presets():
        console.print(f"[yellow]note:[/yellow] no preset given, so the paper's protocol applies; `--preset {Path(cfg.data).name}` exists for this data.")
    files = open_common(resolve_data(cfg.data))
    cat = read_catalogue(files)
    tally = Tally()
    progress = rate_progress("files", console=console, transient=True)
    n_buckets = min(MAX_BUCKETS, max(1, -(-estimate_rows(files) // cfg.bucket_rows)))
    _allow_open_files(n_buckets + 64)

    with atomic_dir(Path(cfg.out)) as tmp, progress:
        work = tmp / "_work"
        buckets = bucket_pass(files, cat.items["item_id"], n_buckets, work, tally, progress)
        _check_read(files, cat, tally)
        assert tally.t_min is not None and tally.t_max is not None
        window = resolve_window(cfg, tally.t_min, tally.t_max)
        item_counts = scope_pass(buckets, window, tally, progress)
        if tally.steps["outside the window"].interactions == 0:
            raise UserError(
                f"no interactions in the window {iso(window.start)} .. {iso(window.end)} (end exclusive): the data spans "
                f"{iso(tally.t_min)} .. {iso(tally.t_max)}. Choose a window inside it (--window-start/--window-end, "
                f"--window-last-months) or a preset (--preset NAME; available: {', '.join(available_presets())})."
            )
        kept_items = item_counts.filter(pl.col("len") >= max(int(cfg.min_item_interactions or 0), 1))["item_id"]
        spec = S.SampleSpec(
            recent_k=int(cfg.recent_k or 10),
            min_recent=int(cfg.min_recent if cfg.min_recent is not None else 1),
            last_only=cfg.targets == "last",
            target_from=window.start,
            target_until=window.end,
            ties=cfg.ties or "pos",
        )
        keep_upto = _choose_users(buckets, cfg, window, kept_items, spec, tally, progress) if cfg.max_users else None
        if cfg.split_by == "quantile":
            _quantile_split(buckets, cfg, window, kept_items, keep_upto, spec, tally, progress)

        writers = SplitWriters(tmp / "samples")
        try:
            for path in progress.track(buckets, description="building samples"):
                df = filtered_bucket(path, cfg, window, kept_items, keep_upto, tally)
                for chunk in user_chunks(df, cfg.chunk_elements):
                    emit(chunk, spec, window, writers, tally)
                path.unlink()  # free the disk as we go
        finally:
            writers.close()
        if any(n == 0 for n in tally.samples.values()):
            raise UserError(_empty_message(tally, cfg, window))

        # The catalogue: items that occur in some sample, titles made unique among them.
        used = tally.steps["user has no sample"].items.series()
        items, renamed = dedupe_titles(cat.items.filter(pl.col("item_id").is_in(used.implode())))
        items.select(pl.col("item_id").cast(pl.Int64), pl.col("title").cast(pl.Utf8)).write_parquet(tmp / "items.parquet")
        shutil.rmtree(work, ignore_errors=True)
        stats = build_stats(cfg, sources, files, cat, window, tally, items.height, renamed, time.perf_counter() - t0, n_buckets)
        write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp)
    print_summary(console, stats)
    return stats


MAX_BUCKETS = 4096  # one open file each during pass 1; beyond ~400M rows buckets grow instead


def _allow_open_files(n: int) -> None:
    """Pass 1 keeps one file open per bucket: raise the soft limit (often 1024) towards the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def _check_read(files: CommonFiles, cat: Any, tally: Tally) -> None:
    """Stop after pass 1 on input nothing can come of: timestamps in the wrong unit, no usable row, no title."""
    from automr.data.prepare_report import describe_malformed

    m = tally.malformed
    unit = time_unit_error(files.interactions, m.integer_rows, m.large_times, m.large_example)
    if unit is not None:
        raise unit
    if tally.well_formed == 0:
        raise UserError(
            f"{files.interactions}: none of its {tally.rows} rows has integer user_id, item_id, timestamp and pos "
            f"with the timestamp in unix seconds: {describe_malformed(tally.malformed.as_stats())}."
        )
    if tally.t_min is None:
        raise UserError(
            f"no interaction's item has a title: {len(tally.items_read)} items are referenced but none is in {files.items} "
            f"with a non-empty title ({cat.items.height} titled items there). Check that the two files belong together."
        )


def _choose_users(
    buckets: list[Path], cfg: PrepareConfig, window: Window, kept_items: pl.Series, spec: S.SampleSpec, tally: Tally, progress: Any
) -> int | None:
    """The hash threshold that keeps `max_users` of the users that will have a sample (seeded, exact).

    Drawing among users with a sample (not all users passing the filters, some of whom have no
    target in the window) makes `max_users: N` give N users. The users and items the draw starts
    from go to `tally.max_users`, so the report can say how much it shrinks the catalogue.
    """
    hashes, items = [], Distinct()
    for path in progress.track(buckets, description="choosing users"):
        seq = S.with_positions(filtered_bucket(path, cfg, window, kept_items, None, None))
        users = seq.filter(S.target_mask(spec))["user_id"].unique()
        items.add(seq.filter(pl.col("user_id").is_in(users.implode()))["item_id"])
        hashes.append(users.to_frame().select(stable_hash(pl.col("user_id"), int(cfg.seed or 0)).alias("s"))["s"])
    all_h = pl.concat(hashes).sort() if hashes else pl.Series("s", [], dtype=pl.UInt64)
    assert cfg.max_users is not None
    tally.max_users = {"requested": cfg.max_users, "users_with_samples": all_h.len(), "items_of_those_users": len(items)}
    return int(all_h[cfg.max_users - 1]) if all_h.len() > cfg.max_users else None


def _quantile_split(
    buckets: list[Path],
    cfg: PrepareConfig,
    window: Window,
    kept_items: pl.Series,
    keep_upto: int | None,
    spec: S.SampleSpec,
    tally: Tally,
    progress: Any,
) -> None:
    """Set window.valid_start / test_start from the distribution of target times (O(distinct times))."""
    counts = []
    for path in progress.track(buckets, description="finding split times"):
        seq = S.with_positions(filtered_bucket(path, cfg, window, kept_items, keep_upto, None))
        counts.append(seq.filter(S.target_mask(spec)).group_by(pl.col("timestamp").alias("target_time")).len())
    tc = pl.concat(counts) if counts else pl.DataFrame()
    if tc.is_empty():
        raise UserError(_empty_message(tally, cfg, window))
    window.valid_start, window.test_start = quantile_boundaries(tc, float(cfg.valid_size or 0.1), float(cfg.test_size or 0.1))


def _empty_message(tally: Tally, cfg: PrepareConfig, window: Window) -> str:
    shown = [k for k in tally.steps if k != "item has no title" and (k != "max_users" or cfg.max_users)]
    left = "; ".join(f"after '{k}': {tally.steps[k].interactions} interactions, {tally.steps[k].users} users" for k in shown)
    counts = ", ".join(f"{k} {v}" for k, v in tally.samples.items())
    return (
        f"too few samples after filtering: {counts} (every split needs samples). Window {iso(window.start)} .. "
        f"{iso(window.end)}, valid from {iso(window.valid_start)}, test from {iso(window.test_start)}; {left}. "
        f"Relax the filters (min_item_interactions={cfg.min_item_interactions}, min_sequence_length={cfg.min_sequence_length}), "
        "widen the window or the valid/test periods, or use a preset (--preset NAME)."
    )
