"""The evaluator end to end on tiny hand-made prepared folders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.eval.evaluator import evaluate_methods, load_predictions, paired_from_predictions
from automr.utils.seeding import select_subset
from automr.stages.evaluate import EvaluateConfig, run_evaluate
from automr.eval.metrics import METRIC_NAMES
from automr.methods.base import Recommender
from automr.methods.registry import METHODS, make_method
from conftest import make_prepared


class Oracle(Recommender):
    """Puts the target first (or at a fixed rank), the other items after it by id: metrics known in advance."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.items: list[int] = []

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / "fitted").write_text("yes")
        self.items = sorted(data.item_ids)

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        rows = []
        for target in samples["target_item"].to_list():
            others = [i for i in self.items if i != target]
            rows.append((others[: self.rank] + [target] + others[self.rank :])[:k])
        return np.array(rows, dtype=np.int64)


class SeenFirst(Oracle):
    """Ranks the sample's history first (most recent first), then the target, then the rest by id."""

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        rows = []
        for recent, memory, target in samples.select("recent_items", "memory_items", "target_item").iter_rows():
            head = list(dict.fromkeys([*reversed(recent), *reversed(memory), target]))
            rows.append((head + [i for i in self.items if i not in head])[:k])
        return np.array(rows, dtype=np.int64)


def make_oracle(options: dict[str, Any], seed: int) -> Oracle:
    return Oracle(**options)


@pytest.fixture
def with_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "oracle", f"{__name__}:make_oracle")


def _tiny(tmp_path: Path) -> Path:
    # Leave-last-out; test targets are 4, 5, 3. Popularity before validation (DAY0 + 2 days):
    # items 1 and 2 three times each, so the ranking is 1, 2, 3, 4, 5, 6 (ties by id).
    return make_prepared(tmp_path / "tiny", {1: [1, 2, 3, 4], 2: [1, 2, 3, 5], 3: [2, 1, 4, 3]}, items=[1, 2, 3, 4, 5, 6])


def _many(tmp_path: Path, n_users: int = 30, n_items: int = 14, recent_k: int = 10) -> Path:
    rng = np.random.default_rng(0)
    users = {u: rng.integers(1, n_items + 1, size=6).tolist() for u in range(n_users)}
    return make_prepared(tmp_path / "many", users, items=list(range(1, n_items + 1)), recent_k=recent_k)


