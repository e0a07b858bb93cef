"""A served recommendation with the prompt-prefix cache against the instruction computed every time.

`SplitLM.prefill` reads back the keys of the prompt prefix it computed last (automr/llm/prefix_cache.py):
one request at a time, the next user's prompt shares the instruction with the last one. Both ways
answer the same test histories, interleaved, one request per call, through the Python API the server
uses; before each request the cache is cleared ("recomputed") or holds another user's prompt (as
under traffic: "cached"). Prints the median query state (AutoMR's z_t, which reads the cache too),
prefill and whole recommendation per way and how many top-10 lists agree. `--trie-scores` serves the method with D3's trie scores (beam_scores trie,
length_penalty 0), where settled beams are skipped too (bench_settled_beams.py).

Run (an evaluated run, e.g. the real experiment's):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prefix_cache.py --run runs/seed-0/movielens-100k-cpu-large/eval
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from serve_common import served_variant  # benchmarks/ is on sys.path when a script in it runs

WAYS = ("recomputed", "cached")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an evaluation folder (automr evaluate's --run)")
    ap.add_argument("--method", default="bigrec", help="a generative method the run evaluated")
    ap.add_argument("--n", type=int, default=12, help="test histories")
    ap.add_argument("--trie-scores", action="store_true", help="serve the method with beam_scores trie, length_penalty 0")
    args = ap.parse_args()

    from automr.api import History, load_run

    run = load_run(args.run)
    method = served_variant(run, args.method, {"beam_scores": "trie", "length_penalty": 0} if args.trie_scores else {})
    rows = list(run.data.split("test").head(args.n + 2).iter_rows(named=True))
    hists = [(r["user_id"], History.of_sample(r)) for r in rows]
    rec = run.method(method)
    run.recommend(hists[0][1], method, 10, user_id=hists[0][0])  # warm-up: loads the model and the index
    prefill: dict[str, list[float]] = {w: [] for w in WAYS}
    query: dict[str, list[float]] = {w: [] for w in WAYS}  # AutoMR's query state z_t (lower layers of the prompt)
    total: dict[str, list[float]] = {w: [] for w in WAYS}
    agree = 0
    for i, (uid, h) in enumerate(hists[2:], start=2):
        tops = {}
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
            rec.split.prefix_cache.clear()
            if way == "cached":  # the cache holds another user's prompt, as after the previous request
                run.recommend(hists[i - 1][1], method, 10, user_id=hists[i - 1][0])
            r = run.recommend(h, method, 10, user_id=uid)
            prefill[way].append(r.timings_ms["prefill_ms"])
            query[way].append(r.timings_ms.get("query_ms", 0.0))
            total[way].append(r.timings_ms["total_ms"])
            tops[way] = [x.item_id for x in r.items]
        agree += tops["recomputed"] == tops["cached"]
    base_p, base_t = statistics.median(prefill["recomputed"]), statistics.median(total["recomputed"])
    base_q = statistics.median(query["recomputed"])
    print(f"{run.folder}: {method}, {len(hists) - 2} test histories, one request per call")
    for way in WAYS:
        p, q, t = (statistics.median(x[way]) for x in (prefill, query, total))
        q_part = f"query state {q:7.1f} ms (x{q / base_q:.3f})   " if base_q else ""
        print(f"{way:10s} {q_part}prefill {p:7.1f} ms (x{p / base_p:.3f})   whole recommendation {t:7.1f} ms "
              f"(x{t / base_t:.3f})")
    print(f"identical top-10 lists: {agree} of {len(hists) - 2}")
    print(f"prefix cache: {rec.split.prefix_cache.reused_tokens} tokens read back, "
          f"{rec.split.prefix_cache.computed_tokens} computed")


if __name__ == "__main__":
    main()
