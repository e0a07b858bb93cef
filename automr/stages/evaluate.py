"""`automr evaluate`: build every method, rank the catalogue for each sample, write metrics.

The config, the methods' option checks and the runner; the ranking loop, metrics and paired tests
live in automr/eval/evaluator.py, the methods in automr/methods/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from automr.config import StageConfig, parse_mapping, save_config
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.eval.evaluator import (
    DEFAULT_COMPARE,
    _rich_table,
    evaluate_methods,
    metrics_markdown,
    paired_tests,
)
from automr.eval.metrics import max_k
from automr.eval.ranking import ExcludeHistory, resolve_exclude_history
from automr.eval.resume import resumable_results, save_resume_record
from automr.eval.reuse import copy_predictions, reused_results
from automr.methods.registry import METHODS, build_methods, is_known
from automr.utils.io import atomic_write_text, write_json
from automr.utils.logging import get_console
from automr.utils.seeding import select_subset


class EvaluateConfig(StageConfig):
    """Settings of `automr evaluate`."""

    samples: Path = Field(description="prepared data folder (the output of `automr prepare`)")
    methods: list[str] = Field(
        description=f"methods to evaluate, comma-separated; known: {', '.join(METHODS)}; KIND@LABEL names a variant of one "
        "with its own method_options",
        min_length=1,
    )
    run: Path = Field(description="output folder for metrics, predictions and each method's work folder")
    split: Literal["train", "valid", "test"] = Field("test", description="which split's samples to rank")
    n_eval: int = Field(
        0, ge=0, description="evaluate a seeded random subset of this many samples (0 = all); same subset for every method"
    )
    seed: int = Field(0, description="seed for the subset, the methods and the bootstrap")
    subset_seed: int | None = Field(
        None, description="seed of the n_eval subset alone (default: seed); pin it so that every seed of "
        "`automr run --seeds` scores the same samples (the ones build-memory covered)"
    )
    annotated: Path | None = Field(
        None, description="evaluate exactly the samples this annotate output labelled (of `split`; n_eval then picks "
        "among them): the samples of the headroom table, and the only ones the `oracle` diagnostic can score"
    )
    n_boot: int = Field(1000, ge=1, description="bootstrap resamples for the 95% intervals and paired tests")
    batch_size: int = Field(256, ge=1, description="samples per recommend() call")
    k: int = Field(10, ge=max_k(), description="length of each saved ranked list (>= 10, the deepest metric)")
    exclude_history: ExcludeHistory = Field(
        "auto", description="drop each sample's recent + memory items from every method's ranking: true, false, or "
        "auto (true when at most 1% of training targets repeat an item of their history; prepare's stats.json repeat_rate)"
    )
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method settings, e.g. {sasrec: {epochs: 20}} (YAML mapping; on the command line a YAML/JSON string)",
    )
    reuse: list[Path] = Field(
        default_factory=list,
        description="earlier evaluation runs whose predictions stand for methods of this one evaluated there with the "
        "same settings (data, split, samples, k, history exclusion, method_options; any difference is an error), "
        "e.g. the seed-independent methods evaluated once for every seed of `automr run --seeds`",
    )
    resume: bool = Field(
        True, description="keep the methods an earlier evaluation into this run folder finished with the same settings "
        "(an interrupted one included) instead of ranking them again; false: rank every method afresh",
    )
    compare: list[str] | None = Field(
        None,
        description="paired bootstrap tests as a:b pairs (a minus b); default automr:bigrec and automr:random when both are evaluated",
    )

    @field_validator("method_options", mode="before")
    @classmethod
    def _parse_options(cls, value: Any) -> Any:
        return parse_mapping(value)  # YAML text from the command line

    @field_validator("methods")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        dupes = sorted({m for m in value if value.count(m) > 1})
        if dupes:
            raise ValueError(f"methods listed more than once: {', '.join(dupes)}")
        return value

    def compare_pairs(self) -> list[tuple[str, str]]:
        """The (a, b) pairs to test; the default pairs only where both methods are evaluated."""
        if self.compare is None:
            return [(a, b) for a, b in DEFAULT_COMPARE if a in self.methods and b in self.methods]
        return [tuple(p.split(":", 1)) for p in self.compare]  # type: ignore[misc]

    def problems(self) -> list[str]:
        """Every mistake that `run_evaluate` would hit, found before fitting anything."""
        out: list[str] = []
        unknown = [m for m in self.methods if not is_known(m)]
        if unknown:
            out.append(f"unknown method(s) {', '.join(map(repr, unknown))}; known methods: {', '.join(METHODS)}, "
                       "or a variant KIND@LABEL of one (e.g. bigrec@bf16, with its own method_options entry)")
        for p in self.compare or []:
            a, sep, b = p.partition(":")
            if not sep or not a or not b:
                out.append(f"compare entry {p!r} is not of the form a:b (e.g. automr:bigrec)")
            elif a not in self.methods or b not in self.methods:
                out.append(f"compare entry {p!r} names a method that is not in methods ({', '.join(self.methods)})")
            elif a == b:
                out.append(f"compare entry {p!r} compares a method with itself")
        stray = [m for m in self.method_options if m not in self.methods]
        if stray:
            out.append(
                f"method_options for {', '.join(map(repr, stray))}, which is not in methods ({', '.join(self.methods)}); "
                "remove them or add the method"
            )
        if not self.samples.is_dir():
            out.append(f"samples folder {self.samples} does not exist; create it with `automr prepare --out {self.samples}`")
        if self.annotated is not None:
            out += self._annotated_problems()
        return out

    def _annotated_problems(self) -> list[str]:
        from automr.memory.annotate import annotations_problem
        from automr.stages.annotate import annotate_config

        assert self.annotated is not None
        if (problem := annotations_problem(self.annotated)) is not None:
            return [f"annotated: {problem}"]
        acfg = annotate_config(self.annotated)
        out = []
        if acfg.split != self.split:
            out.append(f"annotated: {self.annotated} labels the {acfg.split!r} split, but this evaluation ranks {self.split!r}; "
                       f"set `split: {acfg.split}` or name annotations of the {self.split} split")
        if Path(acfg.samples).resolve() != self.samples.resolve():
            out.append(f"annotated: {self.annotated} labels samples of {acfg.samples}, not of {self.samples}")
        return out


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every method of `cfg` and write the run folder; returns the metrics.json mapping."""
    recommenders = _checked_methods(cfg)
    console = get_console()
    data = PreparedData.load(cfg.samples)
    split, rows, subset_note = _evaluated_samples(cfg, data)
    samples = split[rows] if rows.shape[0] < split.height else split
    exclude, why = resolve_exclude_history(cfg.exclude_history, data)  # before the run folder: may refuse
    eval_info: dict[str, Any] = {
        "samples": str(cfg.samples), "split": cfg.split, "n_split": split.height, "n_eval": int(rows.shape[0]),
        "subset": subset_note, "seed": cfg.seed, "n_boot": cfg.n_boot,
        "rows": rows if rows.shape[0] < split.height else "all",
        "exclude_history": exclude, "exclude_history_reason": why,
    }
    mine = cfg.model_dump(mode="json")
    reused = reused_results(cfg.reuse, cfg.methods, mine, eval_info, rows)  # may refuse: before writing
    run = Path(cfg.run)
    left = [m for m in cfg.methods if m not in reused]
    resumed = resumable_results(run, left, mine, eval_info, rows, cfg.n_boot, cfg.seed) if cfg.resume else {}
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run)
    console.print(f"evaluating {', '.join(cfg.methods)} on {subset_note}\n{why}")
    for name, res in reused.items():
        console.print(f"[bold]{name}[/bold]: reused from {res.timings['reused_from']} (same settings), recall@10 {res.summary['recall@10']:.4f}")
    for name, res in resumed.items():
        console.print(f"[bold]{name}[/bold]: already ranked in this run folder with the same settings (--no-resume ranks it "
                      f"again), recall@10 {res.summary['recall@10']:.4f}")
    copy_predictions(reused, run / "predictions")
    for res in reused.values():
        save_resume_record(run / "predictions", mine, eval_info, res)
    fresh = evaluate_methods(
        data, {n: r for n, r in recommenders.items() if n in left and n not in resumed}, samples, work_root=run / "methods",
        k=cfg.k, batch_size=cfg.batch_size, n_boot=cfg.n_boot, seed=cfg.seed, predictions_dir=run / "predictions",
        rows=rows, console=console, exclude_history=exclude,
        on_result=lambda res: save_resume_record(run / "predictions", mine, eval_info, res),
    )
    results = reused | resumed | fresh
    results = {name: results[name] for name in cfg.methods}
    metrics = {name: r.summary for name, r in results.items()}
    paired = {
        f"{a}:{b}": paired_tests(results[a].per_sample, results[b].per_sample, n_boot=cfg.n_boot, seed=cfg.seed)
        for a, b in cfg.compare_pairs()
    }
    eval_info["timings"] = {name: r.timings for name, r in results.items()}
    eval_info["seen_in_top_k"] = {name: round(r.seen_share, 4) for name, r in results.items()}
    _write_run(cfg, run, data, metrics, paired, eval_info, console)
    return metrics


