"""The server's model thread (automr/serve/batching.py): queued requests of one key are answered by one
call, in arrival order, at most max_batch at a time; other keys keep their places; an error reaches
every request of its batch; the thread runs below the requests' priority."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from automr.serve.batching import Batcher


def _wait_until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_queued_requests_of_a_key_share_one_call_in_order() -> None:
    gate, calls = threading.Event(), []

    def answer(key, payloads):
        calls.append((key, list(payloads)))
        gate.wait()
        return [f"{key}{p}" for p in payloads]

    b = Batcher(answer, max_batch=3)
    results: dict = {}
    first = threading.Thread(target=lambda: results.__setitem__(0, b.submit("a", 0)))
    first.start()
    _wait_until(lambda: len(calls) == 1)  # the model is busy with request 0
    threads = []
    for key, x in [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5)]:
        threads.append(threading.Thread(target=lambda k=key, v=x: results.__setitem__(v, b.submit(k, v))))
        threads[-1].start()
        _wait_until(lambda n=len(threads): b.queued() == n)
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    b.close()
    assert calls == [("a", [0]), ("a", [1, 3, 4]), ("b", [2]), ("a", [5])]
    assert results == {0: "a0", 1: "a1", 2: "b2", 3: "a3", 4: "a4", 5: "a5"}
    assert (b.batches, b.answered) == (4, 6)


def test_an_error_reaches_every_request_of_its_batch_and_the_thread_goes_on() -> None:
    def answer(key, payloads):
        if key == "bad":
            raise ValueError("boom")
        return payloads

    b = Batcher(answer)
    with pytest.raises(ValueError, match="boom"):
        b.submit("bad", 1)
    assert b.submit("good", 2) == 2
    b.close()
    with pytest.raises(RuntimeError, match="stopped"):
        b.submit("good", 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_model_thread_runs_below_the_callers_priority() -> None:
    from automr.utils.threads import thread_niceness

    b = Batcher(lambda key, payloads: [thread_niceness() for _ in payloads], nice=7)
    assert b.submit("k", None) == min(19, thread_niceness() + 7)
    b.close()


def test_the_service_batches_concurrent_recommendations_and_answers_each_as_alone(tiny_run: Path, tmp_path: Path) -> None:
    """Through the app's Service: requests that queue while the model is busy are one model call, and each
    answer equals the one the run gives that user's history alone."""
    import torch
    from fastapi.testclient import TestClient

    from automr.api import load_run
    from automr.serve.app import create_app

    torch.set_num_threads(1)
    run = load_run(tiny_run)
    with TestClient(create_app(run, tmp_path / "state")) as client:
        service = client.app.state.service
        users = [f"u{j}" for j in range(4)]
        for j, u in enumerate(users):
            for t in range(3):
                client.post(f"/users/{u}/interactions", json={"item_id": 1 + (j * 5 + t) % 20, "time": 100 + t, "event_id": f"{u}-{t}"})
        uids = [service.storage.user(u) for u in users]
        got: dict[int, object] = {}
        threads = [threading.Thread(target=lambda x=x: got.__setitem__(x, service.recommend(x, "automr", 5)[0])) for x in uids]
        with service.memory.lock:  # the model thread takes the first request and waits here; the others queue
            threads[0].start()
            _wait_until(lambda: service.batcher.in_flight == 1)
            for t in threads[1:]:
                t.start()
            _wait_until(lambda: service.batcher.queued() == len(uids) - 1)
        for t in threads:
            t.join(60)
        assert sorted(r.batch for r in got.values()) == [1, 3, 3, 3]
        for x in uids:
            alone = run.recommend(service.memory.history_of(x), "automr", 5, user_id=x, store=service.memory.store)
            assert [i.item_id for i in got[x].items] == [i.item_id for i in alone.items]
