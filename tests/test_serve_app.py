"""The HTTP API (FastAPI TestClient over the tiny run): every endpoint, every validation case with nothing
written, idempotent retries, persistence across a restart, memory growth off the request path,
deletion that erases the states, and recommendations equal to the offline evaluator's."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from serve_helpers import K, history_before, merged_histories


@pytest.fixture(scope="module")
def run(tiny_run: Path):
    import torch

    from automr.api import load_run

    torch.set_num_threads(1)
    return load_run(tiny_run)


def _client(run, state: Path) -> TestClient:
    from automr.serve.app import create_app

    return TestClient(create_app(run, state))


@pytest.fixture
def client(run, tmp_path: Path) -> Iterator[TestClient]:
    with _client(run, tmp_path / "state") as c:
        yield c


def _post(c: TestClient, user: str, item: int, t: int, ev: str, **kw):
    wait = kw.pop("wait", False)
    return c.post(f"/users/{user}/interactions", json={"item_id": item, "time": t, "event_id": ev, **kw}, params={"wait": wait})


def _counts(c: TestClient) -> dict:
    return c.app.state.service.storage.counts()


# -- reads -------------------------------------------------------------------------------------
def test_health_metrics_items_users_page_and_openapi(client: TestClient, run) -> None:
    assert client.get("/health").json()["status"] == "ok"
    found = client.get("/items", params={"query": "frozen"}).json()
    assert found["total"] == sum("frozen" in t.lower() for t in run.titles.values()) > 0
    assert all("frozen" in i["title"].lower() for i in found["items"])
    _post(client, "ann", 1, 100, "a")
    assert client.get("/users").json()["users"] == [{"user_id": "ann", "interactions": 1}]
    m = client.get("/metrics").json()
    assert m["storage"]["interactions"] == 1 and m["requests"]["POST /users/{user_id}/interactions"]["count"] == 1
    page = client.get("/")
    assert page.status_code == 200 and '<form id="add"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/users/{user_id}/interactions", "/users/{user_id}/recommendations", "/users/{user_id}/memory", "/items"} <= set(paths)


def test_a_user_without_history_gets_popularity_labelled(client: TestClient, run) -> None:
    assert client.put("/users/new").status_code == 201 and client.put("/users/new").status_code == 200
    got = client.get("/users/new/recommendations", params={"k": 3}).json()
    assert got["method"] == "popularity" and "no history" in got["label"]
    assert [x["item_id"] for x in got["items"]] == list(run.method("popularity").order[:3])


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("request_kw", "status", "message"), [
    ({"json": {"item_id": 999, "time": 1, "event_id": "x"}}, 422, "not in the catalogue"),
    ({"json": {"title": "No Such Film", "time": 1, "event_id": "x"}}, 422, "no item has the title"),
    ({"json": {"item_id": 1, "title": "Silent River", "time": 1, "event_id": "x"}}, 422, "exactly one of item_id and title"),
    ({"json": {"time": 1, "event_id": "x"}}, 422, "exactly one of item_id and title"),
    ({"json": {"item_id": 1, "time": "soon", "event_id": "x"}}, 422, "time"),
    ({"json": {"item_id": 1, "time": 1_700_000_000_000, "event_id": "x"}}, 422, "time"),
    ({"json": {"item_id": 1, "time": 1, "event_id": "bad id!"}}, 422, "event_id"),
    ({"json": {"item_id": 1, "time": 1, "event_id": "x", "model": "/etc/passwd"}}, 422, "model"),
    ({"content": b'{"item_id": 1, "time": ', "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"content": b"[" + b"1," * 20000 + b"1]", "headers": {"content-type": "application/json"}}, 413, "over 16384 bytes"),
])
def test_a_bad_interaction_is_a_4xx_with_a_message_and_writes_nothing(client: TestClient, request_kw, status, message) -> None:
    _post(client, "bob", 1, 100, "first")
    before = _counts(client)
    r = client.post("/users/bob/interactions", **request_kw)
    assert r.status_code == status and message in r.json()["detail"]
    assert _counts(client) == before


def test_ambiguous_titles_bad_user_ids_k_and_methods_are_refused(client: TestClient) -> None:
    service = client.app.state.service
    service.by_title["twin title"] = [3, 4]  # two catalogue items sharing a title (real catalogues have them)
    r = client.post("/users/bob/interactions", json={"title": "Twin  Title", "time": 1, "event_id": "x"})
    assert r.status_code == 422 and "2 items have the title" in r.json()["detail"] and "3, 4" in r.json()["detail"]
    assert client.post("/users/bad%20user/interactions", json={"item_id": 1, "time": 1, "event_id": "x"}).status_code == 422
    assert _counts(client)["interactions"] == 0
    assert client.get("/users/ghost").status_code == 404
    assert client.get("/users/ghost/recommendations").status_code == 404
    assert client.delete("/users/ghost/memory").status_code == 404
    _post(client, "bob", 1, 100, "a")
    for k in (0, 101, "x"):
        assert client.get("/users/bob/recommendations", params={"k": k}).status_code == 422
    r = client.get("/users/bob/recommendations", params={"method": "gpt"})
    assert r.status_code == 422 and "served:" in r.json()["detail"]
    ok = client.post("/users/bob/interactions", json={"title": "silent   RIVER", "time": 200, "event_id": "t"})
    assert ok.status_code == 201 and ok.json()["interaction"]["item_id"] == 1


# -- writes ----------------------------------------------------------------------------------------
def test_retries_are_applied_once_and_order_is_enforced(client: TestClient) -> None:
    first = _post(client, "cy", 2, 100, "e1")
    retry = _post(client, "cy", 2, 100, "e1")
    assert first.status_code == 201 and retry.status_code == 200 and retry.json()["duplicate"]
    assert _post(client, "cy", 3, 100, "e1").status_code == 409  # same id, other data
    late = _post(client, "cy", 4, 50, "e2")
    assert late.status_code == 409 and "backfill" in late.json()["detail"]
    assert _post(client, "cy", 4, 50, "e2", backfill=True).status_code == 201
    assert [h["item_id"] for h in client.get("/users/cy").json()["history"]] == [4, 2]


def test_memory_grows_off_the_request_path_when_an_interaction_leaves_the_window(client: TestClient) -> None:
    for j in range(K):
        assert _post(client, "dee", j + 1, 100 + j, f"e{j}").json()["memory"]["status"] == "done"  # nothing left it
    r = _post(client, "dee", 9, 200, "e9", wait=True)
    assert r.json()["memory"] == {"status": "done", "pending": 0}
    user = client.get("/users/dee").json()
    assert user["memory"] == {"done": 1, "pending": 0}
    assert [h["where"] for h in user["history"]] == ["memory"] + ["recent"] * K
    mem = client.get("/users/dee/memory").json()
    assert [(e["item_id"], e["status"]) for e in mem["elements"]] == [(1, "done")]
    store = client.app.state.service.memory.store
    assert store.rows_for(client.app.state.service.storage.user("dee")).tolist() == [0]
    rec = client.get("/users/dee/recommendations", params={"method": "automr"}).json()
    assert [x["item_id"] for x in rec["retrieved"]] == [1] and rec["memory_missing"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_the_model_runs_below_the_requests_priority(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nice: int) -> None:
    """With --model-nice N, recommendations and memory elements compute on threads N below the request threads."""
    from automr.memory import build
    from automr.serve.app import create_app
    from automr.utils.threads import thread_niceness

    seen: dict[str, int] = {}
    recommend, elements = run.recommend_batch, build.history_elements
    monkeypatch.setattr(run, "recommend_batch",
                        lambda *a, **kw: (seen.setdefault("recommend", thread_niceness()), recommend(*a, **kw))[1])
    monkeypatch.setattr(build, "history_elements",
                        lambda *a, **kw: (seen.setdefault("memory", thread_niceness()), elements(*a, **kw))[1])
    with TestClient(create_app(run, tmp_path / "state", model_nice=nice)) as client:
        for j in range(K + 1):
            _post(client, "neo", j + 1, 100 + j, f"e{j}", wait=True)
        assert client.get("/users/neo/recommendations").status_code == 200
    here = thread_niceness()
    assert seen == {"recommend": min(19, here + nice), "memory": min(19, here + nice)}


def test_a_backfill_recomputes_the_slid_windows_and_erases_the_old_states(client: TestClient) -> None:
    for j in range(K + 2):
        _post(client, "eve", j + 1, 100 + j, f"e{j}", wait=True)
    service = client.app.state.service
    assert len(service.memory.store) == 2
    _post(client, "eve", 20, 100, "late", backfill=True, wait=True)  # ties with the first: lands second
    uid = service.storage.user("eve")
    rows = service.memory.store.rows_for(uid)
    assert len(rows) == 3 and service.storage.counts()["memory_pending"] == 0
    idx = np.asarray(service.memory.store.index)
    assert (idx["user_id"][1] == -1) and not np.asarray(service.memory.store.key_matrix[1]).any()  # slid: erased


def test_delete_memory_erases_the_states_from_the_store(client: TestClient) -> None:
    for j in range(K + 3):
        _post(client, "fay", j + 1, 100 + j, f"e{j}", wait=True)
    _post(client, "gus", 5, 100, "g0")
    service = client.app.state.service
    store = service.memory.store
    uid = service.storage.user("fay")
    rows = store.rows_for(uid)
    assert len(rows) == 3
    r = client.delete("/users/fay/memory")
    assert r.status_code == 200 and r.json()["erased"] == 3
    assert store.rows_for(uid).tolist() == [] and client.get("/users/fay/memory").json()["elements"] == []
    raw = np.fromfile(store.folder / "keys.bin", np.float32).reshape(-1, store.hidden_size)
    assert not raw[rows].any()
    rec = client.get("/users/fay/recommendations").json()  # still served: from the recent window alone
    assert rec["retrieved"] == [] and rec["memory_missing"] == 3
    _post(client, "fay", 30, 900, "after", wait=True)  # pushes an erased interaction out: not computed again
    assert client.get("/users/fay").json()["memory"] == {"done": 0, "pending": 0}


def test_everything_survives_a_restart_and_retries_stay_duplicates(run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _client(run, state) as c:
        for j in range(K + 1):
            _post(c, "hal", j + 1, 100 + j, f"e{j}", wait=True)
        before = c.get("/users/hal").json()
        rec = c.get("/users/hal/recommendations").json()
    with _client(run, state) as c:
        assert c.get("/users/hal").json() == before
        assert _post(c, "hal", K + 1, 100 + K, f"e{K}").json()["duplicate"]
        again = c.get("/users/hal/recommendations").json()
        assert again["cached"] is False and again["items"] == rec["items"] and again["retrieved"] == rec["retrieved"]


def test_an_element_no_entry_points_to_is_erased_at_start_up(run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _client(run, state) as c:
        for j in range(K + 1):
            _post(c, "ivy", j + 1, 100 + j, f"e{j}", wait=True)
    from automr.memory.store import MemoryStore

    with MemoryStore.open(state / "memory", "a") as store:  # as if the server died between append and mark_done
        store.append([1], [3], [102], np.ones((1, store.hidden_size)), [np.ones((1, store.hidden_size))])
    with _client(run, state) as c:
        store = c.app.state.service.memory.store
        assert len(store) == 2 and store.rows_for(1).tolist() == [0]
        assert not np.asarray(store.key_matrix[1]).any()


def test_repeated_requests_reuse_the_answer_until_the_user_changes(client: TestClient) -> None:
    _post(client, "jo", 1, 100, "a")
    first = client.get("/users/jo/recommendations").json()
    second = client.get("/users/jo/recommendations").json()
    assert not first["cached"] and second["cached"] and second["items"] == first["items"]
    _post(client, "jo", 2, 101, "b")
    assert client.get("/users/jo/recommendations").json()["cached"] is False


def test_served_recommendations_equal_the_offline_evaluator(run, tiny_run: Path, tmp_path: Path) -> None:
    """Each test sample's user replayed into the server (their whole history before the target): the
    worker's memory elements and the ranking are the offline ones."""
    histories, placements = merged_histories(run.data.root)
    want = {m: dict(zip(*(pl.read_parquet(tiny_run / "predictions" / f"{m}.parquet")[c].to_list() for c in ("row", "ranked_items"))))
            for m in ("automr", "recent", "bigrec")}
    with _client(run, tmp_path / "state") as c:
        for p in placements:
            items, times = history_before(histories, p)
            for j, (i, t) in enumerate(zip(items, times)):
                assert _post(c, f"user{p.user_id}", i, t, f"e{j}", wait=j == len(items) - 1).status_code == 201
            for method, ranked in want.items():
                got = c.get(f"/users/user{p.user_id}/recommendations", params={"method": method}).json()
                assert [x["item_id"] for x in got["items"]] == ranked[p.row], (method, p.row)


