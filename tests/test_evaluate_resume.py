"""An evaluation run again into its own folder keeps the methods it finished with the same settings (automr/eval/resume.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_evaluate_reuse import FitCounter, counted_popularity  # noqa: F401  (a fixture)
from test_evaluator import Oracle, _many

from automr.eval.evaluator import load_predictions
from automr.methods.registry import METHODS
from automr.stages.evaluate import EvaluateConfig, run_evaluate


class Crashing(Oracle):
    """An oracle whose ranking fails: the evaluation stops after the methods before it finished."""

    def recommend(self, samples: Any, k: int) -> Any:
        raise RuntimeError("killed")


def make_crashing(options: dict[str, Any], seed: int) -> Oracle:
    return Crashing(**options)


def _cfg(root: Path, run: Path, **kw: object) -> EvaluateConfig:
    settings = {"methods": ["popularity", "oracle"], "n_eval": 12, "subset_seed": 3, "n_boot": 100, "exclude_history": False}
    return EvaluateConfig(samples=root, run=run, **(settings | kw))


def test_an_interrupted_evaluation_keeps_what_it_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          counted_popularity: type[FitCounter]) -> None:  # noqa: F811
    root = _many(tmp_path)
    monkeypatch.setitem(METHODS, "oracle", f"{__name__}:make_crashing")
    with pytest.raises(RuntimeError, match="killed"):
        run_evaluate(_cfg(root, tmp_path / "run"))
    assert counted_popularity.calls == 1 and (tmp_path / "run" / "predictions" / "popularity.json").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()

    monkeypatch.setitem(METHODS, "oracle", "test_evaluator:make_oracle")
    resumed = run_evaluate(_cfg(root, tmp_path / "run"))
    assert counted_popularity.calls == 1  # read back, not ranked again
    fresh = run_evaluate(_cfg(root, tmp_path / "fresh"))
    assert counted_popularity.calls == 2
    assert resumed == fresh  # every metric, interval and collapse figure
    assert json.loads((tmp_path / "run" / "paired.json").read_text()) == json.loads((tmp_path / "fresh" / "paired.json").read_text())
    info = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert info["timings"]["popularity"]["resumed_from"] == str(tmp_path / "run")
    assert load_predictions(tmp_path / "run", "popularity").equals(load_predictions(tmp_path / "fresh", "popularity"))


def test_a_changed_setting_or_seed_or_resume_false_ranks_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                counted_popularity: type[FitCounter]) -> None:  # noqa: F811
    root = _many(tmp_path)
    monkeypatch.setitem(METHODS, "oracle", "test_evaluator:make_oracle")
    run_evaluate(_cfg(root, tmp_path / "run"))
    assert counted_popularity.calls == 1
    moved = run_evaluate(_cfg(root, tmp_path / "run", method_options={"oracle": {"rank": 1}}))
    assert counted_popularity.calls == 1  # popularity's settings did not change
    assert moved["oracle"]["recall@1"] == 0.0  # the oracle was ranked again with its new options
    run_evaluate(_cfg(root, tmp_path / "run", method_options={"oracle": {"rank": 1}}, exclude_history=True))
    assert counted_popularity.calls == 2  # another ranking rule: nothing is kept
    run_evaluate(_cfg(root, tmp_path / "run", method_options={"oracle": {"rank": 1}}, exclude_history=True, seed=5))
    assert counted_popularity.calls == 3  # another seed
    run_evaluate(_cfg(root, tmp_path / "run", method_options={"oracle": {"rank": 1}}, exclude_history=True, seed=5, resume=False))
    assert counted_popularity.calls == 4


def test_a_folder_finished_before_resume_records_is_read_from_its_run_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_popularity: type[FitCounter]  # noqa: F811
) -> None:
    root = _many(tmp_path)
    monkeypatch.setitem(METHODS, "oracle", "test_evaluator:make_oracle")
    first = run_evaluate(_cfg(root, tmp_path / "run"))
    for record in (tmp_path / "run" / "predictions").glob("*.json"):
        record.unlink()
    again = run_evaluate(_cfg(root, tmp_path / "run", methods=["popularity"]))
    assert counted_popularity.calls == 1
    assert again["popularity"] == first["popularity"]


def test_an_unreadable_prediction_file_is_ranked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        counted_popularity: type[FitCounter]) -> None:  # noqa: F811
    root = _many(tmp_path)
    monkeypatch.setitem(METHODS, "oracle", "test_evaluator:make_oracle")
    first = run_evaluate(_cfg(root, tmp_path / "run"))
    (tmp_path / "run" / "predictions" / "popularity.parquet").write_bytes(b"not parquet")
    again = run_evaluate(_cfg(root, tmp_path / "run"))
    assert counted_popularity.calls == 2 and again == first
