"""The paper's retriever against the feature retriever, on held-out headroom share, over seeds (issue 10, section 3).

Given annotate outputs of the train, valid and test splits (one memory store), trains both kinds per
seed with the same labels, loss and early stopping (`automr train-retriever --features none|cheap`,
validation headroom share), then scores the *test* annotations with each, through the same function
inference uses (automr.methods.feature_retriever.select_elements), and prints per seed:

  seed | paper share [95%] | features share [95%] | features - paper [95%, paired over samples]

with the mean and spread over seeds, and the cheap baselines (random's expectation is 0; most recent
element) on the same samples. Everything goes to OUT/compare.json; the retrievers stay in
OUT/{paper,features}-seed-S/ (a second run with the same OUT retrains into fresh folders).

Run (from the repository root):
  .venv/bin/python benchmarks/compare_retrievers.py --train ANN_TRAIN --valid ANN_VALID --test ANN_TEST \\
      --out runs/compare-retrievers --seeds 0,1,2 [--temperature 1.0 --epochs 100 ...]

Recall (optional, it decodes with the LLM): with --samples PREPARED and --method-options FILE.yaml (the
`automr` method's options without `retriever`: model or adapter, memory, decoding, ...), every retriever
is also evaluated as the `automr` method on the same test samples (--n-eval, seed 0 subset) with
--slot-elements 1[,2,3] elements in the slot, into OUT/eval-{kind}-seed-S-kK/, and Recall@1/5/10 with
their intervals are printed per seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("none", "cheap")
LABEL = {"none": "paper", "cheap": "features"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="annotate output of the training split")
    p.add_argument("--valid", type=Path, required=True, help="annotate output of the validation split (early stopping)")
    p.add_argument("--test", type=Path, required=True, help="annotate output of the test split (held out)")
    p.add_argument("--memory", type=Path, default=None, help="memory store (default: the annotations')")
    p.add_argument("--out", type=Path, required=True, help="work folder (retrievers, compare.json)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--label-type", default="loglik_gain", choices=["loglik_gain", "prob_diff"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--feature-similarity", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--samples", type=Path, default=None, help="prepared data folder: also evaluate Recall (decodes)")
    p.add_argument("--method-options", type=Path, default=None, help="YAML mapping of automr method options (no retriever)")
    p.add_argument("--slot-elements", default="1", help="comma-separated k for the Recall runs (1-3)")
    p.add_argument("--n-eval", type=int, default=0, help="test samples decoded (0 = all)")
    return p.parse_args()


def recall(args: argparse.Namespace, folder: Path, kind: str, seed: int, k: int) -> dict[str, Any]:
    """Recall@1/5/10 [95%] of the automr method with this retriever and k elements in the slot."""
    import yaml

    from automr.stages.evaluate import EvaluateConfig, run_evaluate

    run = args.out / f"eval-{LABEL[kind]}-seed-{seed}-k{k}"
    clear_own(run, "eval.json")
    opts = (yaml.safe_load(args.method_options.read_text()) or {}) | {"retriever": str(folder), "slot_elements": k}
    run_evaluate(EvaluateConfig(samples=args.samples, run=run, methods=["automr"], method_options={"automr": opts},
                                n_eval=args.n_eval, seed=0, n_boot=args.n_boot))
    m = json.loads((run / "metrics.json").read_text())["automr"]
    return {f"recall@{d}": m[f"recall@{d}"] for d in (1, 5, 10)} | {"ci95": m["ci95"], "n": m["n"]}


def clear_own(folder: Path, marker: str) -> None:
    """Remove a folder a previous run of this script wrote (it holds `marker`); refuse any other."""
    if not folder.exists():
        return
    if not (folder / marker).is_file():
        raise SystemExit(f"{folder} exists and is not a {marker} folder this script wrote; choose another --out")
    shutil.rmtree(folder)


def train(args: argparse.Namespace, kind: str, seed: int) -> Path:
    from automr.stages.train_retriever import TrainRetrieverConfig, run_train_retriever

    out = args.out / f"{LABEL[kind]}-seed-{seed}"
    clear_own(out, "retriever.json")
    cfg = TrainRetrieverConfig(
        annotations=args.train, valid_annotations=args.valid, memory=args.memory, out=out, seed=seed,
        label_type=args.label_type, temperature=args.temperature, epochs=args.epochs, patience=args.patience,
        hidden=args.hidden, lr=args.lr, batch_size=args.batch_size, features=kind,
        feature_similarity=args.feature_similarity, feature_cache=args.out / "title-embeddings", progress=False,
    )
    return run_train_retriever(cfg)


def chosen_gains(folder: Path, data: Any, frame: Any, keys: list[np.ndarray]) -> np.ndarray:
    """Gain (nats over the empty slot) of the element the retriever in `folder` picks per test sample."""
    from automr.methods.feature_retriever import load_retriever, select_elements

    r = load_retriever(folder)
    pick = select_elements(r, frame, data.queries, keys, 1)[:, 0]
    return np.array([g[int(i)] for g, i in zip(data.gains(), pick)])


def paired_difference(a: np.ndarray, b: np.ndarray, gains: list[np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """Share(b) - share(a) on the same samples, with a 95% paired bootstrap interval (resampling samples)."""
    mean = np.array([g.mean() for g in gains])
    den = np.array([g.max() for g in gains]) - mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    d = den[idx].sum(1)
    boots = np.where(d > 0, (b - a)[idx].sum(1) / np.where(d > 0, d, 1.0), np.nan)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"diff": float((b - a).sum() / den.sum()), "ci95": [float(lo), float(hi)]}


def main() -> None:
    from automr.eval.headroom import share_with_interval
    from automr.stages.annotate import annotate_config
    from automr.stages.train_retriever import annotated_samples, retrieval_data_from_files

    args = parse()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    data, info = retrieval_data_from_files(args.test, args.memory)
    frame = annotated_samples(annotate_config(args.test), info["sample_index"], [len(r) for r in data.memory_rows])
    gains = data.gains()
    keys = [np.asarray(data.key_bank[rows]) for rows in data.memory_rows]
    recent = share_with_interval([g[-1] for g in gains], gains, args.n_boot, 0)
    rows, t0 = [], time.perf_counter()
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        picked = {}
        for kind in KINDS:
            folder = train(args, kind, seed)
            picked[kind] = chosen_gains(folder, data, frame, keys)
            m = json.loads((folder / "metrics.json").read_text())
            row[LABEL[kind]] = share_with_interval(picked[kind], gains, args.n_boot, seed) | {
                "best_epoch": m["best_epoch"], "valid_share": m["final"]["valid"]["headroom_share"], "folder": str(folder)}
            if args.samples is not None:
                row[LABEL[kind]]["recall"] = {f"k{k}": recall(args, folder, kind, seed, int(k)) for k in args.slot_elements.split(",")}
        row["features_minus_paper"] = paired_difference(picked["none"], picked["cheap"], gains, args.n_boot, seed)
        rows.append(row)
    info["store"].close()
    summary = {
        "test_annotations": str(args.test), "n_test": len(data), "mean_m": float(np.mean([len(g) for g in gains])),
        "headroom_nats": float(np.mean([g.max() - g.mean() for g in gains])), "recent": recent, "seeds": rows,
        "feature_names": json.loads((Path(rows[0]["features"]["folder"]) / "retriever.json").read_text())["feature_names"],
        "over_seeds": {k: {"mean": float(np.mean([r[k]["share"] for r in rows])),
                           "sd": float(np.std([r[k]["share"] for r in rows], ddof=1)) if len(rows) > 1 else float("nan")}
                       for k in ("paper", "features")},
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    report(summary)


def report(s: dict[str, Any]) -> None:
    f = lambda r: f"{r['share']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"  # noqa: E731
    print(f"held-out test headroom share ({s['n_test']} annotated samples, mean |M| {s['mean_m']:.1f}, "
          f"headroom {s['headroom_nats']:.3f} nats/sample); features: {', '.join(s['feature_names'])}")
    print(f"{'seed':>4} | {'paper [95%]':>24} | {'features [95%]':>24} | {'features - paper [95%, paired]':>30} | best epochs")
    for r in s["seeds"]:
        d = r["features_minus_paper"]
        diff = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        print(f"{r['seed']:>4} | {f(r['paper']):>24} | {f(r['features']):>24} | {diff:>30} | "
              f"{r['paper']['best_epoch']} / {r['features']['best_epoch']}")
    o = s["over_seeds"]
    sd = lambda k: f" (sd {o[k]['sd']:.3f})" if len(s["seeds"]) > 1 else ""  # noqa: E731  (no spread from one seed)
    print(f"over {len(s['seeds'])} seed(s): paper {o['paper']['mean']:+.3f}{sd('paper')}, "
          f"features {o['features']['mean']:+.3f}{sd('features')}; most recent element "
          f"{f(s['recent'])}; random 0 by definition; {s['seconds']:.0f} s")
    if "recall" not in s["seeds"][0]["paper"]:
        return
    print("Recall of the automr method (test samples; k = elements in the slot): R@1 [95%] / R@5 [95%] / R@10")
    for r in s["seeds"]:
        for kind in ("paper", "features"):
            for k, m in r[kind]["recall"].items():
                ci = m["ci95"]
                print(f"  seed {r['seed']} {kind:>8} {k}: R@1 {m['recall@1']:.3f} [{ci['recall@1'][0]:.3f}, {ci['recall@1'][1]:.3f}]"
                      f" / R@5 {m['recall@5']:.3f} [{ci['recall@5'][0]:.3f}, {ci['recall@5'][1]:.3f}] / R@10 {m['recall@10']:.3f}"
                      f" (n {m['n']})")


if __name__ == "__main__":
    main()
