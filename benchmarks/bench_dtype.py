"""float32 against bfloat16 on the CPU: the same recommender, the same samples, side by side.

Why: CPUs with AMX or AVX512-BF16 (Sapphire Rapids and later) multiply bfloat16 matrices several
times faster than float32 ones, and every CPU stage of automr is bound by the LLM's matrix products.
This prints, for BIGRec with constrained decoding (the evaluation path), each dtype's time per user
and its ratio, and how far bfloat16's answers move from float32's: top-1 agreement, top-10 overlap
and Recall on the same samples.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dtype.py --adapter runs/ft --samples runs/data --n 60
Without --samples: the tiny memorised model on a toy catalogue (seconds; checks the path, not the speed).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from automr.data.schema import PreparedData
from automr.llm.toy import make_toy_prepared, memorised_tiny_lm
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.utils.seeding import select_subset

DTYPES = ("float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True where the CPU flags name AMX-BF16 or AVX512-BF16 (Linux: /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def recommend(args: argparse.Namespace, data: PreparedData, samples, dtype: str, work: Path, toy_lm) -> tuple[np.ndarray, float]:
    """Top-10 item ids (n, 10) and seconds per user for one dtype."""
    opts = GenerativeOptions(
        adapter=args.adapter, model=args.model, decoding="constrained", num_beams=args.num_beams,
        batch_size=args.batch_size, device="cpu", dtype=dtype, progress=False,
    )
    lm = None
    if toy_lm is not None:  # the toy model is built in float32: a copy in this dtype
        lm = copy.deepcopy(toy_lm)
        lm.model.to(getattr(torch, dtype))
    rec = GenerativeRecommender(opts, args.seed, lm=lm)
    rec.fit(data, work / dtype)
    rec.recommend(samples[: min(2, samples.height)], k=10)  # warm-up: oneDNN picks its kernels on first use
    t0 = time.perf_counter()
    recs = rec.recommend(samples, k=10)
    return recs, (time.perf_counter() - t0) / max(samples.height, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="prepared data folder (default: a toy catalogue)")
    ap.add_argument("--model", default="smollm2", help="model spec (zero-shot, without --adapter)")
    ap.add_argument("--adapter", type=Path, default=None, help="a finetune output folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=40, help="samples (seeded subset)")
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    toy_lm = None
    if args.samples is None:
        root = make_toy_prepared(tmp / "toy", n_items=40, n_users=args.n, seq_len=12)
        toy_lm = memorised_tiny_lm(root, steps=60, device="cpu")
    else:
        root = args.samples
    data = PreparedData.load(root)
    split = data.split(args.split)
    samples = split[select_subset(split.height, args.n, args.seed).tolist()]
    targets = samples["target_item"].to_numpy()
    print(f"{samples.height} {args.split} samples, {data.items.height} items, {args.num_beams} beams, batch "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}, CPU bfloat16 units: {cpu_has_native_bf16()}")

    out = {dt: recommend(args, data, samples, dt, tmp, toy_lm) for dt in DTYPES}
    (r32, s32), (r16, s16) = out["float32"], out["bfloat16"]
    for dt, (recs, s) in out.items():
        hit = recs == targets[:, None]
        print(f"{dt:>9}: {1000 * s:8.1f} ms/user, Recall@1 {hit[:, :1].any(1).mean():.4f}, "
              f"@10 {hit.any(1).mean():.4f}, distinct top-1 {len(set(recs[:, 0].tolist()))}")
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r32.tolist(), r16.tolist())])
    print(f"bfloat16 / float32 time per user: x{s16 / s32:.2f} (speed-up x{s32 / s16:.2f}); "
          f"top-1 agreement {(r32[:, 0] == r16[:, 0]).mean():.1%}, top-10 overlap {overlap:.1%}")


if __name__ == "__main__":
    main()
