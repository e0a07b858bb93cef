"""`automr headroom`: the share of the oracle headroom each retrieval method captures.

The config, the runner and its table; the share and its interval live in automr/eval/headroom.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from automr.config import StageConfig
from automr.errors import UserError
from automr.eval.headroom import HEADROOM_METHODS, share_with_interval, split_label

SPLIT_HELP = (
    "split the annotations must be on: test (held out, the default) or valid (labelled \"seen by early stopping\" "
    "when the retriever early-stopped on those samples); a mismatch is refused, so an in-sample share is never "
    "produced by accident"
)


class HeadroomConfig(StageConfig):
    """Settings of `automr headroom`."""

    annotations: Path = Field(description="annotate output folder of the samples to judge on (held-out test samples; see `split`)")
    out: Path = Field(description="output folder: headroom.json, headroom.md, config.yaml")
    methods: list[Literal["automr", "random", "recent", "oldest", "rella"]] = Field(
        default_factory=lambda: ["automr", "random", "recent", "rella"],
        description="retrieval methods to judge (automr needs `retriever`; rella the sentence-encoder package)",
    )
    split: Literal["train", "valid", "test"] = Field("test", description=SPLIT_HELP)
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


def run_headroom(cfg: HeadroomConfig) -> dict[str, Any]:
    """Judge every method of `cfg` on the annotated samples; write and print the shares."""
    import shutil

    from automr.config import save_config
    from automr.data.schema import PreparedData
    from automr.stages.annotate import annotate_config
    from automr.stages.train_retriever import annotated_samples, retrieval_data_from_files
    from automr.utils.io import atomic_dir, atomic_write_text, write_json

    acfg = annotate_config(cfg.annotations)
    if acfg.split != cfg.split:
        raise UserError(
            f"the annotations in {cfg.annotations} are on the {acfg.split!r} split, but headroom expects {cfg.split!r} "
            f"(`split`, default test: held-out numbers). Annotate the {cfg.split} split, or set `split: {acfg.split}` "
            "to judge on these samples (labelled as such)."
        )
    data, info = retrieval_data_from_files(cfg.annotations, cfg.memory, cfg.queries)
    prepared = PreparedData.load(acfg.samples)
    frame = annotated_samples(acfg, info["sample_index"], [len(r) for r in data.memory_rows])
    gains = data.gains()
    with atomic_dir(Path(cfg.out)) as tmp:
        cache = tmp / "cache"  # ReLLa's title embeddings, kept for the next run
        if (Path(cfg.out) / "cache").is_dir():
            shutil.copytree(Path(cfg.out) / "cache", cache)
        summary = _judge(cfg, data, frame, prepared, gains, acfg.split, cache)
        seen = seen_by_early_stopping(cfg.annotations, cfg.retriever, acfg, info["sample_index"])
        summary |= {"seen_by_early_stopping": seen, "split_label": split_label(acfg.split, seen),
                    "held_out": acfg.split == "test" and not seen}
        write_json(tmp / "headroom.json", summary)
        atomic_write_text(tmp / "headroom.md", headroom_markdown(summary, cfg))
        save_config(cfg, tmp)
    info["store"].close()
    _print(summary, cfg)
    return summary


def seen_by_early_stopping(annotations: Path, retriever: Path | None, acfg: Any, sample_index: Any) -> bool:
    """Whether the retriever early-stopped on any of these annotated samples.

    The retriever's config.yaml names its `valid_annotations`; they count as the same samples when they
    are this folder, or annotate the same split of the same prepared data and share a sample. When
    that folder can no longer be read, validation samples count as seen (the safe side).
    """
    import numpy as np

    from automr.config import read_yaml
    from automr.memory.annotate import load_annotations
    from automr.stages.annotate import annotate_config

    if retriever is None or not (Path(retriever) / "config.yaml").is_file():
        return False
    valid = read_yaml(Path(retriever) / "config.yaml").get("valid_annotations")
    if not valid:
        return False
    if Path(valid).resolve() == Path(annotations).resolve():
        return True
    try:
        vcfg = annotate_config(valid)
        vidx = load_annotations(valid, require_complete=False)["sample_index"].to_numpy()
    except UserError:
        return acfg.split == "valid"
    same = vcfg.split == acfg.split and Path(vcfg.samples).resolve() == Path(acfg.samples).resolve()
    return bool(same and np.isin(vidx, np.asarray(sample_index)).any())


def _judge(cfg: HeadroomConfig, data: Any, frame: Any, prepared: Any, gains: list[Any], split: str, cache: Path) -> dict[str, Any]:
    import numpy as np

    from automr.methods.selectors import MostRecentSelector, RandomSelector

    choices: dict[str, list[int]] = {}
    for m in cfg.methods:
        if m == "automr":  # either kind of retriever, scored the way inference scores it
            from automr.methods.feature_retriever import load_retriever, select_elements

            r = load_retriever(cfg.retriever)
            keys = [np.asarray(data.key_bank[rows]) for rows in data.memory_rows]
            choices[m] = select_elements(r, frame, data.queries, keys, 1)[:, 0].tolist()
        elif m == "random":
            choices[m] = RandomSelector(cfg.seed).select(frame)  # type: ignore[assignment]
        elif m == "recent":
            choices[m] = MostRecentSelector().select(frame)  # type: ignore[assignment]
        elif m == "oldest":
            choices[m] = [0] * frame.height
        elif m == "rella":
            from automr.methods.rella import RellaOptions, RellaSelector

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
    from rich.table import Table

    from automr.utils.logging import get_console

    results = summary["methods"]
    table = Table(title=f"share of the oracle headroom over random retrieval ({summary['split_label']}, {summary['n_samples']} annotated samples)")
    for col in ("method", "share", "95% interval", "chosen gain (nats)", "picks the best"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m, r in results.items():
        table.add_row(m, f"{r['share']:+.3f}", f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]", f"{r['chosen_gain']:+.3f}",
                      f"{r['picks_best']:.1%}")
    console = get_console()
    console.print(table)
    console.print(
        f"oracle gain {summary['oracle_gain']:+.3f} nats, random element {summary['random_expected_gain']:+.3f} "
        f"-> headroom {summary['headroom_nats']:.3f} nats per sample (mean |M| {summary['mean_m']:.1f}) -> {cfg.out}",
        highlight=False,
    )


def headroom_markdown(summary: dict[str, Any], cfg: HeadroomConfig) -> str:
    lines = [
        f"# Share of the oracle headroom over random retrieval ({summary['split_label']}, {summary['n_samples']} annotated samples)",
        "",
        f"Samples: {summary['split_label']}."
        + (" The retriever chose its epoch on them, so automr's share here is optimistic; the held-out figure is on the test split."
           if summary["seen_by_early_stopping"] else ""),
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