def _checked_methods(cfg: EvaluateConfig) -> dict[str, Any]:
    """Every method built and every path its options name checked, before anything is fitted or written,
    so a bad retriever path of the last method does not fail after the first methods ran."""
    recommenders, method_problems = build_methods([m for m in cfg.methods if is_known(m)], cfg.method_options, cfg.seed)
    problems = cfg.problems() + method_problems
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the evaluate config:\n" + "\n".join(f"  - {p}" for p in problems))
    return recommenders


def _evaluated_samples(cfg: EvaluateConfig, data: PreparedData) -> tuple[Any, Any, str]:
    """(the split, the evaluated rows, a sentence saying which they are)."""
    split = data.split(cfg.split)
    if split.height == 0:
        raise UserError(
            f"split {cfg.split!r} of {cfg.samples} has no samples; choose another split or re-run "
            "`automr prepare` with a window that leaves samples in it"
        )
    subset_seed = cfg.seed if cfg.subset_seed is None else cfg.subset_seed
    if cfg.annotated is not None:
        import numpy as np

        from automr.memory.annotate import load_annotations

        labelled = np.sort(load_annotations(cfg.annotated)["sample_index"].to_numpy().astype(np.int64))
        rows = labelled[select_subset(len(labelled), cfg.n_eval, subset_seed)]
        return split, rows, f"{rows.shape[0]} of the {len(labelled)} {cfg.split} samples annotated in {cfg.annotated}"
    rows = select_subset(split.height, cfg.n_eval, subset_seed)
    note = (
        f"all {split.height} {cfg.split} samples"
        + (f" (n_eval={cfg.n_eval} asked for more than the {split.height} that exist)" if cfg.n_eval > split.height else "")
        if rows.shape[0] == split.height
        else f"a seeded random subset (seed {subset_seed}) of {rows.shape[0]} of the {split.height} {cfg.split} samples, the same for every method"
    )
    return split, rows, note


