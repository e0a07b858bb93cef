"""The one gate every stage invocation passes through (`automr STAGE` and `automr run`): output safety.

Before a stage's runner writes anything, `run_stage`:

1. refuses an output that is, contains or lies inside one of the stage's inputs (every path in the
   config: Path fields, lists of them, and existing paths named by strings, mapping values included);
2. refuses an output path that is a file;
3. takes the output's lock (`.{name}.lock` beside it), so a second process writing the same folder
   refuses instead of mixing its parts with the first one's;
4. removes the output's own temporaries left by killed runs (named by pid; only of processes gone);
5. refuses an existing non-empty folder that automr did not write, unless `overwrite`: then the
   folder is set aside, deleted once the stage succeeds (and said so), and put back if it fails.

Our folders carry OUTPUT_MARKER (atomic_dir writes it; this module writes it into the folders that
resumable stages fill in place); folders of earlier versions are recognised by `automr run`'s stamp
or by a config.yaml of a stage. Under torchrun only rank 0 locks, cleans and claims (the others
would find its lock held); every rank makes the read-only checks.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from automr.errors import UserError
from automr.utils.logging import note
from automr.utils.io import (
    OUTPUT_MARKER,
    has_marker,
    output_lock,
    remove_path,
    remove_stale_temporaries,
    write_marker,
)

if TYPE_CHECKING:
    from automr.config import StageConfig


class Stage(Protocol):
    """What the guard reads of an automr.stages.Stage (a protocol: this module does not import the registry)."""

    @property
    def name(self) -> str: ...

    @property
    def output_field(self) -> str | None: ...

    @property
    def output_is_cache(self) -> bool: ...

    def config_class(self) -> type[StageConfig]: ...

    def runner(self) -> Callable[[Any], Any]: ...


def run_stage(stage: Stage, cfg: StageConfig, registry: Sequence[Stage], *, overwrite: bool = False) -> Any:
    """Run `stage` on `cfg` behind the output checks and lock (see the module docstring).

    `registry`: every stage, whose config.yaml files mark folders of earlier versions as ours
    (passed in by automr.stages, so this module does not import the registry back).
    """
    field = stage.output_field
    value = getattr(cfg, field) if field else None
    if field is None or value is None:  # fetch into the default user cache: nothing of the user's to protect
        return stage.runner()(cfg)
    out, flag = Path(value), _flag(field)
    check_overlap(cfg, field, out)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"{flag} {out} is an existing file, but {stage.name} writes a folder there. Choose another {flag} "
            "(nothing was written)."
        )
    if secondary_rank():
        return stage.runner()(cfg)
    with ExitStack() as stack:
        _enter_lock(stack, out, f"Wait for it to finish, or choose another {flag}.", f"{flag} {out}", writable=True)
        if stage.output_is_cache:
            _clean(out)
            return stage.runner()(cfg)
        return _run_claimed(stage, cfg, out, flag, overwrite, registry)


def _run_claimed(stage: Stage, cfg: StageConfig, out: Path, flag: str, overwrite: bool,
                 registry: Sequence[Stage]) -> Any:
    """Claim `out` (create it, or set aside a foreign folder if `overwrite`), run, then settle."""
    backup = _set_aside_foreign(stage, out, flag, overwrite, registry)
    _clean(out)  # only now: a foreign folder is refused or set aside before anything inside it is touched
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, stage.name)
    try:
        result = stage.runner()(cfg)
    except BaseException:
        if backup is not None:
            remove_path(out)
            backup.rename(out)
            _say(f"{stage.name} failed; {out} is restored as it was")
        elif created and out.is_dir() and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]:
            remove_path(out)  # nothing but our claim: leave nothing behind
        raise
    if out.is_dir():
        write_marker(out, stage.name)  # the runner may have replaced the folder or started it over
    if backup is not None:
        held = _describe(backup)
        remove_path(backup)
        _say(f"--overwrite: replaced {out} (it held {held})")
    return result


# A user's folder set aside by --overwrite until the stage succeeds. Not named like a temporary, so
# it is never removed as stale: if that run was killed, the user's data is still there to take back.
_SET_ASIDE = ".{name}.set-aside-by-automr-"


def _clean(out: Path) -> None:
    """Remove the stale temporaries of `out` (beside it and inside it), saying what went."""
    removed = remove_stale_temporaries(out)
    if removed:
        _say(f"removed {len(removed)} stale temporar{'y' if len(removed) == 1 else 'ies'} of killed runs: "
             + ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    prefix, ours = _SET_ASIDE.format(name=out.name), _SET_ASIDE.format(name=out.name) + str(os.getpid())
    for p in out.parent.iterdir() if out.parent.is_dir() else []:
        if p.name.startswith(prefix) and p.name != ours:
            _say(f"note: {p} holds the folder that an interrupted `--overwrite` run set aside; move it back or delete it")


def _set_aside_foreign(stage: Stage, out: Path, flag: str, overwrite: bool, registry: Sequence[Stage]) -> Path | None:
    """Refuse a non-empty folder automr did not write; with `overwrite`, rename it aside and return where."""
    if not out.is_dir() or not any(out.iterdir()) or is_ours(out, [stage, *registry]):
        return None
    if not overwrite:
        raise UserError(
            f"{flag} {out} is a folder that automr did not write ({_describe(out)}; no {OUTPUT_MARKER} and no "
            f"config.yaml of an automr stage in it). Refusing to replace it: choose a new or empty folder for {flag}, "
            f"or pass --overwrite to replace it (its contents are deleted once {stage.name} succeeds)."
        )
    backup = out.with_name(f"{_SET_ASIDE.format(name=out.name)}{os.getpid()}")
    out.rename(backup)
    _say(f"--overwrite: {out} ({_describe(backup)}) is set aside and will be deleted when {stage.name} succeeds")
    return backup


def is_ours(folder: Path, stages: Sequence[Stage]) -> bool:
    """Whether automr wrote `folder`: our marker, `automr run`'s stamp, or a config.yaml of one of `stages`."""
    return has_marker(folder) or _is_stage_config(Path(folder) / "config.yaml", stages)


