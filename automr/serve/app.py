"""The HTTP API over a trained run (FastAPI): users' interactions in, recommendations with their "why" out.

    POST   /users/{user_id}/interactions      {item_id | title, time, event_id, backfill?}  (?wait=true)
    GET    /users/{user_id}/recommendations   ?k=10&method=automr
    PUT    /users/{user_id}                   a user with no history yet (gets popularity, labelled)
    GET    /users/{user_id}                   history, recent window and memory size
    GET    /users/{user_id}/memory            the memory elements kept about the user
    DELETE /users/{user_id}/memory            erase them (their states are zeroed in the store files)
    GET    /users  /items?query=  /health  /metrics  /  (the page)  /docs, /openapi.json

Every recommendation goes through `automr.api.Run.recommend`, the same call as `automr recommend` and
a notebook. Writes are one SQLite transaction each (automr/serve/storage.py), acknowledged once
durable; memory grows in a background worker (automr/serve/memory.py). Requests are validated
before anything is written: a 4xx with a message saying what is wrong; bodies over `max_body` bytes
are refused with 413. No endpoint takes a path, a model name or code: the run is fixed at start-up.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from automr.api import MAX_K, Recommendation, Run
from automr.errors import UserError
from automr.serve.batching import Batcher
from automr.serve.memory import ServedMemory
from automr.serve.model import LocalModel, ModelProcess, ModelUnavailable, ServedModel
from automr.serve.storage import Conflict, SQLiteStorage

HERE = Path(__file__).resolve().parent
USER_ID = r"^[A-Za-z0-9_.@:-]{1,64}$"
EVENT_ID = r"^[A-Za-z0-9_.@:-]{1,128}$"
MAX_TIME = 4_102_444_800  # 2100-01-01: a time past it is a unit mistake (milliseconds)
MAX_BODY = 16 * 1024
MODEL_NICE = 0  # `automr serve --model-nice`: see automr/utils/threads.py for when to raise it
MAX_BATCH = 16


# ---------------------------------------------------------------------------------------------
# Request and response bodies
# ---------------------------------------------------------------------------------------------
class InteractionIn(BaseModel):
    """One interaction: the item by id or by its exact title, when, and the caller's idempotency key."""

    model_config = ConfigDict(extra="forbid")

    item_id: int | None = Field(None, ge=0, description="catalogue item id (or give `title`)")
    title: str | None = Field(None, min_length=1, max_length=500, description="exact title, case-insensitive (or give `item_id`)")
    time: int = Field(ge=0, le=MAX_TIME, description="unix seconds")
    event_id: str = Field(pattern=EVENT_ID, description="unique per user; a retry with the same id is not applied twice")
    backfill: bool = Field(False, description="allow a time earlier than the user's last interaction")

    @model_validator(mode="after")
    def _one_item(self) -> InteractionIn:
        if (self.item_id is None) == (self.title is None):
            raise ValueError("give exactly one of item_id and title")
        return self


