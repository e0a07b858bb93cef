"""`automr report`: results table, plots and a static HTML page from evaluation runs (automr/eval/report.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from automr.config import StageConfig, save_config
from automr.eval.report import (
    _html,
    box_plot,
    load_runs,
    markdown_table,
    results_table,
    retrieval_time_plot,
)


class ReportConfig(StageConfig):
    runs: list[Path] = Field(description="Evaluation run folders (e.g. one per seed), each with metrics.json.")
    out: Path = Field(description="Output folder for table.md, table.csv, plots and report.html.")
    title: str = Field("automr results", description="Heading of the HTML report.")
    box_methods: list[str] = Field(
        default_factory=lambda: ["automr", "random"], description="Methods compared in the box plot over runs."
    )
    box_metrics: list[str] = Field(default_factory=lambda: ["recall@5", "ndcg@5"], description="Metrics in the box plot.")


def run_report(cfg: ReportConfig) -> Path:
    """Write table.md, table.csv, boxplot.png, retrieval_time.png and report.html."""
    from automr.utils.io import atomic_dir, write_json
    from automr.utils.logging import get_console, info

    runs = load_runs(cfg.runs)
    header, rows = results_table(runs)
    with atomic_dir(cfg.out) as tmp:
        md = markdown_table(header, rows)
        (tmp / "table.md").write_text(md)
        (tmp / "table.csv").write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [header, *rows]) + "\n")
        box = box_plot(runs, cfg.box_methods, cfg.box_metrics, tmp)
        timeplot, time_summary = retrieval_time_plot(cfg.runs, tmp)
        write_json(tmp / "retrieval_time.json", time_summary)
        (tmp / "report.html").write_text(_html(cfg.title, header, rows, box, timeplot, time_summary))
        save_config(cfg, tmp)
    get_console().print(md)
    info(f"report written to {cfg.out / 'report.html'}")
    return cfg.out


