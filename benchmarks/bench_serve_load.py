"""Load on the HTTP server: 16 concurrent clients mixing writes and reads for 60 s, on loopback.

Each client owns a few users and loops: POST an interaction (half the requests; one in ten is sent
twice with the same event_id, as a retrying client would), GET recommendations (a quarter; method
automr, constrained decoding as the run was evaluated), GET the user (15%), GET /items?query (10%).
Prints p50 / p99 latency per endpoint and requests per second, and checks that no request failed
and that every acknowledged write is in its user's history exactly once afterwards. Then, for an
unchanged user, a repeated recommendation (the server's answer cache) against a fresh one, and the
recommendation's steps from its timings (retrieval alone = reading the keys + scoring them; the
query state z_t is a lower-layer forward of the prompt, reported apart).

Run (tiny random-init model, builds its own run, ~2 minutes):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_load.py
SmolLM2 (a trained run, e.g. the demo's):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_load.py --run runs/demo/eval
Server settings side by side, one fresh server after the other (each --servers value is `automr serve` flags; ratios
to the first): one request per model call against the defaults (up to 16 queued requests per call), and a shorter
thread switch interval:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_load.py --servers "--max-batch 1" "" "--gil-switch-ms 0.5"
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
from serve_common import Server, percentile, tiny_run, wait_memory


def client_loop(c: int, url: str, items: list[int], deadline: float, users_per_client: int, out: dict,
                rec_share: float = 0.25) -> None:
    rng = random.Random(c)
    users = [f"c{c}-u{j}" for j in range(users_per_client)]
    clock = {u: 1_600_000_000 for u in users}
    acked: dict[str, list[str]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    fails: list[str] = []
    rec_timings: list[dict] = []
    n = 0
    with httpx.Client(base_url=url, timeout=120) as http:

        def call(name: str, method: str, path: str, ok: tuple[int, ...], **kw) -> httpx.Response | None:
            t0 = time.perf_counter()
            try:
                r = http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                fails.append(f"{name}: {type(exc).__name__}: {exc}")
                return None
            lat[name].append(time.perf_counter() - t0)
            if r.status_code not in ok:
                fails.append(f"{name}: {r.status_code} {r.text[:200]}")
                return None
            return r

        def write(u: str) -> None:
            nonlocal n
            clock[u] += rng.randint(1, 3600)
            body = {"item_id": rng.choice(items), "time": clock[u], "event_id": f"{u}-{n}"}
            n += 1
            r = call("POST interactions", "POST", f"/users/{u}/interactions", (201,), json=body)
            if r is not None:
                acked[u].append(body["event_id"])
                if rng.random() < 0.1:  # a retry of an acknowledged write: applied once
                    again = call("POST interactions (retry)", "POST", f"/users/{u}/interactions", (200,), json=body)
                    if again is not None and not again.json()["duplicate"]:
                        fails.append(f"retry of {body['event_id']} was not reported as a duplicate")

        for u in users:
            write(u)
        while time.perf_counter() < deadline:
            u, x = rng.choice(users), rng.random()
            if x < 0.5:
                write(u)
            elif x < 0.5 + rec_share:
                r = call("GET recommendations", "GET", f"/users/{u}/recommendations", (200,), params={"k": 10})
                if r is not None and not r.json()["cached"]:
                    rec_timings.append(r.json()["timings_ms"])
            elif x < 0.5 + rec_share + (0.5 - rec_share) * 0.6:
                call("GET user", "GET", f"/users/{u}", (200,))
            else:
                call("GET items", "GET", "/items", (200,), params={"query": rng.choice(["the", "part", "a", "of"])})
    out[c] = {"acked": dict(acked), "lat": dict(lat), "fails": fails, "rec_timings": rec_timings}


def check_visible(url: str, acked: dict[str, list[str]]) -> list[str]:
    """Every acknowledged write in its user's history, exactly once, and nothing else."""
    problems = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for u, events in acked.items():
            got = [h["event_id"] for h in http.get(f"/users/{u}").json()["history"]]
            if sorted(got) != sorted(events):
                problems.append(f"{u}: {len(events)} acknowledged, history holds {len(got)} ({len(set(got))} distinct)")
    return problems


def cache_gain(url: str, user: str, items: list[int], rounds: int) -> tuple[list[float], list[float]]:
    """(fresh, repeated) latencies of GET recommendations for one user, a new interaction before each fresh one."""
    fresh, repeat = [], []
    with httpx.Client(base_url=url, timeout=120) as http:
        for j in range(rounds):
            http.post(f"/users/{user}/interactions", json={"item_id": items[j % len(items)], "time": 1_700_000_000 + j,
                                                           "event_id": f"cache-{j}"}, params={"wait": True})
            for bucket in (fresh, repeat):
                t0 = time.perf_counter()
                r = http.get(f"/users/{user}/recommendations")
                bucket.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["cached"] == (bucket is repeat)
    return fresh, repeat


