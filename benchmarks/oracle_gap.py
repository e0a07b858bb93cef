"""How far is the true item from the recommender's top-1, against what the best memory element adds?

The oracle diagnostic (`evaluate --annotated`, method `oracle`) asks whether any retrieval could move Recall;
this measures why not, on the same annotated samples. Per sample, with the empty slot and the annotation's own
prompt rule: log P(true title) (checked against the annotation's logp_empty) and log P(the title a method ranked
first); the gap between them, against the best element's gain (max logp_cand - logp_empty). Where the best
gain is below the gap, even a perfect retriever leaves the top-1 title ahead of the true one in likelihood.

Run (after `automr run configs/movielens-100k-cpu-oracle.yaml`):
    .venv/bin/python benchmarks/oracle_gap.py --annotations runs/movielens-100k-cpu/annotations-test \\
        --run runs/movielens-100k-cpu-oracle/eval --method bigrec --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", type=Path, required=True, help="an annotate output (its config names data, model, memory)")
    ap.add_argument("--run", type=Path, required=True, help="an evaluate output that ranked those samples")
    ap.add_argument("--method", default="bigrec", help="whose top-1 title to compare with (default bigrec)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from automr.data.schema import PreparedData
    from automr.eval.evaluator import load_predictions
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM
    from automr.memory.annotate import encode_sample, load_annotations
    from automr.memory.store import MemoryStore
    from automr.stages.annotate import annotate_config
    from automr.memory.parallel import load_stage_lm

    acfg = annotate_config(args.annotations)
    ann = load_annotations(args.annotations)
    data = PreparedData.load(acfg.samples)
    frame = data.split(acfg.split)[ann["sample_index"].to_list()]
    pred = load_predictions(args.run, args.method).select("row", "ranked_items")
    top1 = dict(zip(pred["row"].to_list(), (r[0] for r in pred["ranked_items"].to_list())))
    missing = [i for i in ann["sample_index"].to_list() if i not in top1]
    if missing:
        raise SystemExit(f"{len(missing)} annotated samples are not in {args.run}'s {args.method} predictions: "
                         "evaluate with `annotated:` set to these annotations")

    store = MemoryStore.open(acfg.memory)
    lm = load_stage_lm(acfg.model, acfg.adapter, device="cpu", dtype=acfg.dtype)
    split = SplitLM(lm, store.meta.layer)
    titles = data.titles()
    builder = PromptBuilder.for_lm(lm, max_length=acfg.max_length, slot_tokens=store.meta.max_value_tokens,
                                   answers=titles.values())
    reserve = store.meta.max_value_tokens
    recents = frame["recent_items"].to_list()
    rows = ann["sample_index"].to_list()

    @torch.no_grad()  # answer_logprob also serves training, so it keeps autograd on by itself
    def logprobs(answers: list[int]) -> np.ndarray:
        out = []
        for s in range(0, len(answers), args.batch_size):
            prompts = [encode_sample(builder, titles, recents[j], answers[j], reserve)
                       for j in range(s, min(s + args.batch_size, len(answers)))]
            out.append(split.answer_logprob(prompts, [None] * len(prompts)).double().cpu().numpy())
        return np.concatenate(out)  # (n,)

    true = logprobs(frame["target_item"].to_list())
    first = logprobs([int(top1[r]) for r in rows])
    empty = ann["logp_empty"].to_numpy()
    best_gain = np.array([max(c) for c in ann["logp_cand"].to_list()]) - empty
    gap = first - true
    q = lambda x: f"mean {x.mean():+.2f}, median {np.median(x):+.2f}, [p10 {np.percentile(x, 10):+.2f}, p90 {np.percentile(x, 90):+.2f}]"  # noqa: E731
    print(f"{len(rows)} annotated {acfg.split} samples; top-1 of {args.method} from {args.run}")
    print(f"  log P(true title), empty slot      {q(true)}  (annotation's logp_empty: max |diff| {np.abs(true - empty).max():.2e})")
    print(f"  log P({args.method}'s top-1 title)      {q(first)}")
    print(f"  gap top-1 - true (nats)            {q(gap)}")
    print(f"  best element's gain (nats)         {q(best_gain)}")
    print(f"  samples whose best gain closes the gap: {int((best_gain >= gap).sum())} of {len(rows)}")


if __name__ == "__main__":
    main()
