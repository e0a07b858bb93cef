"""Learning curve of fine-tuning recipes on CPU (issue 9 B2): validation loss and Recall@10 against training time.

Each recipe trains SmolLM2 on real prepared samples through the library's own fine-tuning loop
(`automr.stages.finetune._setup`, `automr.llm.finetune.train_step`) for a budget of CPU seconds,
and at fixed points of that budget saves its weights and measures:
  valid_loss   answer-token NLL over the whole vocabulary on the fine-tuning validation subset
               (64 samples by default), whatever loss the recipe trains with, so recipes compare;
               valid_loss_trie beside it (each token normalised over the title prefix tree)
  Recall@10    `automr evaluate --split valid` with BIGRec, constrained decoding, full rankings and
               the evaluator's history exclusion, on the same --n-eval validation samples for
               every recipe (a subprocess started beside training, so its time is not charged to
               training and training does not wait for it)

The x axis is the training process's CPU time (`time.process_time`, 1 thread), not wall time:
this machine is shared, and CPU seconds of a single-threaded process do not stretch when other
jobs run (wall time on an idle machine is about the same). Wall time is logged beside it.
The learning rate is constant after a short warm-up for every recipe, so no recipe is favoured
by a schedule tuned to a horizon; the real run decays over its own horizon.

Rows go to OUT/curve.jsonl (one per point); a recipe whose points are all there is skipped, so
the script can be re-run after an interruption. `--plot` draws OUT/learning_curve.png from them,
with popularity and SASRec on the same validation samples as reference lines.

Run (outputs and data outside the checkout):
  python -m automr prepare --data ../shared/data/movielens-100k --preset movielens-100k --out /work/bench/ml100k
  OMP_NUM_THREADS=1 python benchmarks/learning_curve.py --samples /work/bench/ml100k --out /work/bench/curve \
      --recipe qv --cpu-minutes 30
  python benchmarks/learning_curve.py --samples /work/bench/ml100k --out /work/bench/curve --plot
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from evaluate_common import evaluate_command

RECIPES: dict[str, dict[str, Any]] = {
    # BIGRec's recipe: LoRA r=8 on the attention's query and value projections.
    "qv": {"target_modules": ["q_proj", "v_proj"], "lora_r": 8, "lora_alpha": 16, "lr": 5e-4},
    # LoRA on every linear layer of the decoder.
    "all-linear": {"target_modules": ["all-linear"], "lora_r": 16, "lora_alpha": 32, "lr": 5e-4},
}


def recipe_settings(name: str) -> dict[str, Any]:
    """FinetuneConfig fields of a recipe: qv | all-linear | full, then -trie (the trie answer loss), then
    -prior (that loss over logits plus the popularity prior, `finetune --answer-prior 1`)."""
    prior = name.endswith("-trie-prior")
    name = name.removesuffix("-prior")
    base = name.removesuffix("-trie")
    if base == "full":  # every parameter; a smaller rate than LoRA's, as usual for full fine-tuning
        settings: dict[str, Any] = {"recipe": "full", "lr": 3e-5}
    elif base in RECIPES:
        settings = dict(RECIPES[base])
    else:
        raise SystemExit(f"unknown recipe {name!r}; expected one of {sorted(RECIPES) + ['full']}, optionally with -trie "
                         "or -trie-prior")
    if name.endswith("-trie"):
        settings["answer_loss"] = "trie"
    if prior:
        settings["answer_prior"] = 1.0
    # The split forward runs the instruction every prompt shares once per micro-batch (1.9x the HF
    # forward's tokens/s, the same loss and gradients: tests/test_slot_finetune.py); with no slot
    # filled (memory_aware_prob 0) it trains plain BIGRec, so every recipe gets the fastest path.
    settings["slot_mode"] = "states"
    return settings


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def decoding_of(recipe: str) -> dict[str, Any]:
    """BIGRec's decoding options for a recipe's points: what the older curves used (model scores, length
    normalised), or for a -prior recipe the trie scores plus the prior it was trained with."""
    if recipe.endswith("-prior"):
        return {"beam_scores": "trie", "length_penalty": 0.0, "popularity_prior": 1.0}
    return {}


def evaluate_baselines(samples: Path, run: Path, n_eval: int) -> dict[str, Any]:
    """Run (unless done) popularity and SASRec on the curve's validation samples; their metrics.json."""
    if not (run / "metrics.json").is_file():
        subprocess.run(evaluate_command(samples, "valid", n_eval, run, methods="popularity,sasrec"), check=True)
    return json.loads((run / "metrics.json").read_text())


