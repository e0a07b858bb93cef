"""`automr serve RUN`: the HTTP API and the page over a trained run (automr/serve/app.py).

The state folder (SQLite file + the served memory store) survives restarts; one server per state
folder (its lock). It defaults to `serve/` beside the evaluate folder (runs/demo/serve for
runs/demo/eval). Bound to 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from automr.config import StageConfig
from automr.errors import UserError


class ServeConfig(StageConfig):
    """Settings of `automr serve`."""

    cli_arguments: ClassVar[tuple[str, ...]] = ("run",)

    run: Path = Field(description="an `automr evaluate` output folder, a folder holding one, or a pipeline YAML")
    state: Path | None = Field(None, description="the server's state folder (default: serve/ beside the evaluate folder)")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 exposes the server to the network)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    preload: list[str] = Field(default_factory=list, description="methods to load before serving (default: on first request)")
    max_body: int = Field(16384, ge=256, description="largest request body accepted, in bytes (larger: 413)")
    log_level: str = Field("warning", description="uvicorn's log level")
    model_nice: int = Field(0, ge=0, le=19, description="run the model (its process, or its threads with --no-model-process: "
                            "recommendations and memory elements) this many nice levels below the requests, so writes do not wait behind them for a core; for a machine "
                            "the server has to itself (elsewhere other CPU-bound jobs would starve the model)")
    max_batch: int = Field(16, ge=1, le=256, description="recommendation requests that queued while the model was busy, "
                           "answered by one batched model call (1: one at a time)")
    model_process: bool = Field(True, description="run the model in a process of its own, so requests never wait for "
                                "the interpreter behind it (--no-model-process: in the server's process, one interpreter: "
                                "~140 MiB less with SmolLM2; the weights are loaded once either way)")
    http: Literal["auto", "h11", "httptools"] = Field("auto", description="uvicorn's HTTP parser (auto: httptools, "
                                                     "compiled, where installed; h11 is pure Python)")
    loop: Literal["auto", "asyncio", "uvloop"] = Field("auto", description="uvicorn's event loop (auto: uvloop where installed)")
    gil_switch_ms: float = Field(5.0, gt=0, le=100, description="Python's thread switch interval in milliseconds "
                                 "(sys.setswitchinterval; 5 is Python's default): how long a request thread may wait "
                                 "for the interpreter while the model's Python holds it")


def default_state(run: Path) -> Path:
    """serve/ beside the evaluate folder that `run` names."""
    from automr.api import find_evaluate_settings

    return find_evaluate_settings(run)[1].parent / "serve"


def claim_state(state: Path) -> None:
    """Refuse a state folder that holds something else than a server's state (user files are sacred)."""
    from automr.utils.io import has_marker, write_marker

    if state.exists() and not state.is_dir():
        raise UserError(f"--state {state} is a file; the server keeps a folder there (nothing was written)")
    if state.is_dir() and any(state.iterdir()) and not (has_marker(state) or (state / "serve.sqlite").is_file()):
        raise UserError(f"--state {state} is a folder that automr did not write; choose an empty or new folder (nothing was written)")
    state.mkdir(parents=True, exist_ok=True)
    write_marker(state, "serve")


def run_serve(cfg: ServeConfig) -> None:
    import uvicorn

    from automr.api import load_run
    from automr.serve.app import create_app
    from automr.utils.io import output_lock
    from automr.utils.logging import info

    sys.setswitchinterval(cfg.gil_switch_ms / 1000)
    state = cfg.state or default_state(cfg.run)
    with output_lock(state, "Another `automr serve` uses this state folder; stop it or pass another --state."):
        claim_state(state)
        # With a model process the child loads the model (and the preloaded methods); this process only reads the run.
        run = load_run(cfg.run, preload=() if cfg.model_process else cfg.preload)
        app = create_app(run, state, max_body=cfg.max_body, model_nice=cfg.model_nice, max_batch=cfg.max_batch,
                         model_process=cfg.model_process, preload=cfg.preload)
        info(f"serving {run.folder} ({', '.join(run.method_names)}) on http://{cfg.host}:{cfg.port}/ (API docs at /docs), state in {state}")
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=cfg.http, loop=cfg.loop)
