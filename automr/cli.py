"""The `automr` command: one subcommand per pipeline stage.

Each subcommand is generated from the stage's pydantic config: every field becomes a flag
(its description is the help text), `--config FILE.yaml` loads a YAML file first, and flags
override it. The stage function is imported only when its command runs, so `automr --help`
stays fast (no torch import).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.console import Console

from automr.config import StageConfig, load_config
from automr.errors import UserError

app = typer.Typer(
    name="automr",
    help=(
        "LLM-based generative recommendation with retrieved long-term memory (AutoMR).\n\n"
        "Stages hand off through files: prepare -> finetune -> build-memory -> annotate -> "
        "train-retriever -> evaluate -> report. `automr run CONFIG` runs the whole chain."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """LLM-based generative recommendation with retrieved long-term memory (AutoMR)."""


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """Map a field annotation to a CLI type; the bool says 'comma-separated list'."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        return str, True
    if origin is typing.Literal:
        return str, False
    if annotation in (int, float, bool, str, Path):
        return annotation, False
    return str, False


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        text += " \\[required]"
    elif field.default is not None and not callable(field.default):
        default = field.default if not isinstance(field.default, (list, tuple)) else ",".join(map(str, field.default))
        text += f" \\[default: {default}]"
    return text


def register_stage(name: str, config_path: str, run_path: str, help: str) -> None:
    """Add subcommand `name` that builds `config_path` from YAML + flags and calls `run_path`."""
    cls: type[StageConfig] = _import(config_path)
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML file with this stage's settings; flags override it."),
            annotation=Optional[Path],
        )
    ]
    list_fields: set[str] = set()
    for fname, field in cls.model_fields.items():
        typ, is_list = _flag_type(field.annotation)
        if is_list:
            list_fields.add(fname)
        flag = "--" + fname.replace("_", "-")
        decls = [f"{flag}/--no-{fname.replace('_', '-')}"] if typ is bool else [flag]
        params.append(
            inspect.Parameter(
                fname,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=_help(field), show_default=False),
                annotation=Optional[typ],
            )
        )

    def command(**kwargs: Any) -> None:
        cfg_path = kwargs.pop("config")
        overrides = {}
        for key, value in kwargs.items():
            if value is None:
                continue
            if key in list_fields and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            overrides[key] = value
        cfg = load_config(cls, cfg_path, **overrides)
        _import(run_path)(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    app.command(name, help=help)(command)


# name, config class, stage function, help. Keep configs importable without torch.
STAGES: list[tuple[str, str, str, str]] = [
    (
        "import-data",
        "automr.data.readers:ImportConfig",
        "automr.data.readers:run_import",
        "Convert raw data (Amazon 2018 JSON lines, MovieLens 100K/1M) into a common-format folder "
        "(interactions.parquet, items.parquet, stats.json).",
    ),
    (
        "fetch",
        "automr.data.fetch:FetchConfig",
        "automr.data.fetch:run_fetch",
        "Download a public data set (ml-100k) into the user cache, verify its checksum, convert it "
        "to the common format and print the folder.",
    ),
    (
        "synthetic",
        "automr.data.synthetic:SyntheticConfig",
        "automr.data.synthetic:run_synthetic",
        "Write seeded synthetic data with a planted long-term interest (series part 1 as an old "
        "cue, part 2 as the last interaction) plus planted.parquet.",
    ),
    (
        "prepare",
        "automr.data.protocol:PrepareConfig",
        "automr.data.protocol:run_prepare",
        "Read a data set, apply the temporal protocol (window, filters, K recent + memory) and "
        "write samples/{train,valid,test}.parquet, items.parquet and stats.json.",
    ),
    (
        "finetune",
        "automr.llm.finetune:FinetuneConfig",
        "automr.llm.finetune:run_finetune",
        "LoRA fine-tuning of the generative recommender (BIGRec) on prepared samples, loss on the "
        "target title only; resumable checkpoints, early stopping; writes adapter/ and train_log.jsonl.",
    ),
    (
        "tiny-lm",
        "automr.llm.tiny_stage:TinyLMConfig",
        "automr.llm.tiny_stage:run_tiny_lm",
        "Build a tiny random Llama (tokenizer trained on the catalogue titles) and train its upper layers "
        "memory-aware on prepared samples: a model folder for CPU tests and demos of the whole pipeline.",
    ),
    (
        "build-memory",
        "automr.memory.stage_configs:BuildMemoryConfig",
        "automr.memory.build:run_build_memory",
        "Build the AutoMR memory store: one element (layer-L key z_m, title-state value) per older "
        "interaction, once per user, plus each sample's query z_t (queries/{split}.npy). Shards by user under torchrun.",
    ),
    (
        "annotate",
        "automr.memory.stage_configs:AnnotateConfig",
        "automr.memory.annotate:run_annotate",
        "Score every sample's answer with the empty slot and with each memory element spliced in "
        "(shared-prefix kernel); raw log-probabilities in resumable parts, label statistics in stats.json.",
    ),
    (
        "train-retriever",
        "automr.memory.stage_configs:TrainRetrieverConfig",
        "automr.memory.train_stage:run_train_retriever",
        "Train the retriever MLP on annotations (KL to the labels), early-stopping on the validation "
        "headroom share; writes retriever.safetensors, metrics.json, history.jsonl.",
    ),
    (
        "headroom",
        "automr.memory.headroom:HeadroomConfig",
        "automr.memory.headroom:run_headroom",
        "Share of the oracle headroom over random retrieval that each retrieval method (automr, random, "
        "recent, oldest, rella) captures on annotated (validation) samples, with 95% intervals.",
    ),
    (
        "evaluate",
        "automr.eval.evaluator:EvaluateConfig",
        "automr.eval.evaluator:run_evaluate",
        "Fit/load each method, rank all items for every test sample, and write metrics.json "
        "(Recall@K, NDCG@K, 95% bootstrap intervals) and a Markdown table.",
    ),
    (
        "report",
        "automr.eval.report:ReportConfig",
        "automr.eval.report:run_report",
        "Results table, box plot of AutoMR against random retrieval over runs, plot of when the "
        "retrieved memories happened, and a static HTML report, from evaluation runs.",
    ),
]


def _register_all() -> None:
    for name, cfg, run, help_text in STAGES:
        try:
            register_stage(name, cfg, run, help_text)
        except (ImportError, AttributeError):
            # A stage whose module is not written yet is simply not offered.
            continue


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML: one section per stage (see configs/demo.yaml)."),
    force: bool = typer.Option(False, help="Re-run stages even when their outputs are up to date."),
) -> None:
    """Run the whole chain of stages from one YAML file, skipping stages that are up to date."""
    _import("automr.pipeline:run_pipeline_file")(config, force=force)


def main() -> None:
    """Entry point: user mistakes print a clear message (no stack trace) and exit 2."""
    _register_all()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
