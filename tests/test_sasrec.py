"""SASRec: training windows, a learnable sequential pattern, saving/reloading, bad options."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from automr.methods import popularity, sasrec
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.eval.evaluator import evaluate_methods
from automr.eval.metrics import rank_summary
from automr.utils.io import read_json
from conftest import make_prepared

FAST = {"hidden": 32, "max_len": 12, "batch_size": 32, "lr": 5e-3, "dropout": 0.0, "threads": 1, "device": "cpu"}


def _quiet(rec: sasrec.SASRecRecommender) -> sasrec.SASRecRecommender:
    rec.console = Console(file=io.StringIO())
    return rec


def test_training_windows_do_not_overlap(tmp_path: Path) -> None:
    # One user, items 1..12; leave-last-out gives train targets 2..10 (positions 1..9).
    data = PreparedData.load(make_prepared(tmp_path / "d", {7: list(range(1, 13))}))
    wins = sasrec.training_windows(data.split("train"), max_len=4, mode="all")
    # Latest: ... 6 | 7 8 9 10 supervised; then the latest sample before item 7: target 6, and so on.
    assert wins == [([6, 7, 8, 9, 10], 7), ([2, 3, 4, 5, 6], 7), ([1, 2], 7)]
    assert sasrec.training_windows(data.split("train"), max_len=4, mode="last") == [([6, 7, 8, 9, 10], 7)]


def _cyclic(tmp_path: Path, n_items: int = 40, n_users: int = 120, length: int = 12) -> PreparedData:
    """Every user walks the catalogue in order: next item = last item + 1 (mod n_items)."""
    rng = np.random.default_rng(0)
    users = {u: [int((s + j) % n_items) + 1 for j in range(length)] for u, s in enumerate(rng.integers(0, n_items, n_users))}
    return PreparedData.load(make_prepared(tmp_path / "cyclic", users))


def test_learns_sequential_pattern_and_beats_popularity(tmp_path: Path) -> None:
    data = _cyclic(tmp_path)
    rec = _quiet(sasrec.make({**FAST, "epochs": 12, "eval_every": 4}, seed=0))
    res = evaluate_methods(
        data,
        {"popularity": popularity.make({}, 0), "sasrec": rec},
        data.split("test"),
        work_root=tmp_path / "work",
        n_boot=50,
        console=Console(file=io.StringIO()),
    )
    pop, sas = res["popularity"].summary, res["sasrec"].summary
    # Popularity is near chance (1/40) on a uniform walk; the pattern is fully predictable.
    assert pop["recall@1"] < 0.1
    assert sas["recall@1"] > 0.8 and sas["recall@10"] > 0.95, sas
    assert [h["epoch"] for h in rec.history] == [4, 8, 12]


def test_saves_reloads_and_is_deterministic(tmp_path: Path) -> None:
    data = _cyclic(tmp_path, n_items=20, n_users=40)
    test = data.split("test")
    opts = {**FAST, "epochs": 2}
    a = _quiet(sasrec.make(opts, seed=1))
    a.fit(data, tmp_path / "a")
    for name in ("model.safetensors", "sasrec.json", "item_ids.npy"):
        assert (tmp_path / "a" / name).is_file()
    recs_a = a.recommend(test, 10)
    assert recs_a.shape == (test.height, 10) and recs_a.dtype == np.int64
    assert set(np.unique(recs_a)) <= set(data.item_ids)

    # Same data, options and seed: the second fit loads the weights instead of training.
    b = _quiet(sasrec.make(opts, seed=1))
    b.fit(data, tmp_path / "a")
    assert b.history == [] and np.array_equal(b.recommend(test, 10), recs_a)

    # Training again from scratch with the same seed gives the same model.
    c = _quiet(sasrec.make({**opts, "reuse": False}, seed=1))
    c.fit(data, tmp_path / "c")
    assert c.history and np.array_equal(c.recommend(test, 10), recs_a)

    # The whole catalogue ranked, each item once; k beyond the catalogue pads. Excluding the history is the
    # evaluator's (tests/test_evaluator.py); the method option only accepts false now.
    out = a.recommend(test, 25)
    assert all(sorted(row[:20].tolist()) == sorted(data.item_ids) for row in out) and (out[:, 20:] == -1).all()
    with pytest.raises(UserError, match="exclude_history moved from the method to the evaluator"):
        sasrec.make({**opts, "exclude_history": True}, seed=1)


def test_bad_options() -> None:
    with pytest.raises(UserError, match="divisible"):
        sasrec.make({"hidden": 10, "heads": 3}, 0)
    with pytest.raises(UserError, match="hiden: unknown key"):
        sasrec.make({"hiden": 10}, 0)
    with pytest.raises(UserError, match="CUDA is not available|device: Input should be 'auto', 'cpu' or 'cuda'"):
        sasrec.make({"device": "cuda" if not __import__("torch").cuda.is_available() else "nonsense"}, 0)


def test_defaults_stop_on_ndcg_at_10_over_the_whole_validation_split(tmp_path: Path) -> None:
    """Issue 9 A9: the default criterion is smooth (NDCG@10), measured on every validation sample."""
    opts = sasrec.SasrecOptions()
    assert (opts.valid_metric, opts.n_valid) == ("ndcg@10", 0)
    data = _cyclic(tmp_path, n_items=20, n_users=40)
    rec = sasrec.make({}, seed=0)
    assert rec._validation_samples(data).height == data.split("valid").height == 40
    assert sasrec.make({"n_valid": 7}, seed=0)._validation_samples(data).height == 7  # a cap is still an option


def _scripted_validation(n: int = 100):
    """validate() as on a small real set: a single Recall@1 hit at epoch 1, none after (flat), while
    NDCG@10 keeps rising (10 more targets at rank 3 each epoch)."""
    calls: list[int] = []

    def validate(samples) -> dict[str, float]:
        calls.append(1)
        epoch = len(calls)
        ranks = np.full(n, 50)
        if epoch == 1:
            ranks[0] = 0
        else:
            ranks[: 10 * epoch] = 3
        return rank_summary(ranks)

    return validate


@pytest.mark.parametrize("metric", ["ndcg@10", "recall@1"])
def test_flat_recall_at_1_does_not_stop_training_at_the_first_epoch(
    tmp_path: Path, metric: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The games set of issue 9 A9 in miniature: on Recall@1 (the old default) the best epoch is 1, from
    one hit, and training stops after `patience`; on NDCG@10 (the default) it trains on and keeps epoch 8.
    Each validation is logged and recorded with its hits; the one-hit choice is warned about."""
    data = _cyclic(tmp_path, n_items=20, n_users=40)
    opts = {**FAST, "epochs": 8, "patience": 3} | ({} if metric == "ndcg@10" else {"valid_metric": metric})
    rec = sasrec.make(opts, seed=0)
    rec.console = Console(file=io.StringIO(), width=400)
    rec.validate = _scripted_validation()  # type: ignore[method-assign]
    rec.fit(data, tmp_path / "w")
    epochs = [h["epoch"] for h in rec.history]
    saved = read_json(tmp_path / "w" / "sasrec.json")
    log, err = rec.console.file.getvalue(), capsys.readouterr().err
    if metric == "ndcg@10":
        assert epochs == list(range(1, 9)) and rec.best["epoch"] == 8
        assert "valid ndcg@10 0.3445 from 80 hits@10 of 100 samples (recall@10 0.8000)" in log
        assert "warning" not in err
    else:
        assert epochs == [1, 2, 3, 4] and rec.best["epoch"] == 1 and "early stop at epoch 4" in log
        assert "valid recall@1 0.0100 from 1 hits@1 of 100 samples" in log
        assert "the best epoch (1) was chosen on valid recall@1 0.0100 from 1 hits@1 of 100 samples" in err
    assert saved["best"] == rec.best and saved["history"] == rec.history
    last = rec.history[-1]
    assert (last["criterion"], last["criterion_samples"], last["hits@10"]) == (metric, 100, 10 * epochs[-1])
