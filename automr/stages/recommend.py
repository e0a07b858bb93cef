"""`automr recommend RUN --user U | --history FILE`: one recommendation on the command line, as JSON.

The same call as the server's (automr.api.Run.recommend): `--user` reads that user's history and
memory from the server's state folder (read-only; the server may be running), `--history` a file
of interactions (JSON: {"items": [...], "times": [...]} or [{"item_id": .., "time": ..}, ...]; or a
CSV with item_id,time columns) whose memory elements are computed with build-memory's code.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from automr.config import StageConfig
from automr.errors import UserError


class RecommendConfig(StageConfig):
    """Settings of `automr recommend`."""

    cli_arguments: ClassVar[tuple[str, ...]] = ("run",)

    run: Path = Field(description="an `automr evaluate` output folder, a folder holding one, or a pipeline YAML")
    user: str | None = Field(None, description="a user of the server's state folder")
    history: Path | None = Field(None, description="a file of interactions (JSON or CSV with item_id,time), oldest first")
    state: Path | None = Field(None, description="the server's state folder (default: serve/ beside the evaluate folder)")
    method: str = Field("automr", description="method to rank with (one the run evaluated, or popularity)")
    k: int = Field(10, ge=1, le=100, description="items to return")


def read_history(path: Path) -> Any:
    """A History from a JSON or CSV file, with a clear error for anything else."""
    from automr.api import History

    if not path.is_file():
        raise UserError(f"--history {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            import polars as pl

            df = pl.read_csv(path)
            return History(items=df["item_id"].to_list(), times=df["time"].to_list())
        data = json.loads(path.read_text())
        if isinstance(data, list):
            return History(items=[int(r["item_id"]) for r in data], times=[int(r["time"]) for r in data])
        return History.model_validate(data)
    except Exception as exc:  # noqa: BLE001 - any malformed file (JSON, CSV, pydantic): one message, no traceback
        raise UserError(f"--history {path}: not a history ({type(exc).__name__}: {exc}); expected JSON "
                        '{"items": [...], "times": [...]}, a JSON list of {"item_id", "time"}, or a CSV with item_id,time') from None


def run_recommend(cfg: RecommendConfig) -> dict[str, Any]:
    from automr.api import load_run

    if (cfg.user is None) == (cfg.history is None):
        raise UserError("give exactly one of --user (a user of the server's state) and --history FILE")
    with contextlib.redirect_stdout(sys.stderr):  # progress and info lines: stdout holds only the JSON answer
        if cfg.history is not None:
            history = read_history(cfg.history)
            rec = load_run(cfg.run).recommend(history, cfg.method, cfg.k)
        else:
            rec = _for_user(cfg)
    out = rec.model_dump()
    sys.stdout.write(json.dumps(out, indent=1) + "\n")  # the answer alone on stdout, as JSON (no console markup)
    return out


def _for_user(cfg: RecommendConfig) -> Any:
    from automr.api import History, load_run
    from automr.memory.store import MemoryStore, store_problem
    from automr.serve.storage import SQLiteStorage
    from automr.stages.serve import default_state

    state = cfg.state or default_state(cfg.run)
    if not (state / "serve.sqlite").is_file():
        raise UserError(f"no server state at {state} (no serve.sqlite); start `automr serve` first, or pass --state")
    storage = SQLiteStorage(state / "serve.sqlite")
    try:
        uid = storage.user(cfg.user or "")
        if uid is None:
            raise UserError(f"unknown user {cfg.user!r} in {state}")
        events = storage.history(uid)
        history = History(items=[e.item_id for e in events], times=[e.time for e in events])
    finally:
        storage.close()
    run = load_run(cfg.run)  # after the user is found: a mistyped user fails at once
    store = MemoryStore.open(state / "memory") if store_problem(state / "memory") is None else None
    try:
        return run.recommend(history, cfg.method, cfg.k, user_id=uid, store=store)
    finally:
        if store is not None:
            store.close()
