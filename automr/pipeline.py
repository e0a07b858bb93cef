"""`automr run CONFIG`: run a chain of stages from one YAML file.

The YAML has one section per stage, in order, each holding that stage's config:

    stages:
      prepare:  {data: ..., preset: movielens-100k, out: runs/demo/data}
      evaluate: {samples: runs/demo/data, methods: [popularity, sasrec], run: runs/demo/eval}

A section may be repeated under another name with `stage:` naming the command, e.g.
`finetune-memory-aware: {stage: finetune, ...}`.

Up to date. After a stage runs, its output folder gets a stamp (`.automr-stage.json`) holding
  - the digest of its config;
  - the fingerprint of every input that no earlier stage of the pipeline writes (size, mtime and a
    sha256 of files up to 64 MiB; a folder's files likewise): the path-typed fields of its config
    other than its output, and path strings inside mappings such as evaluate's `method_options`;
  - the run id of every earlier stage it reads from (stage j reads from stage i when one of j's
    inputs lies inside i's output folder, or holds it), and its own new run id.
A stage is skipped when all of these match, so replacing an input file reruns the stage that reads
it and the stages that read from those, and nothing else; the reason is printed
("prepare: input raw/interactions.parquet changed"). A stage reruns when a stage it reads from reran,
whatever the new output holds. A string value counts as a path when it lies inside an earlier stage's
output, or exists and has a separator or a suffix: write a bare folder name in a mapping as `./name`.
Caches (`cache_dir`) are not inputs. Stamps written before inputs were stamped count as stale (one rerun).
An option added to a stage after its stamp was written does not make it stale while it stays at its
default (`same_config`): adding an option must not rerun hours of finished work.

Seeds: `seeds: [0, 1, 2]` (or `--seeds`) replicates the experiment; the rule is in automr/pipeline_seeds.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python

from automr.config import StageConfig, build_config, read_yaml
from automr.errors import UserError
from automr.pipeline_seeds import expand_seeds, seeds_of, stage_output
from automr.stages import BY_NAME, Stage, get_stage, run_stage
from automr.stages.guard import pipeline_lock
from automr.utils.fingerprint import changed_parts, is_within, path_fingerprint
from automr.utils.io import OUTPUT_MARKER, atomic_write_text
from automr.utils.logging import get_console, rule

console = get_console()
STAMP = ".automr-stage.json"
# Caches a stage fills itself: not inputs (each would look changed after every run); their entries
# are keyed by what made them.
CACHE_FIELDS = frozenset({"cache_dir"})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_pipeline(path: Path, *, check_paths: bool = False, seeds: list[int] | None = None) -> list[tuple[str, str, Any]]:
    """Validate every stage of a pipeline YAML (all problems at once); returns (label, command, config) in order.

    `check_paths`: also check that the paths evaluate's methods name (adapter, memory, retriever, ...)
    exist and are the right kind of output, except those an earlier stage of this pipeline writes.
    `seeds`: run the seed-dependent stages once per seed (module docstring); None reads `seeds:` from the YAML.
    """
    spec = read_yaml(path)
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{path}: expected a `stages:` mapping of stage name -> settings (see configs/demo.yaml)")
    seeds = seeds_of(spec, path) if seeds is None else seeds
    planned, problems, outputs = [], [], []
    for label, command, settings, cfg in expand_seeds(_parse_stages(path, stages, problems), seeds, path):
        if command == "evaluate":  # the methods' own options, checked by building them (nothing loads yet)
            from automr.methods.registry import build_methods

            _, method_problems = build_methods(
                cfg.methods, cfg.method_options, cfg.seed, check_paths=check_paths, produced=outputs
            )
            problems += [f"  - {label}: {p}" for p in method_problems]
        out = stage_output(BY_NAME[command], cfg)
        outputs += [out] if out is not None else []
        planned.append((label, command, cfg))
    if problems:
        raise UserError("the pipeline config has problems:\n" + "\n".join(problems))
    return planned


# -- stamps ------------------------------------------------------------------------------------
def _parse_stages(path: Path, stages: dict[str, Any], problems: list[str]) -> list[tuple[str, str, dict[str, Any], Any]]:
    """(label, command, raw settings, validated config) of every stage that validates; problems appended."""
    parsed = []
    for label, settings in stages.items():
        settings = dict(settings or {})
        command = settings.pop("stage", label)
        if command not in BY_NAME:
            problems.append(f"  - {label}: unknown stage {command!r}; expected one of {', '.join(BY_NAME)}")
            continue
        try:
            cfg = build_config(BY_NAME[command].config_class(), settings, source=f"{path} [stages.{label}]")
        except UserError as exc:
            problems.append(str(exc))
            continue
        parsed.append((label, command, settings, cfg))
    return parsed


def _names_path(text: str, produced: Iterable[Path]) -> bool:
    """Whether a string value (a `model` spec, a path inside `method_options`) names a path: it lies
    inside an earlier stage's output, or it exists and looks like a path (a separator or a suffix),
    so that a bare word that happens to name a folder here (`split: test`) is not taken for one."""
    try:
        if is_within(Path(text), produced):
            return True
        return ("/" in text or os.sep in text or bool(Path(text).suffix)) and Path(text).exists()
    except (OSError, ValueError):  # not a possible path at all (too long, a NUL byte)
        return False


def _paths_in(value: Any, produced: list[Path]) -> Iterator[Path]:
    """The paths inside a config value: Path objects (pydantic made every path-typed field one),
    path strings, and both inside lists and mappings (cache entries left out)."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, str):
        if _names_path(value, produced):
            yield Path(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in CACHE_FIELDS:
                yield from _paths_in(item, produced)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _paths_in(item, produced)


def stage_inputs(stage: Stage, cfg: StageConfig, produced: Iterable[Path] = ()) -> list[Path]:
    """Every path a stage's config names as an input: all but its output field and caches, in field order."""
    produced = list(produced)
    found: dict[str, Path] = {}
    for name in type(cfg).model_fields:
        if name != stage.output_field and name not in CACHE_FIELDS:
            found.update((str(p), p) for p in _paths_in(getattr(cfg, name), produced))
    return list(found.values())


def make_stamp(
    stage: Stage, cfg: StageConfig, earlier: dict[str, tuple[Path, str]], old: dict[str, Any] | None
) -> dict[str, Any]:
    """The stamp a stage's output must hold to be up to date: config digest, fingerprints of its inputs
    that no earlier stage writes, and the run ids of the earlier stages it reads from.

    `earlier`: label -> (output folder, run id) of the stages before it; `old`: the stamp there now, whose
    hashes are reused for files whose size and mtime did not change.
    """
    out = stage_output(stage, cfg)
    own = [out] if out is not None else []
    old_inputs = (old or {}).get("inputs") or {}
    inputs: dict[str, Any] = {}
    upstream: dict[str, str] = {}
    for p in stage_inputs(stage, cfg, [o for o, _ in earlier.values()]):
        if is_within(p, own):
            continue  # inside its own output (a resume folder): it writes it, it is not an input
        overlap = {label: o for label, (o, _) in earlier.items() if is_within(p, [o]) or is_within(o, [p])}
        upstream.update({label: earlier[label][1] for label in overlap})
        if not is_within(p, overlap.values()):  # what an earlier stage writes is covered by its run id
            inputs[str(p)] = path_fingerprint(p, old_inputs.get(str(p)), exclude=[*overlap.values(), *own])
    settings = _settings(cfg)
    return {"stage": stage.name, "config": _digest(settings), "settings": settings, "inputs": inputs, "upstream": upstream}


def _settings(cfg: StageConfig) -> dict[str, Any]:
    """The config as the stamp digests and keeps it: JSON values (paths as text)."""
    return json.loads(json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str))


