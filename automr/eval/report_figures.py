"""The figures of `automr report`, each a PNG or a sentence saying why it was not drawn.

- Figure 2: AutoMR against random retrieval over seeds, every seed a point over its method's box;
  refused with fewer than 2 seeds (one point per box is no distribution); y axis from 0.
- Figure 3 (the paper's): on the test samples where memory turned a BIGRec miss into an AutoMR hit
  (`miss_to_hit`), when the retrieved element happened, in interactions ago and in days (log axis),
  as an ECDF against the whole history of the same samples (and against their memory: what random
  retrieval draws from).
- The retriever's training curve (train KL and the early-stopping criterion per epoch, per seed).
- The label distribution: each candidate's log-likelihood gain, and each sample's largest label
  against uniform (the paper's probability-difference labels are uniform to many decimals).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

DAY = 86_400


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


@dataclass
class Figure:
    """A drawn figure (path) or the sentence that says why it is not there (note)."""

    path: Path | None
    note: str


# -- Figure 2 ----------------------------------------------------------------------------------
def figure2(values: dict[str, dict[str, list[float]]], out: Path) -> Figure:
    """values[metric][method] -> one value per seed. Refuses fewer than 2 seeds."""
    n_seeds = min((len(v) for m in values.values() for v in m.values()), default=0)
    if n_seeds < 2:
        return Figure(None, f"Figure 2 needs at least 2 seeds to show a spread; this report has {n_seeds}. "
                            "Run `automr run CONFIG --seeds 0,1,2` to draw it.")
    plt = _plt()
    fig, axes = plt.subplots(1, len(values), figsize=(3.6 * len(values), 3.4), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    for ax, metric in zip(axes[0], values):
        methods = list(values[metric])
        data = [values[metric][m] for m in methods]
        ax.boxplot(data, tick_labels=methods, widths=0.5, showfliers=False)
        for i, ys in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.08, 0.08, len(ys)), ys, s=22, zorder=3, color="C3")
        top = max(max(d) for d in data)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.set_title(f"{metric} over {n_seeds} seeds")
        ax.grid(axis="y", alpha=0.3)
    return Figure(_save(fig, out / "figure2.png"), f"{n_seeds} seeds; each point is one seed.")


# -- Figure 3 ----------------------------------------------------------------------------------
def miss_to_hit(bigrec: pl.DataFrame, automr: pl.DataFrame, k: int) -> pl.DataFrame:
    """The rows of `automr`'s predictions where BIGRec missed the target in its top k and AutoMR hit it.

    Both frames are one run's predictions (same samples); rank is 0-based, -1 = not in the top k saved.
    """
    hit_b = bigrec.select("row", (pl.col("rank").is_between(0, k - 1)).alias("bigrec_hit"))
    both = automr.join(hit_b, on="row", how="inner")
    return both.filter(~pl.col("bigrec_hit") & pl.col("rank").is_between(0, k - 1)).drop("bigrec_hit")


@dataclass
class Position:
    """When one sample's retrieved element happened, and when every element of its history did."""

    ago: int  # interactions before the target (the newest recent item is 1)
    days: float  # days before the target
    history_ago: list[int]  # every history element (memory oldest first, then recent)
    history_days: list[float]
    n_memory: int  # the first n_memory entries of the history are the memory


def retrieved_position(pred: pl.DataFrame, samples: pl.DataFrame) -> list[Position]:
    """A Position per prediction row with a retrieved element; `samples` is the evaluated split, rows index it.

    Memory element j of M (oldest first), with K recent items after it, is M - j + K interactions ago.
    """
    out = []
    for row in pred.filter(pl.col("retrieved_time").is_not_null()).iter_rows(named=True):
        s = samples.row(int(row["row"]), named=True)
        mem_t, rec_t, target = s["memory_times"] or [], s["recent_times"] or [], s["target_time"]
        idx = row.get("retrieved_index")
        if idx is None:  # predictions from before retrieved_index: the element with that item and time
            idx = next(j for j, (i, t) in enumerate(zip(s["memory_items"], mem_t))
                       if i == row["retrieved_item"] and t == row["retrieved_time"])
        k, m = len(rec_t), len(mem_t)
        out.append(Position(m - int(idx) + k, (target - row["retrieved_time"]) / DAY,
                            [m + k - j for j in range(m + k)], [(target - t) / DAY for t in [*mem_t, *rec_t]], m))
    return out


def _ecdf(ax: Any, x: np.ndarray, label: str, **kw: Any) -> None:
    xs = np.sort(x)
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label, **kw)