def train_curve(args: argparse.Namespace) -> None:
    """Train one recipe for its CPU budget, measuring at each point (see the module docstring)."""
    from transformers import get_constant_schedule_with_warmup

    from automr.llm.finetune import _accelerator, planned_steps, train_step, validation_loss
    from automr.stages.finetune import FinetuneConfig, _setup

    out = args.out / args.recipe
    rows_path = args.out / "curve.jsonl"
    points = [float(p) * 60 for p in args.points.split(",")] + [args.cpu_minutes * 60]
    points = sorted({p for p in points if p <= args.cpu_minutes * 60})
    if sum(r["recipe"] == args.recipe for r in read_rows(rows_path)) >= len(points):
        print(f"{args.recipe}: every point is in {rows_path}; nothing to do")
        return
    cfg = FinetuneConfig(samples=args.samples, out=out / "ft", model=args.model, epochs=50, batch_size=8, grad_accum=1,
                         max_valid_samples=args.n_valid_loss, warmup_steps=10, progress=False, seed=0, **recipe_settings(args.recipe))
    run = _setup(cfg, _accelerator(cpu=True))
    run.scheduler = get_constant_schedule_with_warmup(run.optimizer, cfg.warmup_steps)
    cpu = samples_seen = tokens = 0
    wall0, recent_losses, pending = time.perf_counter(), [], []
    for epoch, _, micros, slots in planned_steps(run, cfg, 0):
        t0 = time.process_time()
        loss, _, step_tokens = train_step(run, micros, slots)
        cpu += time.process_time() - t0
        samples_seen += sum(len(m) for m in micros)
        tokens += step_tokens
        recent_losses = (recent_losses + [loss])[-10:]
        if points and cpu >= points[0]:
            points.pop(0)
            if pending:  # one evaluation at a time per recipe keeps memory bounded (each holds a model)
                write_row(rows_path, *pending.pop())
            pending.append(measure(args, run, out, cfg, cpu, samples_seen, tokens, recent_losses, epoch, time.perf_counter() - wall0))
        if not points:
            break
    for entry in pending:
        write_row(rows_path, *entry)


