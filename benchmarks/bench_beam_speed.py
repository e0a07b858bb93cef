"""Beam search speed: the decoding cache of issue 9 B3 against the one before it, in one process.

The previous implementation (automr/llm/split.py and decoding.py at --baseline, by default the commit
before B3) is read from git into temporary modules, so the library keeps one implementation. Both
decode the same prompts with the same model, batch by batch, alternating which runs first (these
machines are shared and noisy: only the ratio measured side by side means anything). Each path
batches the samples as its GenerativeRecommender.recommend does: by item count before, by the
recent titles' token length now (bigrec.decode_order), batch i of one interleaved with batch i of
the other. For each torch thread count it prints samples/s of both and the ratio, and checks that
both return the same hypotheses (tokens, catalogue items, order) for every sample: a ranking is
those beams' items, then the catalogue by grounding distance to the best beam's text, so equal
hypotheses give equal rankings.

Run (real data: prepare ml-100k first, see the README; SmolLM2 is converted once into ~/.cache/automr):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_beam_speed.py --samples /tmp/dec-ml100k --threads 1,2
A quick check on a toy catalogue and a tiny random model (seconds):
    .venv/bin/python benchmarks/bench_beam_speed.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from automr.data.schema import PreparedData
from automr.llm import decoding
from automr.llm.loading import LM, build_tiny_lm, load_lm
from automr.llm.prompts import EncodedPrompt, PromptBuilder
from automr.llm.split import SplitLM
from automr.llm.toy import make_toy_prepared
from automr.methods.bigrec import decode_order
from automr.utils.seeding import select_subset

BASELINE = "e32e069"  # the commit before issue 9 B3 (whole-cache concatenation and per-beam index_select)
ROOT = Path(__file__).resolve().parents[1]


def load_baseline(rev: str, folder: Path) -> tuple[ModuleType, ModuleType]:
    """automr/llm/split.py and decoding.py as they were at `rev`, imported as baseline_split / baseline_decoding."""
    mods = []
    for name in ("split", "decoding"):
        try:
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:automr/llm/{name}.py"],
                                 capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"cannot read automr/llm/{name}.py at {rev} from git ({e}); pass --baseline REV of a checkout "
                     "with history")
        path = folder / f"baseline_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1]


def make_prompts(data: PreparedData, builder: PromptBuilder, split: str, n: int, seed: int,
                 reserve: int) -> tuple[list[EncodedPrompt], dict[str, np.ndarray]]:
    """`n` seeded samples of `split` encoded as GenerativeRecommender.encode does, and the order each
    path's recommend decodes them in."""
    frame = data.split(split)
    samples = frame[select_subset(frame.height, n, seed).tolist()]
    titles = data.titles()
    recent = samples["recent_items"].to_list()
    prompts = [builder.encode([titles[i] for i in r if i in titles], reserve=reserve) for r in recent]
    orders = {
        "before": np.argsort([len(r) for r in recent], kind="stable"),  # e32e069's recommend
        "B3": decode_order(recent, lambda i: len(builder.title_ids(titles[i])) if i in titles else 0),
    }
    return prompts, orders


def same(a: list, b: list) -> tuple[bool, float]:
    """Equal hypotheses (tokens, item, finished, order), and the largest score difference."""
    keys = [[(h.tokens, h.item, h.finished) for h in hs] for hs in (a, b)]
    diff = max((abs(x.score - y.score) for x, y in zip(a, b)), default=0.0)
    return keys[0] == keys[1], diff


def bench(paths: dict, prompts: list[EncodedPrompt], orders: dict[str, np.ndarray], batch: int,
          kw: dict) -> tuple[dict[str, float], list]:
    """Seconds per path over every batch (which path runs first alternates), and per-sample comparisons."""
    seconds = dict.fromkeys(paths, 0.0)
    hyps: dict[str, dict[int, list]] = {name: {} for name in paths}
    for i, s in enumerate(range(0, len(prompts), batch)):
        for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
            split, module, trie = paths[name]
            idx = orders[name][s : s + batch].tolist()
            t0 = time.perf_counter()
            out = module.beam_search(split, [prompts[j] for j in idx], [None] * len(idx), trie=trie, **kw)
            seconds[name] += time.perf_counter() - t0
            hyps[name].update(zip(idx, out))
        print(f"  batch {i + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()), flush=True)
    return seconds, [same(hyps["before"][j], hyps["B3"][j]) for j in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="prepared data folder (default: a toy catalogue, tiny random model)")
    ap.add_argument("--model", default="smollm2", help="model spec with --samples")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=32, help="samples (seeded subset)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples decoded together (bigrec's default)")
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--decoding", choices=["constrained", "grounding"], default="constrained")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--baseline", default=BASELINE, help="git revision whose decoding is the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    scratch = tempfile.TemporaryDirectory(prefix="bench-beam-")  # removed at exit
    tmp = Path(scratch.name)
    old_split, old_decoding = load_baseline(args.baseline, tmp)
    if args.samples is None:
        root = make_toy_prepared(tmp / "toy", n_items=40, n_users=args.n, seq_len=12)
        data = PreparedData.load(root)
        lm: LM = build_tiny_lm(list(data.titles().values()))
    else:
        data = PreparedData.load(args.samples)
        lm = load_lm(args.model, device="cpu")
    builder = PromptBuilder.for_lm(lm)
    catalogue = sorted(data.titles().items())
    max_new = decoding.max_answer_tokens(builder, [t for _, t in catalogue])
    prompts, orders = make_prompts(data, builder, args.split, args.n, args.seed, reserve=max_new)
    constrained = args.decoding == "constrained"
    paths = {
        "before": (old_split.SplitLM(lm), old_decoding, old_decoding.build_trie(builder, catalogue) if constrained else None),
        "B3": (SplitLM(lm), decoding, decoding.build_trie(builder, catalogue) if constrained else None),
    }
    kw = {"num_beams": args.num_beams, "max_new_tokens": max_new}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    print(f"{lm.name}: {len(prompts)} {args.split} prompts of {data.root}, {len(catalogue)} items, {args.decoding}, "
          f"{args.num_beams} beams, batch {args.batch_size}, {max_new} new tokens at most")
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"baseline {args.baseline}")
    for split, module, trie in paths.values():  # warm-up (allocator, first-call costs), untimed
        module.beam_search(split, prompts[:2], [None, None], trie=trie, **kw)

    failed = False
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\ntorch threads {threads}:")
        seconds, checks = bench(paths, prompts, orders, args.batch_size, kw)
        rate = {k: len(prompts) / v for k, v in seconds.items()}
        n_same = sum(ok for ok, _ in checks)
        print(f"  samples/s: before {rate['before']:.3f}, B3 {rate['B3']:.3f}; ratio {rate['B3'] / rate['before']:.2f}x")
        print(f"  identical hypotheses (tokens, items, order): {n_same}/{len(checks)} samples; "
              f"largest score difference {max(d for _, d in checks):.2e}")
        failed |= n_same != len(checks)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if failed:
        sys.exit("the two implementations returned different hypotheses")


if __name__ == "__main__":
    main()
