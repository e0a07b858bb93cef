"""Does `prepare` stream? Peak memory and throughput on a data set and on copies of it, replicated.

Run: .venv/bin/python benchmarks/bench_prepare_memory.py [--data ../shared/data/amazon2014-books-1m]
         [--preset amazon2014-books-1m] [--scales 1,10]

For each scale N it writes, in a temporary folder (deleted afterwards, never in the repository),
the data's interactions N times over with new user ids (copy k adds k * (max user id + 1)), as
interactions.csv.gz next to a link to the original items file, then runs
`automr prepare --preset PRESET` on it in a fresh subprocess and reads that run's stats.json:
wall seconds, CPU seconds, interactions per second, peak RSS of the prepare process (its own
getrusage), and the samples written. The last line gives the peak-memory ratio of the largest
scale to the smallest: ~1 means memory does not grow with the input.

Samples do not grow exactly N-fold: items are shared by the copies, so an item with 1-4
interactions in the original has 10-40 in the x10 data and passes the >= 5 item filter.
Under a loaded machine wall time says little; the CPU seconds (user + system of the prepare
process, imports included) are the steadier figure.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]


def replicate(src: Path, dst: Path, copies: int) -> int:
    """Write src's interactions `copies` times with new user ids into dst (common format)."""
    dst.mkdir(parents=True)
    df = pl.read_csv(src / "interactions.csv.gz", columns=["user_id", "item_id", "timestamp", "pos"])
    offset = int(df["user_id"].max()) + 1  # type: ignore[arg-type]
    with gzip.open(dst / "interactions.csv.gz", "wb", compresslevel=6) as fh:
        for k in range(copies):
            df.with_columns(pl.col("user_id") + k * offset).write_csv(fh, include_header=(k == 0))
    items = next(p for p in (src / "items.csv.gz", src / "items.parquet") if p.exists())
    os.symlink(items.resolve(), dst / items.name)
    return df.height * copies


def run_prepare(data: Path, out: Path, preset: str) -> dict:
    cmd = [sys.executable, "-m", "automr.cli", "prepare", "--data", str(data), "--preset", preset, "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"prepare failed on {data}:\n{res.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    stats["process"] = {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "amazon2014-books-1m")
    ap.add_argument("--preset", default="amazon2014-books-1m")
    ap.add_argument("--scales", default="1,10", help="comma-separated replication factors")
    args = ap.parse_args()
    if not (args.data / "interactions.csv.gz").is_file():
        raise SystemExit(f"{args.data}/interactions.csv.gz not found; pass --data FOLDER (common format, CSV)")
    scales = [int(s) for s in args.scales.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for n in scales:
            data = Path(tmp) / f"x{n}"
            n_rows = replicate(args.data, data, n)
            stats = run_prepare(data, Path(tmp) / f"out{n}", args.preset)
            perf, proc = stats["performance"], stats["process"]
            rows.append((n, n_rows, perf["seconds"], proc["cpu_s"], perf["interactions_per_second"], perf["peak_rss_mb"], sum(stats["samples"].values())))
            print(
                f"x{n:<3} {n_rows:>11,} interactions  {perf['seconds']:7.1f} s wall  {proc['cpu_s']:7.1f} s cpu  "
                f"{perf['interactions_per_second']:>9,} interactions/s  peak RSS {perf['peak_rss_mb']:7.1f} MB  "
                f"{rows[-1][-1]:>10,} samples  ({perf['buckets']} buckets)",
                flush=True,
            )
            for p in sorted(data.iterdir()):
                p.unlink()
    lo, hi = rows[0], rows[-1]
    print(
        f"peak RSS x{hi[0]} / x{lo[0]} = {hi[5] / lo[5]:.2f} for {hi[1] / lo[1]:.0f}x the interactions; "
        f"throughput x{hi[0]} / x{lo[0]} = {hi[4] / lo[4]:.2f}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
