"""Priors in constrained decoding, side by side on the same samples (automr/llm/trie_prior.py).

For one adapter, BIGRec is evaluated once per decoding setting on the same seeded samples of one
split, with full rankings and the evaluator's history exclusion, and optionally popularity and
SASRec beside it. Settings:
  model   beam_scores model, length_penalty 1 (the decoding of the learning curve and older configs)
  R:P     beam_scores trie, length_penalty 0, reference_prior R, popularity_prior P (0:0 is D3's fix alone)
Each row: Recall@1/5/10 and NDCG@10 with the 95% interval of Recall@10, distinct top-1 items, and
the paired difference in Recall@10 and NDCG@10 against the first setting (paired bootstrap over
the same samples). Choose the weights on the validation split, then report them on test.

Run (outputs outside the checkout):
  OMP_NUM_THREADS=1 python benchmarks/trie_prior_sweep.py --samples PREPARED --adapter FT --out OUT \
      --split valid --n-eval 150 --settings 0:0,0:1,0.5:1 --parallel 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from automr.eval.bootstrap import paired_bootstrap
from automr.eval.metrics import per_sample_metrics
from evaluate_common import evaluate_command


def decoding_options(setting: str) -> dict[str, Any]:
    """BIGRec's decoding options for one setting string (see the module docstring)."""
    if setting == "model":
        return {"beam_scores": "model", "length_penalty": 1.0}
    ref, _, pop = setting.partition(":")
    return {"beam_scores": "trie", "length_penalty": 0.0, "reference_prior": float(ref), "popularity_prior": float(pop or 0)}


def command(args: argparse.Namespace, run: Path, methods: str, setting: str | None) -> list[str]:
    """The evaluation of one row: BIGRec with one decoding setting, or the baselines (setting None)."""
    return evaluate_command(args.samples, args.split, args.n_eval, run, methods=methods, seed=args.seed,
                            adapter=args.adapter if setting is not None else None, num_beams=args.num_beams,
                            cache_dir=args.out / "grounding-cache",
                            decoding=decoding_options(setting) if setting is not None else None)


def run_all(args: argparse.Namespace, jobs: list[tuple[Path, str, str | None]]) -> None:
    """Run the evaluations not yet done, `--parallel` at a time (each logs beside its folder)."""
    todo = [j for j in jobs if not (j[0] / "metrics.json").is_file()]
    running: list[tuple[subprocess.Popen, Path]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            run, methods, setting = todo.pop(0)
            log = open(f"{run}.log", "w")
            running.append((subprocess.Popen(command(args, run, methods, setting), stdout=log, stderr=subprocess.STDOUT), run))
        proc, run = running.pop(0)
        if proc.wait() != 0:
            raise SystemExit(f"evaluation {run} failed (exit {proc.returncode}); see {run}.log")


def per_sample(run: Path, method: str) -> dict[str, np.ndarray]:
    ranks = pl.read_parquet(run / "predictions" / f"{method}.parquet").sort("row")["rank"].to_numpy()
    return per_sample_metrics(ranks)


def row(name: str, metrics: dict[str, Any], mine: dict[str, np.ndarray], first: dict[str, np.ndarray] | None) -> str:
    lo, hi = metrics["ci95"]["recall@10"]
    cells = [name] + [f"{metrics[m]:.4f}" for m in ("recall@1", "recall@5")] + [f"{metrics['recall@10']:.4f} [{lo:.3f}, {hi:.3f}]",
             f"{metrics['ndcg@10']:.4f}", str(metrics.get("distinct_top1", "-"))]
    for m in ("recall@10", "ndcg@10"):
        if first is None:
            cells.append("-")
        else:
            p = paired_bootstrap(mine[m], first[m])
            cells.append(f"{p.diff:+.4f} [{p.ci95[0]:+.3f}, {p.ci95[1]:+.3f}] p={p.p_value:.2f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=Path, required=True, help="prepared data folder")
    p.add_argument("--adapter", type=Path, required=True, help="finetune output (adapter/ or model/)")
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the checkout)")
    p.add_argument("--split", choices=["valid", "test"], default="valid")
    p.add_argument("--n-eval", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=10)
    p.add_argument("--settings", default="0:0,0:1,0.5:1", help="comma-separated: model, or R:P (see the docstring)")
    p.add_argument("--baselines", default="popularity,sasrec", help="methods evaluated once beside ('' for none)")
    p.add_argument("--parallel", type=int, default=1, help="evaluations at a time")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = args.settings.split(",")
    for s in settings:
        decoding_options(s)  # refuse a malformed setting before any work
    jobs = [(args.out / f"{args.split}-{s.replace(':', '_')}", "bigrec", s) for s in settings]
    if args.baselines:
        jobs.append((args.out / f"{args.split}-baselines", args.baselines, None))
    run_all(args, jobs)
    print(f"| {args.split}, {args.n_eval} samples | Recall@1 | Recall@5 | Recall@10 [95%] | NDCG@10 | distinct top-1 | "
          f"Recall@10 - {settings[0]} | NDCG@10 - {settings[0]} |")
    print("|---|---:|---:|---|---:|---:|---|---|")
    first = None
    for run, _, s in jobs[: len(settings)]:
        mine = per_sample(run, "bigrec")
        print(row(f"bigrec {s}", json.loads((run / "metrics.json").read_text())["bigrec"], mine, first))
        first = first or mine
    if args.baselines:
        run = jobs[-1][0]
        for m in args.baselines.split(","):
            print(row(m, json.loads((run / "metrics.json").read_text())[m], per_sample(run, m), first))


if __name__ == "__main__":
    main()
