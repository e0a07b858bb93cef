"""Split-forward annotation kernel: shared-prefix packed scoring vs one forward per candidate.

For one sample (10 recent titles, a target title) and |M| memory elements (layer-L states of a
title, cut to --value-tokens tokens, each taken from its own window), time
  shared   SplitLM.score_candidates: lower layers on the prompt once, upper layers on the prefix
           once, all candidate blocks packed after it;
  naive    SplitLM.score_candidates_naive: each candidate through the whole model separately;
  batched  SplitLM.answer_logprob on rows of --batch candidates (the naive work, batched);
and check the three agree. (benchmarks/bench_annotation.py measures the same over several samples.)

    .venv/bin/python benchmarks/bench_split_kernel.py --threads 1               # SmolLM2, |M|=90, CPU
    .venv/bin/python benchmarks/bench_split_kernel.py --model tiny --memory 30
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "movielens-100k" / "items.csv.gz"


def _titles() -> list[str]:
    """MovieLens-100k titles with their year where the shared data is present, else synthetic ones."""
    if ML100K.is_file():
        with gzip.open(ML100K, "rt") as fh:
            return [f"{r['title']} ({r['release_year']})" if r.get("release_year") else r["title"]
                    for r in csv.DictReader(fh)]
    rng = random.Random(0)
    words = "red blue night day river stone city king queen lost last first dark light war love".split()
    return [" ".join(rng.choice(words).title() for _ in range(3)) + f" ({1950 + i % 70})" for i in range(500)]


def run(model: str = "smollm2", memory: int = 90, value_tokens: int = 8, repeats: int = 3, batch: int = 30,
        threads: int | None = None, naive: bool = True) -> dict[str, float]:
    from automr.llm.loading import build_tiny_lm, load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM

    if threads:
        torch.set_num_threads(threads)
    titles = _titles()
    lm = build_tiny_lm(titles[:300]) if model == "tiny" else load_lm(model)
    pb = PromptBuilder.for_lm(lm)
    sp = SplitLM(lm)
    rng = random.Random(0)
    ep = pb.encode(rng.sample(titles, 10), answer=rng.choice(titles))
    windows = [pb.encode(rng.sample(titles, 9) + [t]) for t in rng.sample(titles, memory)]
    cands = []
    for i in range(0, memory, 32):
        part = windows[i:i + 32]
        cands += sp.token_states([w.prefix_ids for w in part], [w.title_spans[-1] for w in part])
    cands = [c[:value_tokens] for c in cands]
    info = {
        "prefix_tokens": len(ep.prefix_ids), "marker_tokens": len(ep.marker_ids),
        "answer_tokens": len(ep.answer_ids), "mean_value_tokens": statistics.mean(c.shape[0] for c in cands),
        "threads": torch.get_num_threads(),
    }
    print(f"{lm.name}, L={sp.split_layer}/{sp.num_layers}, {info}", flush=True)

    def timed(name, fn):
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        print(f"  {name}: {min(times):.3f} s (runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)
        return min(times), out

    sp.score_candidates(ep, cands[:4])  # warm-up
    shared_t, shared = timed("shared", lambda: sp.score_candidates(ep, cands))

    def batched():
        with torch.no_grad():
            slots = [None] + cands
            return torch.cat([sp.answer_logprob([ep] * len(slots[i:i + batch]), slots[i:i + batch])
                              for i in range(0, len(slots), batch)]).cpu()

    batched_t, batched_out = timed("batched", batched)
    res = {"shared_s": shared_t, "batched_s": batched_t, "speedup_vs_batched": batched_t / shared_t,
           "max_abs_diff_batched": (shared - batched_out).abs().max().item()}
    if naive:
        naive_t, naive_out = timed("naive", lambda: sp.score_candidates_naive(ep, cands))
        res |= {"naive_s": naive_t, "speedup_vs_naive": naive_t / shared_t,
                "max_abs_diff_naive": (shared - naive_out).abs().max().item()}
    res["candidates_per_s_shared"] = (memory + 1) / shared_t
    for k, v in res.items():
        print(f"  {k}: {v:.4g}")
    return info | res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="load_lm spec, or 'tiny'")
    ap.add_argument("--memory", type=int, default=90, help="|M|, candidates per sample")
    ap.add_argument("--value-tokens", type=int, default=8, help="tokens per memory value")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (the minimum is reported)")
    ap.add_argument("--batch", type=int, default=30, help="rows per answer_logprob call in the batched baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow one-by-one baseline")
    a = ap.parse_args()
    run(a.model, a.memory, a.value_tokens, a.repeats, a.batch, a.threads, not a.no_naive)


if __name__ == "__main__":
    main()
