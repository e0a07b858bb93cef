"""Where the server keeps users, histories, event ids and the memory index: a small interface, SQLite by default.

The interface (`Storage`) is what the app and the memory worker call; `SQLiteStorage` implements it
with one embedded database file in WAL mode, `synchronous=FULL`: a write is acknowledged only after
its transaction is in the write-ahead log on disk, so an acknowledged interaction survives a crash
or a SIGKILL (benchmarks/bench_serve_faults.py kills it mid-burst). The memory elements' states
live beside it in a memory-mapped MemoryStore (automr/serve/memory.py); this database holds only
their index: which interaction each element belongs to, the window it was computed from and its
row in the store.

Tables
  users         uid (the store's user id), name (the URL's user id), created
  interactions  uid, seq (arrival order), item_id, time, event_id (unique per user), backfill flag
  memory        uid, seq of the interaction, window (the seqs of the K interactions ending at it, or
                ERASED after the user deleted their memory), row in the store (NULL while pending),
                queued / done times

A user's history is their interactions ordered by (time, seq). An interaction at position p < n - K
(n interactions) has left the recent window of K and needs an element; `reconcile` keeps the memory
table equal to that set after every write: new entries are pending, entries whose window changed
(a backfill slid it) are dropped and their store rows returned for erasure.

Outgrowing one machine: the same interface over a server database (PostgreSQL: the same tables,
`SERIALIZABLE` transactions or `SELECT ... FOR UPDATE` on the user's row where SQLite's single writer
serialises today, the event-id uniqueness as a unique index) and the state arrays in a shared or
sharded store by user; the memory worker then runs as its own process pool reading pending rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
  uid INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS interactions (
  uid INTEGER NOT NULL REFERENCES users(uid),
  seq INTEGER NOT NULL,
  item_id INTEGER NOT NULL,
  time INTEGER NOT NULL,
  event_id TEXT NOT NULL,
  backfill INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (uid, seq),
  UNIQUE (uid, event_id)
);
CREATE INDEX IF NOT EXISTS interactions_order ON interactions (uid, time, seq);
CREATE TABLE IF NOT EXISTS memory (
  uid INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  window TEXT NOT NULL,
  row INTEGER,
  queued REAL NOT NULL,
  done REAL,
  PRIMARY KEY (uid, seq)
);
CREATE INDEX IF NOT EXISTS memory_pending ON memory (done) WHERE done IS NULL;
"""


ERASED = "erased"  # the window of a memory entry the user deleted: never computed again


@dataclass(frozen=True)
class Event:
    """One interaction as stored."""

    seq: int
    item_id: int
    time: int
    event_id: str
    backfill: bool = False


@dataclass(frozen=True)
class MemoryEntry:
    """The index entry of one memory element (row None while it is pending)."""

    uid: int
    seq: int
    window: tuple[int, ...]
    row: int | None


@dataclass(frozen=True)
class Added:
    """What `add_interaction` did: the stored event, whether it was a retry, and the memory work it caused."""

    uid: int
    event: Event
    duplicate: bool
    pending: int  # elements of this user still pending after the write
    stale_rows: list[int]  # store rows whose window changed: the caller erases them


class Conflict(Exception):
    """A write refused because of the stored state (an event id reused with other data, a time out of order)."""


class Storage(Protocol):
    """The server's storage; every method is one transaction."""

    def user(self, name: str) -> int | None: ...
    def create_user(self, name: str) -> tuple[int, bool]: ...
    def users(self, limit: int, offset: int) -> list[tuple[str, int]]: ...
    def add_interaction(self, name: str, item_id: int, time: int, event_id: str, backfill: bool, window: int) -> Added: ...
    def history(self, uid: int) -> list[Event]: ...
    def memory(self, uid: int) -> list[MemoryEntry]: ...
    def pending(self, limit: int) -> list[MemoryEntry]: ...
    def mark_done(self, entry: MemoryEntry, row: int) -> bool: ...
    def delete_memory(self, uid: int) -> list[int]: ...
    def live_rows(self) -> set[int]: ...
    def counts(self) -> dict[str, int]: ...
    def version(self, uid: int) -> tuple[int, int, int]: ...
    def close(self) -> None: ...


