"""`automr run CONFIG`: run a chain of stages from one YAML file.

The YAML has one section per stage, in order, each holding that stage's config:

    stages:
      prepare:  {data: ..., preset: movielens-100k, out: runs/demo/data}
      evaluate: {samples: runs/demo/data, methods: [popularity, sasrec], run: runs/demo/eval}

A stage is skipped when its output folder holds a stamp with the same config and the same
upstream stamps, so re-running a pipeline only redoes what changed (and everything after it).
A section may be repeated under another name with `stage:` naming the command, e.g.
`finetune-memory-aware: {stage: finetune, ...}`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from automr.config import build_config, read_yaml
from automr.errors import UserError
from automr.stages import BY_NAME, get_stage, run_stage
from automr.stages.guard import pipeline_lock

console = Console()
STAMP = ".automr-stage.json"
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_pipeline(path: Path) -> list[tuple[str, str, Any]]:
    """Validate every stage of a pipeline YAML (all problems at once); returns (label, command, config) in order."""
    spec = read_yaml(path)
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{path}: expected a `stages:` mapping of stage name -> settings (see configs/demo.yaml)")
    planned, problems = [], []
    for label, settings in stages.items():
        settings = dict(settings or {})
        command = settings.pop("stage", label)
        if command not in BY_NAME:
            problems.append(f"  - {label}: unknown stage {command!r}; expected one of {', '.join(BY_NAME)}")
            continue
        cfg_cls = BY_NAME[command].config_class()
        try:
            cfg = build_config(cfg_cls, settings, source=f"{path} [stages.{label}]")
        except UserError as exc:
            problems.append(str(exc))
            continue
        if command == "evaluate":  # the methods' own options, checked by building them (nothing loads yet)
            from automr.methods.registry import make_method

            for m in cfg.methods:
                try:
                    make_method(m, cfg.method_options.get(m, {}), cfg.seed)
                except UserError as exc:
                    problems.append(f"  - {label}: method {m}: {exc}")
        planned.append((label, command, cfg))
    if problems:
        raise UserError("the pipeline config has problems:\n" + "\n".join(problems))
    return planned


def run_pipeline_file(path: Path, *, force: bool = False, overwrite: bool = False) -> None:
    """Run every stage of a pipeline YAML in order, skipping up-to-date ones."""
    # Validate every stage first, so a typo in the last stage fails before hours of work.
    planned = plan_pipeline(path)
    with pipeline_lock(path):  # two `automr run` of one file must not both start; stages lock their outputs
        _run_planned(planned, force=force, overwrite=overwrite)


def _run_planned(planned: list[tuple[str, str, Any]], *, force: bool, overwrite: bool) -> None:
    """Run the validated stages in order (`overwrite`: see run_stage), skipping up-to-date ones."""
    upstream: list[str] = []
    for label, command, cfg in planned:
        stage = get_stage(command)
        out_value = getattr(cfg, stage.output_field, None) if stage.output_field else None
        out = Path(out_value) if out_value is not None else None
        stamp = {"stage": command, "config": _digest(cfg.model_dump(mode="json")), "upstream": _digest(upstream)}
        stamp_file = out / STAMP if out is not None else None
        if not force and stamp_file is not None and stamp_file.is_file():
            try:
                old = json.loads(stamp_file.read_text())
            except json.JSONDecodeError:
                old = {}
            if {k: old.get(k) for k in stamp} == stamp:
                console.print(f"[dim]- {label}: up to date ({out})[/dim]")
                upstream.append(stamp["config"])
                continue
        console.rule(f"[bold]{label}[/bold]")
        t0 = time.perf_counter()
        run_stage(stage, cfg, overwrite=overwrite)
        elapsed = time.perf_counter() - t0
        if out is not None and stamp_file is not None:
            out.mkdir(parents=True, exist_ok=True)
            stamp_file.write_text(json.dumps({**stamp, "seconds": round(elapsed, 1)}, indent=2))
        console.print(f"[green]- {label}: done in {elapsed:.1f} s[/green]")
        upstream.append(stamp["config"])
