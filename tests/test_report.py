"""The report stage: table values, plots and HTML from hand-made evaluation runs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from automr.errors import UserError
from automr.eval.report import results_table
from automr.stages.report import ReportConfig, run_report

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def _run(folder: Path, values: dict[str, float], retrieved_days: list[int] | None = None) -> Path:
    folder.mkdir(parents=True)
    metrics = {
        m: {**{k: v for k in METRICS}, "n": 4, "ci95": {k: [v - 0.1, v + 0.1] for k in METRICS}}
        for m, v in values.items()
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if retrieved_days is not None:
        (folder / "predictions").mkdir()
        t = 100 * 86_400
        pl.DataFrame(
            {"target_time": [t] * len(retrieved_days), "retrieved_time": [t - d * 86_400 for d in retrieved_days]}
        ).write_parquet(folder / "predictions" / "automr.parquet")
    return folder


def test_table_averages_runs(tmp_path: Path) -> None:
    runs = [json.loads((_run(tmp_path / f"r{i}", {"automr": v, "random": 0.1}) / "metrics.json").read_text()) for i, v in enumerate([0.2, 0.4])]
    header, rows = results_table(runs)
    assert header[:3] == ["method", "n", "runs"]
    automr = next(r for r in rows if r[0] == "automr")
    assert automr[2] == "2"
    assert automr[3].startswith("0.3000 [0.1000, 0.3000]")  # mean of 0.2, 0.4; interval of the first run


def test_report_writes_everything(tmp_path: Path) -> None:
    r1 = _run(tmp_path / "r1", {"automr": 0.3, "random": 0.1}, retrieved_days=[1, 2, 30])
    r2 = _run(tmp_path / "r2", {"automr": 0.35, "random": 0.12}, retrieved_days=[5])
    out = tmp_path / "report"
    run_report(ReportConfig(runs=[r1, r2], out=out))
    for name in ["table.md", "table.csv", "boxplot.png", "retrieval_time.png", "report.html", "config.yaml"]:
        assert (out / name).is_file(), name
    times = json.loads((out / "retrieval_time.json").read_text())
    assert times["automr"]["n"] == 4 and times["automr"]["median_days"] == pytest.approx(3.5)
    assert "boxplot.png" in (out / "report.html").read_text()


def test_report_rejects_non_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no metrics.json"):
        run_report(ReportConfig(runs=[tmp_path], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
