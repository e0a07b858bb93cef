"""Faults: the server SIGKILLed at a random point of a write burst, ten times; after each restart, every
acknowledged interaction is there, retried events are not duplicated, and the memory store opens and
matches the histories.

Each round: start `automr serve` on the same state folder; 4 writer threads send interactions for
their users as fast as they can (event ids unique; an interaction is acknowledged when its 201 or
200 arrives); after a random 0.5-3 s the server gets SIGKILL. Restart; every writer resends the
requests it sent without an answer and a few acknowledged ones (retries of both kinds must each be
applied once); wait until the memory worker has nothing pending; stop the server; then check offline:
  - each user's history holds exactly the acknowledged events plus those retried, each once;
  - the memory store opens; each user's elements are exactly the interactions that left the recent
    window (item and time in history order), each pointed to by one done entry, and no live element
    belongs to no entry.

Run (tiny random-init model, builds its own run; ~3 minutes, most of it ten server start-ups):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_faults.py
SmolLM2:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_faults.py --run runs/demo/eval
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from serve_common import Server, tiny_run, wait_memory


class Writer(threading.Thread):
    """Sends interactions for its users until told to stop; remembers what was acknowledged and what was in flight."""

    def __init__(self, w: int, url: str, items: list[int], state: dict) -> None:
        super().__init__(daemon=True)
        self.w, self.url, self.items, self.state = w, url, items, state
        self.stop_flag = threading.Event()

    def run(self) -> None:
        rng = random.Random(self.w * 7919 + len(self.state["acked"]))
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.stop_flag.is_set():
                j = self.state["next"]
                user = f"w{self.w}-u{j % 3}"
                body = {"item_id": rng.choice(self.items), "time": 1_600_000_000 + j, "event_id": f"w{self.w}-{j}"}
                self.state["next"] = j + 1
                self.state["in_flight"][body["event_id"]] = (user, body)
                try:
                    r = http.post(f"/users/{user}/interactions", json=body)
                except httpx.HTTPError:
                    return  # the server died: this request stays in flight
                if r.status_code in (200, 201):
                    del self.state["in_flight"][body["event_id"]]
                    self.state["acked"][body["event_id"]] = (user, body)
                else:
                    raise RuntimeError(f"unexpected {r.status_code}: {r.text}")


def resend(url: str, states: list[dict], rng: random.Random) -> int:
    """After a restart: every in-flight request again, and a few acknowledged ones (idempotent retries)."""
    n = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for st in states:
            again = list(st["in_flight"].items()) + rng.sample(sorted(st["acked"].items()), min(3, len(st["acked"])))
            for ev, (user, body) in again:
                r = http.post(f"/users/{user}/interactions", json=body)
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"resend of {ev}: {r.status_code} {r.text}")
                st["in_flight"].pop(ev, None)
                st["acked"][ev] = (user, body)
                n += 1
    return n


def check_offline(state_dir: Path, states: list[dict], k: int) -> list[str]:
    """The checks of the module docstring, on the state folder of a stopped server."""
    from automr.memory.store import MemoryStore
    from automr.serve.storage import SQLiteStorage

    problems: list[str] = []
    db = SQLiteStorage(state_dir / "serve.sqlite")
    store = MemoryStore.open(state_dir / "memory")
    want: dict[str, set[str]] = {}
    for st in states:
        for ev, (user, _) in st["acked"].items():
            want.setdefault(user, set()).add(ev)
    live = db.live_rows()
    erased = np.asarray(store.index)["user_id"] == -1
    orphans = [r for r in np.flatnonzero(~erased).tolist() if r not in live]
    if orphans:
        problems.append(f"{len(orphans)} live store elements belong to no memory entry")
    for user, events in want.items():
        uid = db.user(user)
        hist = db.history(uid) if uid is not None else []
        got = [e.event_id for e in hist]
        if len(got) != len(set(got)) or set(got) != events:
            problems.append(f"{user}: {len(events)} acknowledged, history holds {len(got)} ({len(set(got))} distinct)")
        older = hist[: max(0, len(hist) - k)]
        rows = store.rows_for(uid) if uid is not None else np.zeros(0, np.int64)
        idx = np.asarray(store.index)[rows]
        if [(int(i), int(t)) for i, t in zip(idx["item_id"], idx["time"])] != [(e.item_id, e.time) for e in older]:
            problems.append(f"{user}: the store holds {len(rows)} elements, {len(older)} interactions left the window")
        entries = db.memory(uid) if uid is not None else []
        if sorted(e.row for e in entries if e.row is not None) != sorted(rows.tolist()):
            problems.append(f"{user}: memory entries and store rows differ")
    store.close()
    db.close()
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run to serve (default: build the tiny one)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="automr-bench-faults-") as tmp:
        tmp = Path(tmp)
        run = args.run or tiny_run(tmp / "run")
        state_dir = tmp / "state"
        states = [{"acked": {}, "in_flight": {}, "next": 0} for _ in range(args.writers)]
        failures = 0
        for round_ in range(args.rounds):
            server = Server(run, state_dir, tmp / "server.log")
            up = server.start()
            try:
                items = [i["item_id"] for i in httpx.get(f"{server.url}/items", params={"limit": 200}).json()["items"]]
                resent = resend(server.url, states, rng)
                k = httpx.get(f"{server.url}/health").json()["recent_k"]
                writers = [Writer(w, server.url, items, states[w]) for w in range(args.writers)]
                for w in writers:
                    w.start()
                burst = rng.uniform(0.5, 3.0)
                before = sum(len(s["acked"]) for s in states)
                time.sleep(burst)
            finally:
                server.kill()
            for w in writers:
                w.stop_flag.set()
                w.join(timeout=30)
            acked_now = sum(len(s["acked"]) for s in states) - before
            in_flight = sum(len(s["in_flight"]) for s in states)
            # restart, resend what was in flight, let the memory catch up, stop cleanly, check offline
            server = Server(run, state_dir, tmp / "server.log")
            server.start()
            try:
                resent += resend(server.url, states, rng)
                users = sorted({u for s in states for u, _ in s["acked"].values()})
                with httpx.Client(base_url=server.url, timeout=60) as http:
                    wait_memory(http, users)
            finally:  # a failed check must not leave the server running
                server.stop()
            problems = check_offline(state_dir, states, k)
            failures += bool(problems)
            total = sum(len(s["acked"]) for s in states)
            print(f"round {round_ + 1}: up in {up:.1f} s, SIGKILL after {burst:.2f} s of burst ({acked_now} writes acknowledged, "
                  f"{in_flight} in flight), {resent} resent; {total} interactions in all: "
                  + ("OK" if not problems else "; ".join(problems[:5])))
        print(f"{args.rounds} rounds, {failures} with a problem")
        if failures:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
