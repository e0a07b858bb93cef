"""Recall along a long fine-tuning run: BIGRec from the weights at each validation step, on the same samples.

The fine-tuning stage validates by the answer loss over the title tree (a smooth criterion, DESIGN.md);
whether a lower loss turns into Recall is what issue 10 asks. This script evaluates BIGRec from
snapshots of a full fine-tuning run's weights (folders `step-N` holding the run's config.yaml and
model/) with constrained decoding, with the configs' length-normalised model scores (`bigrec`), with D3's
trie scores (`bigrec@d3`) and with trie scores and 50 beams (`bigrec@d3b50`, the epoch config's @d3
decoding), on the same seeded validation samples, beside popularity and SASRec
evaluated once on them (SASRec early-stops on the validation split: its figure there is in-sample).
Prints one row per step with the validation losses from the run's train_log.jsonl; `--plot` draws
OUT/checkpoint_recall.png. A step already evaluated is skipped (a variant added since is ranked alone), so
the script can run again as new snapshots appear.

Snapshots: the stage keeps only its latest checkpoint, so copy the weights at each validation step while
it trains, e.g. with hard links (a checkpoint is replaced as a whole folder, so a link keeps its step):
    FT=runs/movielens-100k-cpu-epoch/finetune; while sleep 60; do s=$(python -c "import json; \\
      print(json.load(open('$FT/checkpoint/state.json'))['step'])"); [ $((s % 96)) = 0 ] && [ ! -d SNAP/step-$s ] \\
      && mkdir -p SNAP/step-$s/model && cp -l $FT/checkpoint/model/* SNAP/step-$s/model/ && cp $FT/config.yaml SNAP/step-$s/; done
Run (`--variants bigrec@d3b50` ranks with that decoding alone):
    OMP_NUM_THREADS=1 python benchmarks/checkpoint_recall.py --samples runs/movielens-100k-cpu/data --snapshots SNAP \\
        --train-log runs/movielens-100k-cpu-epoch/finetune/train_log.jsonl --out OUT [--plot]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

VARIANTS = {  # each on top of constrained decoding with 10 beams
    "bigrec": {},
    "bigrec@d3": {"beam_scores": "trie", "length_penalty": 0},
    "bigrec@d3b50": {"beam_scores": "trie", "length_penalty": 0, "num_beams": 50},  # the epoch config's @d3 decoding
}
COMPARE = ["bigrec@d3:bigrec", "bigrec@d3b50:bigrec@d3"]
REFERENCE = ("popularity", "sasrec")


def evaluate(samples: Path, run: Path, methods: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """`automr evaluate` of `methods` (name -> options) into `run`, unless its metrics.json has them all (an
    evaluation asked for a method more ranks only that one: the evaluate stage resumes); its metrics.json."""
    done = run / "metrics.json"
    if not done.is_file() or set(methods) - set(json.loads(done.read_text())):
        cfg = {"samples": str(samples), "split": args.split, "n_eval": args.n_eval, "seed": 0, "methods": list(methods),
               "run": str(run), "method_options": {m: o for m, o in methods.items() if o}}
        if compare := [c for c in COMPARE if set(c.split(":")) <= set(methods)]:
            cfg["compare"] = compare
        run.parent.mkdir(parents=True, exist_ok=True)
        config = run.parent / f"{run.name}.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run([sys.executable, "-m", "automr", "evaluate", "--config", str(config)], check=True)
    return json.loads((run / "metrics.json").read_text())


def valid_losses(train_log: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if '"valid_loss' in line]
    return {int(r["step"]): {"trie": r.get("valid_loss_trie"), "full": r.get("valid_loss_full")} for r in rows}


def collect(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per snapshot step (evaluating what is missing), and the reference methods' metrics."""
    reference = evaluate(args.samples, args.reference or args.out / "reference", {m: {} for m in REFERENCE}, args)
    reference = {m: reference[m] for m in REFERENCE}
    losses = valid_losses(args.train_log) if args.train_log else {}
    rows = []
    for snap in sorted(args.snapshots.glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(re.fullmatch(r"step-(\d+)", snap.name).group(1))  # type: ignore[union-attr]
        ft = yaml.safe_load((snap / "config.yaml").read_text())
        llm = {"adapter": str(snap), "decoding": "constrained", "num_beams": 10, "batch_size": 10}
        variants = {m: llm | VARIANTS[m] for m in args.variants}
        metrics = evaluate(args.samples, args.out / snap.name, variants, args)
        rows.append({"step": step, "samples": step * int(ft["batch_size"]) * int(ft["grad_accum"]),
                     "loss": losses.get(step, {}), "metrics": metrics})
    return rows, reference


def projection(args: argparse.Namespace, samples_per_step: float) -> str:
    """The validation loss's least-squares slope per doubling of samples seen, and where that line meets the
    popularity counts' loss (a straight line in log samples: a projection, not a measurement)."""
    import numpy as np

    losses = sorted(valid_losses(args.train_log).items()) if args.train_log else []
    if len(losses) < 2:
        return "projection: too few validations"
    x = np.log2([step * samples_per_step for step, _ in losses])
    slope, intercept = np.polyfit(x, [v["trie"] for _, v in losses], 1)
    text = f"projection: validation trie loss {slope:+.4f} nats per doubling of samples over {len(losses)} validations"
    if args.popularity_loss is not None and slope < 0:
        cross = 2 ** ((args.popularity_loss - intercept) / slope)
        text += f"; the line reaches the popularity counts' {args.popularity_loss} at ~{cross:,.0f} samples seen"
    return text


def cell(m: dict[str, Any], key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    head = ("| step | samples seen | valid trie loss | method | Recall@1 | Recall@5 | Recall@10 [95%] | NDCG@10 | distinct top-1 |\n"
            "|---:|---:|---:|---|---:|---:|---|---:|---:|")
    out = [head]
    for r in rows:
        loss = r["loss"].get("trie")
        for name in (v for v in VARIANTS if v in r["metrics"]):
            m = r["metrics"][name]
            out.append(f"| {r['step']} | {r['samples']:,} | {'' if loss is None else f'{loss:.4f}'} | {name} | {m['recall@1']:.3f} | "
                       f"{m['recall@5']:.3f} | {cell(m, 'recall@10')} | {m['ndcg@10']:.4f} | {m.get('distinct_top1', '')} |")
    for name, m in reference.items():
        out.append(f"| | | | {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {cell(m, 'recall@10')} | {m['ndcg@10']:.4f} | "
                   f"{m.get('distinct_top1', '')} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], reference: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["samples"] for r in rows]
    per_step = rows[0]["samples"] / rows[0]["step"]  # samples per optimizer step
    losses = sorted(valid_losses(args.train_log).items()) if args.train_log else []
    ax_loss.plot([s * per_step for s, _ in losses], [v["trie"] for _, v in losses], "o-", label="BIGRec (every validation)")
    for value, name, style in ((args.popularity_loss, "popularity counts", "--"), (args.uniform_loss, "uniform", ":")):
        if value is not None:
            ax_loss.axhline(value, color="grey", ls=style, label=f"{name} ({value})")
    ax_loss.set(xlabel="training samples seen", ylabel="answer loss over the title tree (nats/token)",
                title="validation loss")
    ax_loss.legend()
    for name, marker in zip(VARIANTS, "os^"):
        if name not in args.variants:
            continue
        y = [r["metrics"][name]["recall@10"] for r in rows]
        lo = [r["metrics"][name]["recall@10"] - r["metrics"][name]["ci95"]["recall@10"][0] for r in rows]
        hi = [r["metrics"][name]["ci95"]["recall@10"][1] - r["metrics"][name]["recall@10"] for r in rows]
        ax_rec.errorbar(x, y, yerr=[lo, hi], marker=marker, capsize=3, label=name)
    for name, color in zip(REFERENCE, ("grey", "black")):
        ax_rec.axhline(reference[name]["recall@10"], color=color, ls="--", label=f"{name} ({reference[name]['recall@10']:.3f})")
    ax_rec.set(xlabel="training samples seen", ylabel="Recall@10 (95% interval)", ylim=(0, None),
               title="Recall@10 on the same validation samples")
    ax_rec.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True, help="prepared data folder")
    ap.add_argument("--snapshots", type=Path, required=True, help="folder of step-N snapshots (config.yaml + model/)")
    ap.add_argument("--train-log", type=Path, help="the fine-tuning run's train_log.jsonl (validation losses)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (evaluations, table, figure)")
    ap.add_argument("--reference", type=Path, help="a finished evaluation of popularity and SASRec on the same samples "
                    "(default: evaluated into OUT/reference)")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--popularity-loss", type=float, help="the popularity counts' trie loss on the run's validation samples "
                    "(`catalogue_references` of learning_curve.py)")
    ap.add_argument("--uniform-loss", type=float, help="a uniform answer's trie loss on the same samples")
    ap.add_argument("--plot", action="store_true", help="also draw OUT/checkpoint_recall.png")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the decodings to rank each snapshot with (default: all)")
    args = ap.parse_args()
    if args.reference is not None and args.reference.resolve().parent == args.out.resolve() \
            and re.fullmatch(r"step-\d+", args.reference.name):
        # Each evaluation into one folder rewrites its metrics.json with its own methods, so a shared folder
        # flips between the two sets (and a step evaluated before resume records were kept is ranked again).
        sys.exit(f"--reference {args.reference} is a snapshot's evaluation folder; pass another folder (or none)")
    rows, reference = collect(args)
    text = table(rows, reference)
    if rows:
        text += "\n\n" + projection(args, rows[0]["samples"] / rows[0]["step"])
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    if args.plot and rows:
        plot(rows, reference, args.out / "checkpoint_recall.png", args)


if __name__ == "__main__":
    main()
