"""`automr headroom`: the share of the oracle headroom each retrieval method captures (DESIGN.md).

On annotated samples (normally the validation split) every memory element's gain
g_m = log P(y | z_t, z_m) - log P(y | z_t) is known, so a retrieval method can be judged without
decoding: per sample it picks one element, and

    share = sum_i (g_i[chosen_i] - mean_m g_i[m]) / sum_i (max_m g_i[m] - mean_m g_i[m])

(automr.memory.labels.headroom_share): 1 = always the best element (the oracle), 0 = no better
than a random element (its expectation), negative = worse than random. It is the most direct
measure of a retriever: the nats it gains over random retrieval, as a share of what a perfect
retriever would gain. Methods: automr (the trained retriever on the stored query z_t and the
memory keys), random (the seeded draw the `random` method makes; its expectation is 0), recent
(the newest element), oldest, rella (the element whose title is most similar to the recent
titles). Intervals: 95% percentile bootstrap over samples.

Outputs: headroom.json, headroom.md and config.yaml in `out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from automr.config import StageConfig

HEADROOM_METHODS = ("automr", "random", "recent", "oldest", "rella")


class HeadroomConfig(StageConfig):
    """Settings of `automr headroom`."""

    annotations: Path = Field(description="annotate output folder of the samples to judge on (normally the validation split)")
    out: Path = Field(description="output folder: headroom.json, headroom.md, config.yaml")
    methods: list[Literal["automr", "random", "recent", "oldest", "rella"]] = Field(
        default_factory=lambda: ["automr", "random", "recent", "rella"],
        description="retrieval methods to judge (automr needs `retriever`; rella the sentence-encoder package)",
    )
    retriever: Path | None = Field(None, description="train-retriever output folder (for automr)")
    memory: Path | None = Field(None, description="memory store folder (default: the one the annotations were made with)")
    queries: Path | None = Field(None, description="folder of query states {split}.npy (default: MEMORY/queries)")
    seed: int = Field(0, description="seed of the random method's draws (as `automr evaluate --seed`) and of the bootstrap")
    n_boot: int = Field(1000, ge=1, description="bootstrap resamples for the 95% intervals")
    rella_aggregate: Literal["mean", "max"] = Field("mean", description="rella: how the recent titles form the query")

    @model_validator(mode="after")
    def _check(self) -> "HeadroomConfig":
        if not self.methods:
            raise ValueError("methods is empty; name at least one of " + ", ".join(HEADROOM_METHODS))
        if "automr" in self.methods and self.retriever is None:
            raise ValueError("method automr needs `retriever` (a train-retriever output folder); set it or drop automr")
        return self


def share_with_interval(chosen: Any, gains: list[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Headroom share (ratio of sums) with a 95% percentile bootstrap interval over samples.

    chosen[i]: gain of the element the method chose for sample i; gains[i]: all its elements' gains.
    Also returns the mean chosen gain (nats over the empty slot), the per-sample share averaged
    over samples with headroom ("mean_of_ratios") and how often the choice is the best element.
    """
    import numpy as np

    from automr.memory import labels as L

    c = np.asarray(chosen, np.float64)
    mean = np.array([np.mean(g) for g in gains])
    best = np.array([np.max(g) for g in gains])
    num, den = c - mean, best - mean
    rng = np.random.default_rng(seed)
    n = len(c)
    boots = np.empty(n_boot)
    step = max(1, 2_000_000 // max(n, 1))
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))
        d = den[idx].sum(1)
        boots[s : s + len(idx)] = np.where(d > 0, num[idx].sum(1) / np.where(d > 0, d, 1.0), np.nan)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (float("nan"), float("nan"))
    return {
        "share": L.headroom_share(c, gains),
        "ci95": [float(lo), float(hi)],
        "share_mean_of_ratios": L.headroom_share(c, gains, reduction="mean_of_ratios"),
        "chosen_gain": float(c.mean()),
        "picks_best": float(np.mean(c >= best - 1e-9)),
        "n": int(n),
    }


