"""The `automr` command: one subcommand per pipeline stage.

Each subcommand is generated from the stage's pydantic config: every field becomes a flag
(its description is the help text), `--config FILE.yaml` loads a YAML file first, and flags
override it. The stage function is imported only when its command runs, so `automr --help`
stays fast (no torch import).
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from automr.config import StageConfig, load_config
from automr.errors import UserError
from automr.utils.logging import get_console
from automr.stages import STAGES, Stage, run_stage

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
err_console = get_console(stderr=True)


@app.callback()
def _root() -> None:
    """LLM-based generative recommendation with retrieved long-term memory (AutoMR)."""


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


# A CLI option, not a config field: config fields feed `automr run`'s up-to-date stamps.
_OVERWRITE = typer.Option(
    False, "--overwrite",
    help="Replace an existing output folder that automr did not write (refused without it; our own outputs are always replaced).",
)


def register_stage(stage: Stage) -> None:
    """Add the subcommand of `stage`: its config built from YAML + flags, then its runner called."""
    cls: type[StageConfig] = stage.config_class()
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML file with this stage's settings; flags override it."),
            annotation=Optional[Path],
        ),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=_OVERWRITE, annotation=bool),
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
        overwrite = kwargs.pop("overwrite")
        overrides = {}
        for key, value in kwargs.items():
            if value is None:
                continue
            if key in list_fields and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            overrides[key] = value
        cfg = load_config(cls, cfg_path, **overrides)
        run_stage(stage, cfg, overwrite=overwrite)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = stage.name.replace("-", "_")
    app.command(stage.name, help=stage.help)(command)


def _register_all() -> None:
    """One subcommand per registered stage; a stage that fails to import is an error, not hidden."""
    for stage in STAGES:
        register_stage(stage)


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML: one section per stage (see configs/demo.yaml)."),
    force: bool = typer.Option(False, help="Re-run stages even when their outputs are up to date."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Run the whole chain of stages from one YAML file, skipping stages that are up to date."""
    from automr.pipeline import run_pipeline_file

    run_pipeline_file(config, force=force, overwrite=overwrite)


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