class SQLiteStorage:
    """`Storage` in one SQLite file (WAL, synchronous=FULL); safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the writer lock is taken up front, no upgrade deadlock)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- users --------------------------------------------------------------------------------
    def user(self, name: str) -> int | None:
        rows = self._read("SELECT uid FROM users WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    def create_user(self, name: str) -> tuple[int, bool]:
        """(uid, created): an existing user is returned as it is."""
        with self._tx() as db:
            return self._ensure_user(db, name)

    @staticmethod
    def _ensure_user(db: sqlite3.Connection, name: str) -> tuple[int, bool]:
        row = db.execute("SELECT uid FROM users WHERE name = ?", (name,)).fetchone()
        if row:
            return int(row[0]), False
        cur = db.execute("INSERT INTO users (name, created) VALUES (?, ?)", (name, time.time()))
        return int(cur.lastrowid), True

    def users(self, limit: int, offset: int) -> list[tuple[str, int]]:
        """(name, interactions) of users in creation order."""
        return [(str(n), int(c)) for n, c in self._read(
            "SELECT u.name, (SELECT COUNT(*) FROM interactions i WHERE i.uid = u.uid) FROM users u ORDER BY u.uid LIMIT ? OFFSET ?",
            (limit, offset))]

    # -- interactions -------------------------------------------------------------------------
    def add_interaction(self, name: str, item_id: int, time_: int, event_id: str, backfill: bool, window: int) -> Added:
        """Append one interaction (idempotent on event_id) and reconcile the user's memory index.

        A retry of a stored event (same id, same item and time) returns it with duplicate=True and
        writes nothing; the same id with other data, or a time earlier than the user's last
        interaction without `backfill`, raises Conflict and writes nothing.
        """
        with self._tx() as db:
            uid, _ = self._ensure_user(db, name)
            old = db.execute("SELECT seq, item_id, time, backfill FROM interactions WHERE uid = ? AND event_id = ?",
                             (uid, event_id)).fetchone()
            if old is not None:
                if (int(old[1]), int(old[2])) != (item_id, time_):
                    raise Conflict(f"event_id {event_id!r} was already used for item {old[1]} at time {old[2]}; "
                                   "a retry must send the same item and time (use a new event_id for a new interaction)")
                ev = Event(int(old[0]), int(old[1]), int(old[2]), event_id, bool(old[3]))
                return Added(uid, ev, True, self._pending_count(db, uid), [])
            last = db.execute("SELECT MAX(time), COALESCE(MAX(seq), -1) FROM interactions WHERE uid = ?", (uid,)).fetchone()
            if last[0] is not None and time_ < int(last[0]) and not backfill:
                raise Conflict(f"time {time_} is earlier than user {name!r}'s last interaction ({last[0]}); "
                               "send interactions in time order, or set backfill: true to insert an older one")
            ev = Event(int(last[1]) + 1, item_id, time_, event_id, backfill)
            db.execute("INSERT INTO interactions (uid, seq, item_id, time, event_id, backfill) VALUES (?, ?, ?, ?, ?, ?)",
                       (uid, ev.seq, item_id, time_, event_id, int(backfill)))
            stale = self._reconcile(db, uid, window)
            return Added(uid, ev, False, self._pending_count(db, uid), stale)

    def history(self, uid: int) -> list[Event]:
        return [Event(int(s), int(i), int(t), str(e), bool(b)) for s, i, t, e, b in self._read(
            "SELECT seq, item_id, time, event_id, backfill FROM interactions WHERE uid = ? ORDER BY time, seq", (uid,))]

    # -- the memory index ---------------------------------------------------------------------
    @staticmethod
    def _reconcile(db: sqlite3.Connection, uid: int, window: int) -> list[int]:
        """Make the user's memory entries the interactions that left the recent window, each with the window
        ending at it; returns the store rows of entries dropped (their window changed, or they left)."""
        seqs = [int(s) for (s,) in db.execute("SELECT seq FROM interactions WHERE uid = ? ORDER BY time, seq", (uid,))]
        want = {seqs[p]: json.dumps(seqs[max(0, p - window + 1) : p + 1]) for p in range(max(0, len(seqs) - window))}
        have = {int(s): (w, r) for s, w, r in db.execute("SELECT seq, window, row FROM memory WHERE uid = ?", (uid,))}
        stale = [s for s, (w, _) in have.items() if w != ERASED and want.get(s) != w]
        rows = [int(have[s][1]) for s in stale if have[s][1] is not None]
        db.executemany("DELETE FROM memory WHERE uid = ? AND seq = ?", [(uid, s) for s in stale])
        now = time.time()
        db.executemany("INSERT INTO memory (uid, seq, window, row, queued) VALUES (?, ?, ?, NULL, ?)",
                       [(uid, s, w, now) for s, w in want.items() if s not in have or s in stale])
        return rows

    @staticmethod
    def _pending_count(db: sqlite3.Connection, uid: int) -> int:
        return int(db.execute("SELECT COUNT(*) FROM memory WHERE uid = ? AND done IS NULL", (uid,)).fetchone()[0])

    def memory(self, uid: int) -> list[MemoryEntry]:
        return [MemoryEntry(uid, int(s), tuple(json.loads(w)), None if r is None else int(r)) for s, w, r in self._read(
            "SELECT m.seq, m.window, m.row FROM memory m JOIN interactions i ON i.uid = m.uid AND i.seq = m.seq "
            "WHERE m.uid = ? AND m.window != ? ORDER BY i.time, i.seq", (uid, ERASED))]

    def pending(self, limit: int) -> list[MemoryEntry]:
        """Pending entries, oldest queued first."""
        return [MemoryEntry(int(u), int(s), tuple(json.loads(w)), None) for u, s, w in self._read(
            "SELECT uid, seq, window FROM memory WHERE done IS NULL ORDER BY queued, uid, seq LIMIT ?", (limit,))]

    def mark_done(self, entry: MemoryEntry, row: int) -> bool:
        """Record the element's store row; False when the entry was dropped or its window changed meanwhile
        (the caller then erases the row it just wrote)."""
        with self._tx() as db:
            cur = db.execute("UPDATE memory SET row = ?, done = ? WHERE uid = ? AND seq = ? AND window = ? AND done IS NULL",
                             (row, time.time(), entry.uid, entry.seq, json.dumps(list(entry.window))))
            return cur.rowcount == 1

    def delete_memory(self, uid: int) -> list[int]:
        """Drop every memory entry of the user (their history stays); returns the store rows to erase.

        Every interaction stored so far gets a tombstone (window ERASED): the user asked for their memory
        to be erased, so no element is computed again for those interactions, not even when one of them
        later leaves the recent window; the memory grows again from interactions sent after the delete."""
        with self._tx() as db:
            rows = [int(r) for (r,) in db.execute("SELECT row FROM memory WHERE uid = ? AND row IS NOT NULL", (uid,))]
            db.execute("DELETE FROM memory WHERE uid = ?", (uid,))
            db.execute("INSERT OR REPLACE INTO memory (uid, seq, window, row, queued, done) "
                       "SELECT uid, seq, ?, NULL, 0, 0 FROM interactions WHERE uid = ?", (ERASED, uid))
            return rows

    def live_rows(self) -> set[int]:
        return {int(r) for (r,) in self._read("SELECT row FROM memory WHERE row IS NOT NULL")}

    def counts(self) -> dict[str, int]:
        (users,), (inter,), (done,), (pend,) = (self._read(q)[0] for q in (
            "SELECT COUNT(*) FROM users", "SELECT COUNT(*) FROM interactions",
            "SELECT COUNT(*) FROM memory WHERE row IS NOT NULL", "SELECT COUNT(*) FROM memory WHERE done IS NULL"))
        return {"users": int(users), "interactions": int(inter), "memory_done": int(done), "memory_pending": int(pend)}

    def version(self, uid: int) -> tuple[int, int, int]:
        """Changes whenever what a recommendation reads changes: (interactions, max seq, elements done)."""
        (n, s), (d,) = self._read("SELECT COUNT(*), COALESCE(MAX(seq), -1) FROM interactions WHERE uid = ?", (uid,))[0], \
            self._read("SELECT COUNT(*) FROM memory WHERE uid = ? AND row IS NOT NULL", (uid,))[0]
        return int(n), int(s), int(d)