def figure3(positions: list[Position], n_runs: int, k: int, out: Path) -> tuple[Figure, dict[str, Any]]:
    """ECDFs of when the retrieved elements of miss-to-hit samples happened, against their whole history."""
    if not positions:
        return Figure(None, f"Figure 3: no test sample where AutoMR hit the target in its top {k} and BIGRec missed it, "
                            "so there is no retrieved element to place."), {"n": 0}
    ago = np.array([p.ago for p in positions], float)
    days = np.array([p.days for p in positions], float)
    hist_ago = np.concatenate([p.history_ago for p in positions]).astype(float)
    hist_days = np.concatenate([p.history_days for p in positions]).astype(float)
    mem_ago = np.concatenate([p.history_ago[: p.n_memory] for p in positions]).astype(float)
    mem_days = np.concatenate([p.history_days[: p.n_memory] for p in positions]).astype(float)
    floor = 1.0 / 24  # an hour: same-day elements still show on the log axis
    panels = [(ago, hist_ago, mem_ago, "interactions before the target"),
              (np.maximum(days, floor), np.maximum(hist_days, floor), np.maximum(mem_days, floor), "days before the target")]
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (r, h, mm, xlabel) in zip(axes, panels):
        _ecdf(ax, r, f"retrieved, miss to hit (n={len(r)})", color="C3", linewidth=2)
        _ecdf(ax, h, "whole history of those samples", color="C0")
        _ecdf(ax, mm, "their memory (what random retrieval draws)", color="C0", linestyle="--")
        ax.set(xscale="log", xlabel=xlabel + " (log axis)", ylabel="share at or below", ylim=(0, 1.02))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.subplots_adjust(bottom=0.28)
    summary = {"n": len(positions), "median_interactions_ago": float(np.median(ago)), "median_days_ago": float(np.median(days)),
               "history_median_interactions_ago": float(np.median(hist_ago)), "history_median_days_ago": float(np.median(hist_days))}
    note = (f"{len(positions)} test samples over {n_runs} run(s) where BIGRec missed the target in its top {k} and AutoMR hit it. "
            f"Their retrieved element happened a median {summary['median_interactions_ago']:.0f} interactions and "
            f"{summary['median_days_ago']:.1f} days before the target (their whole history: "
            f"{summary['history_median_interactions_ago']:.0f} and {summary['history_median_days_ago']:.1f}).")
    fig.savefig(out / "figure3.png", dpi=110)  # not _save: tight_layout would undo the room kept for the legend
    plt.close(fig)
    return Figure(out / "figure3.png", note), summary


# -- retriever and labels ----------------------------------------------------------------------
def training_curve(histories: dict[str, list[dict[str, Any]]], out: Path) -> Figure:
    """Train KL and the early-stopping criterion per epoch, one line per seed."""
    if not histories:
        return Figure(None, "No retriever training history found (the runs have no automr method with a retriever folder).")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, (label, rows) in enumerate(histories.items()):
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_kl"] for r in rows], color=f"C{i}", label=label)
        crit = [(r["epoch"], r["metric"]) for r in rows if r.get("metric") is not None]
        if crit:
            axes[1].plot(*zip(*crit), color=f"C{i}", label=label)
            best = max(crit, key=lambda c: c[1])
            axes[1].scatter([best[0]], [best[1]], color=f"C{i}", marker="*", s=80, zorder=3)
    axes[0].set(xlabel="epoch", ylabel="train KL(S' || S)", title="retriever training loss")
    name = next((r.get("criterion") for rows in histories.values() for r in rows if r.get("criterion")), "criterion")
    axes[1].set(xlabel="epoch", ylabel=f"validation {name}", title="early-stopping criterion (star: kept epoch)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return Figure(_save(fig, out / "retriever_curve.png"), f"{len(histories)} retriever(s); the star marks the epoch kept.")


def label_distribution(logp_empty: np.ndarray, logp_cand: list[np.ndarray], label_type: str, temperature: float, out: Path) -> tuple[Figure, dict[str, Any]]:
    """Histograms of every candidate's gain (nats) and of each sample's largest label times M (1 = uniform)."""
    from automr.memory.labels import make_labels

    if not logp_cand:
        return Figure(None, "No annotations found for the retriever's training samples."), {}
    gains = np.concatenate([c - e for e, c in zip(logp_empty, logp_cand)])
    peak = np.array([make_labels(label_type, e, c, temperature).max() * len(c) for e, c in zip(logp_empty, logp_cand)])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist(gains, bins=40, color="C0")
    axes[0].axvline(0, color="k", linewidth=0.8)
    axes[0].set(xlabel="log P(y | slot = m) - log P(y | empty slot), nats", ylabel="candidates", title=f"gains of {len(gains):,} candidates")
    axes[1].hist(peak, bins=30, color="C2")
    axes[1].axvline(1, color="k", linewidth=0.8)
    axes[1].set(xlabel="largest label x M (1 = uniform)", ylabel="samples", title=f"{label_type} labels, T = {temperature:g}")
    for ax in axes:
        ax.grid(alpha=0.3)
    summary = {"samples": len(logp_cand), "candidates": int(len(gains)), "share_positive_gain": float((gains > 0).mean()),
               "median_gain": float(np.median(gains)), "median_peak_over_uniform": float(np.median(peak))}
    note = (f"{summary['samples']} annotated training samples, {summary['candidates']:,} candidates: {summary['share_positive_gain']:.0%} "
            f"of candidates raise the answer's log-probability (median gain {summary['median_gain']:+.2f} nats); the median "
            f"sample's largest {label_type} label is {summary['median_peak_over_uniform']:.2f} times uniform.")
    return Figure(_save(fig, out / "labels.png"), note), summary
