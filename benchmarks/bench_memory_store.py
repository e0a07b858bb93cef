"""Memory store benchmark: bytes per element, append and read throughput.

Run: .venv/bin/python benchmarks/bench_memory_store.py [--n 20000] [--hidden 576] [--tokens 16]
Synthetic states (random float32) stand in for layer-L states; titles vary 4..tokens tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from automr.memory.store import MemoryStore, estimate_bytes_per_element, merge_stores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=90)  # one user's memory per append
    ap.add_argument("--no-durable", action="store_true", help="skip fsync")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    h, n = args.hidden, args.n
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        s = MemoryStore.create(folder, h, args.tokens, layer=15, model_name="bench", durable=not args.no_durable)
        keys = rng.standard_normal((args.batch, h)).astype(np.float32)
        vals = [rng.standard_normal((int(rng.integers(4, args.tokens + 1)), h)).astype(np.float32) for _ in range(args.batch)]
        t0 = time.perf_counter()
        for start in range(0, n, args.batch):
            m = min(args.batch, n - start)
            u = start // args.batch
            s.append(np.full(m, u), np.arange(m), np.arange(m), keys[:m], vals[:m])
        t_append = time.perf_counter() - t0
        s.close()
        s = MemoryStore.open(folder)
        t0 = time.perf_counter()
        users = rng.integers(0, n // args.batch, 500)
        got = 0
        for u in users.tolist():
            rows = s.rows_for(u)
            k = s.keys(rows)
            v = s.values(rows)
            got += len(rows)
            _ = k.sum() + sum(float(x[0, 0]) for x in v)
        t_read = time.perf_counter() - t0
        mean_tokens = s.n_tokens / len(s)
        print(f"elements {len(s)}, hidden {h}, mean value tokens {mean_tokens:.1f} (max {args.tokens})")
        print(f"bytes/element {s.bytes_per_element:,.0f}  total {s.total_bytes / 2**20:,.1f} MiB")
        print(f"append {n / t_append:,.0f} elements/s ({s.total_bytes / 2**20 / t_append:,.0f} MiB/s, {'no fsync' if args.no_durable else 'fsync'} per batch of {args.batch})")
        print(f"read (rows_for + keys + values of a user) {got / t_read:,.0f} elements/s over {len(users)} users")
        for hh in (576, 2048, 4096):
            print(f"  estimate H={hh}, {mean_tokens:.1f} tokens: {estimate_bytes_per_element(hh, mean_tokens):,.0f} bytes/element")
        shards = []
        half = len(s) // 2
        for i, (a, b) in enumerate([(0, half), (half, len(s))]):
            f = Path(tmp) / f"shard{i}"
            with MemoryStore.create(f, h, args.tokens, layer=15, model_name="bench", durable=False) as w:
                rows = np.arange(a, b)
                w.append(s.index["user_id"][rows] + i * 10**6, s.index["item_id"][rows], s.index["time"][rows], s.keys(rows), s.values(rows))
            shards.append(f)
        t0 = time.perf_counter()
        merged = merge_stores(shards, Path(tmp) / "merged")
        print(f"merge {len(merged) / (time.perf_counter() - t0):,.0f} elements/s")


if __name__ == "__main__":
    main()
