"""One evaluator for every method: full ranking, per-sample metrics, bootstrap intervals.

`automr evaluate` fits (or loads) each method, ranks the whole catalogue for every sample of
a split (or of one seeded subset shared by all methods), and writes into the run folder
(what every method must return, and the history exclusion applied to all alike: ranking.py):

  run/metrics.json            {method: {"recall@1": x, ..., "ndcg@10": x, "n": n, "ci95": {metric: [lo, hi]},
                              "distinct_top1": d, "top1_repeats_history": r}}: d distinct items ranked first
                              over the samples (after any history exclusion: what is scored; a collapsed
                              model has few), r the share of samples whose own first item, before
                              exclusion, is in their history
  run/metrics.md              the same as a Markdown table, with intervals and paired tests
  run/paired.json             {"a:b": {"n": n, metric: {"diff", "ci95", "p_value", "n"}}}
  run/eval.json               which samples were evaluated (split, subset rows, seed), timings, the
                              exclude_history choice and each method's share of seen items in its top k
  run/predictions/<m>.parquet row, user_id, target_item, target_time, ranked_items, rank, plus the
                              method's extra columns (Recommender.last_extras: retrieval methods add
                              retrieved_item, retrieved_time)
  run/methods/<m>/            each method's own work folder (weights, counts, ...)
  run/config.yaml             the config that made it

`evaluate_methods` is the same loop without the CLI, for benchmarks and reports;
`load_predictions` + `paired_from_predictions` recompute tests later from saved rankings.
This module imports no torch, so `automr --help` stays fast.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.eval.bootstrap import bootstrap_ci, paired_bootstrap
from automr.eval.metrics import METRIC_NAMES, max_k, per_sample_metrics, target_ranks
from automr.eval.ranking import RankingSpec, check_ranking, keep_ranking, top1_in_history
from automr.utils.logging import get_console
from automr.utils.progress import rate_progress
from automr.utils.io import atomic_file, read_json

class Recommender(Protocol):
    """What the evaluator needs of a method (automr.methods.base.Recommender implements it).

    A structural type, so the evaluator does not import the methods package (which uses the
    metrics here): the stage builds the methods and hands them in.
    """

    def fit(self, data: PreparedData, work_dir: Path) -> None: ...

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray: ...

    def last_extras(self) -> dict[str, list[Any]]: ...


DEFAULT_COMPARE: tuple[tuple[str, str], ...] = (("automr", "bigrec"), ("automr", "random"))


@dataclass
class MethodResult:
    """One method's rankings and metrics on the evaluated samples."""

    name: str
    recs: np.ndarray  # (n, k) item ids, best first (history removed when excluding); -1 only past the catalogue
    ranks: np.ndarray  # (n,) 0-based rank of the target, -1 if not in the top k
    per_sample: dict[str, np.ndarray]  # metric -> (n,)
    summary: dict[str, Any]  # the metrics.json entry
    timings: dict[str, Any] = field(default_factory=dict)  # fit_s, recommend_s, users_per_s (or reused_from)
    extras: dict[str, list[Any]] = field(default_factory=dict)  # column -> (n,) values (Recommender.last_extras)
    seen_share: float = 0.0  # share of the method's own top-k items already in the sample's history
    top1_seen: float = 0.0  # share of samples whose own first item (before exclusion) is in their history


