"""AutoMR with SmolLM2 (LoRA) on synthetic planted-interest data: does the retriever find the cue?

Runs a pipeline file (default configs/synthetic-smollm2.yaml) with its relative paths under
--workdir, then prints, from its outputs:
  * Recall@5 (and the other metrics) of AutoMR, BIGRec (empty slot), random and most-recent retrieval
    and ReLLa-style retrieval, with 95% bootstrap intervals, and whether AutoMR's interval clears the others;
  * how often each retrieval method put the planted cue (the series' Part 1) in the slot on test samples;
  * the validation headroom shares (automr headroom).

Stages whose outputs are up to date are skipped (automr run's stamps), so a rerun with the same
--workdir only redoes what changed; --fresh starts over. The tiny-model version of the same
check is the default-suite test tests/test_automr_synthetic.py (configs/synthetic-tiny.yaml).

Run:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_synthetic_smollm2.py --workdir /tmp/automr-smollm2
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_synthetic_smollm2.py --config configs/synthetic-tiny.yaml --workdir /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "synthetic-smollm2.yaml")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/automr-bench-synthetic-smollm2"))
    ap.add_argument("--fresh", action="store_true", help="delete the workdir first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import numpy as np
    import polars as pl
    import torch
    import yaml

    from automr.pipeline import plan_pipeline, run_pipeline_file

    if args.threads:
        torch.set_num_threads(args.threads)
    config = args.config.resolve()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    t0 = time.perf_counter()
    run_pipeline_file(config)
    seconds = time.perf_counter() - t0

    stages = {label: cfg for label, _, cfg in plan_pipeline(config)}
    ev, raw = stages["evaluate"], Path(stages["synthetic"].out)
    metrics = json.loads((Path(ev.run) / "metrics.json").read_text())
    paired = json.loads((Path(ev.run) / "paired.json").read_text())
    planted = pl.read_parquet(raw / "planted.parquet")
    cue = dict(zip(planted["user_id"].to_list(), planted["cue_item"].to_list()))

    print(f"\n== {config.name}: pipeline {seconds:.0f} s in {args.workdir} (torch threads {torch.get_num_threads()})")
    print(f"{'method':8s} {'n':>4s}  {'recall@5 [95% interval]':26s} {'recall@1':>8s} {'ndcg@5':>7s}  cue in slot")
    for m, e in metrics.items():
        pred_file = Path(ev.run) / "predictions" / f"{m}.parquet"
        rate = ""
        if pred_file.is_file():
            pred = pl.read_parquet(pred_file)
            if "retrieved_item" in pred.columns:
                hits = [cue.get(u) == i for u, i in zip(pred["user_id"].to_list(), pred["retrieved_item"].to_list())]
                rate = f"{np.mean(hits):.1%}"
        lo, hi = e["ci95"]["recall@5"]
        print(f"{m:8s} {e['n']:4d}  {e['recall@5']:.3f} [{lo:.3f}, {hi:.3f}]        {e['recall@1']:8.3f} {e['ndcg@5']:7.3f}  {rate}")
    if "automr" in metrics:
        a_lo = metrics["automr"]["ci95"]["recall@5"][0]
        for other in ("bigrec", "random"):
            if other in metrics:
                o_hi = metrics[other]["ci95"]["recall@5"][1]
                d = paired.get(f"automr:{other}", {}).get("recall@5")
                diff = f"; paired diff {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p={d['p_value']:.3g}" if d else ""
                print(f"automr vs {other}: intervals {'separate' if a_lo > o_hi else 'OVERLAP'} (automr low {a_lo:.3f}, {other} high {o_hi:.3f}){diff}")
    if "headroom" in stages:
        h = json.loads((Path(stages["headroom"].out) / "headroom.json").read_text())
        shares = ", ".join(f"{m} {r['share']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" for m, r in h["methods"].items())
        print(f"headroom shares ({h['split']}, {h['n_samples']} samples, headroom {h['headroom_nats']:.3f} nats): {shares}")
    from automr.pipeline import OUTPUT_FIELD, STAMP

    timings = {}
    for label, command, cfg in plan_pipeline(config):
        out = getattr(cfg, OUTPUT_FIELD.get(command, "out"), None)
        if out is not None and (Path(out) / STAMP).is_file():
            timings[label] = json.loads((Path(out) / STAMP).read_text()).get("seconds")
    print("stage seconds (when last run):", yaml.safe_dump(timings, sort_keys=False, default_flow_style=True).strip())


if __name__ == "__main__":
    main()
