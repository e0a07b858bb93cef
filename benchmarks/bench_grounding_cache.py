"""Grounding's item embeddings: embedding the catalogue against reading it from each cache, side by side.

An evaluation per seed used to embed every title again (440-870 s on Amazon books' 9,362 titles with
SmolLM2 here). Now a second evaluation reads the user cache, keyed by the weights' and token sequences'
content (automr/llm/decoding.py). Prints, in one run, for the same model and catalogue: the embedding
pass, a load from an evaluation's own cache (keyed by name), and a load from the user cache (hashes
every weight first), with the ratios to the embedding pass; checks all three give the same matrix.

Run:
    .venv/bin/python benchmarks/bench_grounding_cache.py --samples runs/movielens-100k-cpu/data --threads 1
    .venv/bin/python benchmarks/bench_grounding_cache.py            # tiny random-init model, toy titles
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, help="prepared data folder whose items.parquet is the catalogue "
                    "(default: 200 toy titles)")
    ap.add_argument("--model", default="smollm2", help="model spec (with --samples)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-grounding-"))
    os.environ["AUTOMR_GROUNDING_CACHE"] = str(tmp / "user")  # a cold user cache, not the reader's own

    from automr.data.schema import PreparedData
    from automr.llm.decoding import GroundingIndex
    from automr.llm.loading import build_tiny_lm, load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.llm.toy import toy_titles

    if args.samples is None:
        titles = toy_titles(200)
        catalogue = list(enumerate(titles, start=1))
        lm = build_tiny_lm(titles)
    else:
        items = PreparedData.load(args.samples).items
        catalogue = list(zip(items["item_id"].to_list(), items["title"].to_list()))
        lm = load_lm(args.model, device="cpu")
    builder = PromptBuilder.for_lm(lm)

    def timed(cache_dir: Path) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        index = GroundingIndex.build(lm, builder, catalogue, cache_dir=cache_dir)
        return time.perf_counter() - t0, index.embeddings

    embed_s, first = timed(tmp / "seed-0")  # embeds; writes both caches
    own_s, own = timed(tmp / "seed-0")  # the same evaluation again: its own cache
    user_s, user = timed(tmp / "seed-1")  # another evaluation (the next seed): the user cache
    assert torch.equal(first, own) and torch.equal(first, user), "a cache returned other embeddings"
    n = len(catalogue)
    print(f"{n} titles, {lm.name}, {torch.get_num_threads()} thread(s)")
    print(f"  embed the catalogue          {embed_s:8.2f} s  ({n / embed_s:.0f} titles/s)")
    print(f"  evaluation's own cache       {own_s:8.2f} s  x{embed_s / own_s:.0f} faster")
    print(f"  user cache (hash + load)     {user_s:8.2f} s  x{embed_s / user_s:.0f} faster")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
