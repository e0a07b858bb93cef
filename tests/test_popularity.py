"""Popularity baseline: counts of distinct interactions before the validation period."""

from __future__ import annotations

from pathlib import Path

import pytest

from automr.eval.evaluator import evaluate_methods
from automr.methods.popularity import make, popularity_counts
from automr.data.schema import PreparedData
from automr.errors import UserError
from conftest import DAY, DAY0, make_prepared


def _data(tmp_path: Path) -> PreparedData:
    # Leave-last-out: per user the last target is test, the one before valid, the rest train.
    users = {
        1: [1, 2, 3, 4, 5, 6],  # train targets 2, 3, 4 (histories overlap: 1, 2, 3 each once)
        2: [2, 3, 7, 8],  # train target 3; valid 7; test 8
        3: [9, 9, 2, 1],  # a repeat of item 9
    }
    return PreparedData.load(make_prepared(tmp_path / "d", users, items=list(range(1, 12))))


def test_counts_by_hand(tmp_path: Path) -> None:
    data = _data(tmp_path)
    counts = dict(zip(*popularity_counts(data).select("item_id", "count").to_dict(as_series=False).values()))
    # Validation starts at the earliest valid target: user 2's and 3's position 2 (DAY0 + 2 days).
    # Before it: user 1 items 1,2,3,4 (train targets/histories, positions 0..3 at DAY0..DAY0+3d are
    # all train); user 2 items 2,3; user 3 items 9 (twice, at two times). Train targets of user 1
    # after the cutoff still count (they are training targets).
    assert counts == {1: 1, 2: 2, 3: 2, 4: 1, 5: 0, 6: 0, 7: 0, 8: 0, 9: 2, 10: 0, 11: 0}


def test_ranking_ties_by_id_and_covers_catalogue(tmp_path: Path) -> None:
    data = _data(tmp_path)
    rec = make({}, seed=0)
    rec.fit(data, tmp_path / "work")
    out = rec.recommend(data.split("test"), 12)
    assert out.shape == (3, 12)
    assert out[0].tolist() == [2, 3, 9, 1, 4, 5, 6, 7, 8, 10, 11, -1]  # 11 items, then padding
    assert (out == out[0]).all()  # same list for every user by default
    assert (tmp_path / "work" / "popularity.parquet").is_file()


def test_exclude_history_moved_to_the_evaluator(tmp_path: Path) -> None:
    """The per-method option would exclude for one method only; it now points to evaluate's setting."""
    with pytest.raises(UserError, match="exclude_history moved from the method to the evaluator") as info:
        make({"exclude_history": True}, seed=0)
    assert "--exclude-history true" in str(info.value)
    assert make({"exclude_history": False}, seed=0).options.exclude_history is False  # old configs with false still load
    data = _data(tmp_path)
    test = data.split("test").sort("user_id")
    # What the option did (user 1 has 1..5 in history; user 2 has 2, 3, 7; user 3 has 9, 9, 2) the evaluator
    # now does for every method: the popularity order minus the history.
    res = evaluate_methods(data, {"popularity": make({}, 0)}, test, n_boot=10, exclude_history=True)
    assert res["popularity"].recs[:, :4].tolist() == [[9, 6, 7, 8], [9, 1, 4, 5], [3, 1, 4, 5]]


def test_cutoff_excludes_validation_period(tmp_path: Path) -> None:
    # One train user early; a test user whose history lies partly after validation starts.
    users = {1: [1, 2, 3], 2: [5, 6, 7, 8]}
    times = {1: [DAY0, DAY0 + DAY, DAY0 + 10 * DAY], 2: [DAY0, DAY0 + 20 * DAY, DAY0 + 21 * DAY, DAY0 + 22 * DAY]}
    root = make_prepared(tmp_path / "d", users, times=times, valid_from=DAY0 + 10 * DAY, test_from=DAY0 + 22 * DAY)
    data = PreparedData.load(root)
    counts = dict(zip(*popularity_counts(data).select("item_id", "count").to_dict(as_series=False).values()))
    # Item 5 (at DAY0) is before validation; 6 and 7 are inside the validation period: not counted.
    assert counts[5] == 1 and counts[6] == 0 and counts[7] == 0 and counts[2] == 1 and counts[3] == 0


def test_bad_option() -> None:
    with pytest.raises(UserError, match="exclude_histroy"):
        make({"exclude_histroy": True}, 0)


def test_recommend_before_fit() -> None:
    with pytest.raises(RuntimeError):
        make({}, 0).recommend(None, 3)  # type: ignore[arg-type]
