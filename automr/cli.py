"""The `automr` command: one subcommand per pipeline stage.

Each subcommand is generated from the stage's pydantic config: every field becomes a flag
(its description is the help text), `--config FILE.yaml` loads a YAML file first, and flags
override it. The stage function is imported only when its command runs, so `automr --help`
stays fast (no torch import).

Exit status (main): 0 done; 2 a user mistake (bad flag or value, bad config, bad input files, a
full disk), one message and no stack trace; 130 / 143 interrupted by SIGINT / SIGTERM, both
raised as KeyboardInterrupt so that cleanups run (atomic_dir removes its temporary folder).
"""

from __future__ import annotations

import enum
import errno
import functools
import inspect
import json
import os
import signal
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.text import Text

from automr.config import StageConfig, load_config
from automr.errors import UserError
from automr.stages import STAGES, Stage, run_stage
from automr.utils.logging import get_console

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
    # Click's plain help formatter, not rich's panels: at 80 columns rich's option table cuts long
    # flag names short (`--window-last-mont...`), the plain one puts a long name on its own line.
    # It also prints help text as written, so no field description needs markup escapes.
    rich_markup_mode=None,
)
err_console = get_console(stderr=True)
EXIT_USER_ERROR = 2


def _print_version(value: bool) -> None:
    """`--version`: the installed distribution's version, else the source tree's `__version__`."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("automr")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from automr import __version__ as text
    typer.echo(f"automr {text}")
    raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
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


def _default_text(field: FieldInfo) -> str | None:
    """A field's default as it would be typed on the command line; None when there is none to show.

    A field with a default factory has `default` PydanticUndefined: call the factory instead
    (unless it needs the other fields' values, which --help does not have).
    """
    if field.is_required():
        return None
    if field.default_factory is not None:
        if field.default_factory_takes_validated_data:
            return None
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return None
    if isinstance(value, (list, tuple)):  # list flags are comma-separated
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, dict):  # mapping flags take YAML/JSON text
        return json.dumps(value)
    return str(value.value if isinstance(value, enum.Enum) else value)


def _help(field: FieldInfo) -> str:
    """A flag's help: the field's description, then [required] or its default."""
    text = field.description or ""
    if field.is_required():
        return f"{text} [required]".strip()
    default = _default_text(field)
    return text if default is None else f"{text} [default: {default}]".strip()


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
    arguments = tuple(getattr(cls, "cli_arguments", ()))  # fields given by position (`automr serve RUN`)
    for fname in arguments:
        typ, _ = _flag_type(cls.model_fields[fname].annotation)
        params.insert(0, inspect.Parameter(
            fname, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[typ],
            default=typer.Argument(None, help=_help(cls.model_fields[fname]), show_default=False),
        ))
    for fname, field in cls.model_fields.items():
        if fname in arguments:
            continue
        typ, is_list = _flag_type(field.annotation)
        if is_list:
            list_fields.add(fname)
        flag = "--" + fname.replace("_", "-")
        decls = [f"{flag}/--no-{fname.replace('_', '-')}"] if typ is bool else [flag]
        params.append(
            inspect.Parameter(
                fname,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=_help(field), show_default=False,
                                     metavar="<a,b,...>" if is_list else None),
                # a list field's flag may repeat (--runs A --runs B) and each may hold commas (--runs A,B)
                annotation=Optional[list[typ]] if is_list else Optional[typ],  # type: ignore[valid-type]
            )
        )

    def command(**kwargs: Any) -> None:
        cfg_path = kwargs.pop("config")
        overwrite = kwargs.pop("overwrite")
        overrides = {}
        for key, value in kwargs.items():
            if key in list_fields and value is not None:
                parts = [value] if isinstance(value, str) else list(value)
                value = [v.strip() for part in parts for v in str(part).split(",") if v.strip()] or None
            if value is None:
                continue
            overrides[key] = value
        cfg = load_config(cls, cfg_path, **overrides)
        run_stage(stage, cfg, overwrite=overwrite)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = stage.name.replace("-", "_")
    app.command(stage.name, help=stage.help)(command)


@functools.cache  # once per process: main() may run more than once in one (tests)
def _register_all() -> None:
    """One subcommand per registered stage; a stage that fails to import is an error, not hidden."""
    for stage in STAGES:
        register_stage(stage)


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML: one section per stage (see configs/demo.yaml)."),
    force: bool = typer.Option(False, help="Re-run stages even when their outputs are up to date."),
    overwrite: bool = _OVERWRITE,
    seeds: str | None = typer.Option(
        None, help="Comma-separated seeds, e.g. 0,1,2: the seed-dependent stages run once per seed into "
        "seed-S folders, the others are shared, the report covers every seed (overrides the YAML's `seeds:`).",
    ),
) -> None:
    """Run the whole chain of stages from one YAML file, skipping stages that are up to date."""
    from automr.pipeline import run_pipeline_file
    from automr.pipeline_seeds import parse_seeds

    run_pipeline_file(config, force=force, overwrite=overwrite, seeds=parse_seeds(seeds) if seeds is not None else None)


def _print_error(message: str) -> None:
    """`error: <message>` on stderr, verbatim.

    A rich Text is never read as markup, so a label such as `[stages.prepare]` is printed as
    written (an f-string passed to Console.print loses it as an unknown style tag); soft_wrap
    keeps long paths on one line for copying.
    """
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, innermost last (cycles cut)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _disk_full_message(exc: BaseException) -> str | None:
    """The message for an error caused by a full disk, or None when `exc` is something else.

    Python's own writes raise OSError(ENOSPC) and name the file when they know it; pyarrow raises
    OSError with errno 28 and no file name; polars raises ComputeError whose text alone says it
    ("No space left on device (os error 28)"). So the errno and the text are both checked, along
    the chain of causes.
    """
    no_space = os.strerror(errno.ENOSPC)
    for e in _exception_chain(exc):
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or no_space in str(e):
            path = (getattr(e, "filename", None) or getattr(e, "filename2", None)) if isinstance(e, OSError) else None
            where = f"writing {path}" if path else f"writing an output file (the error did not name it: {e})"
            return (
                f"the disk is full ({no_space}) {where}. Free space on that disk (`df -h` shows it) or "
                "write the output to another disk, then run the command again."
            )
    return None


@contextmanager
def _interrupts_trapped() -> Iterator[list[int]]:
    """While the command runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does; yields the signals seen.

    SIGTERM would end the process on the spot, so `atomic_dir` could not remove its temporary
    folder; as an exception it unwinds like Ctrl-C and every cleanup on the way runs. The list
    tells main() which signal came (typer reports both as 130). A SIGTERM the parent set to
    SIG_IGN stays ignored.

    SIGINT keeps Python's own handler: installing one after polars is imported replaces polars'
    native handler, and Ctrl-C then waits for a running query to end (a minute, measured, instead
    of at once). Polars passes the signal on to Python's handler too, so one Ctrl-C can raise
    KeyboardInterrupt twice; the second often lands in a finalizer (a progress bar's generator
    closed while unwinding), where Python prints "Exception ignored ... Traceback" and drops it.
    The unraisable hook records such an interruption instead of printing it.
    """
    seen: list[int] = []

    def on_sigterm(signum: int, frame: types.FrameType | None) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    def on_unraisable(args: Any) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, KeyboardInterrupt):
            if not seen:
                seen.append(signal.SIGINT)
        else:
            previous_hook(args)

    previous_hook, sys.unraisablehook = sys.unraisablehook, on_unraisable
    previous = signal.getsignal(signal.SIGTERM)
    trap = previous != signal.SIG_IGN
    if trap:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield seen
    finally:
        sys.unraisablehook = previous_hook
        if trap:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(signals: list[int]) -> int:
    """Report an interruption; the exit status is 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""
    signum = signals[0] if signals else signal.SIGINT
    err_console.print(f"interrupted ({signal.Signals(signum).name})", markup=False, highlight=False)
    return 128 + signum


def _positional_config_hint(argv: list[str], problem: str) -> str | None:
    """`automr evaluate X.yaml`: the stage commands read a YAML file with -c, and a pipeline config (one
    with `stages:`) runs with `automr run`; say both where a YAML file came as an extra argument."""
    if "unexpected extra argument" not in problem or len(argv) < 2:
        return None
    command = argv[0]
    after_flag = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")}
    yamls = [a for a in argv[1:] if a.endswith((".yaml", ".yml")) and a not in after_flag]
    if not yamls:
        return None
    y = yamls[0]
    return (f"hint: `automr {command}` reads a YAML file of its settings with -c: automr {command} -c {y}; "
            f"a config with `stages:` runs every stage with: automr run {y}")


def _run_app(argv: list[str] | None, signals: list[int]) -> int:
    """Run the typer app and turn every way it can end into an exit status (see the module docstring)."""
    try:
        # standalone_mode=False lets UserError through to here. Then typer *returns* exit codes
        # instead of exiting, KeyboardInterrupt included (it becomes a returned 130): ignoring the
        # returned value is why an interrupted stage used to exit 0.
        result = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:  # typer converts those raised inside its main; this is any other
        return _interrupted(signals)
    except typer.Abort:  # EOF at a prompt
        err_console.print("aborted")
        return 130
    except UserError as exc:
        _print_error(str(exc))
        return EXIT_USER_ERROR
    except typer.TyperException as exc:  # usage errors: the base of typer's vendored click exceptions
        if hasattr(exc, "show"):  # click's own format: usage line, the problem, where to get help
            exc.show()
        else:
            _print_error(exc.format_message())
        hint = _positional_config_hint(sys.argv[1:] if argv is None else argv, exc.format_message())
        if hint:
            err_console.print(hint, markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:
        message = _disk_full_message(exc)
        if message is None:
            raise  # a bug: the traceback is what its report needs
        _print_error(message)
        return EXIT_USER_ERROR
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    return _interrupted(signals) if signals or code == 130 else code


def main(argv: list[str] | None = None) -> None:
    """Entry point of `automr` and `python -m automr`; argv defaults to sys.argv[1:]."""
    _register_all()
    with _interrupts_trapped() as signals:
        code = _run_app(argv, signals)
    sys.exit(code)


if __name__ == "__main__":
    main()