def test_a_chunked_body_is_limited_too_and_a_small_one_goes_through(client: TestClient) -> None:
    """Without content-length (chunked transfer), the body is counted as it arrives."""
    def chunks(body: bytes):
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    big = b'{"item_id": 1, "time": 1, "event_id": "x", "title": "' + b"a" * 20000 + b'"}'
    r = client.post("/users/kim/interactions", content=chunks(big), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _counts(client)["interactions"] == 0
    small = b'{"item_id": 1, "time": 1, "event_id": "x"}'
    r = client.post("/users/kim/interactions", content=chunks(small), headers={"content-type": "application/json"})
    assert r.status_code == 201 and _counts(client)["interactions"] == 1


def test_serve_passes_its_settings_to_the_interpreter_the_app_and_uvicorn(tiny_run: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`automr serve`: --gil-switch-ms reaches the interpreter before the server starts (default: Python's 5 ms);
    the model process (default on) gets --preload, this process loads nothing; --http and --loop reach uvicorn."""
    import uvicorn

    import automr.api
    import automr.serve.app
    from automr.stages.serve import ServeConfig, run_serve

    seen: list[tuple] = []
    loads: list[tuple] = []
    apps: list[dict] = []
    monkeypatch.setattr(automr.api, "load_run", lambda *a, **kw: loads.append(tuple(kw.get("preload", ())))
                        or type("R", (), {"folder": tiny_run, "method_names": []})())
    monkeypatch.setattr(automr.serve.app, "create_app", lambda *a, **kw: apps.append(kw))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.append((sys.getswitchinterval(), kw["http"], kw["loop"])))
    before = sys.getswitchinterval()
    try:
        run_serve(ServeConfig(run=tiny_run, state=tmp_path / "s", gil_switch_ms=0.5, http="h11", loop="asyncio",
                              preload=["automr"]))
        run_serve(ServeConfig(run=tiny_run, state=tmp_path / "s", model_process=False, preload=["automr"]))
    finally:
        sys.setswitchinterval(before)
    assert seen == [(pytest.approx(0.0005), "h11", "asyncio"), (pytest.approx(0.005), "auto", "auto")]
    assert loads == [(), ("automr",)]
    assert [(a["model_process"], list(a["preload"])) for a in apps] == [(True, ["automr"]), (False, ["automr"])]


def test_a_model_that_stopped_is_a_503_and_writes_still_go_through(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model process died during a call (automr/serve/model.py): that request is a 503 that says so."""
    from automr.serve.model import ModelUnavailable

    def stopped(*a, **kw):
        raise ModelUnavailable("the model process stopped (exit code -9); the next request starts a new one")

    monkeypatch.setattr(client.app.state.service.model, "recommend_batch", stopped)
    assert _post(client, "zed", 1, 100, "a").status_code == 201
    r = client.get("/users/zed/recommendations")
    assert r.status_code == 503 and "model process stopped" in r.json()["detail"] and r.headers["retry-after"] == "5"
