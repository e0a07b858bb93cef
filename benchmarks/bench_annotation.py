"""Annotation speed: naive (every candidate through the whole model) vs the shared-prefix kernel.

Both score the same samples and candidates: log P(answer | prompt, slot = c) for the empty slot and
|M| memory values. Naive = `SplitLM.score_candidates_naive` (one full forward of prefix + slot +
marker + answer per candidate); shared = `SplitLM.score_candidates` (prefix once through all
layers, candidates packed after it through the upper layers only). Checks that the two agree to
1e-4 relative and prints samples/s and the speed-up. Targets: >= 5x at |M| = 90 with SmolLM2 (issue
"AutoMR"); >= 9x, samples/s reported at |M| = 30 and 90 on 2 threads (issue 9, B4):
  .venv/bin/python benchmarks/bench_annotation.py --samples PREPARED --threads 2 --m 30

Run:
  .venv/bin/python benchmarks/bench_annotation.py                     # SmolLM2, synthetic titles, |M| = 90
  .venv/bin/python benchmarks/bench_annotation.py --model tiny        # quick check on the tiny model
  .venv/bin/python benchmarks/bench_annotation.py --samples PREPARED  # real prompts from a prepared folder

Candidate values are layer-L title states cut from prompts of the memory titles (chunks of 10,
as build-memory's chunked mode does), truncated to --value-tokens: realistic lengths and scales.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def _synthetic_samples(n: int, m: int, k: int, seed: int) -> list[tuple[list[str], str, list[str]]]:
    from automr.data.synthetic import filler_title_pool

    pool = filler_title_pool()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = [pool[i] for i in rng.choice(len(pool), k + 1 + m, replace=False)]
        out.append((t[:k], t[k], t[k + 1 :]))
    return out


def _prepared_samples(root: Path, split: str, n: int, m: int, seed: int) -> list[tuple[list[str], str, list[str]]]:
    """Samples with the most memory; memory titles cycled up to m when a sample has fewer."""
    from automr.data.schema import PreparedData

    data = PreparedData.load(root)
    titles = data.titles()
    df = data.split(split)
    lens = df["memory_items"].list.len().to_numpy()
    order = np.argsort(-lens, kind="stable")[: max(n * 5, n)]
    rng = np.random.default_rng(seed)
    pick = rng.choice(order, size=min(n, len(order)), replace=False)
    out = []
    for i in pick.tolist():
        r = df.row(int(i), named=True)
        mem = [titles[x] for x in r["memory_items"]] or [titles[x] for x in r["recent_items"]]
        mem = (mem * (m // len(mem) + 1))[-m:]
        out.append(([titles[x] for x in r["recent_items"]], titles[r["target_item"]], mem))
    return out


def _values(split, builder, titles: list[str], value_tokens: int) -> list[torch.Tensor]:
    vals = []
    for c in range(0, len(titles), 10):
        enc = builder.encode(titles[c : c + 10])
        spans = [(s, min(e, s + value_tokens)) for s, e in enc.title_spans]
        _, v = split.prompt_states([enc.prefix_ids] * len(spans), spans)
        vals.extend(x.float() for x in v)
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny', or any load_lm spec")
    ap.add_argument("--samples", type=Path, default=None, help="prepared data folder for real prompts (default: synthetic titles)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n-samples", type=int, default=3)
    ap.add_argument("--m", type=int, default=90, help="memory elements per sample |M|")
    ap.add_argument("--k", type=int, default=10, help="recent titles per prompt (synthetic)")
    ap.add_argument("--value-tokens", type=int, default=16)
    ap.add_argument("--split-layer", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=None, help="candidates per packed pass (default: the kernel's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from automr.llm.loading import build_tiny_lm, load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM

    samples = (
        _prepared_samples(args.samples, args.split, args.n_samples, args.m, args.seed)
        if args.samples else _synthetic_samples(args.n_samples, args.m, args.k, args.seed)
    )
    if args.model == "tiny":
        lm = build_tiny_lm(sorted({t for r, a, mem in samples for t in [*r, a, *mem]}))
    else:
        lm = load_lm(args.model, device="cpu")
    split = SplitLM(lm, args.split_layer)
    builder = PromptBuilder.for_lm(lm)
    prepared = []
    for recent, answer, mem in samples:
        prompt = builder.encode(recent, answer=answer, reserve=args.value_tokens)
        prepared.append((prompt, _values(split, builder, mem, args.value_tokens)))
    p0, c0 = prepared[0]
    split.score_candidates(p0, c0[:4])  # warm-up (allocator, kernels)
    split.score_candidates_naive(p0, c0[:4])

    t_naive = t_shared = 0.0
    worst = 0.0
    for prompt, cands in prepared:
        t = time.perf_counter()
        a = split.score_candidates_naive(prompt, cands, include_empty=True)
        t_naive += time.perf_counter() - t
        t = time.perf_counter()
        b = split.score_candidates(prompt, cands, include_empty=True, chunk_size=args.chunk_size)
        t_shared += time.perf_counter() - t
        worst = max(worst, float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max()))
    n = len(prepared)
    mean_p = np.mean([len(p.prefix_ids) for p, _ in prepared])
    mean_s = np.mean([np.mean([c.shape[0] for c in cs]) for _, cs in prepared])
    mean_t = np.mean([len(p.marker_ids) + len(p.answer_ids) for p, _ in prepared])
    cands = sum(len(c) + 1 for _, c in prepared)
    print(
        f"model {lm.name} ({split.num_layers} layers, split at {split.split_layer}, {torch.get_num_threads()} threads); "
        f"{n} samples, |M| = {args.m} (+ empty slot), prompt {mean_p:.0f} tokens, value {mean_s:.1f} tokens, "
        f"marker+answer {mean_t:.1f} tokens; source: {args.samples or 'synthetic titles'}"
    )
    print(f"naive : {t_naive / n * 1e3:9.1f} ms/sample  {n / t_naive:8.3g} samples/s  {cands / t_naive:8.1f} candidates/s")
    print(f"shared: {t_shared / n * 1e3:9.1f} ms/sample  {n / t_shared:8.3g} samples/s  {cands / t_shared:8.1f} candidates/s")
    print(f"max relative difference {worst:.2e} ({'OK' if worst <= 1e-4 else 'ABOVE 1e-4'}); speed-up {t_naive / t_shared:.1f}x")
    if worst > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
