"""Typed stage configs: pydantic models loaded from YAML and overridden from flags.

Every stage takes one config object. Validation reports every problem at once, as one
`UserError`, so a user fixes a bad config in one pass instead of one error per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from automr.errors import UserError


class StageConfig(BaseModel):
    """Base for stage configs: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def seed_affects_output(self) -> bool:
        """Whether this config's `seed` changes what the stage writes, given its other settings.

        `automr run --seeds` runs such a stage once per seed (automr/pipeline_seeds.py). A stage whose seed
        only picks a subset overrides this to say when a subset is asked for; data stages say never.
        """
        return "seed" in type(self).model_fields


C = TypeVar("C", bound=StageConfig)


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that leaves an impossible date as the text it was.

    YAML reads an unquoted `2017-13-01` as a timestamp, and SafeLoader's constructor then raises
    ValueError (not YAMLError) from datetime. Kept as text, it reaches validation, which reports
    it with every other problem, exactly as it reports the quoted '2017-13-01'.
    """


def _timestamp_or_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    try:
        return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except ValueError:
        return loader.construct_scalar(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_or_text)


def _load_yaml(text: str) -> Any:
    """YAML text to Python values, as every config is read (see _ConfigLoader)."""
    return yaml.load(text, Loader=_ConfigLoader)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: where it is, what was found, what was expected."""
    lines = [f"{len(err.errors())} problem(s) in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        found = e.get("input")
        found_s = "" if isinstance(found, dict) else f" (found {found!r})"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown key{found_s}; remove it or check its spelling")
        else:
            lines.append(f"  - {loc}: {e['msg']}{found_s}")
    return "\n".join(lines)


def parse_mapping(value: Any) -> Any:
    """A mapping field's value: YAML/JSON text (from the command line) parsed, anything else as is."""
    if isinstance(value, str):
        try:
            return _load_yaml(value) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"not a YAML/JSON mapping: {exc}") from None
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}. Pass an existing YAML file (see configs/).")
    try:
        data = _load_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values, found {type(data).__name__}")
    return data


def build_config(cls: type[C], *layers: dict[str, Any], source: str = "config") -> C:
    """Merge layers (later wins; None values are ignored) and validate into `cls`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    try:
        return cls.model_validate(merged)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Load `cls` from an optional YAML file, then apply keyword overrides."""
    base = read_yaml(path) if path else {}
    return build_config(cls, base, overrides, source=str(path) if path else cls.__name__)


def save_config(config: StageConfig, folder: Path, name: str = "config.yaml") -> Path:
    """Save the config that made an output next to it (litgpt-style provenance).

    Atomic: resumable stages read it back to decide whether to resume, so it is never half-written.
    """
    from automr.utils.io import atomic_write_text

    out = Path(folder) / name
    atomic_write_text(out, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out
