"""AutoMR's prefill reading back the lower layers its query state computed, against running them again.

AutoMR runs each prompt's lower layers for the query state z_t, retrieves, then prefills the prompt
with the retrieved element in its slot. The slot enters at layer L, after the prompt, so the prefill
can read the prompt's layer-L states and lower keys back (`SplitLM.lower_stash`,
automr/llm/prefix_cache.py) and run only the marker through the lower layers. Both ways answer the
same test histories through the Python API the server uses, in batches of `--batch` requests per model
call (the server batches queued requests; 1 is one client), the ways interleaved batch by batch.
Prints the median prefill and whole call per way, and how many top-10 lists agree.

Run (an evaluated run with AutoMR, e.g. the demo's):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lower_stash.py --run runs/demo/eval --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from serve_common import served_variant  # benchmarks/ is on sys.path when a script in it runs

WAYS = ("run again", "read back")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an evaluation folder (automr evaluate's --run)")
    ap.add_argument("--method", default="automr", help="a memory method of the run that retrieves by z_t")
    ap.add_argument("--batch", type=int, default=8, help="requests per model call")
    ap.add_argument("--calls", type=int, default=6, help="model calls per way")
    ap.add_argument("--trie-scores", action="store_true", help="serve with beam_scores trie, length_penalty 0")
    ap.add_argument("--bf16", action="store_true", help="serve in bfloat16 (dtype: bfloat16)")
    ap.add_argument("--beams", type=int, default=None, help="num_beams (default: the run's)")
    args = ap.parse_args()

    from automr.api import History, load_run

    run = load_run(args.run)
    extra = ({"beam_scores": "trie", "length_penalty": 0} if args.trie_scores else {}) | (
        {"dtype": "bfloat16"} if args.bf16 else {}) | ({"num_beams": args.beams} if args.beams else {})
    method = served_variant(run, args.method, extra)
    rows = list(run.data.split("test").iter_rows(named=True))
    if len(rows) < args.batch + 1:
        raise SystemExit(f"{args.run} has {len(rows)} test samples; --batch {args.batch} needs one more")
    # Calls of `batch` distinct histories, cycling through the test samples (a small run has few).
    batches = [[rows[(c * args.batch + j) % len(rows)] for j in range(args.batch)] for c in range(args.calls + 1)]
    rec = run.method(method)
    stash = rec.split.lower_stash
    capacity = stash.capacity

    def as_under_traffic(batch: list[dict]) -> None:
        """Caches as after another user's request: the instruction cached, nothing of this batch."""
        other = next(r for r in rows if r["user_id"] not in {b["user_id"] for b in batch})
        stash.capacity = 0
        rec.split.prefix_cache.clear()
        run.recommend(History.of_sample(other), method, 10, user_id=other["user_id"])
        stash.clear()

    def call(batch: list[dict]) -> tuple[float, float, list[list[int]]]:
        t0 = time.perf_counter()
        got = run.recommend_batch([History.of_sample(r) for r in batch], method, 10, user_ids=[r["user_id"] for r in batch])
        return got[0].timings_ms["prefill_ms"], 1000 * (time.perf_counter() - t0), [[x.item_id for x in g.items] for g in got]

    call(batches[0])  # warm-up: loads the model and the index, caches the instruction
    prefill: dict[str, list[float]] = {w: [] for w in WAYS}
    total: dict[str, list[float]] = {w: [] for w in WAYS}
    agree = lists = 0
    for i, batch in enumerate(batches[1:]):
        tops = {}
        for way in WAYS if i % 2 == 0 else WAYS[::-1]:
            as_under_traffic(batch)
            stash.capacity = capacity if way == "read back" else 0  # 0: nothing kept, every prefill runs it all
            p, t, tops[way] = call(batch)
            prefill[way].append(p)
            total[way].append(t)
        agree += sum(a == b for a, b in zip(*tops.values()))
        lists += len(batch)
    stash.capacity = capacity
    base_p, base_t = (statistics.median(x[WAYS[0]]) for x in (prefill, total))
    print(f"{run.folder}: {method}, {args.calls} calls of {args.batch} test histories per way")
    for way in WAYS:
        p, t = statistics.median(prefill[way]), statistics.median(total[way])
        print(f"{way:10s} prefill {p:8.1f} ms (x{p / base_p:.3f})   whole call {t:8.1f} ms (x{t / base_t:.3f})")
    print(f"identical top-10 lists: {agree} of {lists}; lower-layer tokens read back: {stash.reused_tokens}")


if __name__ == "__main__":
    main()