class Metrics:
    """Per-route request counts, errors and recent latencies (for p50/p99), kept in memory."""

    def __init__(self, keep: int = 5000) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))
        self.started = time.time()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.count[route] += 1
        self.errors[route] += status >= 500
        self.latency[route].append(seconds)

    def summary(self) -> dict[str, Any]:
        import numpy as np

        out = {}
        for route, n in sorted(self.count.items()):
            lat = np.asarray(self.latency[route]) * 1000
            out[route] = {"count": n, "server_errors": self.errors[route],
                          "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3)}
        return out


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
class Service:
    """What the endpoints share: the run, the model, the storage, the served memory, caches and metrics.

    The model (automr/serve/model.py) runs in a process of its own (`model_process`) or on this process's
    threads (the batcher's thread for recommendations, the memory worker for elements); `model_nice` nice
    levels below the requests when asked (the child process, or those threads): one model call runs at a
    time anyway, and on a machine of its own a write or a light read then does not wait behind the model
    for a core. Recommendations that queue meanwhile are answered together, up to `max_batch` per call
    (automr/serve/batching.py).
    """

    def __init__(self, run: Run, state: Path, *, durable: bool = True, model_nice: int = MODEL_NICE,
                 max_batch: int = MAX_BATCH, model_process: bool = False, preload: Sequence[str] = ()) -> None:
        self.run, self.state = run, Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.model: ServedModel = (ModelProcess(run.folder, preload=preload, nice=model_nice) if model_process
                                   else LocalModel(run))
        thread_nice = 0 if model_process else model_nice
        self.storage = SQLiteStorage(self.state / "serve.sqlite")
        self.memory = ServedMemory(self.state / "memory", self.model, run.recent_k, self.storage, durable=durable,
                                   nice=thread_nice)
        self.batcher = Batcher(self._recommend_now, max_batch=max_batch, nice=thread_nice)
        self.metrics = Metrics()
        self.cache: OrderedDict[tuple, Recommendation] = OrderedDict()  # (uid, version, method, k) -> answer
        self.cache_hits = self.cache_misses = 0
        self.cache_lock = threading.Lock()
        titles: dict[str, list[int]] = defaultdict(list)
        for i, t in run.titles.items():
            titles[_norm(t)].append(i)
        self.by_title = dict(titles)

    def uid_or_404(self, user_id: str) -> int:
        uid = self.storage.user(user_id)
        if uid is None:
            raise HTTPException(404, f"unknown user {user_id!r}; add an interaction (POST /users/{user_id}/interactions) "
                                     f"or create it (PUT /users/{user_id})")
        return uid

    def item_of(self, body: InteractionIn) -> int:
        if body.item_id is not None:
            if body.item_id not in self.run.titles:
                raise HTTPException(422, f"item_id {body.item_id} is not in the catalogue ({len(self.run.titles)} items; "
                                         "GET /items?query=... finds an id by title)")
            return body.item_id
        ids = self.by_title.get(_norm(body.title or ""), [])
        if not ids:
            raise HTTPException(422, f"no item has the title {body.title!r}; GET /items?query=... lists titles that contain a word")
        if len(ids) > 1:
            raise HTTPException(422, f"{len(ids)} items have the title {body.title!r} (ids {', '.join(map(str, sorted(ids)))}); "
                                     "send item_id instead")
        return ids[0]

    def recommend(self, uid: int, method: str, k: int) -> tuple[Recommendation, bool]:
        """The run's answer for the user's stored history and served memory; reused while the user is unchanged."""
        key = (uid, self.storage.version(uid), method, k)
        with self.cache_lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                self.cache.move_to_end(key)
                return hit, True
            self.cache_misses += 1
        history = self.memory.history_of(uid)
        rec = self.batcher.submit((method, k), (uid, history))
        with self.cache_lock:
            self.cache[key] = rec
            while len(self.cache) > 2048:
                self.cache.popitem(last=False)
        return rec, False

    def _recommend_now(self, key: tuple[str, int], requests: list[tuple[int, Any]]) -> list[Recommendation]:
        """One model call for the queued requests of one (method, k) (the batcher's thread)."""
        method, k = key
        with self.memory.lock:  # no element is appended or erased while these answers read the store
            return self.model.recommend_batch([h for _, h in requests], method, k, [u for u, _ in requests],
                                              self.memory.store)

    def close(self) -> None:
        self.batcher.close()
        self.memory.stop()
        self.model.close()
        self.storage.close()


def _norm(title: str) -> str:
    return re.sub(r"\s+", " ", title).strip().casefold()


def create_app(run: Run, state: str | Path, *, max_body: int = MAX_BODY, durable: bool = True, worker: bool = True,
               model_nice: int = MODEL_NICE, max_batch: int = MAX_BATCH, model_process: bool = False,
               preload: Sequence[str] = ()) -> FastAPI:
    """The app over a loaded run, keeping its state (SQLite + memory store) in `state`. The model runs in
    a child process that loads the run again (`model_process`, fitting the `preload` methods at start), else
    in this one; `model_nice` below the requests' priority (0: the same); up to `max_batch` queued
    recommendations are answered by one model call (1: one at a time)."""
    service = Service(run, Path(state), durable=durable, model_nice=model_nice, max_batch=max_batch,
                      model_process=model_process, preload=preload)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.memory.recover()
        if worker:
            service.memory.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="automr", version="1", lifespan=lifespan,
                  description="Recommendations from a trained automr run, with a per-user memory that grows as users interact.")
    app.state.service = service
    _install_middleware(app, service, max_body)
    _install_errors(app)
    _routes(app, service)
    return app


