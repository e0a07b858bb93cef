"""The report: Table 1 over seeds, the floor, Figures 2 and 3, the page, from hand-made evaluation runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from automr.errors import UserError
from automr.eval.report_data import floor_verdict, llm_floor, load_runs, method_rows, paired_over_seeds, report_pairs
from automr.eval.report_figures import figure2, miss_to_hit, retrieved_position
from automr.eval.report import paired_rows
from automr.stages.report import ReportConfig, run_report

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
DAY = 86_400


def _run(folder: Path, values: dict[str, float], ranks: dict[str, list[int]] | None = None) -> Path:
    """A run folder: metrics.json with every metric = values[m]; with `ranks`, predictions whose targets sit at those ranks."""
    folder.mkdir(parents=True)
    metrics = {
        m: {**{k: v for k in METRICS}, "n": 4, "ci95": {k: [v - 0.1, v + 0.1] for k in METRICS}, "distinct_top1": 3}
        for m, v in values.items()
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for m, rk in (ranks or {}).items():
        (folder / "predictions").mkdir(exist_ok=True)
        ranked = [[100 + j for j in range(10)] for _ in rk]
        for row, r in zip(ranked, rk):
            if r >= 0:
                row[r] = 7  # the target
        pl.DataFrame({"row": list(range(len(rk))), "target_item": [7] * len(rk), "target_time": [100 * DAY] * len(rk),
                      "ranked_items": ranked, "rank": rk}).write_parquet(folder / "predictions" / f"{m}.parquet")
    return folder


def test_table_means_spreads_and_seed_averaged_intervals(tmp_path: Path) -> None:
    """Two seeds on the same 4 samples: mean and spread over seeds of metrics.json, the interval over
    samples of the per-sample value averaged over seeds (hits 1,1,0,0 and 1,0,0,0 -> 0.75 at most)."""
    r0 = _run(tmp_path / "seed-0" / "eval", {"automr": 0.5, "bigrec": 0.0}, {"automr": [0, 0, -1, -1], "bigrec": [-1] * 4})
    r1 = _run(tmp_path / "seed-1" / "eval", {"automr": 0.25, "bigrec": 0.0}, {"automr": [0, -1, -1, -1], "bigrec": [-1] * 4})
    runs = load_runs([r0, r1])
    assert [r.seed for r in runs] == [0, 1]
    rows, how = method_rows(runs, n_boot=200)
    automr = next(r for r in rows if r.name == "automr")
    c = automr.cells["recall@1"]
    assert c.mean == pytest.approx(0.375) and c.spread == pytest.approx(np.std([0.5, 0.25], ddof=1))
    assert how == "averaged over seeds per sample"
    assert 0.0 <= c.ci[0] <= 0.375 <= c.ci[1] <= 0.75  # per-sample seed means are 1, .5, 0, 0
    assert automr.seeds == 2 and automr.distinct_top1 == 3
    paired = paired_over_seeds(runs, "automr", "bigrec", n_boot=200)
    assert paired["recall@1"]["diff"] == pytest.approx(0.375) and paired["seeds"] == 2


def test_floor_rule(tmp_path: Path) -> None:
    """Every method's Recall@10 interval reaching down to popularity's mean: at the floor; one above it: not."""
    low = load_runs([_run(tmp_path / "a", {"popularity": 0.05, "bigrec": 0.06, "automr": 0.1})])
    assert floor_verdict(method_rows(low)[0]) == (pytest.approx(0.05), "popularity's Recall@10", True)
    high = load_runs([_run(tmp_path / "b", {"popularity": 0.05, "sasrec": 0.3})])
    assert floor_verdict(method_rows(high)[0])[2] is False
    out = tmp_path / "report"
    run_report(ReportConfig(runs=[tmp_path / "a"], out=out))
    assert "Every method is at the floor" in (out / "report.html").read_text()
    run_report(ReportConfig(runs=[tmp_path / "b"], out=tmp_path / "report-b"))
    assert "at the floor:" not in (tmp_path / "report-b" / "report.md").read_text()


def test_floor_of_the_llm_methods_when_only_sasrec_rises_above_popularity(tmp_path: Path) -> None:
    """SASRec above popularity and every LLM method at or below it: the report says the LLM methods are at the
    floor (by their base name: a labelled "bigrec [plain adapter]" is an LLM method); one LLM method above: silent."""
    low = method_rows(load_runs([_run(tmp_path / "a", {"popularity": 0.05, "sasrec": 0.3, "bigrec": 0.06,
                                                       "automr": 0.04})]))[0]
    assert llm_floor(low) == (["bigrec", "automr"], ["sasrec"])
    labelled = [replace(r, name=f"{r.name} [plain adapter]") if r.name == "bigrec" else r for r in low]
    assert llm_floor(labelled) == (["bigrec [plain adapter]", "automr"], ["sasrec"])
    high = load_runs([_run(tmp_path / "b", {"popularity": 0.05, "sasrec": 0.3, "bigrec": 0.06, "automr": 0.2})])
    assert llm_floor(method_rows(high)[0]) is None
    run_report(ReportConfig(runs=[tmp_path / "a"], out=tmp_path / "report-a"))
    md = (tmp_path / "report-a" / "report.md").read_text()
    assert "Every LLM method is at the floor" in md and "while sasrec does" in md
    run_report(ReportConfig(runs=[tmp_path / "b"], out=tmp_path / "report-b"))
    assert "at the floor:" not in (tmp_path / "report-b" / "report.md").read_text()


def test_figure2_refuses_one_seed(tmp_path: Path) -> None:
    one = figure2({"recall@5": {"automr": [0.3], "random": [0.1]}}, tmp_path)
    assert one.path is None and "at least 2 seeds" in one.note
    two = figure2({"recall@5": {"automr": [0.3, 0.35], "random": [0.1, 0.0]}}, tmp_path)
    assert two.path is not None and two.path.is_file()
    r = _run(tmp_path / "r", {"automr": 0.3, "random": 0.1})
    run_report(ReportConfig(runs=[r], out=tmp_path / "report"))
    assert not (tmp_path / "report" / "figure2.png").exists()
    assert "Figure 2 needs at least 2 seeds" in (tmp_path / "report" / "report.html").read_text()


def test_figure3_selects_exactly_the_miss_to_hit_samples() -> None:
    """Rows: 0 both hit, 1 BIGRec misses and AutoMR hits, 2 both miss, 3 BIGRec hits and AutoMR misses,
    4 BIGRec misses and AutoMR hits at rank 9 (a hit at k=10, a miss at k=5), 5 BIGRec at rank 7 (a miss at k=5)."""
    bigrec = pl.DataFrame({"row": [0, 1, 2, 3, 4, 5], "rank": [0, -1, -1, 2, -1, 7]})
    automr = pl.DataFrame({"row": [0, 1, 2, 3, 4, 5], "rank": [1, 3, -1, -1, 9, 0]})
    assert sorted(miss_to_hit(bigrec, automr, 10)["row"].to_list()) == [1, 4]
    assert sorted(miss_to_hit(bigrec, automr, 5)["row"].to_list()) == [1, 5]


def test_retrieved_position_counts_interactions_and_days_ago() -> None:
    """Memory [a, b, c] (oldest first) + 2 recent: retrieving b (index 1) is 3 + 2 - 1 = 4 interactions ago."""
    t = 100 * DAY
    samples = pl.DataFrame({"user_id": [1], "target_item": [9], "target_time": [t], "recent_items": [[4, 5]],
                            "recent_times": [[t - 2 * DAY, t - DAY]], "memory_items": [[1, 2, 3]],
                            "memory_times": [[t - 30 * DAY, t - 10 * DAY, t - 5 * DAY]]})
    pred = pl.DataFrame({"row": [0], "retrieved_item": [2], "retrieved_time": [t - 10 * DAY], "retrieved_index": [1]})
    (p,) = retrieved_position(pred, samples)
    assert (p.ago, p.days, p.n_memory) == (4, 10.0, 3)
    assert p.history_ago == [5, 4, 3, 2, 1] and p.history_days == [30.0, 10.0, 5.0, 2.0, 1.0]
    (q,) = retrieved_position(pred.drop("retrieved_index"), samples)  # older predictions: found by item and time
    assert q.ago == 4


def test_report_writes_everything(tmp_path: Path) -> None:
    ranks = {"automr": [0, 2, -1, -1], "random": [-1, -1, 3, -1], "bigrec": [-1, -1, -1, 1]}
    r0 = _run(tmp_path / "seed-0" / "eval", {"automr": 0.3, "random": 0.1, "bigrec": 0.1}, ranks)
    r1 = _run(tmp_path / "seed-1" / "eval", {"automr": 0.35, "random": 0.12, "bigrec": 0.1}, ranks)
    out = tmp_path / "report"
    run_report(ReportConfig(runs=[r0, r1], out=out, n_boot=100))
    for name in ["table.md", "table.csv", "figure2.png", "report.html", "report.md", "report.json", "config.yaml"]:
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "figure2.png" in page and "automr - bigrec" in page and "automr - random" in page
    assert '<td class="best">0.3250' in page  # the best recall@1 (mean of 0.3, 0.35) is marked
    numbers = json.loads((out / "report.json").read_text())
    assert {p["pair"] for p in numbers["paired"]} == {"automr - bigrec", "automr - random"}


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
    report = (out / "report.md").read_text()
    headroom_rows = [r for r in report.splitlines() if r.startswith("| test") or r.startswith("| valid")]
    headroom_rows = [r for r in headroom_rows if "| automr |" in r]
    assert headroom_rows[0].startswith("| test (held out) | automr | 8 | 1 | +0.050")
    (seen,) = [r for r in headroom_rows if r.startswith("| valid (seen by early stopping) | automr")]
    assert "| 2 | +0.172 ±0.040 | +0.144 |" in seen  # the two validation folders are tabulated as two seeds
    assert not any(r.startswith("| valid |") for r in headroom_rows)
    page = (out / "report.html").read_text()
    assert page.index("test (held out)") < page.index("valid (seen by early stopping)")



def test_variants_are_paired_within_their_label(tmp_path: Path) -> None:
    """automr@d3 is tested against bigrec@d3 and random@d3 (one decoding against itself), beside the plain pairs."""
    assert report_pairs(["bigrec", "automr", "bigrec@d3", "automr@d3", "random"]) == [
        ("automr", "bigrec"), ("automr", "random"), ("automr@d3", "bigrec@d3"), ("automr@d3", "random@d3")]
    ranks = {"bigrec": [0, -1, -1, 3], "automr": [0, 0, -1, 3], "bigrec@d3": [-1, -1, 2, 3], "automr@d3": [0, 1, 2, 3]}
    runs = load_runs([_run(tmp_path / "r", {m: 0.1 for m in ranks}, ranks)])
    pairs = {p["pair"]: p for p in paired_rows(runs, n_boot=50)}
    assert set(pairs) == {"automr - bigrec", "automr@d3 - bigrec@d3"}  # no random in these runs
    assert pairs["automr@d3 - bigrec@d3"]["recall@5"]["diff"] == pytest.approx(0.5)


def test_report_rejects_missing_headroom_and_variant(tmp_path: Path) -> None:
    run = _run(tmp_path / "r", {"automr": 0.3})
    with pytest.raises(UserError, match="no headroom.json"):
        run_report(ReportConfig(runs=[run], headroom=[tmp_path / "nope"], out=tmp_path / "out"))
    with pytest.raises(UserError, match="no metrics.json"):
        run_report(ReportConfig(runs=[run], variants="{plain: [" + str(tmp_path / "gone") + "]}", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_oracle_diagnostic_is_never_marked_best() -> None:
    """Table 1 marks the best method per column; the oracle reads the targets, so it is shown but not a candidate."""
    from automr.eval.report_data import METRICS, Cell, MethodRow, best_per_column

    def row(name: str, value: float) -> MethodRow:
        return MethodRow(name, 10, 1, {k: Cell(value, None, None) for k in METRICS}, None, None)

    rows = [row("oracle", 0.9), row("bigrec", 0.1), row("automr [seeds 0-2]", 0.2), row("oracle [seeds 0-2]", 0.8)]
    assert set(best_per_column(rows).values()) == {"automr [seeds 0-2]"}
    assert best_per_column([row("popularity", 0.0), row("bigrec", 0.0)]) == {}  # all at 0: nothing is best