def test_popularity_end_to_end_by_hand(tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run_evaluate(
        EvaluateConfig(samples=_tiny(tmp_path), methods=["popularity"], run=run, n_boot=200, exclude_history=False)
    )
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == metrics
    assert list(on_disk) == ["popularity"]
    entry = on_disk["popularity"]
    assert set(entry) == {*METRIC_NAMES, "n", "ci95", "distinct_top1", "top1_repeats_history"}
    assert set(entry["ci95"]) == set(METRIC_NAMES)
    # Ranks of the targets 4, 5, 3 in [1, 2, 3, 4, 5, 6]: 3, 4, 2.
    assert entry["n"] == 3
    assert entry["recall@1"] == 0 and entry["recall@5"] == 1 and entry["recall@10"] == 1
    expected_ndcg = (1 / math.log2(5) + 1 / math.log2(6) + 1 / math.log2(4)) / 3
    assert entry["ndcg@5"] == pytest.approx(expected_ndcg) and entry["ndcg@10"] == pytest.approx(expected_ndcg)
    for m in METRIC_NAMES:
        lo, hi = entry["ci95"][m]
        assert lo <= entry[m] <= hi

    pred = load_predictions(run, "popularity")
    assert pred.columns == ["row", "user_id", "target_item", "target_time", "ranked_items", "rank"]
    assert pred["rank"].to_list() == [3, 4, 2]
    assert pred["ranked_items"].to_list()[0] == [1, 2, 3, 4, 5, 6, -1, -1, -1, -1]
    for name in ("metrics.md", "paired.json", "config.yaml", "eval.json"):
        assert (run / name).is_file()
    assert "| popularity | 3 |" in (run / "metrics.md").read_text()
    assert (run / "methods" / "popularity" / "popularity.parquet").is_file()
    info = json.loads((run / "eval.json").read_text())
    assert info["exclude_history"] is False and "set in the config" in info["exclude_history_reason"]
    assert info["seen_in_top_k"] == {"popularity": pytest.approx((3 + 3 + 3) / (3 * 6))}  # 3 seen of 6 items each


def test_history_exclusion_by_hand_and_auto(tmp_path: Path) -> None:
    """Issue 9 A2. _tiny: no target repeats (auto excludes); histories 1,2,3 / 1,2,3 / 2,1,4 leave
    popularity 4,5,6 / 4,5,6 / 3,5,6, so the targets 4, 5, 3 rank 0, 1, 0."""
    run = tmp_path / "run"
    metrics = run_evaluate(EvaluateConfig(samples=_tiny(tmp_path), methods=["popularity"], run=run, n_boot=50))
    pred = load_predictions(run, "popularity")
    assert pred["ranked_items"].to_list() == [[4, 5, 6] + [-1] * 7, [4, 5, 6] + [-1] * 7, [3, 5, 6] + [-1] * 7]
    assert pred["rank"].to_list() == [0, 1, 0] and metrics["popularity"]["recall@1"] == pytest.approx(2 / 3)
    info = json.loads((run / "eval.json").read_text())
    assert info["exclude_history"] is True and "0.00% of training targets" in info["exclude_history_reason"]
    assert "counted from" in info["exclude_history_reason"]  # this stats.json predates repeat_rate
    assert "minus each sample's history" in (run / "metrics.md").read_text()


def test_auto_reads_the_repeat_rate_from_stats_json(tmp_path: Path) -> None:
    root = _tiny(tmp_path)
    stats = json.loads((root / "stats.json").read_text())
    (root / "stats.json").write_text(json.dumps(stats | {"repeat_rate": {"train": 0.2, "valid": 0.0, "test": 0.0}}))
    run_evaluate(EvaluateConfig(samples=root, methods=["popularity"], run=tmp_path / "run", n_boot=50))
    info = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert info["exclude_history"] is False and "20.00% of training targets" in info["exclude_history_reason"]
    assert str(root / "stats.json") in info["exclude_history_reason"]
    assert load_predictions(tmp_path / "run", "popularity")["rank"].to_list() == [3, 4, 2]  # not excluded


def test_exclusion_is_the_same_for_every_method(tmp_path: Path) -> None:
    """A method that ranks the history first loses it all, exactly like every other method; metrics follow."""
    data = PreparedData.load(_many(tmp_path, n_items=40, recent_k=2))  # histories: 2 recent + 3 in memory
    test = data.split("test")
    assert all(len(m) == 3 for m in test["memory_items"].to_list())
    methods = {"seen_first": SeenFirst(), "oracle": Oracle(0), "popularity": make_method("popularity")}
    kept = evaluate_methods(data, methods, test, n_boot=20, exclude_history=False)
    assert not any(m.ranking_excludes_history for m in methods.values())
    dropped = evaluate_methods(data, methods, test, n_boot=20, exclude_history=True)
    assert all(m.ranking_excludes_history for m in methods.values())  # each method was told (bigrec's beams use it)
    hist = [set(r) | set(m) for r, m in zip(test["recent_items"].to_list(), test["memory_items"].to_list())]
    for name, method in methods.items():
        full = method.recommend(test, 40)  # the method's own order of the whole catalogue
        for row, h, own in zip(dropped[name].recs, hist, full):
            assert not set(row.tolist()) & h  # no history item left
            assert len(set(row.tolist())) == 10 and (row > 0).all()
            # The same rule for every method: its own ranking, minus the history, in its order.
            assert row.tolist() == [i for i in own.tolist() if i not in h][:10]
    assert kept["seen_first"].summary["recall@1"] < 0.5 and dropped["seen_first"].summary["recall@1"] == 1.0
    assert kept["seen_first"].seen_share > 0.3 and dropped["seen_first"].seen_share == kept["seen_first"].seen_share
    assert dropped["oracle"].summary == kept["oracle"].summary  # no target repeats here: the oracle is unmoved
    assert dropped["popularity"].summary["recall@10"] >= kept["popularity"].summary["recall@10"]


def test_same_subset_for_every_method_and_deterministic(tmp_path: Path, with_oracle: None) -> None:
    root = _many(tmp_path)
    cfg = dict(samples=root, methods=["popularity", "oracle"], n_eval=10, seed=3, n_boot=100)
    m1 = run_evaluate(EvaluateConfig(run=tmp_path / "r1", **cfg))
    m2 = run_evaluate(EvaluateConfig(run=tmp_path / "r2", **cfg))
    assert m1 == m2  # deterministic given the seed
    expected_rows = select_subset(30, 10, 3).tolist()
    assert len(expected_rows) == 10 and expected_rows != list(range(10))
    for method in ("popularity", "oracle"):
        assert load_predictions(tmp_path / "r1", method)["row"].to_list() == expected_rows
    info = json.loads((tmp_path / "r1" / "eval.json").read_text())
    assert info["rows"] == expected_rows and info["n_eval"] == 10 and "same for every method" in info["subset"]
    assert m1["oracle"]["recall@1"] == 1.0 and m1["oracle"]["ci95"]["recall@1"] == [1.0, 1.0]
    assert m1["oracle"]["n"] == m1["popularity"]["n"] == 10
    # A different seed picks a different subset.
    m3 = run_evaluate(EvaluateConfig(run=tmp_path / "r3", **{**cfg, "seed": 4}))
    assert load_predictions(tmp_path / "r3", "oracle")["row"].to_list() != expected_rows
    assert m3["oracle"]["recall@1"] == 1.0
    # A pinned subset_seed keeps the samples while the seed changes (automr run --seeds).
    run_evaluate(EvaluateConfig(run=tmp_path / "r4", **{**cfg, "seed": 4, "subset_seed": 3}))
    assert load_predictions(tmp_path / "r4", "oracle")["row"].to_list() == expected_rows
    assert json.loads((tmp_path / "r4" / "eval.json").read_text())["seed"] == 4


def test_paired_tests_written_and_recomputable(tmp_path: Path, with_oracle: None) -> None:
    run = tmp_path / "run"
    run_evaluate(
        EvaluateConfig(
            samples=_many(tmp_path), methods=["oracle", "popularity"], run=run, compare=["oracle:popularity"], n_boot=300
        )
    )
    paired = json.loads((run / "paired.json").read_text())
    assert list(paired) == ["oracle:popularity"]
    res = paired["oracle:popularity"]
    assert res["n"] == 30 and res["recall@1"]["diff"] > 0.5 and res["recall@1"]["p_value"] < 0.01
    again = paired_from_predictions(load_predictions(run, "oracle"), load_predictions(run, "popularity"), n_boot=300)
    assert again == res
    assert "oracle - popularity" in (run / "metrics.md").read_text()


def test_a_variant_is_the_same_method_with_its_own_options(tmp_path: Path, with_oracle: None) -> None:
    """KIND@LABEL ranks the same samples as KIND with its own method_options entry, tested paired against it."""
    run = tmp_path / "run"
    metrics = run_evaluate(EvaluateConfig(
        samples=_many(tmp_path), methods=["oracle", "oracle@third"], run=run, n_boot=100,
        method_options={"oracle@third": {"rank": 2}}, compare=["oracle:oracle@third"],
    ))
    assert metrics["oracle"]["recall@1"] == 1.0 and metrics["oracle@third"]["recall@1"] == 0.0
    assert metrics["oracle@third"]["recall@5"] == 1.0  # the target third: the variant's own options were used
    assert (run / "predictions" / "oracle@third.parquet").is_file()
    assert json.loads((run / "paired.json").read_text())["oracle:oracle@third"]["recall@1"]["diff"] == 1.0
    for bad in ("oracle@", "oracle@a/b", "nope@x"):
        with pytest.raises(UserError, match="unknown method"):
            run_evaluate(EvaluateConfig(samples=_many(tmp_path), methods=["popularity", bad], run=tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_default_compare_pairs() -> None:
    cfg = EvaluateConfig(samples=Path("x"), methods=["automr", "bigrec", "popularity"], run=Path("r"))
    assert cfg.compare_pairs() == [("automr", "bigrec")]
    cfg = EvaluateConfig(samples=Path("x"), methods=["random", "automr", "bigrec"], run=Path("r"))
    assert cfg.compare_pairs() == [("automr", "bigrec"), ("automr", "random")]
    assert EvaluateConfig(samples=Path("x"), methods=["popularity"], run=Path("r")).compare_pairs() == []


def test_evaluate_methods_without_cli(tmp_path: Path) -> None:
    data = PreparedData.load(_tiny(tmp_path))
    res = evaluate_methods(data, {"o1": Oracle(0), "o3": Oracle(3)}, data.split("test"), n_boot=50)
    assert res["o1"].summary["ndcg@10"] == 1.0
    assert res["o3"].summary["recall@1"] == 0.0 and res["o3"].summary["recall@5"] == 1.0
    assert res["o3"].summary["ndcg@5"] == pytest.approx(1 / math.log2(5))
    assert res["o3"].ranks.tolist() == [3, 3, 3]


class Short(Oracle):
    """Returns only 5 items: what constrained decoding did with 5 beams."""

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        return super().recommend(samples, k)[:, :5]


class Padded(Oracle):
    """The right shape, but -1 after the first 4 items (the old beams-only ranking)."""

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        out = super().recommend(samples, k)
        out[:, 4:] = -1
        return out


class Repeats(Oracle):
    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        out = super().recommend(samples, k)
        out[1, 3] = out[1, 0]
        return out


def make_short(options: dict[str, Any], seed: int) -> Short:
    return Short()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (Short(), r"method 'bad' returned rankings of shape \(30, 5\) for 30 samples; expected \(30, 10\)"),
        (Padded(), r"method 'bad' ranked -1 padding at position 5 for user 0 \(30 of 30 samples affected\)"),
        (Repeats(), r"method 'bad' ranked item \d+ more than once for user 1"),
    ],
)
def test_a_ranking_shorter_than_k_is_refused(tmp_path: Path, method: Recommender, message: str) -> None:
    """Issue 9 A1: every method must rank at least k distinct catalogue items; the error names it and says why."""
    data = PreparedData.load(_many(tmp_path))
    with pytest.raises(UserError, match=message) as info:
        evaluate_methods(data, {"bad": method}, data.split("test"), n_boot=10, predictions_dir=tmp_path / "p")
    assert "at least 10 distinct catalogue items per sample" in str(info.value)
    assert not (tmp_path / "p").exists()
    # Excluding the history asks for k + the longest history (5 here), at most the 14 items there are.
    with pytest.raises(UserError, match=r"expected \(30, 14\).*at least 14 .*whole catalogue.*longest history \(5\)"):
        evaluate_methods(data, {"bad": Short()}, data.split("test"), n_boot=10, exclude_history=True)


def test_cli_refuses_a_short_ranking_without_traceback(tmp_path: Path) -> None:
    root = _many(tmp_path)
    script = (
        "import sys; sys.path[:0] = sys.argv[1:2]; sys.argv[1:2] = []\n"
        "from automr.methods.registry import METHODS; METHODS['short'] = 'test_evaluator:make_short'\n"
        "from automr.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), "evaluate", "--samples", str(root),
         "--methods", "short", "--run", str(tmp_path / "r"), "--exclude-history", "false"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "method 'short' returned rankings of shape" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "metrics.json").exists() and not (tmp_path / "r" / "predictions").exists()


def test_user_errors(tmp_path: Path) -> None:
    root = _tiny(tmp_path)
    with pytest.raises(UserError) as info:
        run_evaluate(EvaluateConfig(samples=root, methods=["popularity", "nope"], run=tmp_path / "r", compare=["a-b"]))
    msg = str(info.value)
    assert "unknown method(s) 'nope'" in msg and "popularity" in msg and "'a-b' is not of the form a:b" in msg
    with pytest.raises(UserError, match="does not exist"):
        run_evaluate(EvaluateConfig(samples=tmp_path / "missing", methods=["popularity"], run=tmp_path / "r"))
    with pytest.raises(UserError, match="method_options for 'sasrec'"):
        run_evaluate(EvaluateConfig(samples=root, methods=["popularity"], run=tmp_path / "r", method_options={"sasrec": {}}))
    empty = make_prepared(tmp_path / "empty", {1: [1, 2, 3]}, samples={"test": []})
    with pytest.raises(UserError, match="split 'test' .* has no samples"):
        run_evaluate(EvaluateConfig(samples=empty, methods=["popularity"], run=tmp_path / "r"))
    with pytest.raises(UserError, match="not a prepared data folder"):
        (tmp_path / "half").mkdir()
        run_evaluate(EvaluateConfig(samples=tmp_path / "half", methods=["popularity"], run=tmp_path / "r"))
    with pytest.raises(UserError, match="no predictions for method 'sasrec'"):
        load_predictions(tmp_path / "r", "sasrec")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_cli_options_and_errors(tmp_path: Path) -> None:
    from automr.config import load_config

    cfg = load_config(
        EvaluateConfig, samples="s", methods=["sasrec"], run="r", method_options="{sasrec: {epochs: 3}}"
    )
    assert cfg.method_options == {"sasrec": {"epochs": 3}}
    with pytest.raises(UserError, match="more than once"):
        load_config(EvaluateConfig, samples="s", methods=["popularity", "popularity"], run="r")
    proc = subprocess.run(
        [sys.executable, "-m", "automr.cli", "evaluate", "--samples", str(_tiny(tmp_path)), "--methods", "popularity,nope", "--run", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "unknown method(s) 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_method_extras_saved_with_predictions(tmp_path: Path) -> None:
    """Recommender.last_extras() columns (e.g. which memory was retrieved) land in the predictions."""

    class WithExtras(Oracle):
        def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
            self._last = samples["user_id"].to_list()
            return super().recommend(samples, k)

        def last_extras(self) -> dict[str, list[Any]]:
            return {"retrieved_item": [u * 10 if u != 2 else None for u in self._last]}

    data = PreparedData.load(_tiny(tmp_path))
    test = data.split("test")
    res = evaluate_methods(
        data, {"x": WithExtras()}, test, n_boot=10, batch_size=2, predictions_dir=tmp_path / "p"
    )
    expected = [u * 10 if u != 2 else None for u in test["user_id"].to_list()]
    assert res["x"].extras == {"retrieved_item": expected}
    saved = pl.read_parquet(tmp_path / "p" / "x.parquet")
    assert saved["retrieved_item"].to_list() == expected and saved.columns[-1] == "retrieved_item"


class Constant(Oracle):
    """Always the same ranking, item 1 first: a fully collapsed model."""

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        return np.tile(np.array(self.items[:k], dtype=np.int64), (samples.height, 1))


def test_distinct_top1_and_top1_repeats_history(tmp_path: Path) -> None:
    """distinct_top1 counts the items ranked first as scored; top1_repeats_history reads the method's own first item."""
    data = PreparedData.load(_many(tmp_path, n_items=40, recent_k=2))
    test = data.split("test")
    res = evaluate_methods(data, {"constant": Constant(), "oracle": Oracle(0), "seen_first": SeenFirst()}, test, n_boot=20)
    assert res["constant"].summary["distinct_top1"] == 1
    assert res["oracle"].summary["distinct_top1"] == len(set(test["target_item"].to_list()))
    in_hist = np.mean([1 in set(r) | set(m) for r, m in zip(test["recent_items"].to_list(), test["memory_items"].to_list())])
    assert res["constant"].summary["top1_repeats_history"] == pytest.approx(round(float(in_hist), 4))
    assert res["seen_first"].summary["top1_repeats_history"] == 1.0 and res["oracle"].summary["top1_repeats_history"] == 0.0
    dropped = evaluate_methods(data, {"seen_first": SeenFirst()}, test, n_boot=20, exclude_history=True)
    assert dropped["seen_first"].summary["top1_repeats_history"] == 1.0  # before exclusion, whatever is scored
