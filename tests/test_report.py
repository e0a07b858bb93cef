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


def _headroom(folder: Path, split: str, seen: bool | None, share: float) -> Path:
    folder.mkdir(parents=True)
    r = {"share": share, "ci95": [share - 0.1, share + 0.1], "chosen_gain": 0.5, "picks_best": 0.25, "n": 8}
    summary = {"split": split, "n_samples": 8, "methods": {"automr": r, "random": r | {"share": 0.0}}}
    if seen is not None:
        summary["seen_by_early_stopping"] = seen
    (folder / "headroom.json").write_text(json.dumps(summary))
    return folder


def test_report_labels_headroom_splits_and_variants(tmp_path: Path) -> None:
    """Held-out test headroom first; validation the retriever early-stopped on only as 'seen by early stopping';
    the plain adapter's runs get their own rows instead of being averaged with the memory-aware ones."""
    run = _run(tmp_path / "r", {"bigrec": 0.2, "automr": 0.3})
    plain = _run(tmp_path / "p", {"bigrec": 0.1, "automr": 0.15})
    valid = _headroom(tmp_path / "hv", "valid", True, 0.144)
    old = _headroom(tmp_path / "ho", "valid", None, 0.2)  # written before the label existed: counted as seen
    test = _headroom(tmp_path / "ht", "test", False, 0.05)
    out = tmp_path / "report"
    run_report(ReportConfig(runs=[run], runs_label="memory-aware", variants={"plain": [plain]}, headroom=[valid, old, test], out=out))
    md = (out / "table.md").read_text()
    assert "| bigrec [memory-aware] | 4 | 1 | 0.2000" in md and "| bigrec [plain] | 4 | 1 | 0.1000" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "automr" in line and "nats" not in line]
    headroom_rows = [r for r in rows if "[95%" not in r and ("test" in r or "valid" in r)]
    assert headroom_rows[0].startswith("| test (held out) | automr | 8 | +0.050")
    assert sum("valid (seen by early stopping) | automr" in r for r in headroom_rows) == 2
    assert not any(r.startswith("| valid |") for r in headroom_rows)
    page = (out / "report.html").read_text()
    assert page.index("test (held out)") < page.index("valid (seen by early stopping)")


def test_report_rejects_missing_headroom_and_variant(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", {"automr": 0.3})
    with pytest.raises(UserError, match="no headroom.json"):
        run_report(ReportConfig(runs=[run], headroom=[tmp_path / "nope"], out=tmp_path / "out"))
    with pytest.raises(UserError, match="no metrics.json"):
        run_report(ReportConfig(runs=[run], variants="{plain: [" + str(tmp_path / "gone") + "]}", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
