"""The model in a process of its own (automr/serve/model.py, `automr serve`'s default): the same answers and
memory as in the server's process, the child's priority, errors that keep their kind, a dead child replaced,
and no child left behind when the server is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import K

from automr.errors import UserError


@pytest.fixture(scope="module")
def run(tiny_run: Path):
    import torch

    from automr.api import load_run

    torch.set_num_threads(1)
    return load_run(tiny_run)


def _replay(c: TestClient, user: str, n: int) -> None:
    for j in range(n):
        r = c.post(f"/users/{user}/interactions", json={"item_id": j + 1, "time": 100 + j, "event_id": f"e{j}"},
                   params={"wait": j == n - 1})
        assert r.status_code == 201, r.text


def _alive(pid: int) -> bool:
    """Running (a zombie no one reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_model_process_serves_what_the_server_process_serves(run, tmp_path: Path) -> None:
    """Same history into both servers: the same memory states, retrieved element and ranking; then the child
    is killed, the request in flight (if any) is a 503 and the next one is answered by a new child."""
    from automr.serve.app import create_app

    answers, keys = {}, {}
    for name, process in (("local", False), ("process", True)):
        with TestClient(create_app(run, tmp_path / name, model_process=process, model_nice=3)) as c:
            _replay(c, "ann", K + 2)
            assert c.get("/users/ann").json()["memory"] == {"done": 2, "pending": 0}
            answers[name] = {m: c.get("/users/ann/recommendations", params={"method": m}).json() for m in ("automr", "bigrec")}
            keys[name] = np.asarray(c.app.state.service.memory.store.key_matrix).copy()
            if process:
                model = c.app.state.service.model
                assert model.pid != os.getpid() and c.get("/metrics").json()["model_process"]["starts"] == 1
                assert os.getpriority(os.PRIO_PROCESS, model.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
                os.kill(model.pid, signal.SIGKILL)
                time.sleep(0.5)
                _replay(c, "bob", K + 1)  # the element goes through the new child (the worker retries)
                got = c.get("/users/bob/recommendations").json()
                assert got["retrieved"] and c.get("/metrics").json()["model_process"]["starts"] == 2
    for m in ("automr", "bigrec"):
        assert [x["item_id"] for x in answers["process"][m]["items"]] == [x["item_id"] for x in answers["local"][m]["items"]]
        assert answers["process"][m]["retrieved"] == answers["local"][m]["retrieved"]
    np.testing.assert_array_equal(keys["process"], keys["local"])


def test_the_child_sees_elements_appended_and_erased_after_it_opened_the_store(run, tmp_path: Path) -> None:
    """The child's read-only store is refreshed per call (appends) and reads erasures through its mapping."""
    from automr.serve.app import create_app

    with TestClient(create_app(run, tmp_path / "state", model_process=True)) as c:
        _replay(c, "ann", K + 1)
        assert c.get("/users/ann/recommendations").json()["retrieved"]  # the child has opened the store now
        _replay(c, "bob", K + 2)  # appended after that
        got = c.get("/users/bob/recommendations").json()
        assert len(got["retrieved"]) == 1 and got["memory_missing"] == 0
        assert c.delete("/users/bob/memory").json()["erased"] == 2
        gone = c.get("/users/bob/recommendations").json()
        assert gone["cached"] is False and gone["retrieved"] == [] and gone["memory_missing"] == 2
        assert c.get("/users/ann/recommendations").json()["retrieved"]  # the other user's element is untouched


def test_errors_keep_their_kind_and_a_killed_server_leaves_no_model_behind(tiny_run: Path, tmp_path: Path) -> None:
    from automr.api import History
    from automr.serve.model import ModelProcess

    with pytest.raises(UserError, match="not served by this run"):  # raised where the server starts, not a dead pipe
        ModelProcess(tiny_run, preload=["no-such-method"])
    model = ModelProcess(tiny_run)
    try:
        with pytest.raises(UserError, match="bad history"):
            model.recommend_batch([History(items=[99_999], times=[1])], "bigrec", 3, [None], None)
        assert len(model.recommend_batch([History(items=[1, 2], times=[1, 2])], "bigrec", 3, [None], None)[0].items) == 3
    finally:
        model.close()
    assert not _alive(model.pid)

    if not sys.platform.startswith("linux"):
        return  # the parent-death signal is Linux's; elsewhere the closed pipe ends the child after its call
    server = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from automr.serve.model import ModelProcess; "
                                f"m = ModelProcess({str(tiny_run)!r}); print('PID', m.pid, flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        child = next(int(line.split()[1]) for line in server.stdout if line.startswith("PID "))
        assert _alive(child)
        server.kill()
        server.wait(10)
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the model process outlived the server it served"
    finally:
        server.kill()
