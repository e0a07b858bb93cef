"""Generation + grounding (BIGRec) against constrained decoding, on the same samples.

Prints, side by side: time per user (decoding, and the one-off fit: item embeddings or prefix
tree), generated tokens/s and Recall@1/@5/@10.

Run (tiny memorised model on a toy catalogue, seconds on CPU):
    .venv/bin/python benchmarks/bench_decoding.py
The real model (a `finetune` output, or zero-shot with --model only):
    .venv/bin/python benchmarks/bench_decoding.py --adapter runs/ft --samples runs/data --n 200
    .venv/bin/python benchmarks/bench_decoding.py --model smollm2 --samples runs/data --n 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from automr.data.schema import PreparedData
from automr.utils.seeding import select_subset
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.llm.toy import make_toy_prepared, memorised_tiny_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="prepared data folder (default: a toy catalogue)")
    ap.add_argument("--model", default=None, help="model spec for zero-shot runs (smollm2, a folder, a hub id)")
    ap.add_argument("--adapter", type=Path, default=None, help="a finetune output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=64, help="samples (seeded subset)")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-decoding-"))
    lm = None
    if args.samples is None:
        if args.model or args.adapter:
            ap.error("--model/--adapter need --samples")
        root = make_toy_prepared(tmp / "toy", n_items=40, n_users=args.n, seq_len=12)
        t0 = time.perf_counter()
        dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        lm = memorised_tiny_lm(root, steps=60, device="cpu" if dev == "auto" else dev)
        print(f"toy: 40 items, tiny model memorised in {time.perf_counter() - t0:.1f}s")
    else:
        root = args.samples
    data = PreparedData.load(root)
    split = data.split(args.split)
    rows = select_subset(split.height, args.n, args.seed)
    samples = split[rows.tolist()]
    targets = samples["target_item"].to_numpy()
    print(f"{samples.height} {args.split} samples, {data.items.height} items, "
          f"{args.num_beams} beams, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    results = {}
    for decoding in ("grounding", "constrained"):
        opts = GenerativeOptions(
            adapter=args.adapter, model=args.model or "smollm2", decoding=decoding, num_beams=args.num_beams,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype, progress=False,
        )
        rec = GenerativeRecommender(opts, args.seed, lm=lm)
        t0 = time.perf_counter()
        rec.fit(data, tmp / decoding)
        t_fit = time.perf_counter() - t0
        lm = rec.lm  # load the fine-tuned model once (the grounding base model stays with its recommender)
        t0 = time.perf_counter()
        recs = rec.recommend(samples, k=10)
        t_rec = time.perf_counter() - t0
        hit = recs == targets[:, None]
        st = rec.stats
        results[decoding] = {
            "fit_s": t_fit,
            "ms_per_user": 1000 * t_rec / max(samples.height, 1),
            "gen_tok_s": st.tokens / max(st.seconds, 1e-9) if st else float("nan"),
            "recall@1": float(hit[:, :1].any(1).mean()),
            "recall@5": float(hit[:, :5].any(1).mean()),
            "recall@10": float(hit[:, :10].any(1).mean()),
            "filled@10": float((recs >= 0).mean()),
        }

    names = list(results)
    print()
    print(f"{'':<22}" + "".join(f"{n:>14}" for n in names))
    for key, fmt in [("fit_s", "{:.2f}"), ("ms_per_user", "{:.1f}"), ("gen_tok_s", "{:.0f}"),
                     ("recall@1", "{:.4f}"), ("recall@5", "{:.4f}"), ("recall@10", "{:.4f}"),
                     ("filled@10", "{:.2f}")]:
        print(f"{key:<22}" + "".join(f"{fmt.format(results[n][key]):>14}" for n in names))
    print(f"\ndevice: {lm.device if lm is not None else '?'}; fit = item embeddings (grounding) or prefix tree "
          "(constrained); filled@10 = share of the top-10 that holds an item (constrained: at most num_beams)")


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
