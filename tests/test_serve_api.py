"""automr.api: a trained run loaded back recommends exactly what the offline evaluator ranked.

The tiny run (tests/serve_helpers.py) was evaluated by `automr evaluate`; for every test sample and
every method, `Run.recommend` on the same history must return the saved ranking: through the run's
own memory store (user id given), and through a scratch store computed from the user's whole history
with build-memory's code (no user id, what `automr recommend --history` does). Also: the fallbacks
(no history, fewer than K), bad histories, run discovery and the `automr recommend` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from serve_helpers import METHODS, history_before, merged_histories

from automr.errors import UserError


@pytest.fixture(scope="module")
def run(tiny_run: Path):
    import torch

    from automr.api import load_run

    torch.set_num_threads(1)
    return load_run(tiny_run)


def _offline(tiny_run: Path, method: str) -> dict[int, list[int]]:
    pred = pl.read_parquet(tiny_run / "predictions" / f"{method}.parquet")
    return dict(zip(pred["row"].to_list(), pred["ranked_items"].to_list()))


@pytest.mark.parametrize("method", METHODS)
def test_api_equals_the_offline_evaluator_for_every_test_sample(run, tiny_run: Path, method: str) -> None:
    from automr.api import History

    want = _offline(tiny_run, method)
    test = run.data.split("test")
    histories, placements = merged_histories(run.data.root)
    for p in placements:
        row = test.row(p.row, named=True)
        sample_history = History.of_sample(row)
        cut = run.sample(sample_history, row["user_id"], at=row["target_time"]).row(0, named=True)
        assert all(cut[c] == row[c] for c in ("recent_items", "recent_times", "memory_items", "memory_times"))
        got = run.recommend(sample_history, method, 10, user_id=row["user_id"], at=row["target_time"])
        assert [x.item_id for x in got.items] == want[p.row], f"{method}, test row {p.row}, run store"
        items, times = history_before(histories, p)  # the whole history: the scratch store's windows are complete
        scratch = run.recommend(History(items=items, times=times), method, 10, at=row["target_time"])
        assert [x.item_id for x in scratch.items] == want[p.row], f"{method}, test row {p.row}, scratch store"
        assert [x.item_id for x in scratch.recent] == row["recent_items"]


@pytest.mark.parametrize("method", ["automr", "bigrec"])
def test_a_batch_answers_each_history_as_it_would_be_answered_alone(run, method: str) -> None:
    """The server's batching: one model call for several histories (an empty one among them) gives each
    the items, scores, retrieved element and window of its own call."""
    from automr.api import History

    rows = list(run.data.split("test").iter_rows(named=True))[:5]
    histories = [History(items=r["memory_items"] + r["recent_items"], times=r["memory_times"] + r["recent_times"])
                 for r in rows] + [History()]
    users = [r["user_id"] for r in rows] + [None]
    batch = run.recommend_batch(histories, method, 7, user_ids=users)
    assert [b.batch for b in batch] == [5] * 5 + [1]
    for h, u, got in zip(histories, users, batch):
        alone = run.recommend(h, method, 7, user_id=u)
        same = {"timings_ms", "batch", "items", "retrieved"}
        assert got.model_dump(exclude=same) == alone.model_dump(exclude=same)
        assert [x.item_id for x in got.items] == [x.item_id for x in alone.items]
        assert [x.score for x in got.items] == pytest.approx([x.score for x in alone.items], abs=1e-3)  # padded batch: float noise
        assert [(r.item_id, r.rank) for r in got.retrieved] == [(r.item_id, r.rank) for r in alone.retrieved]
        assert [r.score for r in got.retrieved] == pytest.approx([r.score for r in alone.retrieved], abs=1e-4)
    assert batch[-1].method == "popularity"
    assert any(b.retrieved for b in batch) == (method == "automr")


def test_the_why_names_the_retrieved_element_with_its_score_and_rank(run) -> None:
    from automr.api import History

    row = next(r for r in run.data.split("test").iter_rows(named=True) if len(r["memory_items"]) >= 2)
    h = History(items=row["memory_items"] + row["recent_items"], times=row["memory_times"] + row["recent_times"])
    got = run.recommend(h, "automr", 5, user_id=row["user_id"])
    assert len(got.retrieved) == 1
    r = got.retrieved[0]
    assert (r.item_id, r.time) in set(zip(row["memory_items"], row["memory_times"]))
    assert r.rank == 1 and 0 < r.score <= 1 and r.memory_size == len(row["memory_items"])
    assert {"retrieve_ms", "prefill_ms", "decode_ms", "rank_ms", "total_ms"} <= set(got.timings_ms)
    assert {"catalogue", "memory", "retriever", "model"} <= set(got.fingerprints)
    assert got.items[0].score is not None and len(got.items) == 5
    recent = run.recommend(h, "recent", 5, user_id=row["user_id"])
    assert (recent.retrieved[0].item_id, recent.retrieved[0].time) == (row["memory_items"][-1], row["memory_times"][-1])


def test_no_history_gets_popularity_labelled_and_a_short_one_its_own_window(run) -> None:
    from automr.api import History

    empty = run.recommend(History(), "automr", 5)
    assert empty.method == "popularity" and "no history" in empty.label and len(empty.items) == 5
    assert [x.item_id for x in empty.items] == list(run.method("popularity").order[:5])
    short = run.recommend(History(items=[3, 5], times=[10, 20]), "automr", 5)
    assert short.method == "automr" and [x.item_id for x in short.recent] == [3, 5] and short.memory == [] and short.retrieved == []


def test_bad_histories_and_options_are_user_errors(run) -> None:
    from automr.api import History

    with pytest.raises(UserError, match="not in the catalogue: 999"):
        run.recommend(History(items=[1, 999], times=[1, 2]), "bigrec")
    with pytest.raises(UserError, match="must not decrease"):
        run.recommend(History(items=[1, 2], times=[5, 2]), "bigrec")
    with pytest.raises(UserError, match="2 items but 1 times"):
        run.recommend(History(items=[1, 2], times=[5]), "bigrec")
    with pytest.raises(UserError, match="k must be between"):
        run.recommend(History(items=[1], times=[5]), "bigrec", 0)
    with pytest.raises(UserError, match="not served by this run"):
        run.recommend(History(items=[1], times=[5]), "sasrec")


def test_a_run_is_found_from_its_parent_or_a_pipeline_file(tiny_run: Path, tmp_path: Path) -> None:
    import yaml

    from automr.api import find_evaluate_settings

    assert find_evaluate_settings(tiny_run.parent)[1] == tiny_run
    spec = {"stages": {"prepare": {"data": "x", "out": "d"}, "evaluate": {"samples": "d", "methods": ["popularity"], "run": "r"}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    settings, folder = find_evaluate_settings(tmp_path / "p.yaml")
    assert folder == Path("r") and settings["methods"] == ["popularity"]
    with pytest.raises(UserError, match="not an `automr evaluate` output folder"):
        find_evaluate_settings(tmp_path)


def test_recommend_command_prints_the_api_answer_and_refuses_bad_input(run, tiny_run: Path, tmp_path: Path, capsys) -> None:
    from automr.api import History
    from automr.cli import main

    test = run.data.split("test").row(0, named=True)
    items, times = test["memory_items"] + test["recent_items"], test["memory_times"] + test["recent_times"]
    f = tmp_path / "h.json"
    f.write_text(json.dumps([{"item_id": i, "time": t} for i, t in zip(items, times)]))
    with pytest.raises(SystemExit) as done:
        main(["recommend", str(tiny_run), "--history", str(f), "--method", "bigrec", "--k", "4"])
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    want = run.recommend(History(items=items, times=times), "bigrec", 4)
    assert [x["item_id"] for x in printed["items"]] == [x.item_id for x in want.items]
    for argv, message in [
        (["--history", str(tmp_path / "missing.json")], "does not exist"),
        ([], "give exactly one of --user"),
        (["--user", "nobody", "--state", str(tmp_path / "nostate")], "no server state"),
    ]:
        with pytest.raises(SystemExit) as bad:
            main(["recommend", str(tiny_run), *argv])
        assert bad.value.code == 2
        assert message in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SystemExit) as bad:
        main(["recommend", str(tiny_run), "--history", str(tmp_path / "bad.json")])
    assert bad.value.code == 2 and "not a history" in capsys.readouterr().err
