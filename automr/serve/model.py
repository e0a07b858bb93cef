"""Where the server's model runs: in the server's own process, or in a process of its own.

The server asks two things of the model: answer a batch of recommendation requests, and compute the
memory elements of interactions that left a user's recent window. `LocalModel` calls the run in this
process (tests, notebooks, `automr serve --no-model-process`). `ModelProcess` (the default of `automr
serve`) runs the same calls in a child process that loads the run itself, so the server's process keeps
its interpreter to itself: in one process a write can wait for the GIL behind the beam search's Python
(per-step bookkeeping between torch calls). Across processes the OS schedules the two, and `--model-nice` lowers
the model's whole process, not threads that still share one interpreter. Measured with SmolLM2 under 16 clients
(BENCHMARKS.md, "Serving SmolLM2"): a write's p99 182 -> 129 ms in one run, p50 level; the tail that remains is
bursts of requests, not the model.

The child reads the served memory store read-only from its folder (memory-mapped, so it sees the
parent's appends after `refresh()`, and its erasures at once: they overwrite the mapped files in place,
and an erased row's identity no longer matches any sample's element). The parent stays the store's one
writer and holds the served memory's lock across a recommendation call, exactly as in one process.

If the child dies (killed, out of memory), the call in flight raises `ModelUnavailable` (the endpoint
answers 503) and the next call starts a new child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from automr.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from multiprocessing.connection import Connection

    from automr.api import History, Recommendation, Run
    from automr.memory.build import UserHistory
    from automr.memory.store import MemoryStore

Element = tuple  # (user, pos, key [H], value [S, H]): what `history_elements` returns, `append_elements` stores


class ModelUnavailable(RuntimeError):
    """The model process stopped during a call; the next call starts a new one."""


class ServedModel(Protocol):
    """The model calls the server makes (LocalModel, ModelProcess)."""

    def memory_template(self) -> Path | None: ...

    def elements(self, history: UserHistory, positions: Sequence[int], *, window: int, value_tokens: int,
                 value_kind: str) -> list[Element]: ...

    def recommend_batch(self, histories: Sequence[History], method: str, k: int, user_ids: Sequence[int],
                        store: MemoryStore | None) -> list[Recommendation]: ...

    def process_info(self) -> dict[str, Any] | None:
        """The model process's pid and how many were started (a restart after one died); None in-process."""
        ...

    def close(self) -> None: ...


class LocalModel:
    """The run's model in this process."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def memory_template(self) -> Path | None:
        """The run's memory store, whose layout the served store copies (None: the run keeps no memory)."""
        rec = self.run.memory_method()
        return None if rec is None else Path(rec.store.folder)

    def elements(self, history: UserHistory, positions: Sequence[int], *, window: int, value_tokens: int,
                 value_kind: str) -> list[Element]:
        """The elements at `positions` of one history, with build-memory's code (automr.api.element_states)."""
        from automr.api import element_states

        with self.run.lock:
            return element_states(self.run.memory_method(), history, positions, window, value_tokens, value_kind)

    def recommend_batch(self, histories: Sequence[History], method: str, k: int, user_ids: Sequence[int],
                        store: MemoryStore | None) -> list[Recommendation]:
        return self.run.recommend_batch(list(histories), method, k, user_ids=list(user_ids), store=store)

    def process_info(self) -> None:
        return None

    def close(self) -> None:
        pass


