"""`automr report`: the paper's outputs from evaluation runs over one or several seeds.

One static page (report.html, rendered from templates/report.html.j2), its PNGs, a Markdown summary
(report.md, also table.md / table.csv for Table 1) and report.json with every number shown:
  - a plain sentence at the top when every method, or every LLM method, is at the floor (rule: report_data.py);
  - Table 1: every method, Recall@1/5/10 and NDCG@5/10 as mean over seeds, spread over seeds and 95%
    bootstrap interval, the best per column marked, distinct top-1 items per method; beside it the
    paired tests of AutoMR against BIGRec and against random retrieval (difference, interval, p);
  - the headroom table over seeds (held-out test rows first; validation rows the retriever
    early-stopped on say "seen by early stopping");
  - Figure 2, Figure 3, the retriever's training curve, the label distribution (report_figures.py);
  - five worked examples and the run's metadata (data, preset, model, adapter recipe, versions, command).
Inputs: evaluation run folders (one per seed; `automr run --seeds` lists them), optionally runs of the
same methods on another model under a label, and `automr headroom` folders. The retriever and its
annotations are found through the runs' own config.yaml.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from automr.errors import UserError
from automr.eval import report_figures as figs
from automr.eval.headroom import split_label
from automr.eval.report_data import (
    METRICS, MethodRow, Run, best_per_column, floor_verdict, headroom_rows, llm_floor, method_rows, methods_of,
    paired_over_seeds, report_pairs, run_seed,
)
from automr.utils.io import read_json

HEADROOM_HEADING = "Share of the oracle headroom over random retrieval"
HEADROOM_NOTE = (
    "1 = the best memory element every time, 0 = random retrieval's expectation. Held-out figures are on test "
    "samples; a validation row marked 'seen by early stopping' is in-sample for the retriever (it chose its epoch there)."
)
LIBRARIES = ("torch", "transformers", "peft", "numpy", "polars", "matplotlib", "jinja2")
RECIPE_KEYS = ("model", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "full_finetune", "lr", "epochs",
               "max_train_samples", "batch_size", "grad_accum", "memory_aware_prob", "slot_mode")


def load_headroom(folders: list[Path]) -> list[dict]:
    """headroom.json of every `automr headroom` folder with its `split_label` and seed, held-out ones first.

    A folder written before the label existed counts validation samples as seen by early stopping
    (the safe side: the demo's retriever always early-stopped on them).
    """
    loaded, missing = [], []
    for folder in map(Path, folders):
        path = folder / "headroom.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        summary = read_json(path)
        seen = summary.get("seen_by_early_stopping", summary["split"] == "valid")
        loaded.append(summary | {"split_label": split_label(summary["split"], seen), "folder": str(folder),
                                 "seed": run_seed(folder, {})})
    if missing:
        raise UserError(f"not headroom outputs (no headroom.json): {', '.join(missing)}. Create them with `automr headroom`.")
    return sorted(loaded, key=lambda s: (s["split"] != "test" or s.get("seen_by_early_stopping", False)))


# -- Table 1 as text ---------------------------------------------------------------------------
def cell_text(row: MethodRow, metric: str) -> str:
    c = row.cells[metric]
    text = f"{c.mean:.4f}"
    text += f" ±{c.spread:.4f}" if c.spread is not None else ""
    return text + (f" [{c.ci[0]:.4f}, {c.ci[1]:.4f}]" if c.ci else "")


def table1(rows: list[MethodRow]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """Header, cells and the best method per column."""
    best = best_per_column(rows)
    header = ["method", "n", "seeds", *METRICS, "distinct top-1", "top-1 in history"]
    body = [[r.name, str(r.n), str(r.seeds), *(cell_text(r, m) for m in METRICS),
             f"{r.distinct_top1:.1f}" if r.distinct_top1 is not None else "-",
             f"{r.top1_repeats_history:.0%}" if r.top1_repeats_history is not None else "-"] for r in rows]
    return header, body, best


def paired_text(p: dict[str, Any], metric: str) -> str:
    r = p[metric]
    return f"{r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] p={r['p_value']:.3g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def headroom_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["samples", "method", "n", "seeds", "share: mean ± spread", "lowest seed", "per seed [95% interval]", "picks the best"]
    body = []
    for r in rows:
        spread = f" ±{r['spread']:.3f}" if r["spread"] is not None else ""
        per = "; ".join(f"{'s' + str(s) + ' ' if s is not None else ''}{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for s, v, (lo, hi) in r["per_seed"])
        body.append([r["samples"], r["method"], str(r["n"]), str(r["seeds"]), f"{r['mean']:+.3f}{spread}", f"{r['min']:+.3f}", per,
                     f"{r['picks_best']:.1%}"])
    return header, body


# -- what the runs point at --------------------------------------------------------------------
def _config(folder: Path | str | None) -> dict[str, Any]:
    path = Path(folder) / "config.yaml" if folder else None
    if path is None or not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _automr_options(run: Run) -> dict[str, Any]:
    opts = (_config(run.folder).get("method_options") or {})
    return opts.get("automr") or opts.get("bigrec") or {}


def retriever_histories(runs: list[Run]) -> dict[str, list[dict[str, Any]]]:
    """seed label -> the retriever's history.jsonl rows, for every run whose automr method names a retriever."""
    import json

    out = {}
    for run in runs:
        folder = (_config(run.folder).get("method_options") or {}).get("automr", {}).get("retriever")
        if folder and (Path(folder) / "history.jsonl").is_file():
            out[run.label] = [json.loads(line) for line in (Path(folder) / "history.jsonl").read_text().splitlines() if line]
    return out


def label_inputs(runs: list[Run]) -> tuple[np.ndarray, list[np.ndarray], str, float] | None:
    """The first retriever's training annotations and label settings, or None."""
    from automr.memory.annotate import load_annotations

    for run in runs:
        folder = (_config(run.folder).get("method_options") or {}).get("automr", {}).get("retriever")
        rcfg = _config(folder)
        if rcfg.get("annotations") and Path(rcfg["annotations"]).is_dir():
            ann = load_annotations(rcfg["annotations"], require_complete=False)
            cands = [np.asarray(c, float) for c in ann["logp_cand"].to_list()]
            keep = [i for i, c in enumerate(cands) if len(c)]
            return (ann["logp_empty"].to_numpy()[keep], [cands[i] for i in keep], rcfg.get("label_type", "loglik_gain"),
                    float(rcfg.get("temperature", 1.0)))
    return None


def _split_samples(run: Run) -> pl.DataFrame | None:
    info = run.eval_info
    path = Path(info.get("samples", "")) / "samples" / f"{info.get('split', 'test')}.parquet"
    return pl.read_parquet(path) if info and path.is_file() else None


def _titles(run: Run) -> dict[int, str]:
    path = Path(run.eval_info.get("samples", "")) / "items.parquet"
    if not path.is_file():
        return {}
    items = pl.read_parquet(path)
    return dict(zip(items["item_id"].to_list(), items["title"].to_list()))


def figure3_positions(runs: list[Run], k: int) -> list[figs.Position]:
    """Miss-to-hit samples of every run that holds BIGRec and AutoMR predictions, placed in their history."""
    out: list[figs.Position] = []
    for run in runs:
        b, a, samples = run.predictions("bigrec"), run.predictions("automr"), _split_samples(run)
        if b is not None and a is not None and samples is not None and "retrieved_time" in a.columns:
            out += figs.retrieved_position(figs.miss_to_hit(b, a, k), samples)
    return out


def _date(t: int | None) -> str:
    return datetime.fromtimestamp(int(t), tz=timezone.utc).strftime("%Y-%m-%d") if t is not None else "-"


def worked_examples(runs: list[Run], k: int, n: int = 5) -> list[dict[str, Any]]:
    """n AutoMR test samples of the first run with predictions, miss-to-hit ones first, as titles."""
    for run in runs:
        a, b, samples = run.predictions("automr"), run.predictions("bigrec"), _split_samples(run)
        if a is None or samples is None:
            continue
        titles = _titles(run)
        first = figs.miss_to_hit(b, a, k)["row"].to_list() if b is not None else []
        order = first + [r for r in a["row"].to_list() if r not in set(first)]
        by_row = {r["row"]: r for r in a.filter(pl.col("row").is_in(order[:n])).iter_rows(named=True)}
        out = []
        for row in order[:n]:
            p, s = by_row[row], samples.row(int(row), named=True)
            out.append({"user": s["user_id"], "miss_to_hit": row in set(first),
                        "recent": [titles.get(i, str(i)) for i in (s["recent_items"] or [])[-5:]],
                        "retrieved": titles.get(p.get("retrieved_item"), "-") if p.get("retrieved_item") is not None else "(empty slot)",
                        "retrieved_date": _date(p.get("retrieved_time")), "target_date": _date(s["target_time"]),
                        "recommended": [titles.get(i, str(i)) for i in p["ranked_items"][:5]],
                        "target": titles.get(s["target_item"], str(s["target_item"])), "rank": p["rank"]})
        return out
    return []


def _git_commit() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=False)
        return proc.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(lib: str) -> str:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_metadata(runs: list[Run]) -> dict[str, Any]:
    """Data, preset, model, adapter recipe, package version and commit, library versions, the command."""
    from automr import __version__

    first = runs[0]
    prep = _config(first.eval_info.get("samples"))
    opts = _automr_options(first)
    adapter = _config(opts.get("adapter")) if opts.get("adapter") else {}
    return {
        "data": prep.get("data", first.eval_info.get("samples", "-")), "preset": prep.get("preset") or "-",
        "samples": first.eval_info.get("subset", "-"), "exclude_history": first.eval_info.get("exclude_history_reason", "-"),
        "model": opts.get("model") or adapter.get("model") or "-", "adapter": opts.get("adapter") or "none",
        "recipe": {k: adapter[k] for k in RECIPE_KEYS if k in adapter},
        "seeds": ", ".join(r.label for r in runs), "automr": f"{__version__} (commit {_git_commit()})",
        "libraries": {lib: _version(lib) for lib in LIBRARIES}, "command": " ".join(["automr", *sys.argv[1:]]),
    }


def floor_sentence(rows: list[MethodRow]) -> str | None:
    floor, what, at = floor_verdict(rows)
    if at:
        return (f"Every method is at the floor: no method's 95% interval of Recall@10 lies above {what} ({floor:.4f}), "
                "so these numbers cannot tell the methods apart.")
    if (llm := llm_floor(rows)) is None:
        return None
    names, above = llm
    return (f"Every LLM method is at the floor: no 95% interval of Recall@10 of {', '.join(names)} lies above {what} "
            f"({floor:.4f}), while {', '.join(above)} does; these numbers cannot tell the LLM methods apart.")


def paired_rows(runs: list[Run], n_boot: int) -> list[dict[str, Any]]:
    return [p for a, b in report_pairs(methods_of(runs)) if (p := paired_over_seeds(runs, a, b, n_boot)) is not None]
