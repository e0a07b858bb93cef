"""Constrained decoding with trie scores: settled beams skipped against every beam fed, in one run.

With `beam_scores: trie` a beam whose prefix leaves one catalogue item possible has only forced
tokens ahead, each costing exactly 0, so `beam_search` stops feeding it through the model
(`skip_settled`, automr/llm/decoding.py). Both ways decode the same prompts with the same weights,
batch by batch, alternating which runs first (only the ratio measured side by side means anything
on these shared machines). Prints samples/s and rows fed per sample of each, the ratio, and checks
that both return the same hypotheses and scores for every sample.

Run (real data prepared as the README says; --finetuned a `finetune` output folder, else the base model):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_settled_beams.py --samples runs/movielens-100k-cpu/data \\
        --finetuned runs/movielens-100k-cpu-large/finetune
A quick check on a toy catalogue and a tiny random model (seconds):
    .venv/bin/python benchmarks/bench_settled_beams.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from automr.data.schema import PreparedData
from automr.llm import decoding
from automr.llm.finetune import load_finetuned
from automr.llm.loading import LM, build_tiny_lm, load_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.split import SplitLM
from automr.llm.title_trie import build_trie
from automr.llm.toy import make_toy_prepared
from bench_beam_speed import make_prompts, same  # benchmarks/ is on sys.path when a script in it runs

WAYS = {"every beam fed": False, "settled skipped": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="prepared data folder (default: a toy catalogue, tiny random model)")
    ap.add_argument("--model", default="smollm2", help="base model spec or folder, with --samples")
    ap.add_argument("--finetuned", type=Path, help="a finetune output folder (its weights on the base model), with --samples")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=48, help="samples (seeded subset)")
    ap.add_argument("--batch-size", type=int, default=10, help="the real-data configs' 10")
    ap.add_argument("--num-beams", type=int, default=10, help="the real-data configs' 10")
    ap.add_argument("--length-penalty", type=float, default=0.0, help="0: D3's rule (no length normalisation)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    scratch = tempfile.TemporaryDirectory(prefix="bench-settled-")  # removed at exit
    if args.samples is None:
        data = PreparedData.load(make_toy_prepared(Path(scratch.name) / "toy", n_items=40, n_users=args.n, seq_len=12))
        lm: LM = build_tiny_lm(list(data.titles().values()))
    else:
        data = PreparedData.load(args.samples)
        lm = load_finetuned(args.finetuned, device="cpu") if args.finetuned else load_lm(str(args.model), device="cpu")
    builder = PromptBuilder.for_lm(lm)
    catalogue = sorted(data.titles().items())
    trie = build_trie(builder, catalogue)
    max_new = decoding.max_answer_tokens(builder, [t for _, t in catalogue])
    prompts, orders = make_prompts(data, builder, args.split, args.n, args.seed, reserve=max_new)
    order = orders["B3"].tolist()
    split = SplitLM(lm)
    kw = dict(num_beams=args.num_beams, max_new_tokens=max_new, trie=trie, beam_scores="trie",
              length_penalty=args.length_penalty)
    print(f"{lm.name}: {len(prompts)} {args.split} prompts of {data.root}, {len(catalogue)} items, "
          f"{args.num_beams} beams, trie scores, length penalty {args.length_penalty}, batch {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    decoding.beam_search(split, prompts[:2], [None, None], **kw)  # warm-up, untimed

    seconds = dict.fromkeys(WAYS, 0.0)
    fed = dict.fromkeys(WAYS, 0)
    hyps: dict[str, dict[int, list]] = {w: {} for w in WAYS}
    for i, s in enumerate(range(0, len(prompts), args.batch_size)):
        idx = order[s : s + args.batch_size]
        for way in (list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]):
            stats = decoding.DecodeStats()
            t0 = time.perf_counter()
            out = decoding.beam_search(split, [prompts[j] for j in idx], [None] * len(idx), stats=stats,
                                       skip_settled=WAYS[way], **kw)
            seconds[way] += time.perf_counter() - t0
            fed[way] += stats.tokens
            hyps[way].update(zip(idx, out))
        print(f"  batch {i + 1}: " + ", ".join(f"{w} {v:.1f}s" for w, v in seconds.items()), flush=True)

    base = list(WAYS)[0]
    for way in WAYS:
        print(f"{way:16s} {len(prompts) / seconds[way]:7.3f} samples/s (x{seconds[base] / seconds[way]:.2f}), "
              f"{fed[way] / len(prompts):6.1f} rows fed per sample (x{fed[way] / fed[base]:.2f})")
    checks = [same(hyps[base][j], hyps["settled skipped"][j]) for j in range(len(prompts))]
    n_same = sum(ok for ok, _ in checks)
    print(f"identical hypotheses (tokens, items, order): {n_same}/{len(checks)} samples; "
          f"largest score difference {max(d for _, d in checks):.2e}")
    if n_same != len(checks):
        sys.exit("skipping settled beams changed the hypotheses")


if __name__ == "__main__":
    main()
