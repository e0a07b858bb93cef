"""The server's memory: a MemoryStore of its users' elements, grown by a background worker off the request path.

When an interaction leaves a user's recent window of K, the write request only records a pending
entry in the storage's memory index (one SQLite transaction); this worker then computes the element
with build-memory's own code (`history_elements`: the same window, prompt and layer-L states as
offline), appends it to the store and marks the entry done. A recommendation made meanwhile skips
the pending element (the response counts it in `memory_missing`).

Consistency. The store append is durable (fsync, then commit.json) before the entry is marked done,
so a crash between the two leaves an element no entry points to; `recover()` at start-up erases
such orphans, and the entry, still pending, is computed again. An entry whose window changed while
its element was being computed (a backfill slid it, or the user deleted their memory) is refused by
`mark_done`, and the element just written is erased. Erasure (DELETE memory, stale elements) zeroes
the states in the files (`MemoryStore.erase`), it does not only unlink them.

Locks: `lock` guards the store (appends, erasures, and the reads of a recommendation); the model
(automr/serve/model.py: in this process or its own) answers one call at a time, and an element is
computed without holding `lock`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from automr.api import History, create_like
from automr.memory.store import ERASED, MemoryStore, store_problem
from automr.serve.model import ServedModel
from automr.serve.storage import MemoryEntry, Storage
from automr.utils.logging import warn
from automr.utils.threads import lower_thread_priority


class ServedMemory:
    """The store of served users' elements (user id = the storage's uid) and its worker thread."""

    def __init__(self, folder: Path, model: ServedModel, recent_k: int, storage: Storage, *, durable: bool = True,
                 batch: int = 32, nice: int = 0) -> None:
        self.model, self.storage, self.batch, self.nice = model, storage, batch, nice
        template = model.memory_template()  # None: this run keeps no memory (bigrec, popularity, sasrec only)
        self.window = recent_k if template is not None else 0
        self.lock = threading.Lock()
        self.store: MemoryStore | None = None
        if template is not None:
            if store_problem(folder) is None:
                self.store = MemoryStore.open(folder, "a", durable=durable)
            else:
                with MemoryStore.open(template, "r") as like:
                    self.store = create_like(Path(folder), like, durable=durable, extra={"served": True})
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._erase_later: list[int] = []
        self._thread: threading.Thread | None = None
        self.computed = 0  # elements computed by this process
        self.compute_seconds = 0.0

    # -- start-up and shutdown ----------------------------------------------------------------
    def recover(self) -> int:
        """Erase elements that no done entry points to (a crash between append and mark_done); returns how many."""
        if self.store is None or not len(self.store):
            return 0
        live = self.storage.live_rows()
        idx = np.asarray(self.store.index)
        orphans = [r for r in np.flatnonzero(idx["user_id"] != ERASED).tolist() if r not in live]
        with self.lock:
            return self.store.erase(orphans) if orphans else 0

    def start(self) -> None:
        if self.store is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="automr-memory", daemon=True)
        self._thread.start()
        self.notify()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.store is not None:
            self.store.close()

    def notify(self) -> None:
        """New pending entries (or rows to erase): wake the worker."""
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the worker has nothing pending (tests, `?wait=true`); False on timeout."""
        if self._thread is None:
            return self.store is None
        return self._idle.wait(timeout)

    # -- erasure ------------------------------------------------------------------------------
    def erase_now(self, rows: list[int]) -> int:
        """Erase store rows before returning (DELETE memory)."""
        if self.store is None or not rows:
            return 0
        with self.lock:
            return self.store.erase(rows)

    def erase_later(self, rows: list[int]) -> None:
        """Stale elements (a backfill slid their window): the worker erases them, off the request path."""
        if rows:
            with self.lock:
                self._erase_later.extend(rows)
            self.notify()

    # -- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        lower_thread_priority(self.nice)  # the model's work goes after the requests' (automr/utils/threads.py)
        while not self._stop.is_set():
            self._wake.clear()
            try:
                busy = self._erase_stale() | self._compute_some()
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker silently: say it, back off, retry
                warn(f"memory worker: {type(exc).__name__}: {exc}")
                busy = False
                self._stop.wait(1.0)
            if not busy:
                self._idle.set()
                self._wake.wait(timeout=5.0)

    def _erase_stale(self) -> bool:
        with self.lock:
            rows, self._erase_later = self._erase_later, []
            if rows and self.store is not None:
                self.store.erase(rows)
        return bool(rows)

    def _compute_some(self) -> bool:
        """Compute one batch of pending entries, user by user; True when there was any."""
        from automr.memory.build import UserHistory

        entries = self.storage.pending(self.batch)
        if not entries or self.store is None:
            return False
        by_user: dict[int, list[MemoryEntry]] = defaultdict(list)
        for e in entries:
            by_user[e.uid].append(e)
        computed = False
        for uid, todo in by_user.items():
            events = self.storage.history(uid)
            seqs = [e.seq for e in events]
            where = {s: p for p, s in enumerate(seqs)}
            current = [e for e in todo if e.seq in where
                       and tuple(seqs[max(0, where[e.seq] - self.window + 1) : where[e.seq] + 1]) == e.window]
            if not current:
                continue
            hist = UserHistory(uid, [e.item_id for e in events], [e.time for e in events])
            t0 = time.perf_counter()
            els = self.model.elements(
                hist, [where[e.seq] for e in current], window=self.window, value_tokens=self.store.meta.max_value_tokens,
                value_kind=self.store.meta.value_kind,
            )
            self.compute_seconds += time.perf_counter() - t0
            by_pos = {p: el for el in els for p in [el[1]]}
            for e in current:
                self._store_one(e, hist, by_pos[where[e.seq]])
            computed = True
        return computed  # pending entries always match the history they were queued with (one transaction)

    def _store_one(self, entry: MemoryEntry, hist: Any, element: tuple) -> None:
        from automr.memory.build import append_elements

        assert self.store is not None
        with self.lock:
            before = len(self.store)
            append_elements(self.store, {hist.user_id: hist}, [element])
            row = before
            if not self.storage.mark_done(entry, row):  # dropped or slid while computing: not kept
                self.store.erase([row])
                return
        self.computed += 1

    # -- reading ------------------------------------------------------------------------------
    def history_of(self, uid: int) -> History:
        events = self.storage.history(uid)
        return History(items=[e.item_id for e in events], times=[e.time for e in events])