def summarise(per_sample: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The metrics.json entry: means, n and 95% percentile bootstrap intervals (shared resamples)."""
    stacked = np.stack([per_sample[m] for m in METRIC_NAMES], axis=1)  # (n, n_metrics)
    ci = bootstrap_ci(stacked, n_boot=n_boot, seed=seed)  # (n_metrics, 2)
    entry: dict[str, Any] = {m: float(per_sample[m].mean()) for m in METRIC_NAMES}
    entry["n"] = int(stacked.shape[0])
    entry["ci95"] = {m: [float(ci[i, 0]), float(ci[i, 1])] for i, m in enumerate(METRIC_NAMES)}
    return entry


def collapse_stats(recs: np.ndarray, top1_seen: float) -> dict[str, Any]:
    """How far a method collapses onto a few items: distinct items ranked first over the samples (as
    scored, after any history exclusion), and the share of samples whose own first item repeats their history."""
    first = recs[:, 0] if recs.size else np.empty(0, np.int64)  # (n,)
    return {"distinct_top1": int(np.unique(first[first >= 0]).size), "top1_repeats_history": round(float(top1_seen), 4)}


def paired_tests(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap of a - b for every metric (both on the same samples, same order)."""
    out: dict[str, Any] = {"n": int(len(a[METRIC_NAMES[0]]))}
    for m in METRIC_NAMES:
        out[m] = paired_bootstrap(a[m], b[m], n_boot=n_boot, seed=seed).to_dict()
    return out


PREDICTION_COLUMNS: tuple[str, ...] = ("row", "user_id", "target_item", "target_time", "ranked_items", "rank")


def _recommend_all(
    name: str, rec: Recommender, samples: pl.DataFrame, spec: RankingSpec, batch_size: int, console: Console | None
) -> tuple[np.ndarray, dict[str, list[Any]], float, float]:
    """Rank in batches (each checked, then cut to k the same way for every method, see ranking.py);
    also gather the method's per-sample extras, the share of seen items in its top k and the share of
    samples whose own top-1 is a seen item."""
    n = samples.height
    out = np.full((n, spec.k), -1, dtype=np.int64)
    extras: dict[str, list[Any]] = {}
    seen = top1_seen = 0
    rec.ranking_excludes_history = spec.exclude_history
    with rate_progress("users", console=console) as progress:
        task = progress.add_task(f"{name}: ranking", total=n)
        for start in range(0, n, batch_size):
            batch = samples.slice(start, batch_size)
            got = np.asarray(rec.recommend(batch, spec.depth))
            check_ranking(name, got, batch, spec)
            out[start : start + batch.height], batch_seen = keep_ranking(got, batch, spec)
            seen += batch_seen
            top1_seen += int(top1_in_history(got, batch).sum())
            _gather_extras(name, rec.last_extras(), extras, start, batch.height)
            progress.advance(task, batch.height)
    return out, extras, seen / max(n * min(spec.k, spec.depth), 1), top1_seen / max(n, 1)


def _gather_extras(name: str, got: Mapping[str, list[Any]], extras: dict[str, list[Any]], start: int, height: int) -> None:
    """Append one batch's extra columns to `extras` (rows start .. start + height)."""
    for key, values in got.items():
        if key in PREDICTION_COLUMNS or len(values) != height:
            raise RuntimeError(
                f"method {name!r}: extra column {key!r} clashes with a prediction column or has "
                f"{len(values)} values for {height} samples"
            )
        # A key first seen in a later batch is padded with None for the earlier rows.
        extras.setdefault(key, [None] * start).extend(values)
    for values in extras.values():
        values.extend([None] * (start + height - len(values)))


def evaluate_methods(
    data: PreparedData,
    recommenders: Mapping[str, Recommender],
    samples: pl.DataFrame,
    *,
    work_root: Path | None = None,
    fit: bool = True,
    k: int = 10,
    batch_size: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
    predictions_dir: Path | None = None,
    rows: np.ndarray | None = None,
    console: Console | None = None,
    exclude_history: bool = False,
    on_result: Callable[[MethodResult], None] | None = None,
) -> dict[str, MethodResult]:
    """Fit (if `fit`) and evaluate each recommender on `samples`, in order.

    Every method is asked for the same ranking depth and must return that many distinct catalogue
    items (UserError otherwise); exclude_history drops each sample's recent + memory items from
    every method's ranking before the first k are scored (automr/eval/ranking.py).
    work_root: each method fits in work_root/<name> (a temporary folder when None).
    predictions_dir: if given, write <name>.parquet there as soon as a method finishes.
    rows: the samples' row numbers in their split file (saved with the predictions; default 0..n-1).
    on_result: called with each method's result once its predictions are saved (the stage's resume record).
    """
    if k < max_k():
        raise ValueError(f"k must be >= {max_k()} for every metric to be defined, got {k}")
    console = console or get_console()
    rows = np.arange(samples.height, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    targets = samples["target_item"].to_numpy()
    spec = RankingSpec.for_samples(data, samples, k, exclude_history)
    results: dict[str, MethodResult] = {}
    with ExitStack() as stack:
        if work_root is None:
            work_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="automr-eval-")))
        for name, rec in recommenders.items():
            t0 = time.perf_counter()
            if fit:
                console.print(f"[bold]{name}[/bold]: fitting")
                rec.fit(data, Path(work_root) / name)
            t1 = time.perf_counter()
            recs, extras, seen_share, top1_seen = _recommend_all(name, rec, samples, spec, batch_size, console)
            t2 = time.perf_counter()
            ranks = target_ranks(recs, targets)
            per_sample = per_sample_metrics(ranks)
            summary = summarise(per_sample, n_boot=n_boot, seed=seed) | collapse_stats(recs, top1_seen)
            timings = {
                "fit_s": round(t1 - t0, 3),
                "recommend_s": round(t2 - t1, 3),
                "users_per_s": round(samples.height / max(t2 - t1, 1e-9), 1),
            }
            console.print(
                f"[bold]{name}[/bold]: fit {timings['fit_s']:.1f} s, ranked {samples.height} users "
                f"in {timings['recommend_s']:.1f} s ({timings['users_per_s']:,.1f} users/s), "
                f"recall@10 {summary['recall@10']:.4f}; {seen_share:.1%} of its top {k} already seen"
                + (" (removed)" if exclude_history else "")
            )
            results[name] = MethodResult(name, recs, ranks, per_sample, summary, timings, extras, seen_share, top1_seen)
            if predictions_dir is not None:
                save_predictions(predictions_dir / f"{name}.parquet", samples, recs, ranks, rows, extras)
            if on_result is not None:
                on_result(results[name])
    return results


