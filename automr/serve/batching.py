"""The server's model thread: concurrent recommendation requests answered in batches.

On a CPU a beam-search step of SmolLM2 costs about the same for 10 rows as for 100 (it reads every
weight once per step), so answering the requests that queued while the model was busy in one call
(`Run.recommend_batch`) multiplies throughput under load; a request that arrives alone is answered
alone, without waiting for company. Requests only batch with others of the same key (method and k).
The thread runs at a lower OS priority than the request threads (automr/utils/threads.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from automr.utils.threads import lower_thread_priority


@dataclass
class _Pending:
    key: Hashable
    payload: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """`submit(key, payload)` blocks until `answer(key, payloads)` has answered it, in a batch of at most
    `max_batch` requests of that key taken from the queue in arrival order."""

    def __init__(self, answer: Callable[[Hashable, Sequence[Any]], Sequence[Any]], *, max_batch: int = 16,
                 nice: int = 0, name: str = "automr-model") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.answer, self.max_batch, self.nice, self.name = answer, max_batch, nice, name
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.in_flight = 0  # requests of the call being made
        self.batches = 0  # model calls made
        self.answered = 0  # requests answered by them

    def submit(self, key: Hashable, payload: Any) -> Any:
        job = _Pending(key, payload)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the model thread is stopped")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _take(self) -> list[_Pending] | None:
        """The next batch: the oldest request and the queued ones of its key (others keep their places)."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            skipped: list[_Pending] = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                (batch if job.key == batch[0].key else skipped).append(job)
            self._queue.extendleft(reversed(skipped))
            self.in_flight = len(batch)
            return batch

    def _loop(self) -> None:
        lower_thread_priority(self.nice)
        while (batch := self._take()) is not None:
            try:
                results = self.answer(batch[0].key, [j.payload for j in batch])
                for job, res in zip(batch, results, strict=True):
                    job.result = res
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request, raised in its thread
                for job in batch:
                    job.error = exc
            finally:
                self.batches += 1
                self.answered += len(batch)
                self.in_flight = 0
                for job in batch:
                    job.done.set()

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