def write_row(rows_path: Path, row: dict[str, Any], proc: subprocess.Popen, eval_dir: Path) -> None:
    """Wait for a point's evaluation (it ran beside training: own process, own CPU time), then append its row."""
    if proc.wait() != 0:
        raise SystemExit(f"evaluation {eval_dir} failed (exit {proc.returncode}); see {eval_dir}.log")
    row["metrics"] = json.loads((eval_dir / "metrics.json").read_text())["bigrec"]
    with open(rows_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def measure(args: argparse.Namespace, run: Any, out: Path, cfg: Any, cpu: float, samples_seen: int, tokens: int,
            recent_losses: list[float], epoch: int, wall: float) -> tuple[dict[str, Any], subprocess.Popen, Path]:
    """Validation losses in process, then the weights saved and Recall@10 started in a subprocess
    (training goes on meanwhile; its CPU time is not the trainer's)."""
    from automr.config import save_config
    from automr.llm.finetune import validation_loss
    from automr.llm.trained_weights import WEIGHTS_DIR, save_weights, trained_state

    vloss, vloss_full, vloss_trie = validation_loss(run, 8)
    point = out / f"cpu-{int(cpu)}"
    save_weights(run.peft_model, trained_state(run.peft_model, run.recipe), point / WEIGHTS_DIR[run.recipe], run.recipe)
    save_config(cfg, point)
    eval_dir = out / f"eval-{int(cpu)}"
    log = open(out / f"eval-{int(cpu)}.log", "w")
    cmd = evaluate_command(args.samples, "valid", args.n_eval, eval_dir, adapter=point, cache_dir=args.out / "grounding-cache",
                           decoding=decoding_of(args.recipe))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return {"recipe": args.recipe, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "epoch": epoch,
            "samples": samples_seen, "tokens": tokens, "tokens_per_cpu_s": round(tokens / cpu, 1),
            "train_loss": sum(recent_losses) / len(recent_losses), "valid_loss": vloss_full,
            "valid_loss_trie": vloss_trie}, proc, eval_dir


def plot(args: argparse.Namespace) -> None:
    """OUT/learning_curve.png: validation losses and Recall@10 against CPU minutes, one line per recipe;
    then each recipe's rows and its loss slope per doubling of samples (the projection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(args.out / "curve.jsonl")
    refs = evaluate_baselines(args.samples, args.out / "eval-baselines", args.n_eval)
    fig, (ax_trie, ax_full, ax_rec) = plt.subplots(1, 3, figsize=(15, 4.2))
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        minutes = [r["cpu_s"] / 60 for r in mine]
        ax_trie.plot(minutes, [r["valid_loss_trie"] for r in mine], marker="o", label=recipe)
        ax_full.plot(minutes, [r["valid_loss"] for r in mine], marker="o", label=recipe)
        rec = [recall(r["metrics"]) for r in mine]
        ci = [r["metrics"]["ci95"]["recall@10"] for r in mine]
        err = [[v - lo for v, (lo, _) in zip(rec, ci)], [hi - v for v, (_, hi) in zip(rec, ci)]]
        ax_rec.errorbar(minutes, rec, yerr=err, marker="o", capsize=3, label=f"{recipe} (95% interval)")
    for name, style, color in (("popularity", ":", "black"), ("sasrec", "--", "grey")):
        ax_rec.axhline(recall(refs[name]), color=color, linestyle=style, label=f"{name} (same samples)")
    refs_loss = catalogue_references(args)
    for (name, value), style in zip(refs_loss.items(), (":", "--")):
        ax_trie.axhline(value, color="grey", linestyle=style, label=f"{name} over the catalogue (no model)")
    xlabel = "training CPU minutes (1 thread)"
    ax_trie.set(xlabel=xlabel, ylabel="nats per answer token", title="Validation loss over the title prefix tree")
    ax_full.set(xlabel=xlabel, ylabel="nats per answer token", title="Validation loss over the whole vocabulary")
    ax_rec.set(xlabel=xlabel, ylabel="Recall@10", title=f"Validation Recall@10 ({args.n_eval} samples, history excluded)")
    ax_rec.set_ylim(bottom=0)
    for ax in (ax_trie, ax_full, ax_rec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "learning_curve.png", dpi=120)
    print(f"wrote {args.out / 'learning_curve.png'}")
    n_train = json.loads((args.samples / "stats.json").read_text())["samples"]["train"]
    for r in rows:
        lo, hi = r["metrics"]["ci95"]["recall@10"]
        print(f"{r['recipe']:>16} {r['cpu_s'] / 60:5.1f} min {r['samples']:6d} samples {r['tokens_per_cpu_s']:6.0f} tok/cpu-s "
              f"valid loss trie {r['valid_loss_trie']:.3f} full {r['valid_loss']:.3f} Recall@10 {recall(r['metrics']):.3f} "
              f"[{lo:.3f}, {hi:.3f}] distinct top-1 {r['metrics'].get('distinct_top1')}")
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        print(f"{recipe:>16} {projection([r for r in rows if r['recipe'] == recipe], n_train)}")
    for name, value in refs_loss.items():
        print(f"{name:>16} trie loss {value:.3f} (the same validation samples, no model)")
    for name in ("popularity", "sasrec"):
        lo, hi = refs[name]["ci95"]["recall@10"]
        print(f"{name:>16} Recall@10 {recall(refs[name]):.3f} [{lo:.3f}, {hi:.3f}]")


def catalogue_references(args: argparse.Namespace) -> dict[str, float]:
    """The trie loss (nats per answer token, forced tokens counted) that a model-free answer scores on
    the same validation samples the curve's loss uses: uniform over the catalogue, and the popularity
    baseline's counts (add-one smoothed), each factorised over the title prefix tree as the trie loss is."""
    from automr.data.schema import PreparedData
    from automr.llm.title_trie import build_trie
    from automr.llm.loading import load_lm
    from automr.llm.prompts import PromptBuilder
    from automr.llm.trie_prior import popularity_prior
    from automr.methods.popularity import popularity_counts
    from automr.utils.seeding import select_subset

    data = PreparedData.load(args.samples)
    titles = data.titles()
    builder = PromptBuilder.for_lm(load_lm(args.model), answers=titles.values())
    trie = build_trie(builder, sorted(titles.items()))
    valid = data.split("valid")
    targets = valid["target_item"].to_numpy()[select_subset(valid.height, args.n_valid_loss, 0, salt=8)]  # finetune's subset
    answers = [builder.answer_ids(titles[int(t)]) for t in targets]
    tokens = sum(len(a) for a in answers)
    out = {}
    for name, counts in (("uniform", {}), ("popularity", dict(popularity_counts(data).iter_rows()))):
        prior = popularity_prior(trie, counts)
        out[name] = -sum(prior.path_sum(a) for a in answers) / tokens
    return out


def projection(rows: list[dict[str, Any]], n_train: int) -> str:
    """The trie loss's least-squares slope per doubling of samples seen, and the CPU hours one epoch of the
    whole training split would take at the recipe's measured rate: how far this CPU is from convergence."""
    import numpy as np

    if len(rows) < 2:
        return "too few points for a slope"
    x = np.log2([r["samples"] for r in rows])
    slope = float(np.polyfit(x, [r["valid_loss_trie"] for r in rows], 1)[0])
    last = rows[-1]
    per_sample_cpu_s = last["cpu_s"] / last["samples"]
    return (f"trie loss {slope:+.3f} nats per doubling of samples; {per_sample_cpu_s:.2f} CPU-s per sample: one epoch "
            f"of the {n_train:,} training samples is {n_train * per_sample_cpu_s / 3600:.1f} CPU hours at one thread")


def recall(metrics: dict[str, Any]) -> float:
    return float(metrics["recall@10"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=Path, required=True, help="prepared data folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the checkout)")
    p.add_argument("--recipe", help="qv | all-linear | full, optionally with -trie (the constrained answer loss)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--cpu-minutes", type=float, default=30.0, help="training budget in CPU minutes")
    p.add_argument("--points", default="2,5,10,20", help="CPU minutes at which to measure (plus the budget's end)")
    p.add_argument("--n-eval", type=int, default=100, help="validation samples for Recall@10")
    p.add_argument("--n-valid-loss", type=int, default=64, help="validation samples for the loss")
    p.add_argument("--plot", action="store_true", help="draw the curve from OUT/curve.jsonl instead of training")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(args)
    elif args.recipe:
        train_curve(args)
    else:
        p.error("give --recipe to train or --plot to draw")


if __name__ == "__main__":
    main()
