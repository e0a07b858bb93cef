"""An evaluation run again into its own folder keeps the methods it already finished with the same settings.

Why: an evaluation of several LLM methods on 1,000 samples takes an hour or more on a CPU, and a session
that ends (or a kill) in the middle of it used to cost every method it had finished. Each method's
predictions are written as soon as it finishes (evaluator.save_predictions); beside them,
predictions/<method>.json records what they are a function of: the settings `automr.eval.reuse` compares
(data, split, evaluated rows, ranking depth, history exclusion, the method's options) and the seed the
method ran with. A rerun resumes a method only when all of these match, and recomputes its metrics
from the saved rankings with this run's bootstrap, so that a resumed method's metrics.json entry equals
a fresh run's. A folder written before these records existed is read from its finished evaluation's
config.yaml, eval.json and metrics.json. Like `reuse`, resuming trusts that the code that ranked is the
code that would rank now; `resume: false` recomputes every method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from automr.errors import UserError
from automr.eval.evaluator import (
    MethodResult,
    collapse_stats,
    load_predictions,
    per_sample_from_predictions,
    rankings_from_predictions,
    read_metrics,
    summarise,
)
from automr.eval.reuse import SHARED_SETTINGS, setting_differences
from automr.utils.io import read_json, write_json


def resume_record(method: str, mine: Mapping[str, Any], mine_info: Mapping[str, Any], result: MethodResult) -> dict[str, Any]:
    """What predictions/<method>.json holds: the settings its rankings depend on, and what the metrics need."""
    rows = mine_info["rows"]
    return {
        "config": {key: mine.get(key) for key in (*SHARED_SETTINGS, "samples", "seed")}
        | {"method_options": {method: mine.get("method_options", {}).get(method, {})}},
        "info": {"rows": rows if isinstance(rows, str) else [int(r) for r in rows], "exclude_history": mine_info["exclude_history"]},
        "timings": result.timings, "seen_share": result.seen_share, "top1_seen": result.top1_seen,
    }


def save_resume_record(predictions_dir: Path, mine: Mapping[str, Any], mine_info: Mapping[str, Any],
                       result: MethodResult) -> None:
    """Write predictions/<method>.json beside the method's rankings (`resume_record`)."""
    write_json(Path(predictions_dir) / f"{result.name}.json", resume_record(result.name, mine, mine_info, result))


def _legacy_records(run: Path) -> dict[str, dict[str, Any]]:
    """Records rebuilt from a finished evaluation written before predictions/<method>.json existed."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
        info = read_json(run / "eval.json")
        metrics = read_metrics(run)
    except (OSError, ValueError, yaml.YAMLError, UserError):
        return {}
    if not isinstance(config, dict) or not isinstance(info, dict):
        return {}
    return {
        m: {"config": config, "info": info, "timings": info.get("timings", {}).get(m, {}),
            "seen_share": float(info.get("seen_in_top_k", {}).get(m, 0.0)),
            "top1_seen": float(summary.get("top1_repeats_history", 0.0))}
        for m, summary in metrics.items()
    }


def _record(run: Path, method: str, legacy: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    path = run / "predictions" / f"{method}.json"
    if path.is_file():
        try:
            return read_json(path)
        except ValueError:
            return None
    return legacy.get(method)


def resumable_results(run: Path, methods: Sequence[str], mine: Mapping[str, Any], mine_info: Mapping[str, Any],
                      rows: np.ndarray, n_boot: int, seed: int) -> dict[str, MethodResult]:
    """{method: result} for each of `methods` whose rankings `run` already holds with this run's settings.
    Read before this run writes its config.yaml (a finished folder's legacy record lives there)."""
    run = Path(run)
    if not (run / "predictions").is_dir():
        return {}
    legacy = _legacy_records(run)
    out: dict[str, MethodResult] = {}
    for method in methods:
        rec = _record(run, method, legacy)
        if rec is None or not (run / "predictions" / f"{method}.parquet").is_file():
            continue
        if setting_differences(method, mine, rec["config"], mine_info, rec["info"]) or rec["config"].get("seed") != mine.get("seed"):
            continue
        try:
            pred = load_predictions(run, method)
        except (OSError, pl.exceptions.PolarsError):  # unreadable: ranked again, and rewritten
            continue
        if not np.array_equal(pred["row"].to_numpy(), rows):
            continue
        recs, ranks = rankings_from_predictions(pred)
        per_sample = per_sample_from_predictions(pred)
        summary = summarise(per_sample, n_boot=n_boot, seed=seed) | collapse_stats(recs, rec["top1_seen"])
        out[method] = MethodResult(method, recs, ranks, per_sample, summary,
                                   timings=dict(rec["timings"]) | {"resumed_from": str(run)},
                                   seen_share=float(rec["seen_share"]), top1_seen=float(rec["top1_seen"]))
    return out
