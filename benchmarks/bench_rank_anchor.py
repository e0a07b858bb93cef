"""Ranking after constrained decoding: the best beam's stored item embedding against embedding its text again.

Constrained decoding's best beam spells a catalogue item, and the grounding index already holds that
item's embedding (the same token sequence through the same model), so the ranking step reads it
instead of running a forward pass (automr/llm/decoding.py, `GroundingIndex.distances(anchors=...)`).
Served recommendations of a trained run's BIGRec, one history at a time, both ways interleaved on the
same test histories: prints the median rank step and total per way, and how many top-10 lists agree.

Run (a run evaluated with constrained decoding, e.g. the real experiment's):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rank_anchor.py --run runs/seed-0/movielens-100k-cpu-large/eval
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="an evaluation folder (automr evaluate's --run)")
    ap.add_argument("--method", default="bigrec", help="a generative method the run evaluated with constrained decoding")
    ap.add_argument("--n", type=int, default=12, help="test histories")
    args = ap.parse_args()

    from automr.api import History, load_run

    run = load_run(args.run)
    rows = list(run.data.split("test").head(args.n + 1).iter_rows(named=True))
    hists = [(r["user_id"], History.of_sample(r)) for r in rows]
    rec = run.method(args.method)
    anchored = rec.grounding.rank

    def embedded(texts, k=None, first=None, anchors=None):  # the rule before anchors: embed every text
        return anchored(texts, k, first=first)

    run.recommend(hists[0][1], args.method, 10, user_id=hists[0][0])  # warm-up: loads the model and the index
    rank_ms: dict[str, list[float]] = {"embedded": [], "anchored": []}
    total_ms: dict[str, list[float]] = {"embedded": [], "anchored": []}
    agree = 0
    for uid, h in hists[1:]:
        tops = {}
        for way, fn in (("embedded", embedded), ("anchored", anchored)):
            rec.grounding.rank = fn
            r = run.recommend(h, args.method, 10, user_id=uid)
            rank_ms[way].append(r.timings_ms["rank_ms"])
            total_ms[way].append(r.timings_ms["total_ms"])
            tops[way] = [i.item_id for i in r.items]
        agree += tops["embedded"] == tops["anchored"]
    rec.grounding.rank = anchored
    base_rank, base_total = statistics.median(rank_ms["embedded"]), statistics.median(total_ms["embedded"])
    for way in ("embedded", "anchored"):
        r, t = statistics.median(rank_ms[way]), statistics.median(total_ms[way])
        print(f"{way:9s} rank step {r:8.1f} ms (x{r / base_rank:.3f})   whole recommendation {t:8.1f} ms (x{t / base_total:.3f})")
    print(f"identical top-10 lists: {agree} of {len(hists) - 1}")


if __name__ == "__main__":
    main()
