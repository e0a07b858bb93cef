"""How `automr run` replicates an experiment over seeds: which stages run once per seed, where they write.

`seeds: [0, 1, 2]` at the top of the YAML (or `automr run CONFIG --seeds 0,1,2`, which wins)
replicates the experiment. The rule, stage by stage in order:
  - a stage runs once per seed when its output depends on the seed: its config has a `seed`, the YAML
    section does not set one (an explicit `seed:` pins the stage and shares it), and the stage says the
    seed changes what it writes given its other settings (`StageConfig.seed_affects_output`): always for
    finetune, tiny-lm, train-retriever, headroom and evaluate; for build-memory and annotate only when
    they build a seeded subset (max_users / max_samples); never for the data stages (synthetic,
    prepare, import-data, fetch), whose seed chooses the data that every seed shares;
  - a stage also runs once per seed when it reads from a stage that does (its input differs per seed);
  - every other stage runs once and is shared; `report` gathers: each entry of its lists that names a
    per-seed output becomes one entry per seed.
A per-seed stage's output moves from ROOT/rel to ROOT/seed-S/rel (ROOT: the folder holding every
stage's output folder), its `seed` is S, and every path inside another per-seed output is rewritten
likewise. Each copy is its own stage, labelled `label/seed-S`, with its own stamp, so up-to-date
checks and resumption work per seed.
An evaluation whose slow methods read no per-seed output (BIGRec, the baselines) can run them once, in a
stage with `seed:` pinned, and each seed's evaluate reads their predictions with `reuse:` (automr/eval/reuse.py;
configs/movielens-100k-cpu.yaml does this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from automr.config import StageConfig, build_config
from automr.errors import UserError
from automr.stages import BY_NAME, Stage


def stage_output(stage: Stage, cfg: StageConfig) -> Path | None:
    """The folder a stage writes (its `output_field`), or None for one without an output folder."""
    value = getattr(cfg, stage.output_field, None) if stage.output_field else None
    return Path(value) if value is not None else None


GATHERS_SEEDS = frozenset({"report"})  # stages that read every seed's outputs instead of running per seed


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (the --seeds option), with a clear error for anything else."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    return _checked_seeds(seeds, "--seeds")


def _checked_seeds(seeds: list[int], where: str) -> list[int]:
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: expected a non-empty list of distinct integer seeds, got {seeds!r}")
    return seeds


def seeds_of(spec: dict[str, Any], path: Path) -> list[int] | None:
    """The YAML's top-level `seeds:` list, or None."""
    value = spec.get("seeds")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{path}: `seeds:` must be a list of integers, e.g. seeds: [0, 1, 2]; got {value!r}")
    return _checked_seeds(value, f"{path}: seeds")


def seed_folder(out: Path, root: Path, seed: int) -> Path:
    """Where seed `seed` of the stage writing `out` writes: ROOT/seed-S/<out relative to ROOT>."""
    return root / f"seed-{seed}" / Path(os.path.relpath(out, root))


def _seed_root(outputs: list[Path]) -> Path:
    """The folder holding every stage's output folder (relative where they all are)."""
    parents = [str(p.parent) for p in outputs]
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # relative and absolute mixed
        return Path(os.path.commonpath([str(Path(p).resolve()) for p in parents]))


def _rewrite(value: Any, moved: dict[Path, Path], gather: bool) -> Any:
    """`value` with every path inside a moved folder (old -> one new folder per seed) moved.

    A path maps to a list of per-seed paths; outside lists (gather=False) the caller has one seed, so
    each mapping holds one folder. In a gathering stage a list entry expands to one entry per seed.
    """
    if isinstance(value, dict):
        return {k: _rewrite(v, moved, gather) for k, v in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            new = _moved_path(item, moved)
            out += new if new is not None else [_rewrite(item, moved, gather)]
        return out
    new = _moved_path(value, moved)
    if new is None:
        return value
    if len(new) != 1:
        raise UserError(f"{value} is written once per seed; name it in a list so that every seed's copy is read")
    return new[0]


def _moved_path(value: Any, moved: dict[Path, Path | list[Path]]) -> list[str] | None:
    """The per-seed path(s) of a string / path value inside a moved folder, or None."""
    if not isinstance(value, str | Path) or not str(value):
        return None
    try:
        resolved = Path(value).resolve()
    except (OSError, ValueError):
        return None
    for old, new in moved.items():
        old_r = old.resolve()
        if resolved.is_relative_to(old_r):
            rel = resolved.relative_to(old_r)
            return [str(n / rel) if rel.parts else str(n) for n in (new if isinstance(new, list) else [new])]
    return None


def expand_seeds(
    parsed: list[tuple[str, str, dict[str, Any], Any]], seeds: list[int] | None, path: Path
) -> list[tuple[str, str, dict[str, Any], Any]]:
    """Each stage as it runs with `seeds` (module docstring): once, or once per seed into seed-S folders."""
    if not seeds:
        return parsed
    outs = [o for _, command, _, cfg in parsed if (o := stage_output(BY_NAME[command], cfg)) is not None]
    root = _seed_root(outs) if outs else Path(".")
    per_seed: dict[Path, list[Path]] = {}  # output folder of a per-seed stage -> its folder for each seed
    expanded = []
    for label, command, settings, cfg in parsed:
        stage = BY_NAME[command]
        out = stage_output(stage, cfg)
        if command in GATHERS_SEEDS:
            settings = _rewrite(settings, per_seed, gather=True)
            cfg = build_config(stage.config_class(), settings, source=f"{path} [stages.{label}]")
            expanded.append((label, command, settings, cfg))
            continue
        reads = _moved_path_anywhere(settings, per_seed)
        own = "seed" not in settings and cfg.seed_affects_output()
        if not (reads or own) or out is None:
            expanded.append((label, command, settings, cfg))
            continue
        per_seed[out] = [seed_folder(out, root, s) for s in seeds]
        for i, s in enumerate(seeds):
            one = {old: new[i] for old, new in per_seed.items()}
            s_settings = _rewrite(settings, one, gather=False)
            if "seed" in type(cfg).model_fields and "seed" not in settings:
                s_settings["seed"] = s
            s_cfg = build_config(stage.config_class(), s_settings, source=f"{path} [stages.{label}, seed {s}]")
            expanded.append((f"{label}/seed-{s}", command, s_settings, s_cfg))
    return expanded


def _moved_path_anywhere(value: Any, moved: dict[Path, list[Path]]) -> bool:
    """Whether any path inside a (nested) settings value lies in a per-seed output."""
    if isinstance(value, dict):
        return any(_moved_path_anywhere(v, moved) for v in value.values())
    if isinstance(value, list):
        return any(_moved_path_anywhere(v, moved) for v in value)
    return _moved_path(value, moved) is not None