def config_defaults(cfg: StageConfig) -> dict[str, Any]:
    """Each optional field's default, as `_settings` writes values (required fields left out)."""
    out = {}
    for name, field in type(cfg).model_fields.items():
        if not field.is_required():
            value = to_jsonable_python(field.get_default(call_default_factory=True))
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def saved_config_keys(out: Path | None) -> set[str] | None:
    """The fields of the config a stage saved beside its output (config.yaml), None without one: which
    options existed when a stamp older than stamps' `settings` was written."""
    path = out / "config.yaml" if out is not None else None
    try:
        saved = read_yaml(path) if path is not None and path.is_file() else None
    except (OSError, UserError):
        return None
    return set(saved) if isinstance(saved, dict) else None


def same_config(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any], legacy_keys: set[str] | None) -> bool:
    """Whether stamp `old` was made for the config of stamp `new`, allowing options added since at their defaults.

    An option is added with a default that keeps what earlier versions computed (the rule for adding
    one), so a run made before it existed is still up to date while the option stays at its default;
    otherwise every new flag would rerun hours of finished stages. The options the old stamp knew are
    its `settings` keys, or for a stamp written before stamps kept them, the keys of the config.yaml
    the stage saved (`legacy_keys`); the known part of the new config must then digest to the old digest.
    """
    if old.get("stage") != new["stage"]:
        return False
    if old.get("config") == new["config"]:
        return True
    known = set(old["settings"]) if isinstance(old.get("settings"), dict) else legacy_keys
    if known is None:
        return False
    added = [k for k in new["settings"] if k not in known]
    if any(k not in defaults or new["settings"][k] != defaults[k] for k in added):
        return False
    return _digest({k: v for k, v in new["settings"].items() if k in known}) == old.get("config")


