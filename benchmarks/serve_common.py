"""What the serving benchmarks share: a run to serve, a server process on loopback, a client, a
variant of a run's method served beside it.

`--run PATH` serves an existing trained run (an `automr evaluate` folder, e.g. the demo's
runs/demo/eval with SmolLM2); without it a tiny run (random-init 4-layer Llama, the serving tests'
fixture) is built in a temporary folder. The server is `python -m automr serve` in its own process,
bound to 127.0.0.1 on a free port, so the figures include HTTP and the fsyncs of a real process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def served_variant(run: Any, method: str, options: dict[str, Any]) -> str:
    """Name of `method` of an `automr.api.Run` served with `options` over its own (a `KIND@bench`
    variant beside it); `method` itself when there are none."""
    if not options:
        return method
    name = f"{method}@bench"
    run.options[name] = {**run.options.get(method, {}), **options}
    run.method_names.append(name)
    return name


def tiny_run(root: Path) -> Path:
    """Build the serving tests' tiny run under `root` (about 20 s); returns its evaluate folder."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from serve_helpers import build_tiny_run

    torch.set_num_threads(1)
    return build_tiny_run(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`automr serve RUN --state STATE` in a child process on a free loopback port."""

    def __init__(self, run: Path, state: Path, log: Path, preload: str = "", extra: tuple[str, ...] = ()) -> None:
        self.run, self.state, self.log, self.preload, self.extra = run, state, log, preload, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until /health answers; returns the seconds it took."""
        t0 = time.perf_counter()
        env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        argv = [sys.executable, "-m", "automr", "serve", str(self.run), "--state", str(self.state), "--port", str(self.port)]
        if self.preload:
            argv += ["--preload", self.preload]
        argv += list(self.extra)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: no cleanup runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_memory(client: httpx.Client, users: list[str], timeout: float = 300.0) -> None:
    """Until no user has a pending memory element."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(client.get(f"/users/{u}").json()["memory"]["pending"] == 0 for u in users):
            return
        time.sleep(0.5)
    raise RuntimeError("memory elements still pending after the timeout")


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