def run_headroom(cfg: HeadroomConfig) -> dict[str, Any]:
    """Judge every method of `cfg` on the annotated samples; write and print the shares."""
    import shutil

    import numpy as np

    from automr.config import save_config
    from automr.data.schema import PreparedData
    from automr.errors import UserError
    from automr.io import atomic_dir, atomic_write_text, write_json
    from automr.memory.annotate import annotate_config
    from automr.memory.train_stage import retrieval_data_from_files

    acfg = annotate_config(cfg.annotations)
    data, info = retrieval_data_from_files(cfg.annotations, cfg.memory, cfg.queries)
    prepared = PreparedData.load(acfg.samples)
    frame = prepared.split(acfg.split)[info["sample_index"].tolist()]
    lens = frame["memory_items"].list.len().fill_null(0).to_numpy()
    if not np.array_equal(lens, np.array([len(r) for r in data.memory_rows])):
        raise UserError(
            f"the annotations in {cfg.annotations} do not match the memories of {acfg.samples}/samples/{acfg.split}.parquet; "
            "annotate again from this prepared data."
        )
    gains = data.gains()
    with atomic_dir(Path(cfg.out)) as tmp:
        cache = tmp / "cache"  # ReLLa's title embeddings, kept for the next run
        if (Path(cfg.out) / "cache").is_dir():
            shutil.copytree(Path(cfg.out) / "cache", cache)
        summary = _judge(cfg, data, frame, prepared, gains, acfg.split, cache)
        write_json(tmp / "headroom.json", summary)
        atomic_write_text(tmp / "headroom.md", headroom_markdown(summary, cfg))
        save_config(cfg, tmp)
    info["store"].close()
    _print(summary, cfg)
    return summary


def _judge(cfg: HeadroomConfig, data: Any, frame: Any, prepared: Any, gains: list[Any], split: str, cache: Path) -> dict[str, Any]:
    import numpy as np

    from automr.memory.selectors import MostRecentSelector, RandomSelector

    choices: dict[str, list[int]] = {}
    for m in cfg.methods:
        if m == "automr":
            from automr.memory.retriever import Retriever

            r = Retriever.load(cfg.retriever)
            picked = r.select_batch(data.queries, [np.asarray(data.key_bank[rows]) for rows in data.memory_rows], 1)
            choices[m] = picked[:, 0].tolist()
        elif m == "random":
            choices[m] = RandomSelector(cfg.seed).select(frame)  # type: ignore[assignment]
        elif m == "recent":
            choices[m] = MostRecentSelector().select(frame)  # type: ignore[assignment]
        elif m == "oldest":
            choices[m] = [0] * frame.height
        elif m == "rella":
            from automr.baselines.rella import RellaOptions, RellaSelector

            sel = RellaSelector(RellaOptions(aggregate=cfg.rella_aggregate))
            sel.fit(prepared, cache)
            choices[m] = sel.select(frame)  # type: ignore[assignment]
    results: dict[str, Any] = {}
    for m, idx in choices.items():
        chosen = [float(g[int(i)]) for g, i in zip(gains, idx)]
        results[m] = share_with_interval(chosen, gains, cfg.n_boot, cfg.seed)
    best = np.array([g.max() for g in gains])
    mean = np.array([g.mean() for g in gains])
    return {
        "split": split,
        "n_samples": len(gains),
        "mean_m": float(np.mean([len(g) for g in gains])),
        "oracle_gain": float(best.mean()),
        "random_expected_gain": float(mean.mean()),
        "headroom_nats": float((best - mean).mean()),
        "methods": results,
    }


def _print(summary: dict[str, Any], cfg: HeadroomConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    results = summary["methods"]
    table = Table(title=f"share of the oracle headroom over random retrieval ({summary['split']}, {summary['n_samples']} annotated samples)")
    for col in ("method", "share", "95% interval", "chosen gain (nats)", "picks the best"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, r in results.items():
        table.add_row(m, f"{r['share']:+.3f}", f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]", f"{r['chosen_gain']:+.3f}",
                      f"{r['picks_best']:.1%}")
    console = Console()
    console.print(table)
    console.print(
        f"oracle gain {summary['oracle_gain']:+.3f} nats, random element {summary['random_expected_gain']:+.3f} "
        f"-> headroom {summary['headroom_nats']:.3f} nats per sample (mean |M| {summary['mean_m']:.1f}) -> {cfg.out}",
        highlight=False,
    )


def headroom_markdown(summary: dict[str, Any], cfg: HeadroomConfig) -> str:
    lines = [
        f"# Share of the oracle headroom over random retrieval ({summary['split']}, {summary['n_samples']} annotated samples)",
        "",
        f"Annotations: {cfg.annotations}. Oracle gain {summary['oracle_gain']:+.3f} nats over the empty slot, a random "
        f"element {summary['random_expected_gain']:+.3f}: headroom {summary['headroom_nats']:.3f} nats per sample "
        f"(mean |M| {summary['mean_m']:.1f}). Share: 1 = the best element every time, 0 = random retrieval's expectation.",
        "",
        "| method | share [95% interval] | per-sample share (mean) | chosen gain (nats) | picks the best |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, r in summary["methods"].items():
        lines.append(
            f"| {m} | {r['share']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['share_mean_of_ratios']:+.3f} | "
            f"{r['chosen_gain']:+.3f} | {r['picks_best']:.1%} |"
        )
    return "\n".join(lines) + "\n"
