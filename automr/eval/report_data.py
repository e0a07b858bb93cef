"""The numbers of `automr report`, over seeds: Table 1, the paired tests, the headroom table, the floor.

A *run set* is the evaluation runs of one model over seeds (one `automr evaluate` folder per seed).
Every cell of Table 1 is, for one method and metric:
  - the mean over seeds of the run's mean;
  - the spread over seeds (sample standard deviation; "-" with one seed);
  - a 95% percentile bootstrap interval over samples of the seed-averaged per-sample value: where
    every seed scored the same samples (rows), each sample's value is first averaged over seeds;
    otherwise the seeds' samples are pooled. Per-sample values come from predictions/<method>.parquet;
    a run without predictions falls back to its own interval (one seed only).
The paired tests (AutoMR against BIGRec and against random retrieval) use the same per-sample
averaging on the per-sample differences, which are paired within each seed.

The floor. A method is at the floor when the lower end of its Recall@10 interval is at or below the
floor: popularity's Recall@10 where popularity was evaluated, else 0. When every method other than
popularity is at the floor, the report says so in one sentence at the top; when only the classic
baselines (SASRec) rise above it, it says that every LLM method is at the floor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from automr.errors import UserError
from automr.eval.bootstrap import bootstrap_ci, paired_bootstrap
from automr.eval.evaluator import per_sample_from_predictions
from automr.utils.io import read_json
from automr.utils.method_names import CLASSIC_METHODS, method_kind

METRICS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
# Methods of automr/methods/registry.py that read the evaluated samples' targets (upper bounds for diagnosis):
# shown, never marked best.
DIAGNOSTIC_METHODS = frozenset({"oracle"})
PAIRS = (("automr", "bigrec"), ("automr", "random"))
FLOOR_METRIC = "recall@10"


@dataclass
class Run:
    """One evaluation run folder: its metrics, which seed it is, and (lazily) its predictions."""

    folder: Path
    metrics: dict[str, Any]
    seed: int | None
    eval_info: dict[str, Any] = field(default_factory=dict)

    def predictions(self, method: str) -> pl.DataFrame | None:
        path = self.folder / "predictions" / f"{method}.parquet"
        return pl.read_parquet(path).sort("row") if path.is_file() and "row" in pl.read_parquet_schema(path) else None

    @property
    def label(self) -> str:
        return f"seed {self.seed}" if self.seed is not None else self.folder.name


def run_seed(folder: Path, eval_info: dict[str, Any]) -> int | None:
    """A run's seed: the seed-S folder `automr run --seeds` put it in, else the seed evaluate used."""
    for part in reversed(folder.parts):
        if m := re.fullmatch(r"seed-(-?\d+)", part):
            return int(m.group(1))
    return eval_info.get("seed")


def load_runs(folders: list[Path]) -> list[Run]:
    """Every run's metrics.json (and eval.json where present), with one error naming every folder that is not a run."""
    runs, missing = [], []
    for folder in map(Path, folders):
        if not (folder / "metrics.json").is_file():
            missing.append(str(folder / "metrics.json"))
            continue
        info = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
        runs.append(Run(folder, read_json(folder / "metrics.json"), run_seed(folder, info), info))
    if missing:
        raise UserError(f"not evaluation runs (no metrics.json): {', '.join(missing)}. Create them with `automr evaluate`.")
    return runs


def methods_of(runs: list[Run]) -> list[str]:
    out: list[str] = []
    for r in runs:
        out += [m for m in r.metrics if m not in out]
    return out


# -- per-sample values over seeds --------------------------------------------------------------
def seed_averaged(frames: list[pl.DataFrame], values: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], str]:
    """Per-sample values averaged over seeds where every seed has the same rows, else pooled; and which."""
    rows = [f["row"].to_numpy() for f in frames]
    if all(len(r) == len(rows[0]) and (r == rows[0]).all() for r in rows):
        return {m: np.mean([v[m] for v in values], axis=0) for m in values[0]}, "averaged over seeds per sample"
    return {m: np.concatenate([v[m] for v in values]) for m in values[0]}, "seeds' samples pooled"


def _per_sample(runs: list[Run], method: str) -> tuple[list[pl.DataFrame], list[dict[str, np.ndarray]]] | None:
    preds = [r.predictions(method) for r in runs if method in r.metrics]
    if not preds or any(p is None for p in preds):
        return None
    return preds, [per_sample_from_predictions(p) for p in preds]  # type: ignore[arg-type]


@dataclass
class Cell:
    mean: float
    spread: float | None
    ci: tuple[float, float] | None


@dataclass
class MethodRow:
    name: str
    n: int
    seeds: int
    cells: dict[str, Cell]
    distinct_top1: float | None
    top1_repeats_history: float | None