def stale_reasons(old: dict[str, Any] | None, new: dict[str, Any], defaults: dict[str, Any] | None = None,
                  legacy_keys: set[str] | None = None) -> list[str]:
    """Why a stage whose output holds stamp `old` must rerun to match stamp `new`; [] when it is up to date.
    `defaults`, `legacy_keys`: see `same_config` (without them any config difference counts)."""
    if old is None:
        return ["not run yet (no stamp in its output folder)"]
    if not isinstance(old.get("inputs"), dict) or not isinstance(old.get("upstream"), dict) or "id" not in old:
        return ["its stamp is from an older automr or unreadable"]
    reasons = [] if same_config(old, new, defaults or {}, legacy_keys) else ["config changed"]
    for key, fp in new["inputs"].items():
        if key not in old["inputs"]:
            reasons.append(f"new input {key}")
            continue
        parts = changed_parts(old["inputs"][key], fp)
        reasons += [f"input {Path(key, part).as_posix() if part else key} changed" for part in parts[:3]]
        if len(parts) > 3:
            reasons.append(f"and {len(parts) - 3} more files of input {key}")
    reasons += [f"{label} reran" for label, run_id in new["upstream"].items() if old["upstream"].get(label) != run_id]
    return reasons


def output_fingerprint(out: Path) -> dict[str, Any]:
    """A stage output's content (the stamp and the ownership marker, rewritten by every run, left out).

    A stage that reruns and leaves its output as it was (a finished fine-tuning asked again with an option
    that changes nothing it wrote) keeps its run id, so that the hours of stages reading it do not rerun."""
    fp = path_fingerprint(out)
    files = fp.get("files") or {}
    for rel in [r for r in files if r == STAMP or Path(r).name == OUTPUT_MARKER]:
        del files[rel]
    return fp


def _read_stamp(stamp_file: Path) -> dict[str, Any] | None:
    if not stamp_file.is_file():
        return None
    try:
        old = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return old if isinstance(old, dict) else {}


# -- the run -----------------------------------------------------------------------------------
def run_pipeline_file(
    path: Path, *, force: bool = False, overwrite: bool = False, seeds: list[int] | None = None
) -> list[tuple[str, str]]:
    """Run every stage of a pipeline YAML in order, skipping up-to-date ones; returns (label, "ran" or
    "up to date") per stage. `overwrite`: see `automr.stages.run_stage`; `seeds`: see the module docstring."""
    # Validate every stage first, so a typo in the last stage fails before hours of work.
    planned = plan_pipeline(path, check_paths=True, seeds=seeds)
    with pipeline_lock(path):  # two `automr run` of one file must not both start; stages lock their outputs
        return _run_planned(planned, force=force, overwrite=overwrite)


def _run_planned(planned: list[tuple[str, str, Any]], *, force: bool, overwrite: bool) -> list[tuple[str, str]]:
    """Run the validated stages in order, skipping up-to-date ones."""
    earlier: dict[str, tuple[Path, str]] = {}  # label -> (output folder, run id) of stages with an output
    outcomes: list[tuple[str, str]] = []
    for label, command, cfg in planned:
        stage = get_stage(command)
        out = stage_output(stage, cfg)
        stamp_file = out / STAMP if out is not None else None  # no output folder (fetch): runs every time
        old, before = None, None  # the stamp there, and the output's content before a rerun
        if stamp_file is not None:
            old = _read_stamp(stamp_file)
            stamp = make_stamp(stage, cfg, earlier, old)
            reasons = ["--force"] if force else stale_reasons(old, stamp, config_defaults(cfg), saved_config_keys(out))
            if old and not reasons:
                console.print(f"[dim]- {label}: up to date ({out})[/dim]")
                earlier[label] = (out, old["id"])
                outcomes.append((label, "up to date"))
                continue
            console.print(f"- {label}: {'; '.join(reasons)}", highlight=False)
            before = output_fingerprint(out) if old and old.get("id") else None
            stamp_file.unlink(missing_ok=True)  # our own file: a rerun that fails must not look up to date
        rule(f"[bold]{label}[/bold]")
        t0 = time.perf_counter()
        run_stage(stage, cfg, overwrite=overwrite)
        elapsed = time.perf_counter() - t0
        kept = ""
        if out is not None and stamp_file is not None:
            kept = _write_stamp(out, stamp, old, before, elapsed)
            earlier[label] = (out, stamp["id"])
        console.print(f"[green]- {label}: done in {elapsed:.1f} s{kept}[/green]")
        outcomes.append((label, "ran"))
    return outcomes


def _write_stamp(out: Path, stamp: dict[str, Any], old: dict[str, Any] | None, before: dict[str, Any] | None,
                 elapsed: float) -> str:
    """Stamp a stage's output after it ran: a new run id, or the old one where the output is as it was
    (`output_fingerprint`); returns the note the console line gets."""
    unchanged = old is not None and before is not None and output_fingerprint(out) == before
    stamp.update(id=old["id"] if unchanged and old else uuid.uuid4().hex, seconds=round(elapsed, 1))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / STAMP, json.dumps(stamp, indent=2))
    return "; its output is unchanged, so the stages reading it stay up to date" if unchanged else ""