class ModelProcess:
    """The run's model in a child process (spawned: no torch state is forked); one call at a time."""

    def __init__(self, run_folder: Path, *, preload: Sequence[str] = (), nice: int = 0) -> None:
        self.run_folder, self.preload, self.nice = Path(run_folder), list(preload), nice
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self.starts = 0
        with self._lock:
            self._template: Path | None = self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def process_info(self) -> dict[str, Any]:
        return {"pid": self.pid, "starts": self.starts}

    def _start(self) -> Path | None:
        """Start a child and wait until it has loaded the run; returns its memory template (its first answer)."""
        conn, child_end = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=serve_calls, args=(child_end, str(self.run_folder), self.preload,
                                                                 self.nice, os.getpid()),
                                       name="automr-model", daemon=True)
        self._proc.start()
        child_end.close()
        self._conn = conn
        self.starts += 1
        return self._receive()

    def _receive(self) -> Any:
        assert self._conn is not None
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            self._conn = None
            raise ModelUnavailable(f"the model process stopped (exit code {self._proc.exitcode}); "
                                   "the next request starts a new one") from None
        if kind == "user_error":
            raise UserError(value)
        if kind == "error":
            raise RuntimeError(f"the model process failed: {value}")
        return value

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            if self._conn is None or not self._proc.is_alive():
                self.close_child()
                self._template = self._start()
            try:
                self._conn.send((op, args))
            except OSError:  # the child died between calls: say so, the next call restarts it
                self._conn = None
                raise ModelUnavailable("the model process stopped; the next request starts a new one") from None
            return self._receive()

    def memory_template(self) -> Path | None:
        return self._template

    def elements(self, history: UserHistory, positions: Sequence[int], *, window: int, value_tokens: int,
                 value_kind: str) -> list[Element]:
        return self._call("elements", history, list(positions), window, value_tokens, value_kind)

    def recommend_batch(self, histories: Sequence[History], method: str, k: int, user_ids: Sequence[int],
                        store: MemoryStore | None) -> list[Recommendation]:
        folder = str(store.folder) if store is not None else None
        return self._call("recommend", list(histories), method, k, list(user_ids), folder)

    def close_child(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the child reads EOF and exits
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)

    def close(self) -> None:
        with self._lock:
            self.close_child()


# ---------------------------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------------------------
def serve_calls(conn: Connection, run_folder: str, preload: list[str], nice: int, parent: int) -> None:
    """The child's loop: load the run, send its memory template, then answer calls until the pipe closes."""
    _die_with_parent(parent)
    if nice > 0:
        os.nice(min(19, nice))
    readers: dict[str, MemoryStore] = {}
    try:
        from automr.api import load_run

        try:
            local = LocalModel(load_run(run_folder, preload=preload))
            template = local.memory_template()
        except Exception as exc:  # noqa: BLE001 - the parent raises it where the server starts
            conn.send(_failure(exc))
            return
        conn.send(("ok", template))
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                return
            _reply(conn, _answer, local, readers, op, args)
    except KeyboardInterrupt:
        return
    finally:
        for store in readers.values():
            store.close()


def _answer(local: LocalModel, readers: dict[str, MemoryStore], op: str, args: tuple) -> Any:
    """One call of the parent's, answered by the run in this process."""
    if op == "recommend":
        histories, method, k, user_ids, folder = args
        return local.recommend_batch(histories, method, k, user_ids, _reader(readers, folder))
    if op == "elements":
        history, positions, window, value_tokens, value_kind = args
        return local.elements(history, positions, window=window, value_tokens=value_tokens, value_kind=value_kind)
    raise ValueError(f"unknown call {op!r}")


def _reply(conn: Connection, compute: Any, *args: Any) -> None:
    try:
        result = compute(*args)
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it in the request's thread
        conn.send(_failure(exc))
    else:
        conn.send(("ok", result))


def _failure(exc: Exception) -> tuple[str, str]:
    """What the parent raises for an exception here: a UserError as one (its message), anything else with its trace."""
    if isinstance(exc, UserError):
        return "user_error", str(exc)
    return "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"


def _reader(readers: dict[str, MemoryStore], folder: str | None) -> MemoryStore | None:
    """The served store, open read-only, with the rows the parent committed since the last call."""
    if folder is None:
        return None
    from automr.memory.store import MemoryStore

    store = readers.get(folder)
    if store is None:
        store = readers[folder] = MemoryStore.open(folder, "r")
    else:
        store.refresh()
    return store


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel stops this process when the server's dies (a SIGKILLed server leaves no model behind).
    Elsewhere the closed pipe ends it once its call in flight is done."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(0)
