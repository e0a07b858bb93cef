"""`automr report`: the paper's outputs from one or more evaluation runs.

- the results table (the paper's Table 1): every method's metrics, mean over runs (seeds) with
  the 95% bootstrap interval of the first run, as Markdown and CSV;
- a box plot of AutoMR against random retrieval over runs (Figure 2), one box per method per metric;
- a histogram of how long before the target the retrieved memory elements happened (Figure 3),
  read from the `retrieved_time` column that retrieval methods add to their predictions;
- the share of the oracle headroom each retrieval method captures, from `automr headroom` folders,
  every row labelled with its samples: held-out test rows first, validation rows only as
  "valid (seen by early stopping)" when the retriever chose its epoch on them;
- report.html, one static page with all of the above.

Inputs are evaluation run folders written by `automr evaluate` (metrics.json and predictions/), and
optionally more runs shown under a label (the same methods on another adapter, e.g. the plain one)
and headroom folders.
"""

from __future__ import annotations

import html
import json
from pathlib import Path


from automr.errors import UserError
from automr.eval.headroom import split_label

HEADROOM_HEADING = "Share of the oracle headroom over random retrieval"
HEADROOM_NOTE = (
    "1 = the best memory element every time, 0 = random retrieval's expectation. Held-out figures are on test "
    "samples; a validation row marked 'seen by early stopping' is in-sample for the retriever (it chose its epoch there)."
)
METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
DAY = 86_400


def load_runs(runs: list[Path]) -> list[dict]:
    """Read metrics.json of every run, with a clear error for a folder that is not a run."""
    loaded, missing = [], []
    for run in runs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        loaded.append(json.loads(path.read_text()))
    if missing:
        raise UserError(
            f"not evaluation runs (no metrics.json): {', '.join(missing)}. Create them with `automr evaluate`."
        )
    return loaded


def results_table(runs: list[dict], label: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows of method x metric: mean over runs, and the first run's 95% interval.

    `label` is appended to every method name ("bigrec [plain adapter]"), so runs of the same methods
    on another model get their own rows instead of being averaged with these as if they were seeds.
    """
    methods: list[str] = []
    for r in runs:
        methods += [m for m in r if m not in methods]
    header = ["method", "n", "runs", *METRICS]
    rows = []
    for m in methods:
        present = [r[m] for r in runs if m in r]
        cells = [f"{m} [{label}]" if label else m, str(present[0]["n"]), str(len(present))]
        for metric in METRICS:
            mean = sum(p[metric] for p in present) / len(present)
            ci = present[0].get("ci95", {}).get(metric)
            cells.append(f"{mean:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        rows.append(cells)
    return header, rows


def load_headroom(folders: list[Path]) -> list[dict]:
    """headroom.json of every `automr headroom` folder, held-out ones first, each with its `split_label`.

    A folder written before the label existed counts validation samples as seen by early stopping
    (the safe side: the demo's retriever always early-stopped on them).
    """
    loaded, missing = [], []
    for folder in folders:
        path = Path(folder) / "headroom.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        summary = json.loads(path.read_text())
        seen = summary.get("seen_by_early_stopping", summary["split"] == "valid")
        loaded.append(summary | {"split_label": split_label(summary["split"], seen), "folder": str(folder)})
    if missing:
        raise UserError(f"not headroom outputs (no headroom.json): {', '.join(missing)}. Create them with `automr headroom`.")
    return sorted(loaded, key=lambda s: (s["split"] != "test" or s.get("seen_by_early_stopping", False)))


def headroom_table(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows of (samples, method): share of the oracle headroom with its 95% interval."""
    header = ["samples", "method", "n", "share [95% interval]", "chosen gain (nats)", "picks the best"]
    rows = []
    for s in summaries:
        for m, r in s["methods"].items():
            share = f"{r['share']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            rows.append([s["split_label"], m, str(r["n"]), share, f"{r['chosen_gain']:+.3f}", f"{r['picks_best']:.1%}"])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def box_plot(runs: list[dict], methods: list[str], metrics: list[str], out: Path) -> Path | None:
    """Figure 2: per-run values of each metric for the compared methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in methods if any(m in r for r in runs)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [[r[m][metric] for r in runs if m in r] for m in present]
        ax.boxplot(data, tick_labels=present)
        ax.set_title(f"{metric} over {len(runs)} run(s)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "boxplot.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def retrieval_time_plot(runs: list[Path], out: Path) -> tuple[Path | None, dict]:
    """Figure 3: days between each retrieved memory element and the target, per retrieval method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import polars as pl

    gaps: dict[str, np.ndarray] = {}
    for run in runs:
        for pred in sorted((Path(run) / "predictions").glob("*.parquet")):
            df = pl.read_parquet(pred)
            if "retrieved_time" not in df.columns:
                continue
            d = df.drop_nulls("retrieved_time")
            days = ((d["target_time"] - d["retrieved_time"]) / DAY).to_numpy()
            gaps[pred.stem] = np.concatenate([gaps.get(pred.stem, np.empty(0)), days])
    if not gaps:
        return None, {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hi = max(float(np.percentile(g, 99)) for g in gaps.values() if len(g)) or 1.0
    bins = np.linspace(0, hi, 30)
    for name, g in gaps.items():
        ax.hist(g, bins=bins, histtype="step", density=True, label=f"{name} (median {np.median(g):.0f} d)")
    ax.set_xlabel("days from retrieved memory to target")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    path = out / "retrieval_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    summary = {k: {"n": int(len(v)), "median_days": float(np.median(v)), "mean_days": float(np.mean(v))} for k, v in gaps.items()}
    return path, summary


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    return table + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


def _html(
    title: str, header: list[str], rows: list[list[str]], box: Path | None, timeplot: Path | None, times: dict,
    headroom: tuple[list[str], list[list[str]]] | None = None,
) -> str:
    esc = html.escape
    parts = [f"<h1>{esc(title)}</h1>", "<h2>Results (mean over runs; 95% bootstrap interval of the first run)</h2>",
             _table_html(header, rows)]
    if headroom and headroom[1]:
        parts += [f"<h2>{esc(HEADROOM_HEADING)}</h2>", f"<p>{esc(HEADROOM_NOTE)}</p>", _table_html(*headroom)]
    if box:
        parts += ["<h2>AutoMR against random retrieval over runs</h2>", f'<img src="{box.name}" alt="box plot">']
    if timeplot:
        parts += ["<h2>When the retrieved memories happened</h2>", f'<img src="{timeplot.name}" alt="retrieval times">']
        parts += ["<ul>" + "".join(f"<li>{esc(k)}: median {v['median_days']:.0f} days (n={v['n']})</li>" for k, v in times.items()) + "</ul>"]
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