def _is_stage_config(path: Path, stages: Sequence[Stage]) -> bool:
    """A config.yaml written by `save_config`: a mapping whose keys are all fields of some stage's config
    (tried in order, so the stage being run is imported first and usually the only one)."""
    import yaml

    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict) or not data:
        return False
    return any(set(data) <= set(s.config_class().model_fields) for s in stages)


def check_overlap(cfg: StageConfig, output_field: str, out: Path) -> None:
    """Refuse an output that is, contains or lies inside any input of `cfg`, naming both."""
    o, flag = out.resolve(), _flag(output_field)
    for name, path in config_paths(cfg, exclude=output_field):
        p = path.resolve()
        relation = ("is the same folder as" if o == p else "contains" if o in p.parents
                    else "lies inside" if p in o.parents else None)
        if relation is not None:
            raise UserError(
                f"the output {flag} {out} {relation} the input {_flag(name)} {path}: writing it would replace or mix "
                f"with that input. Choose an {flag} that is neither an input, nor inside one, nor above one (nothing was written)."
            )


def _flag(label: str) -> str:
    """'--method-options (automr.memory)' for the config path 'method_options.automr.memory'."""
    field, _, rest = label.partition(".")
    return "--" + field.replace("_", "-") + (f" ({rest})" if rest else "")


def config_paths(cfg: StageConfig, *, exclude: str | None = None) -> list[tuple[str, Path]]:
    """Every (field name, path) of `cfg` other than `exclude`: see `_paths` for what counts."""
    return [x for name in type(cfg).model_fields if name != exclude for x in _paths(name, getattr(cfg, name))]


def _paths(label: str, value: Any) -> list[tuple[str, Path]]:
    """Paths in a config value: Path values always; strings only when they name an existing file or folder
    (model names such as 'smollm2' are strings too); lists and mappings (method options) searched through."""
    if isinstance(value, Path):
        return [(label, value)]
    if isinstance(value, str):
        try:
            return [(label, Path(value))] if value.strip() and Path(value).exists() else []
        except (OSError, ValueError):  # a name too long, or with a NUL: not a path
            return []
    if isinstance(value, Mapping):
        return [x for k, v in value.items() for x in _paths(f"{label}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _paths(label, v)]
    return []


@contextmanager
def pipeline_lock(path: Path) -> Iterator[None]:
    """Hold the lock of a pipeline file (`.{name}.lock` beside it): two `automr run` of one file never both run.

    Each stage also locks its own output, which covers different files sharing outputs. A
    read-only config folder cannot hold the lock: then only the stage locks apply, and we say so.
    """
    with ExitStack() as stack:
        if not secondary_rank():
            _enter_lock(stack, Path(path).resolve(), "Wait for that `automr run` to finish.", str(path), writable=False)
        yield


def _enter_lock(stack: ExitStack, target: Path, advice: str, what: str, *, writable: bool) -> None:
    """Take `target`'s lock into `stack`. A file system without locks only gets a warning; a folder we
    cannot write beside is an error where the stage must write there (`writable`), else a warning."""
    try:
        stack.enter_context(output_lock(target, advice))
    except OSError as exc:
        if writable and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise UserError(f"cannot lock {what}: {exc}. Its parent folder must be writable.") from None
        _say(f"cannot lock {what} ({exc}); running without that lock")


def secondary_rank() -> bool:
    """A process of rank > 0 under torchrun / accelerate launch: rank 0 holds the locks for all of them."""
    return os.environ.get("RANK", "0") != "0"


def _describe(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def _say(message: str) -> None:
    note(f"automr: {message}")
