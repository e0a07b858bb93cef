"""Memory build cost and quality: exact (one window per element) vs chunked (one pass per K items).

Builds the memory of the same users both ways with `run_build_memory` (queries off, so only the
elements are timed) and prints, in one run:
  * tokens/s and elements/s of each mode, the tokens each needed, and the speed-up (wall time ratio);
  * quality of chunked against exact, per element: cosine of keys, cosine of value token states
    (mean over the tokens), split by the element's place in its chunk (the chunk's last element
    has exactly its exact window, the first has no context);
  * with --annotate N: N training samples annotated against both stores (shared-prefix kernel):
    correlation of the gains, how often both pick the same best element, and the headroom share
    the exact-best element keeps under chunked labels -- a retrieval-quality proxy that needs no
    retriever training.

Run:
  .venv/bin/python benchmarks/bench_memory_build.py --samples PREPARED --max-users 4        # SmolLM2
  .venv/bin/python benchmarks/bench_memory_build.py --model tiny                            # quick, toy data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _toy_prepared(root: Path) -> Path:
    """A small prepared folder (12 users x 40 interactions over synthetic titles) when none is given."""
    import polars as pl

    from automr.data.schema import ITEM_SCHEMA, SAMPLE_SCHEMA
    from automr.data.synthetic import filler_title_pool

    titles = filler_title_pool()[:200]
    rng = np.random.default_rng(0)
    (root / "samples").mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"item_id": list(range(1, 201)), "title": titles}, schema=ITEM_SCHEMA).write_parquet(root / "items.parquet")
    rows: dict[str, list] = {"train": [], "valid": [], "test": []}
    for u in range(12):
        seq = rng.integers(1, 201, 40).tolist()
        ts = [1_600_000_000 + 86400 * j for j in range(40)]
        for j in range(10, 40):
            split = "test" if j == 39 else "valid" if j == 38 else "train"
            rows[split].append({"user_id": u, "target_item": seq[j], "target_time": ts[j],
                                "recent_items": seq[j - 10 : j], "recent_times": ts[j - 10 : j],
                                "memory_items": seq[: j - 10], "memory_times": ts[: j - 10]})
    for s, r in rows.items():
        pl.DataFrame(r, schema=SAMPLE_SCHEMA).write_parquet(root / "samples" / f"{s}.parquet")
    return root


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' or any load_lm spec")
    ap.add_argument("--samples", type=Path, default=None, help="prepared data folder (default: a small synthetic one)")
    ap.add_argument("--max-users", type=int, default=4)
    ap.add_argument("--splits", default="train", help="comma-separated splits whose memories are built")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--annotate", type=int, default=0, help="annotate this many training samples with both stores")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from automr.memory.build import read_build_stats
    from automr.stages.build_memory import run_build_memory
    from automr.stages.build_memory import BuildMemoryConfig
    from automr.memory.store import MemoryStore

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    samples = args.samples or _toy_prepared(work / "data")
    model = args.model
    if model == "tiny":
        from automr.data.schema import PreparedData
        from automr.llm.loading import build_tiny_lm, save_lm

        save_lm(build_tiny_lm(PreparedData.load(samples).items["title"].to_list()), work / "tiny")
        model = str(work / "tiny")
    common = dict(samples=samples, model=model, max_users=args.max_users, splits=args.splits.split(","),
                  batch_size=args.batch_size, queries=False, progress=False)
    stats = {}
    for mode in ("exact", "chunked"):
        t = time.perf_counter()
        run_build_memory(BuildMemoryConfig(out=work / mode, mode=mode, **common))
        stats[mode] = read_build_stats(work / mode) | {"wall_s": time.perf_counter() - t}
    ex, ch = MemoryStore.open(work / "exact"), MemoryStore.open(work / "chunked")
    assert ex.index_frame().drop("offset").equals(ch.index_frame().drop("offset")), "the two stores hold different elements"
    kc = _cos(np.asarray(ex.key_matrix), np.asarray(ch.key_matrix))
    vc = np.array([float(_cos(np.asarray(a, np.float32), np.asarray(b, np.float32)).mean())
                   for a, b in zip(ex.values(np.arange(len(ex))), ch.values(np.arange(len(ch))))])
    k = stats["chunked"]["window"]
    place = np.asarray(ex.index["pos"]) % k

    print(f"model {stats['exact']['model']}, layer {stats['exact']['layer']}, K = {k}, {stats['exact']['users']} users, "
          f"{len(ex)} elements, {stats['exact']['bytes_per_element'] / 1024:.1f} KiB/element, queries off "
          f"(elements only), {torch.get_num_threads()} threads")
    for mode in ("exact", "chunked"):
        s = stats[mode]
        print(f"{mode:8s}: {s['element_windows']:6d} prompts {s['tokens']:9,d} tokens {s['seconds']:8.1f} s  "
              f"{s['tokens_per_s']:8,.0f} tokens/s  {s['elements_per_s']:8.1f} elements/s")
    e_el, c_el = stats["exact"]["seconds"], stats["chunked"]["seconds"]
    print(f"speed-up chunked vs exact: {e_el / c_el:.1f}x wall time ({stats['exact']['tokens'] / stats['chunked']['tokens']:.1f}x fewer tokens)")
    print(f"chunked vs exact, cosine: keys mean {kc.mean():.4f} min {kc.min():.4f}; values mean {vc.mean():.4f} min {vc.min():.4f}")
    print("  by place in chunk (0 = first, no context):  " + "  ".join(
        f"{j}: key {kc[place == j].mean():.3f} value {vc[place == j].mean():.3f}" for j in range(k) if (place == j).any()))
    result = {"stats": stats, "key_cos_mean": float(kc.mean()), "value_cos_mean": float(vc.mean())}

    if args.annotate:
        from automr.memory import labels as L
        from automr.memory.annotate import load_annotations
        from automr.stages.annotate import run_annotate
        from automr.stages.annotate import AnnotateConfig

        anns = {}
        for mode in ("exact", "chunked"):
            run_annotate(AnnotateConfig(samples=samples, memory=work / mode, model=model, out=work / f"ann-{mode}",
                                        max_samples=args.annotate, progress=False))
            anns[mode] = load_annotations(work / f"ann-{mode}")
        ge = [np.asarray(c) - e for e, c in zip(anns["exact"]["logp_empty"], anns["exact"]["logp_cand"])]
        gc = [np.asarray(c) - e for e, c in zip(anns["chunked"]["logp_empty"], anns["chunked"]["logp_cand"])]
        corr = np.corrcoef(np.concatenate(ge), np.concatenate(gc))[0, 1]
        same = np.mean([a.argmax() == b.argmax() for a, b in zip(ge, gc)])
        share = L.headroom_share([e[c.argmax()] for e, c in zip(ge, gc)], ge)
        print(f"annotation on {len(ge)} samples: gain correlation {corr:.3f}; same best element {same:.2f}; "
              f"the chunked-best element captures {share:+.3f} of the exact headroom; headroom exact "
              f"{np.mean([g.max() - g.mean() for g in ge]):.3f} vs chunked {np.mean([g.max() - g.mean() for g in gc]):.3f} nats")
        result |= {"gain_corr": float(corr), "same_best": float(same), "chunked_best_share_of_exact": float(share)}
    if args.work:
        (work / "bench_memory_build.json").write_text(json.dumps(result, indent=2, default=float))
    ex.close()
    ch.close()


if __name__ == "__main__":
    main()