def _write_run(
    cfg: EvaluateConfig, run: Path, data: PreparedData, metrics: dict[str, Any], paired: dict[str, Any],
    eval_info: dict[str, Any], console: Any,
) -> None:
    """metrics.json, paired.json, eval.json and metrics.md, and the table and paired tests on the console."""
    write_json(run / "metrics.json", metrics)
    write_json(run / "paired.json", paired)
    write_json(run / "eval.json", eval_info)
    excluded = " minus each sample's history" if eval_info["exclude_history"] else ""
    header = (
        f"# Evaluation on {cfg.samples}\n\nSamples: {eval_info['subset']}. Full ranking over {data.items.height} items"
        f"{excluded}. Cells: mean [95% percentile bootstrap interval, {cfg.n_boot} resamples, seed {cfg.seed}]."
    )
    atomic_write_text(run / "metrics.md", metrics_markdown(metrics, paired, header))
    console.print(_rich_table(metrics, title=f"{cfg.split}: {eval_info['subset']}"))
    for pair, res in paired.items():
        r = res["recall@1"]
        console.print(f"paired {pair}: recall@1 diff {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}], p={r['p_value']:.3g}")
    console.print(f"wrote {run / 'metrics.json'}, {run / 'metrics.md'}, {run / 'paired.json'}, {run / 'predictions'}")
