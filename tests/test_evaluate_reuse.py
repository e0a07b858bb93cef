"""`evaluate --reuse RUN`: a method evaluated once stands for itself in later runs, only when nothing differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluator import _many

from automr.methods.registry import METHODS


@pytest.fixture
def with_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "oracle", "test_evaluator:make_oracle")

from automr.errors import UserError
from automr.eval.evaluator import load_predictions
from automr.stages.evaluate import EvaluateConfig, run_evaluate


class FitCounter:
    """Counts how often popularity is fitted: a reused method must not be."""

    calls = 0


@pytest.fixture
def counted_popularity(monkeypatch: pytest.MonkeyPatch) -> type[FitCounter]:
    from automr.methods.popularity import PopularityRecommender as Popularity

    FitCounter.calls = 0
    original = Popularity.fit

    def fit(self, data, work_dir):  # type: ignore[no-untyped-def]
        FitCounter.calls += 1
        return original(self, data, work_dir)

    monkeypatch.setattr(Popularity, "fit", fit)
    return FitCounter


def _cfg(root: Path, run: Path, **kw: object) -> EvaluateConfig:
    return EvaluateConfig(samples=root, run=run, n_eval=12, subset_seed=3, n_boot=100, exclude_history=False, **kw)


def test_reused_method_equals_a_fresh_evaluation(tmp_path: Path, with_oracle: None, counted_popularity: type[FitCounter]) -> None:
    root = _many(tmp_path)
    run_evaluate(_cfg(root, tmp_path / "shared", methods=["popularity"]))
    assert counted_popularity.calls == 1
    both = run_evaluate(_cfg(root, tmp_path / "seed-1", methods=["oracle", "popularity"], seed=1,
                             reuse=[tmp_path / "shared"], compare=["oracle:popularity"]))
    assert counted_popularity.calls == 1  # read, not refitted
    fresh = run_evaluate(_cfg(root, tmp_path / "fresh", methods=["oracle", "popularity"], seed=1, compare=["oracle:popularity"]))
    assert counted_popularity.calls == 2
    assert both["popularity"]["recall@10"] == fresh["popularity"]["recall@10"]
    assert both["popularity"]["ndcg@10"] == fresh["popularity"]["ndcg@10"]
    assert load_predictions(tmp_path / "seed-1", "popularity").equals(load_predictions(tmp_path / "fresh", "popularity"))
    paired = json.loads((tmp_path / "seed-1" / "paired.json").read_text())
    assert paired == json.loads((tmp_path / "fresh" / "paired.json").read_text())
    info = json.loads((tmp_path / "seed-1" / "eval.json").read_text())
    assert info["timings"]["popularity"]["reused_from"] == str(tmp_path / "shared")
    assert list(json.loads((tmp_path / "seed-1" / "metrics.json").read_text())) == ["oracle", "popularity"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_eval": 10}, "different subset"),
        ({"exclude_history": True}, "exclude_history"),
        ({"methods": ["oracle"], "method_options": {"oracle": {"rank": 1}}}, "method_options[oracle]"),
    ],
)
def test_any_difference_is_refused_before_writing(
    tmp_path: Path, with_oracle: None, change: dict[str, object], message: str
) -> None:
    root = _many(tmp_path)
    run_evaluate(_cfg(root, tmp_path / "shared", methods=["popularity", "oracle"]))
    settings = {"methods": ["popularity"], "reuse": [tmp_path / "shared"]} | change
    base = {"samples": root, "run": tmp_path / "later", "n_eval": 12, "subset_seed": 3, "n_boot": 100, "exclude_history": False}
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_evaluate(EvaluateConfig(**(base | settings)))
    assert not (tmp_path / "later").exists()


def test_unfinished_or_unrelated_reuse_run_is_refused(tmp_path: Path, with_oracle: None) -> None:
    root = _many(tmp_path)
    with pytest.raises(UserError, match="not a finished evaluation"):
        run_evaluate(_cfg(root, tmp_path / "r", methods=["popularity"], reuse=[tmp_path / "nothing"]))
    run_evaluate(_cfg(root, tmp_path / "oracle-only", methods=["oracle"]))
    with pytest.raises(UserError, match="none of this run's methods"):
        run_evaluate(_cfg(root, tmp_path / "r", methods=["popularity"], reuse=[tmp_path / "oracle-only"]))
