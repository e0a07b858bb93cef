"""`automr report`: results table, plots and a static HTML page from evaluation runs (automr/eval/report.py)."""

from __future__ import annotations

from pathlib import Path

from typing import Any

from pydantic import Field, field_validator

from automr.config import StageConfig, parse_mapping, save_config
from automr.eval.report import (
    HEADROOM_HEADING,
    HEADROOM_NOTE,
    _html,
    box_plot,
    headroom_table,
    load_headroom,
    load_runs,
    markdown_table,
    results_table,
    retrieval_time_plot,
)


class ReportConfig(StageConfig):
    """Settings of `automr report`."""

    runs: list[Path] = Field(description="Evaluation run folders (e.g. one per seed), each with metrics.json.")
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
        description="`automr headroom` folders to tabulate, each labelled with its samples (held-out test first; validation "
        "the retriever early-stopped on is marked 'seen by early stopping').",
    )
    out: Path = Field(description="Output folder for table.md, table.csv, plots and report.html.")
    title: str = Field("automr results", description="Heading of the HTML report.")
    box_methods: list[str] = Field(
        default_factory=lambda: ["automr", "random"], description="Methods compared in the box plot over runs."
    )
    box_metrics: list[str] = Field(default_factory=lambda: ["recall@5", "ndcg@5"], description="Metrics in the box plot.")

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, value: Any) -> Any:
        return parse_mapping(value)  # YAML text from the command line


def run_report(cfg: ReportConfig) -> Path:
    """Write table.md, table.csv, boxplot.png, retrieval_time.png and report.html."""
    from automr.utils.io import atomic_dir, write_json
    from automr.utils.logging import get_console, info

    runs = load_runs(cfg.runs)
    variants = {label: load_runs(folders) for label, folders in cfg.variants.items()}  # every missing run fails before writing
    header, rows = results_table(runs, cfg.runs_label)
    for label, vruns in variants.items():
        rows += results_table(vruns, label)[1]
    headroom = headroom_table(load_headroom(cfg.headroom))
    with atomic_dir(cfg.out) as tmp:
        md = markdown_table(header, rows)
        if headroom[1]:
            md += f"\n## {HEADROOM_HEADING}\n\n{HEADROOM_NOTE}\n\n" + markdown_table(*headroom)
        (tmp / "table.md").write_text(md)
        (tmp / "table.csv").write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [header, *rows]) + "\n")
        box = box_plot(runs, cfg.box_methods, cfg.box_metrics, tmp)
        timeplot, time_summary = retrieval_time_plot(cfg.runs, tmp)
        write_json(tmp / "retrieval_time.json", time_summary)
        (tmp / "report.html").write_text(_html(cfg.title, header, rows, box, timeplot, time_summary, headroom))
        save_config(cfg, tmp)
    get_console().print(md)
    info(f"report written to {cfg.out / 'report.html'}")
    return cfg.out