def save_predictions(
    path: Path,
    samples: pl.DataFrame,
    recs: np.ndarray,
    ranks: np.ndarray,
    rows: np.ndarray,
    extras: Mapping[str, list[Any]] | None = None,
) -> None:
    """Write one method's rankings (atomically: a reader never sees a partial file).

    Columns: PREDICTION_COLUMNS, then the method's extras (e.g. retrieved_item, retrieved_time).
    """
    df = pl.DataFrame(
        {
            "row": rows,
            "user_id": samples["user_id"],
            "target_item": samples["target_item"],
            "target_time": samples["target_time"],
            "ranked_items": pl.Series("ranked_items", recs, dtype=pl.Array(pl.Int64, recs.shape[1])).cast(pl.List(pl.Int64)),
            "rank": ranks,
        }
    )
    if extras:
        # A column that is None throughout (no sample had a memory) is stored as Int64 nulls, not
        # the Null type, so readers can still subtract it from target_time (the report does).
        cols = [pl.Series(key, values, strict=False) for key, values in extras.items()]
        df = df.with_columns(c.cast(pl.Int64) if c.dtype == pl.Null else c for c in cols)
    with atomic_file(path) as tmp:
        df.write_parquet(tmp)


def load_predictions(run: Path, method: str) -> pl.DataFrame:
    """A method's saved rankings from run/predictions/<method>.parquet, in row order."""
    path = Path(run) / "predictions" / f"{method}.parquet"
    if not path.is_file():
        found = sorted(p.stem for p in (Path(run) / "predictions").glob("*.parquet"))
        raise UserError(
            f"no predictions for method {method!r} at {path}; found: {', '.join(found) or 'none'}. "
            "Run `automr evaluate` with this method first."
        )
    return pl.read_parquet(path).sort("row")