def _install_middleware(app: FastAPI, service: Service, max_body: int) -> None:
    app.add_middleware(LimitAndTime, metrics=service.metrics, max_body=max_body)


class LimitAndTime:
    """Refuse bodies over `max_body` bytes (413, before the endpoint reads them) and time every request.

    A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs the
    endpoint in a task of its own and relays the body through a stream, which cost about 0.9 ms of the
    event loop's time per request in a profile of 1,000 writes (a third of the loop's work on one).
    """

    def __init__(self, app: Any, metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            shown = length.decode("latin-1")[:40]
            await _too_large(send, f"request body over {self.max_body} bytes (content-length {shown}); nothing was written")
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await self._counted(receive, send)
            if receive is None:
                return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on this scope as it matched
            self.metrics.observe(f"{scope['method']} {getattr(route, 'path', 'unmatched')}", status, time.perf_counter() - t0)

    async def _counted(self, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]) -> Any:
        """A body without content-length (chunked), read here and counted as it arrives; then replayed."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _too_large(send, f"request body over {self.max_body} bytes; nothing was written")
                return None
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


async def _too_large(send: Callable[[dict], Awaitable[None]], detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=413)({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')} at character "
                                f"{e.get('loc', ('', '?'))[-1]})")
                continue
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            found = e.get("input")
            shown = "" if isinstance(found, dict | list) or found is None else f" (found {str(found)[:80]!r})"
            problems.append(f"{where}: {e.get('msg')}{shown}")
        return JSONResponse({"detail": "; ".join(problems) + "; nothing was written", "problems": problems}, status_code=422)

    @app.exception_handler(ModelUnavailable)
    async def model_down(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)


def _routes(app: FastAPI, service: Service) -> None:
    run, storage, memory = service.run, service.storage, service.memory
    UserId = PathParam(pattern=USER_ID, description="the caller's user id (letters, digits, _ . @ : -; up to 64)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
        html = env.get_template("index.html").render(methods=run.method_names, k=run.recent_k, run=str(run.folder))
        return HTMLResponse(html)

    @app.get("/static/app.js", include_in_schema=False)
    def script() -> FileResponse:
        return FileResponse(HERE / "static" / "app.js", media_type="text/javascript")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "run": str(run.folder), "methods": run.method_names, "recent_k": run.recent_k,
                "memory": memory.store is not None}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        store = memory.store
        return {"uptime_s": round(time.time() - service.metrics.started, 1), "requests": service.metrics.summary(),
                "storage": storage.counts(), "store_rows": len(store) if store is not None else 0,
                "store_bytes": store.total_bytes if store is not None else 0,
                "memory_computed": memory.computed, "memory_compute_s": round(memory.compute_seconds, 3),
                "recommendation_cache": {"hits": service.cache_hits, "misses": service.cache_misses},
                "model_calls": {"batches": service.batcher.batches, "answered": service.batcher.answered,
                                "in_flight": service.batcher.in_flight, "queued": service.batcher.queued()},
                "model_process": service.model.process_info()}

    @app.get("/items")
    def items(query: str = Query("", max_length=200, description="words the title contains (case-insensitive)"),
              limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        words = _norm(query).split()
        found = [{"item_id": i, "title": t} for i, t in sorted(run.titles.items()) if all(w in _norm(t) for w in words)]
        return {"query": query, "total": len(found), "items": found[:limit]}

    @app.get("/users")
    def users(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        return {"users": [{"user_id": n, "interactions": c} for n, c in storage.users(limit, offset)]}

    @app.put("/users/{user_id}", status_code=200)
    def create_user(user_id: str = UserId) -> JSONResponse:
        _, created = storage.create_user(user_id)
        return JSONResponse({"user_id": user_id, "created": created}, status_code=201 if created else 200)

    @app.get("/users/{user_id}")
    def user(user_id: str = UserId) -> dict[str, Any]:
        uid = service.uid_or_404(user_id)
        events = storage.history(uid)
        entries = storage.memory(uid)
        done = {e.seq for e in entries if e.row is not None}
        pend = {e.seq for e in entries if e.row is None}
        n, k = len(events), run.recent_k
        history = [{"item_id": e.item_id, "title": run.titles.get(e.item_id, "?"), "time": e.time, "event_id": e.event_id,
                    "where": "recent" if p >= n - k else "memory" if e.seq in done else "pending" if e.seq in pend else "older",
                    } for p, e in enumerate(events)]
        return {"user_id": user_id, "interactions": n, "recent_k": k, "history": history,
                "memory": {"done": len(done), "pending": len(pend)}}

    @app.post("/users/{user_id}/interactions", status_code=201)
    def add(body: InteractionIn, user_id: str = UserId,
            wait: bool = Query(False, description="return once the memory element this write caused is computed")) -> JSONResponse:
        item = service.item_of(body)
        try:
            added = storage.add_interaction(user_id, item, body.time, body.event_id, body.backfill,
                                            memory.window if memory.store is not None else 0)
        except Conflict as exc:
            raise HTTPException(409, f"{exc}; nothing was written") from None
        memory.erase_later(added.stale_rows)
        pending = added.pending
        if pending:
            memory.notify()
            if wait and memory.wait_idle(60):
                pending = sum(1 for e in storage.memory(added.uid) if e.row is None)
        status = "none" if memory.store is None else "pending" if pending else "done"
        ev = added.event
        return JSONResponse({
            "user_id": user_id, "duplicate": added.duplicate,
            "interaction": {"item_id": ev.item_id, "title": run.titles[ev.item_id], "time": ev.time, "event_id": ev.event_id,
                            "backfill": ev.backfill},
            "memory": {"status": status, "pending": pending},
        }, status_code=200 if added.duplicate else 201)

    @app.get("/users/{user_id}/recommendations")
    def recommendations(user_id: str = UserId, k: int = Query(10, ge=1, le=MAX_K),
                        method: str = Query("automr" if "automr" in run.method_names else run.method_names[0],
                                            max_length=40, description=f"one of: {', '.join(run.method_names)}")) -> dict[str, Any]:
        if method not in run.method_names:
            raise HTTPException(422, f"method {method!r} is not served; served: {', '.join(run.method_names)}")
        uid = service.uid_or_404(user_id)
        rec, cached = service.recommend(uid, method, k)
        pending = sum(1 for e in storage.memory(uid) if e.row is None)
        return {"user_id": user_id, "cached": cached, "memory_pending": pending, **rec.model_dump()}

    @app.get("/users/{user_id}/memory")
    def get_memory(user_id: str = UserId) -> dict[str, Any]:
        uid = service.uid_or_404(user_id)
        by_seq = {e.seq: e for e in storage.history(uid)}
        out = [{"item_id": by_seq[e.seq].item_id, "title": run.titles.get(by_seq[e.seq].item_id, "?"), "time": by_seq[e.seq].time,
                "status": "pending" if e.row is None else "done", "window": len(e.window)} for e in storage.memory(uid)]
        return {"user_id": user_id, "elements": out, "done": sum(x["status"] == "done" for x in out),
                "pending": sum(x["status"] == "pending" for x in out)}

    @app.delete("/users/{user_id}/memory")
    def delete_memory(user_id: str = UserId) -> dict[str, Any]:
        uid = service.uid_or_404(user_id)
        with memory.lock:  # no element of this user is appended between the delete and the erasure
            rows = storage.delete_memory(uid)
            erased = memory.store.erase(rows) if memory.store is not None and rows else 0
        return {"user_id": user_id, "erased": erased}