def method_rows(runs: list[Run], label: str | None = None, n_boot: int = 1000) -> tuple[list[MethodRow], str]:
    """Table 1's rows for one run set, and how the interval pooled the seeds."""
    rows, how = [], "one seed"
    for m in methods_of(runs):
        present = [r.metrics[m] for r in runs if m in r.metrics]
        per = _per_sample(runs, m)
        if per is not None:
            values, how = seed_averaged(*per) if len(per[0]) > 1 else (per[1][0], how)
            stacked = np.stack([values[k] for k in METRICS], axis=1)  # (n, metrics)
            ci = bootstrap_ci(stacked, n_boot=n_boot, seed=0)  # (metrics, 2)
            cis = {k: (float(ci[i, 0]), float(ci[i, 1])) for i, k in enumerate(METRICS)}
        else:
            cis = {k: tuple(present[0]["ci95"][k]) for k in METRICS} if len(present) == 1 and "ci95" in present[0] else {}
        cells = {}
        for k in METRICS:
            vals = np.array([p[k] for p in present], dtype=float)
            cells[k] = Cell(float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else None, cis.get(k))
        d1 = [p["distinct_top1"] for p in present if "distinct_top1" in p]
        rep = [p["top1_repeats_history"] for p in present if "top1_repeats_history" in p]
        rows.append(MethodRow(f"{m} [{label}]" if label else m, int(present[0]["n"]), len(present), cells,
                              float(np.mean(d1)) if d1 else None, float(np.mean(rep)) if rep else None))
    return rows, how


def _kind(row: MethodRow) -> str:
    """The registry method behind a row: "bigrec [plain adapter]" and "bigrec@bf16" are bigrec."""
    return method_kind(row.name.split(" [")[0])


def best_per_column(rows: list[MethodRow]) -> dict[str, str]:
    """metric -> the name of the method with the highest mean (ties: the first); diagnostics that read the
    targets (the oracle) are not candidates, and a column where every candidate scores 0 has no best."""
    rows = [r for r in rows if _kind(r) not in DIAGNOSTIC_METHODS]
    best = {k: max(rows, key=lambda r: r.cells[k].mean) for k in METRICS} if rows else {}
    return {k: r.name for k, r in best.items() if r.cells[k].mean > 0}


def report_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    """The paired tests the report shows: AutoMR against BIGRec and against random retrieval, and the same
    pairs within each variant label the methods carry (automr@d3 - bigrec@d3: one decoding against itself)."""
    labels = sorted({"@" + m.partition("@")[2] for m in methods if "@" in m})
    return [(a + label, b + label) for label in ["", *labels] for a, b in PAIRS]


def paired_over_seeds(runs: list[Run], a: str, b: str, n_boot: int = 1000) -> dict[str, Any] | None:
    """Paired bootstrap of a - b on the seed-averaged per-sample differences; None where either is missing."""
    pa, pb = _per_sample(runs, a), _per_sample(runs, b)
    if pa is None or pb is None or len(pa[0]) != len(pb[0]):
        return None
    diffs, frames = [], []
    for fa, va, fb, vb in zip(pa[0], pa[1], pb[0], pb[1]):
        if not (fa["row"].to_numpy() == fb["row"].to_numpy()).all():
            raise UserError(f"{a} and {b} were not evaluated on the same samples in one run; evaluate them together")
        diffs.append({k: va[k] - vb[k] for k in METRICS})
        frames.append(fa)
    d, how = seed_averaged(frames, diffs) if len(diffs) > 1 else (diffs[0], "one seed")
    zero = np.zeros_like(d[METRICS[0]])
    return {"pair": f"{a} - {b}", "n": int(len(zero)), "seeds": len(diffs), "how": how,
            **{k: paired_bootstrap(d[k], zero, n_boot=n_boot, seed=0).to_dict() for k in METRICS}}


def llm_floor(rows: list[MethodRow]) -> tuple[list[str], list[str]] | None:
    """(the LLM methods, the classic ones above the floor) when every LLM method is at the floor but a
    classic baseline is not; None otherwise (no LLM method, one above the floor, or nothing above it)."""
    floor, _, everything_at = floor_verdict(rows)
    scored = [r for r in rows if r.name != "popularity" and r.cells[FLOOR_METRIC].ci is not None]
    llm = [r for r in scored if _kind(r) not in CLASSIC_METHODS]
    if everything_at or not llm or any(r.cells[FLOOR_METRIC].ci[0] > floor for r in llm):  # type: ignore[index]
        return None
    return [r.name for r in llm], [r.name for r in scored if r not in llm and r.cells[FLOOR_METRIC].ci[0] > floor]  # type: ignore[index]


def floor_verdict(rows: list[MethodRow]) -> tuple[float, str, bool]:
    """(the floor, what it is, whether every method but popularity is at it) by the rule in the module docstring."""
    pop = next((r for r in rows if r.name == "popularity"), None)
    floor, what = (pop.cells[FLOOR_METRIC].mean, "popularity's Recall@10") if pop else (0.0, "zero")
    others = [r for r in rows if r.name != "popularity" and r.cells[FLOOR_METRIC].ci is not None]
    at = bool(others) and all(r.cells[FLOOR_METRIC].ci[0] <= floor for r in others)  # type: ignore[index]
    return floor, what, at


# -- headroom over seeds -----------------------------------------------------------------------
def headroom_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (samples, method): share mean over seeds, spread, every seed's share with its interval."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        for m, r in s["methods"].items():
            groups.setdefault((s["split_label"], m), []).append(r | {"seed": s.get("seed")})
    rows = []
    for (label, m), rs in groups.items():
        shares = np.array([r["share"] for r in rs], dtype=float)
        rows.append({"samples": label, "method": m, "n": rs[0]["n"], "seeds": len(rs), "mean": float(shares.mean()),
                     "spread": float(shares.std(ddof=1)) if len(rs) > 1 else None, "min": float(shares.min()),
                     "per_seed": [(r["seed"], r["share"], tuple(r["ci95"])) for r in rs],
                     "picks_best": float(np.mean([r["picks_best"] for r in rs]))})
    return rows
