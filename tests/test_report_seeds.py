"""The report builds from a small real run's outputs with 2 seeds: configs/synthetic-tiny.yaml, shrunk
(fewer users, a few tiny-model epochs), run with seeds [0, 1]; every part of the page is there."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from memory_helpers import single_thread

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from automr.pipeline import run_pipeline_file

    root = tmp_path_factory.mktemp("report-seeds")
    spec = yaml.safe_load((REPO / "configs" / "synthetic-tiny.yaml").read_text())
    st = spec["stages"]
    st["synthetic"].update(n_users=240)
    st["tiny-lm"].update(epochs=3)
    for name in ("headroom", "evaluate"):
        st[name]["methods"] = [m for m in st[name]["methods"] if m not in ("rella", "recent", "oldest")]
    for m in ("rella", "recent"):
        st["evaluate"]["method_options"].pop(m)
    spec["seeds"] = [0, 1]
    (root / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    old = Path.cwd()
    gen = single_thread()
    next(gen)
    os.chdir(root)
    try:
        run_pipeline_file(root / "p.yaml")
    finally:
        os.chdir(old)
        next(gen, None)
    return root / "runs" / "synthetic-tiny" / "report"


def test_report_over_two_seeds(report: Path) -> None:
    for name in ("report.html", "report.md", "table.md", "report.json", "figure2.png", "retriever_curve.png", "labels.png"):
        assert (report / name).is_file(), name
    page = (report / "report.html").read_text()
    assert "2 seed run(s): seed 0, seed 1" in page and "automr - bigrec" in page and "automr - random" in page
    assert "Run metadata" in page and "Five worked examples" in page
    numbers = json.loads((report / "report.json").read_text())
    automr = next(r for r in numbers["table1"] if r["name"] == "automr")
    assert automr["seeds"] == 2 and automr["cells"]["recall@5"]["spread"] is not None
    assert {r["seeds"] for r in numbers["headroom"]} == {2}
    # Figure 3 is drawn exactly when some sample went from a BIGRec miss to an AutoMR hit; else the page says so.
    assert (report / "figure3.png").is_file() == (numbers["figure3"]["n"] > 0)
