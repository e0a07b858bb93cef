"""`automr report`: Table 1, paired tests, headroom, figures and a static HTML page over seeds (automr/eval/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from automr.config import StageConfig, parse_mapping, save_config


class ReportConfig(StageConfig):
    """Settings of `automr report`."""

    runs: list[Path] = Field(description="Evaluation run folders, one per seed, each with metrics.json (automr run --seeds lists them).")
    runs_label: str | None = Field(
        None, description="Appended to the method names of `runs` (e.g. 'memory-aware adapter') when `variants` are shown beside them."
    )
    variants: dict[str, list[Path]] = Field(
        default_factory=dict,
        description="More evaluation runs shown as their own rows, label -> run folders, e.g. {'plain adapter': [runs/demo/eval-plain]}: "
        "the same methods on another model, never averaged with `runs`.",
    )
    headroom: list[Path] = Field(
        default_factory=list,
        description="`automr headroom` folders to tabulate over seeds, each labelled with its samples (held-out test first; "
        "validation the retriever early-stopped on is marked 'seen by early stopping').",
    )
    out: Path = Field(description="Output folder: report.html, report.md, table.md, table.csv, report.json, PNGs.")
    title: str = Field("automr results", description="Heading of the HTML report.")
    box_methods: list[str] = Field(default_factory=lambda: ["automr", "random"], description="Methods compared in Figure 2 over seeds.")
    box_metrics: list[str] = Field(default_factory=lambda: ["recall@5", "ndcg@5"], description="Metrics in Figure 2.")
    hit_k: int = Field(10, ge=1, le=10, description="Figure 3 and the examples: a hit is the target in the top hit_k.")
    n_boot: int = Field(1000, ge=10, description="Bootstrap resamples of the intervals and paired tests over seeds.")

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, value: Any) -> Any:
        return parse_mapping(value)  # YAML text from the command line


def run_report(cfg: ReportConfig) -> Path:
    """Compute every number first (bad inputs fail before anything is written), then write the folder at once."""
    from automr.eval import report as rep
    from automr.eval.report_data import load_runs
    from automr.utils.io import atomic_dir, write_json
    from automr.utils.logging import get_console, info

    runs = load_runs(cfg.runs)
    variants = {label: load_runs(folders) for label, folders in cfg.variants.items()}  # every missing run fails before writing
    headroom = rep.load_headroom(cfg.headroom)
    rows, how = rep.method_rows(runs, cfg.runs_label, cfg.n_boot)
    for label, vruns in variants.items():
        rows += rep.method_rows(vruns, label, cfg.n_boot)[0]
    paired = rep.paired_rows(runs, cfg.n_boot)
    with atomic_dir(cfg.out) as tmp:
        ctx = _context(cfg, runs, rows, how, paired, headroom, tmp)
        (tmp / "report.html").write_text(_render(ctx))
        md = _markdown(ctx)
        (tmp / "report.md").write_text(md)
        (tmp / "table.md").write_text(rep.markdown_table(ctx["t1"]["header"], ctx["t1"]["rows"]))
        (tmp / "table.csv").write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [ctx["t1"]["header"], *ctx["t1"]["rows"]]) + "\n")
        write_json(tmp / "report.json", ctx["numbers"])
        save_config(cfg, tmp)
    get_console().print(md)
    info(f"report written to {cfg.out / 'report.html'}")
    return cfg.out


def _context(cfg: ReportConfig, runs: list, rows: list, how: str, paired: list, headroom: list, tmp: Path) -> dict[str, Any]:
    """Everything the template and the Markdown show; figures drawn into tmp."""
    from dataclasses import asdict

    from automr.eval import report as rep
    from automr.eval import report_figures as figs
    from automr.eval.report_data import FLOOR_METRIC, METRICS

    header, body, best = rep.table1(rows)
    box = {m: {meth: [r.metrics[meth][m] for r in runs if meth in r.metrics] for meth in cfg.box_methods} for m in cfg.box_metrics}
    box = {m: {k: v for k, v in d.items() if v} for m, d in box.items()}
    fig2 = figs.figure2(box, tmp) if any(box.values()) else figs.Figure(None, "Figure 2: the runs hold neither AutoMR nor random retrieval.")
    fig3, fig3_summary = figs.figure3(rep.figure3_positions(runs, cfg.hit_k), len(runs), cfg.hit_k, tmp)
    curve = figs.training_curve(rep.retriever_histories(runs), tmp)
    labels_in = rep.label_inputs(runs)
    labels, label_summary = figs.label_distribution(*labels_in, tmp) if labels_in else (
        figs.Figure(None, "No annotations found for the retriever's training samples."), {})
    hr_header, hr_rows = rep.headroom_cells(rep.headroom_rows(headroom))
    floor_value, floor_what, _ = rep.floor_verdict(rows) if rows else (0.0, "zero", False)
    figures = [(f"Figure 2: {' against '.join(cfg.box_methods)} over seeds", fig2),
               ("Figure 3: when the retrieved memories of miss-to-hit samples happened", fig3),
               ("The retriever's training curve", curve), ("The distribution of the labels", labels)]
    return {
        "title": cfg.title, "metrics": list(METRICS), "interval_how": how, "floor": rep.floor_sentence(rows),
        "floor_rule": f"a method is at the floor when the lower end of its {FLOOR_METRIC} interval is at or below {floor_what} "
                      f"({floor_value:.4f}); the sentence at the top appears when every method but popularity is, or every "
                      "LLM method while SASRec is not.",
        "seeds_note": f"{len(runs)} seed run(s): {', '.join(r.label for r in runs)}.",
        "t1": {"header": header, "rows": body, "best": best},
        "paired": [{"pair": p["pair"], "n": p["n"], "seeds": p["seeds"], "cells": {m: rep.paired_text(p, m) for m in METRICS}} for p in paired],
        "headroom_heading": rep.HEADROOM_HEADING, "headroom_note": rep.HEADROOM_NOTE, "headroom": {"header": hr_header, "rows": hr_rows},
        "figures": [{"heading": h, "path": f.path.name if f.path else None, "note": f.note} for h, f in figures],
        "examples": rep.worked_examples(runs, cfg.hit_k), "meta": rep.run_metadata(runs),
        "numbers": {"table1": [asdict(r) for r in rows], "paired": paired, "headroom": rep.headroom_rows(headroom),
                    "figure3": fig3_summary, "labels": label_summary, "floor": {"value": floor_value, "what": floor_what}},
    }


def _render(ctx: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("automr.eval", "templates"), autoescape=select_autoescape(["j2", "html"]),
                      undefined=StrictUndefined)
    return env.get_template("report.html.j2").render(**ctx)


def _markdown(ctx: dict[str, Any]) -> str:
    """report.md: the same content as the page, as text (figures linked)."""
    from automr.eval.report import markdown_table

    t1 = ctx["t1"]
    marked = [[f"**{c}**" if 3 <= i < 3 + len(ctx["metrics"]) and t1["best"].get(ctx["metrics"][i - 3]) == row[0] else c
               for i, c in enumerate(row)] for row in t1["rows"]]
    parts = [f"# {ctx['title']}\n"] + ([f"**{ctx['floor']}**\n"] if ctx["floor"] else []) + [ctx["seeds_note"] + "\n",
             "## Table 1\n", f"Mean ±spread over seeds [95% bootstrap interval, {ctx['interval_how']}]; bold: best per column. "
             f"Floor rule: {ctx['floor_rule']}\n", markdown_table(t1["header"], marked)]
    if ctx["paired"]:
        parts += ["\nPaired tests (a - b: difference [95% interval] p)\n",
                  markdown_table(["a - b", "n", "seeds", *ctx["metrics"]],
                                 [[p["pair"], str(p["n"]), str(p["seeds"]), *(p["cells"][m] for m in ctx["metrics"])] for p in ctx["paired"]])]
    if ctx["headroom"]["rows"]:
        parts += [f"\n## {ctx['headroom_heading']}\n", ctx["headroom_note"] + "\n", markdown_table(ctx["headroom"]["header"], ctx["headroom"]["rows"])]
    for f in ctx["figures"]:
        parts += [f"\n## {f['heading']}\n", (f"![{f['heading']}]({f['path']})\n\n" if f["path"] else "") + f["note"] + "\n"]
    return "\n".join(parts)