def rankings_from_predictions(pred: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(recs (n, k), ranks (n,)) of a saved predictions frame, in its row order."""
    recs = np.asarray(pred["ranked_items"].to_list(), dtype=np.int64).reshape(pred.height, -1)
    return recs, pred["rank"].to_numpy()


def per_sample_from_predictions(pred: pl.DataFrame) -> dict[str, np.ndarray]:
    """Per-sample metrics from saved ranks (recomputed from ranked_items and target_item)."""
    recs, _ = rankings_from_predictions(pred)
    return per_sample_metrics(target_ranks(recs, pred["target_item"].to_numpy()))


def paired_from_predictions(
    a: pl.DataFrame, b: pl.DataFrame, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired tests of two saved prediction frames, aligned on the samples both evaluated."""
    both = a.select("row").join(b.select("row"), on="row", how="inner").sort("row")
    if both.height == 0:
        raise UserError("the two prediction files share no evaluated samples; evaluate both on the same split and subset")
    a2 = both.join(a, on="row", how="left")
    b2 = both.join(b, on="row", how="left")
    return paired_tests(per_sample_from_predictions(a2), per_sample_from_predictions(b2), n_boot=n_boot, seed=seed)


def _fmt(entry: Mapping[str, Any], m: str) -> str:
    lo, hi = entry["ci95"][m]
    return f"{entry[m]:.4f} [{lo:.4f}, {hi:.4f}]"


def metrics_markdown(metrics: Mapping[str, Any], paired: Mapping[str, Any], header: str) -> str:
    """metrics.md: one row per method, each cell 'mean [95% interval]', then the paired tests."""
    lines = [header, "", "| method | n | " + " | ".join(METRIC_NAMES) + " |", "|---|---:|" + "---:|" * len(METRIC_NAMES)]
    for name, e in metrics.items():
        lines.append(f"| {name} | {e['n']} | " + " | ".join(_fmt(e, m) for m in METRIC_NAMES) + " |")
    if paired:
        lines += ["", "Paired bootstrap (a - b): difference [95% interval], two-sided p", ""]
        lines.append("| a - b | n | " + " | ".join(METRIC_NAMES) + " |")
        lines.append("|---|---:|" + "---:|" * len(METRIC_NAMES))
        for pair, res in paired.items():
            cells = [
                f"{res[m]['diff']:+.4f} [{res[m]['ci95'][0]:+.4f}, {res[m]['ci95'][1]:+.4f}] p={res[m]['p_value']:.3g}"
                for m in METRIC_NAMES
            ]
            lines.append(f"| {pair.replace(':', ' - ')} | {res['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(x: float) -> str:
    """0.0123 -> '.012' (three decimals, no leading zero) to keep table cells narrow."""
    text = f"{x:.3f}"
    return text[1:] if text.startswith("0") else text


def _rich_table(metrics: Mapping[str, Any], title: str) -> Table:
    """Mean on the first line of each cell, its 95% interval below (fits an 80-column terminal).

    The sample count is in the title (every method is evaluated on the same samples).
    """
    table = Table(title=title, caption="mean, and below it the 95% bootstrap interval")
    table.add_column("method", no_wrap=True, min_width=max(len(n) for n in metrics) if metrics else 6)
    for m in METRIC_NAMES:
        table.add_column(m, justify="right", no_wrap=True, min_width=9)
    for name, e in metrics.items():
        cells = [f"{e[m]:.4f}\n[dim]{_short(e['ci95'][m][0])}-{_short(e['ci95'][m][1])}[/dim]" for m in METRIC_NAMES]
        table.add_row(name, *cells)
    return table


def read_metrics(run: Path) -> dict[str, Any]:
    """run/metrics.json, with a clear error where it is missing."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `automr evaluate --run {run}` first")
    return read_json(path)
