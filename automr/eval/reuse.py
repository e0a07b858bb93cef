"""Methods read from an earlier evaluation run instead of refitted (`automr evaluate --reuse RUN`).

Why: over `automr run --seeds 0,1,2` only the memory methods read the per-seed retriever; BIGRec, the
baselines and TRSR give the same rankings for every seed once their own seed is pinned, and with an
LLM each of them costs tens of minutes on a CPU. They are evaluated once (a stage with `seed:` pinned)
and each seed's evaluation reads their predictions, so its metrics.json, paired tests and report hold
every method on the same samples.

A method is reused only when the earlier run evaluated it with the same settings: the same prepared
data, split and evaluated rows, the same ranking depth and history exclusion, and the same
method_options entry. Anything else is a UserError naming the difference: a silently different
baseline would make the paired tests meaningless.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automr.errors import UserError
from automr.eval.evaluator import (
    MethodResult,
    load_predictions,
    per_sample_from_predictions,
    rankings_from_predictions,
    read_metrics,
)
from automr.utils.io import read_json

# Settings of an evaluation that decide every method's rankings (besides its own method_options).
SHARED_SETTINGS: tuple[str, ...] = ("split", "k")


def _same_path(a: Any, b: Any) -> bool:
    return Path(str(a)).resolve() == Path(str(b)).resolve()


def _rows(value: Any) -> Any:
    """eval.json's `rows` ("all" or row numbers) in one comparable form."""
    return value if isinstance(value, str) or value is None else [int(r) for r in value]


def setting_differences(method: str, mine: Mapping[str, Any], theirs: Mapping[str, Any], mine_info: Mapping[str, Any],
                 their_info: Mapping[str, Any]) -> list[str]:
    """Every setting that makes `theirs`'s rankings of `method` not stand for this run's."""
    out = [f"{key}: {theirs.get(key)!r} there, {mine.get(key)!r} here" for key in SHARED_SETTINGS if theirs.get(key) != mine.get(key)]
    if not _same_path(theirs.get("samples"), mine.get("samples")):
        out.append(f"samples: {theirs.get('samples')} there, {mine.get('samples')} here")
    if _rows(their_info.get("rows")) != _rows(mine_info.get("rows")):
        out.append("evaluated samples (eval.json rows): a different subset (set the same n_eval and subset_seed)")
    if their_info.get("exclude_history") != mine_info.get("exclude_history"):
        out.append(f"exclude_history: {their_info.get('exclude_history')} there, {mine_info.get('exclude_history')} here")
    ours, other = mine.get("method_options", {}).get(method, {}), theirs.get("method_options", {}).get(method, {})
    if ours != other:
        out.append(f"method_options[{method}]: {other!r} there, {ours!r} here")
    return out


def _one_result(method: str, run: Path, metrics: Mapping[str, Any], info: Mapping[str, Any], rows: np.ndarray) -> MethodResult:
    """The method's MethodResult rebuilt from its saved predictions (and its metrics.json entry)."""
    pred = load_predictions(run, method)
    if not np.array_equal(pred["row"].to_numpy(), rows):
        raise UserError(f"{run}/predictions/{method}.parquet does not hold the evaluated rows; re-run that evaluation")
    recs, ranks = rankings_from_predictions(pred)
    summary = dict(metrics[method])
    return MethodResult(
        method, recs, ranks, per_sample_from_predictions(pred), summary,
        timings=dict(info.get("timings", {}).get(method, {})) | {"reused_from": str(run)},
        seen_share=float(info.get("seen_in_top_k", {}).get(method, 0.0)),
        top1_seen=float(summary.get("top1_repeats_history", 0.0)),
    )


def reused_results(
    runs: Sequence[Path], methods: Sequence[str], mine: Mapping[str, Any], mine_info: Mapping[str, Any], rows: np.ndarray
) -> dict[str, MethodResult]:
    """{method: result} for each method of `methods` that one of `runs` evaluated (the first run wins).

    mine: this run's config as saved (model_dump(mode="json")); mine_info: its eval.json fields
    `rows` and `exclude_history`. A reuse run that holds none of `methods` is an error too: it was
    named for a reason.
    """
    out: dict[str, MethodResult] = {}
    for run in map(Path, runs):
        try:
            theirs = yaml.safe_load((run / "config.yaml").read_text())
            info = read_json(run / "eval.json")
        except FileNotFoundError as e:
            raise UserError(f"reuse run {run} is not a finished evaluation (missing {Path(e.filename).name}); run it first") from e
        metrics = read_metrics(run)
        if not any(m in metrics for m in methods):
            raise UserError(
                f"reuse run {run} evaluated {', '.join(metrics)}, none of this run's methods ({', '.join(methods)}); "
                "remove it from reuse"
            )
        for method in (m for m in methods if m in metrics and m not in out):
            diffs = setting_differences(method, mine, theirs, mine_info, info)
            if diffs:
                raise UserError(
                    f"cannot reuse {method!r} from {run}: its settings differ from this run's:\n"
                    + "\n".join(f"  - {d}" for d in diffs)
                    + f"\nMake them equal, or drop {run} from reuse so that {method} is evaluated here."
                )
            out[method] = _one_result(method, run, metrics, info, rows)
    return out


def copy_predictions(results: Mapping[str, MethodResult], predictions_dir: Path) -> None:
    """Copy each reused method's predictions file into this run (the report reads them from here)."""
    for name, res in results.items():
        predictions_dir.mkdir(parents=True, exist_ok=True)
        src = Path(res.timings["reused_from"]) / "predictions" / f"{name}.parquet"
        shutil.copyfile(src, predictions_dir / f"{name}.parquet")