def measure(run: Path, tmp: Path, args: argparse.Namespace, flags: str, n: int) -> dict:
    """One load run against a fresh server started with `automr serve` `flags`; prints and returns its figures."""
    server = Server(run, tmp / f"state-{n}", tmp / "server.log", preload="automr", extra=tuple(shlex.split(flags)))
    print(f"\n== server flags {flags or '(defaults)'!r}: up in {server.start():.1f} s ({server.url}, run {run})")
    try:
        items = [i["item_id"] for i in httpx.get(f"{server.url}/items", params={"limit": 200}).json()["items"]]
        results: dict[int, dict] = {}
        t0 = time.perf_counter()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(c, server.url, items, deadline, args.users_per_client, results,
                                                                 args.recommend_share))
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lat: dict[str, list[float]] = defaultdict(list)
        acked: dict[str, list[str]] = {}
        fails: list[str] = []
        rec_timings: list[dict] = []
        for r in results.values():
            for k, v in r["lat"].items():
                lat[k] += v
            acked.update(r["acked"])
            fails += r["fails"]
            rec_timings += r["rec_timings"]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            metrics = http.get("/metrics").json()  # before the checks' requests
            wait_memory(http, list(acked))
            metrics["memory_computed"] = http.get("/metrics").json()["memory_computed"]
        invisible = check_visible(server.url, acked)
        fresh, repeat = cache_gain(server.url, "cache-user", items, args.cache_rounds)
    finally:
        server.stop()
    total = sum(len(v) for v in lat.values())
    print(f"{args.clients} clients, {wall:.1f} s: {total} requests, {total / wall:.1f} req/s, {len(fails)} failed")
    print(f"{'endpoint':28s} {'n':>6s} {'p50 ms':>9s} {'p99 ms':>9s}")
    figures: dict = {"server_flags": flags, "clients": args.clients, "seconds": round(wall, 1), "requests": total,
                     "req_per_s": round(total / wall, 1), "failed": len(fails), "endpoints": {}}
    for name, v in sorted(lat.items()):
        p50, p99 = 1000 * percentile(v, 50), 1000 * percentile(v, 99)
        figures["endpoints"][name] = {"n": len(v), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
        print(f"{name:28s} {len(v):6d} {p50:9.2f} {p99:9.2f}")
    server_side = {r: (v["p50_ms"], v["p99_ms"]) for r, v in metrics["requests"].items() if not r.startswith("GET /metrics")}
    print("server-side p50 / p99 ms (the app's own clock, from request to response): "
          + "; ".join(f"{r} {a:.1f} / {b:.1f}" for r, (a, b) in sorted(server_side.items())))
    calls = metrics.get("model_calls", {})
    if calls.get("batches"):
        print(f"model calls: {calls['batches']} answered {calls['answered']} recommendation requests "
              f"({calls['answered'] / calls['batches']:.2f} per call)")
    figures |= {"server_side_ms": server_side, "model_calls": calls}
    steps = {k: round(percentile([t[k] for t in rec_timings if k in t], 50), 3) for k in (rec_timings[0] if rec_timings else {})}
    print("recommendation steps, p50 ms (fresh answers): " + ", ".join(f"{k} {v}" for k, v in steps.items()))
    retrieval = [t.get("keys_ms", 0) + t.get("score_ms", 0) for t in rec_timings if "score_ms" in t]
    if retrieval:
        print(f"retrieval alone (keys + scoring), p50 {percentile(retrieval, 50):.3f} ms, p99 {percentile(retrieval, 99):.3f} ms")
        figures["retrieval_p50_ms"] = round(percentile(retrieval, 50), 4)
        figures["retrieval_p99_ms"] = round(percentile(retrieval, 99), 4)
    writes = sum(len(v) for v in acked.values())
    print(f"acknowledged writes: {writes} over {len(acked)} users; not visible exactly once afterwards: {len(invisible)}")
    print(f"memory elements computed by the worker: {metrics['memory_computed']} in {metrics['memory_compute_s']} s")
    gain = percentile(fresh, 50) / max(percentile(repeat, 50), 1e-9)
    print(f"unchanged user, GET recommendations: fresh p50 {1000 * percentile(fresh, 50):.1f} ms, repeated (cached) p50 "
          f"{1000 * percentile(repeat, 50):.2f} ms ({gain:.0f}x)")
    figures |= {"steps_p50_ms": steps, "acknowledged_writes": writes, "not_visible": len(invisible),
                "memory_computed": metrics["memory_computed"], "problems": fails[:10] + invisible[:10],
                "cache": {"fresh_p50_ms": round(1000 * percentile(fresh, 50), 2), "repeat_p50_ms": round(1000 * percentile(repeat, 50), 3)}}
    for f in figures["problems"]:
        print("  problem:", f)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run to serve (default: build the tiny one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--users-per-client", type=int, default=4)
    ap.add_argument("--cache-rounds", type=int, default=10)
    ap.add_argument("--recommend-share", type=float, default=0.25,
                    help="share of requests that ask for recommendations (0: writes and light reads only, to see what bounds writes)")
    ap.add_argument("--servers", nargs="+", default=[""],
                    help='`automr serve` flags per server, run one after the other and compared (e.g. "--max-batch 1" "")')
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="automr-bench-serve-") as tmp:
        tmp = Path(tmp)
        run = args.run or tiny_run(tmp / "run")
        runs = [measure(run, tmp, args, flags, n) for n, flags in enumerate(args.servers)]
    if len(runs) > 1:
        base = runs[0]
        print(f"\nside by side (ratios to the server with flags {base['server_flags'] or '(defaults)'!r}):")
        for f in runs[1:]:
            print(f"  {f['server_flags'] or '(defaults)'!r}: requests/s x{f['req_per_s'] / base['req_per_s']:.2f}")
        for name in sorted(base["endpoints"]):
            cells = []
            for f in runs[1:]:
                a, b = base["endpoints"][name], f["endpoints"].get(name)
                if b:
                    cells.append(f"{f['server_flags'] or '(defaults)'!r}: p50 x{b['p50_ms'] / a['p50_ms']:.2f}, "
                                 f"p99 x{b['p99_ms'] / a['p99_ms']:.2f}")
            print(f"  {name:28s} " + "; ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(runs if len(runs) > 1 else runs[0], indent=1))
    if any(f["problems"] for f in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
