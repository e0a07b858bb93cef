"""The server's SQLite storage and the store's erasure, without a model: idempotency, order, the memory
index kept equal to the interactions that left the recent window, deletion, durability across reopen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automr.serve.storage import Conflict, SQLiteStorage

K = 3


@pytest.fixture
def db(tmp_path: Path) -> SQLiteStorage:
    s = SQLiteStorage(tmp_path / "serve.sqlite")
    yield s
    s.close()


def _add(db: SQLiteStorage, item: int, t: int, ev: str, backfill: bool = False, user: str = "u"):
    return db.add_interaction(user, item, t, ev, backfill, K)


def test_an_event_id_is_applied_once_and_a_reused_one_with_other_data_is_refused(db: SQLiteStorage) -> None:
    first = _add(db, 1, 10, "a")
    again = _add(db, 1, 10, "a")
    assert not first.duplicate and again.duplicate and again.event == first.event
    with pytest.raises(Conflict, match="already used for item 1"):
        _add(db, 2, 10, "a")
    assert [e.item_id for e in db.history(first.uid)] == [1]
    assert _add(db, 1, 10, "a", user="other").duplicate is False  # event ids are per user


def test_out_of_order_is_refused_unless_backfill_and_nothing_is_written(db: SQLiteStorage) -> None:
    _add(db, 1, 10, "a")
    _add(db, 2, 20, "b")
    with pytest.raises(Conflict, match="earlier than"):
        _add(db, 3, 15, "c")
    uid = db.user("u")
    assert [e.item_id for e in db.history(uid)] == [1, 2]
    _add(db, 3, 15, "c", backfill=True)
    _add(db, 4, 20, "d")  # the same time as the last one is in order (ties keep arrival order)
    assert [e.item_id for e in db.history(uid)] == [1, 3, 2, 4]


def test_memory_entries_are_the_interactions_that_left_the_window(db: SQLiteStorage) -> None:
    for j in range(K):
        assert _add(db, j, j, f"e{j}").pending == 0
    added = _add(db, 9, 9, "e9")
    assert added.pending == 1
    uid = added.uid
    (entry,) = db.memory(uid)
    assert entry.seq == 0 and entry.window == (0,) and entry.row is None
    assert db.pending(10) == [entry]
    assert db.mark_done(entry, 7) and db.memory(uid)[0].row == 7 and db.pending(10) == []
    assert not db.mark_done(entry, 8)  # already done: a second worker's copy is refused
    assert db.counts() == {"users": 1, "interactions": 4, "memory_done": 1, "memory_pending": 0}


def test_a_backfill_drops_the_elements_whose_window_it_slides(db: SQLiteStorage) -> None:
    for j in range(6):
        _add(db, j, 10 * j, f"e{j}")
    uid = db.user("u")
    for row, e in enumerate(db.memory(uid)):  # positions 0, 1, 2 left the window of 3
        db.mark_done(e, row)
    added = _add(db, 99, 5, "late", backfill=True)  # lands at position 1: windows of 1.. slide
    assert sorted(added.stale_rows) == [1, 2]
    windows = {e.seq: e.window for e in db.memory(uid)}
    assert windows[0] == (0,) and db.memory(uid)[0].row == 0  # position 0's window is unchanged: kept
    assert windows[6] == (0, 6) and windows[1] == (0, 6, 1) and windows[2] == (6, 1, 2)
    assert added.pending == 3  # the late one, and positions 2 and 3 (the old 1 and 2), recomputed


def test_delete_drops_every_entry_and_erased_interactions_are_never_queued_again(db: SQLiteStorage) -> None:
    for j in range(5):
        _add(db, j, j, f"e{j}")
    uid = db.user("u")
    done, in_flight = db.memory(uid)
    db.mark_done(done, 0)
    assert db.delete_memory(uid) == [0]
    assert db.memory(uid) == [] and db.pending(10) == []
    assert not db.mark_done(in_flight, 5)  # an element computed while the delete ran is refused (then erased)
    added = _add(db, 7, 7, "e7")  # pushes an erased interaction out of the window: not computed again
    assert added.pending == 0 and db.pending(10) == []
    for j in range(8, 8 + K):
        _add(db, j, j, f"e{j}")
    assert [e.seq for e in db.pending(10)] == [5]  # the first interaction sent after the delete


def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    a = SQLiteStorage(tmp_path / "s.sqlite")
    for j in range(5):
        a.add_interaction("u", j, j, f"e{j}", False, K)
    a.close()
    b = SQLiteStorage(tmp_path / "s.sqlite")
    uid = b.user("u")
    assert [e.item_id for e in b.history(uid)] == list(range(5)) and len(b.memory(uid)) == 2
    assert b.add_interaction("u", 0, 0, "e0", False, K).duplicate
    b.close()


def test_store_erase_zeroes_the_states_in_the_files(tmp_path: Path) -> None:
    from automr.memory.store import MemoryStore

    store = MemoryStore.create(tmp_path / "m", 4, 3)
    keys = np.ones((3, 4), np.float32)
    store.append([1, 1, 2], [10, 11, 12], [5, 6, 7], keys, [np.ones((2, 4)), np.ones((3, 4)), np.ones((1, 4))])
    assert store.erase([1]) == 1
    assert store.rows_for(1).tolist() == [0] and store.rows_for(2).tolist() == [2]
    raw_keys = np.fromfile(tmp_path / "m" / "keys.bin", np.float32).reshape(3, 4)
    raw_values = np.fromfile(tmp_path / "m" / "values.bin", np.float16).reshape(6, 4)
    assert (raw_keys[1] == 0).all() and (raw_keys[[0, 2]] == 1).all()
    assert (raw_values[2:5] == 0).all() and (raw_values[[0, 1, 5]] == 1).all()
    store.close()
    again = MemoryStore.open(tmp_path / "m")
    assert again.index["user_id"][1] == -1 and again.rows_for(1).tolist() == [0]
