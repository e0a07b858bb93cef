"""`automr prepare`: the paper's temporal protocol, its settings, and presets per data set.

The protocol (DESIGN.md, "Sample" and "Paper data protocol"), with every choice the paper leaves
open made explicit here:

1. **Window.** A time window [start, end) (end exclusive). Paper: calendar year 2017. Also the
   last N months of the data set (`window_last_months`: end = the last timestamp + 1 s), or
   `min`/`max` for the data's own first/last timestamp.
2. **Scope.** The interactions the protocol may use: those in the window (paper: the data *is*
   the year, so no history reaches before it), or, with `history_before_window`, everything
   before the window end (history may be older than the window; targets stay inside it).
   Interactions at or after the window end are never used.
3. **Filters, inside the scope, one pass each, in this order:** items with fewer than
   `min_item_interactions` interactions are dropped (counts over the scope); then users with
   fewer than `min_sequence_length` interactions left; then (optionally) a seeded subsample of
   `max_users` of the remaining users; then each sequence is capped to its `max_history` most
   recent interactions (history + target, paper: 100).
4. **Samples.** In each capped sequence, ordered by (timestamp, pos), every interaction whose
   time lies in the window and that has at least `min_recent` inputs is a target (`targets:
   last`: only the user's last one). Its inputs are the interactions before it, as `ties` says:
   - `ties: pos` (default, as before the option existed): all those strictly before the target
     in that order, hence at times <= the target time; an input at the target's own time is
     one the data stored before it (DESIGN.md: "ties in time are broken by the stored order").
     In ml-100k about half the samples' last recent item shares the target's time, and `pos`
     orders such ties by item id there: a shortcut for an id-based model.
   - `ties: strict`: only those strictly earlier in time (every input time < the target time,
     DESIGN.md: "only interactions strictly before t are inputs" read literally). A target with
     fewer than `min_recent` strictly earlier interactions gets no sample (counted in
     stats.json `ties.targets_without_strict_history`).
   recent = the `recent_k` most recent inputs, memory = the older ones (so |memory| <=
   max_history - 1 - K), both oldest first. stats.json `ties.tie_rate` reports per split the
   share of samples whose last recent item shares the target's time (0 under strict).
5. **Split by the target's time.** `split_by: months` (paper): the last `test_size` calendar
   months of the window are test, the `valid_size` months before them validation, the rest
   training (paper: 12 months = 10 + 1 + 1). `split_by: quantile`: the latest `test_size`
   share of targets (by time) is test, the `valid_size` share before them validation -- for
   data whose time range is arbitrary (synthetic). Ties at a boundary stay together, so splits
   never overlap in time: max(train) < min(valid) and max(valid) < min(test), in both modes.

Settings are layered: paper defaults < preset (`--preset NAME`, automr/presets/NAME.yaml) <
YAML config < flags. Every protocol field defaults to None, meaning "not set here"; see
`resolve_prepare` for the two groups that are resolved as a whole (window, split).

Scale: prepare never holds the interactions in Python objects nor all at once: it reads the
input once, in batches, into hash buckets of whole users, then builds samples bucket by bucket
(automr/data/prepare.py). Peak memory is set by `bucket_rows` and `chunk_elements`, not by the
size of the data.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from automr.config import StageConfig, read_yaml
from automr.errors import UserError

if TYPE_CHECKING:  # heavy imports stay out of `automr --help`
    import polars as pl


# --------------------------------------------------------------------------- settings


def _check_date(value: str, keyword: str) -> str:
    if value == keyword:
        return value
    try:
        _parse_instant(value)
    except ValueError:
        raise ValueError(f"expected an ISO date such as 2017-01-01 (UTC) or '{keyword}', found {value!r}") from None
    return value


def _date_to_text(value: Any) -> Any:
    """YAML reads an unquoted 2017-01-01 as a date: accept it as the ISO text it was."""
    return value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else value


WindowStart = Annotated[str, BeforeValidator(_date_to_text), AfterValidator(lambda v: _check_date(v, "min"))]
WindowEnd = Annotated[str, BeforeValidator(_date_to_text), AfterValidator(lambda v: _check_date(v, "max"))]

# The paper's protocol: the bottom layer under any preset or user setting.
PAPER_DEFAULTS: dict[str, Any] = {
    "window_start": "2017-01-01",
    "window_end": "2018-01-01",
    "window_last_months": None,
    "history_before_window": False,
    "split_by": "months",
    "valid_size": 1.0,
    "test_size": 1.0,
    "min_item_interactions": 5,
    "min_sequence_length": 20,
    "max_history": 100,
    "recent_k": 10,
    "targets": "all",
    "min_recent": 1,
    "ties": "pos",
    "max_users": 0,
    "seed": 0,
}
PROTOCOL_FIELDS: tuple[str, ...] = tuple(PAPER_DEFAULTS)
WINDOW_FIELDS: tuple[str, ...] = ("window_start", "window_end", "window_last_months")
SPLIT_SIZE_FIELDS: tuple[str, ...] = ("valid_size", "test_size")
SPLIT_MODE_DEFAULTS: dict[str, tuple[float, float]] = {"months": (1.0, 1.0), "quantile": (0.1, 0.1)}


class PrepareConfig(StageConfig):
    """Settings of `automr prepare`. Protocol fields left unset come from the preset, else the paper."""

    data: Path = Field(
        description="Data folder in the common format: interactions.(parquet|csv.gz) + items.(parquet|csv.gz); or "
        "fetch:ml-100k = ../shared/data/movielens-100k if present, else downloaded once into the cache (automr fetch)."
    )
    out: Path = Field(description="Output folder (samples/, items.parquet, stats.json, config.yaml); replaced atomically.")
    preset: Optional[str] = Field(
        None,
        description="Preset name (a data set folder name such as movielens-1m, or synthetic; see automr/presets/) "
        "or a path to a preset YAML. It sets every protocol field you leave unset; without it, the paper's protocol.",
    )
    window_start: Optional[WindowStart] = Field(
        None, description="Window start, ISO date (UTC, inclusive), or 'min' for the data's first timestamp. Paper: 2017-01-01."
    )
    window_end: Optional[WindowEnd] = Field(
        None,
        description="Window end, ISO date (UTC, EXCLUSIVE: the first instant not in the window), or 'max' for just "
        "after the data's last timestamp. Paper: 2018-01-01.",
    )
    window_last_months: Optional[int] = Field(
        None, ge=1, description="Instead of dates: the window is the last N calendar months of the data set (ends after its last timestamp)."
    )
    history_before_window: Optional[bool] = Field(
        None,
        description="Let history (recent and memory) reach before the window start; targets stay in the window and the "
        "filters count everything before the window end. Paper: no (the data is the window).",
    )
    split_by: Optional[Literal["months", "quantile"]] = Field(
        None,
        description="How the window is split by target time: 'months' (valid/test = calendar months at the window's end, "
        "paper) or 'quantile' (valid/test = shares of the targets, latest last).",
    )
    valid_size: Optional[float] = Field(
        None, gt=0, description="Validation size: whole months (split_by=months, paper 1) or a share of targets in (0,1) (quantile, default 0.1)."
    )
    test_size: Optional[float] = Field(
        None, gt=0, description="Test size: whole months (split_by=months, paper 1) or a share of targets in (0,1) (quantile, default 0.1)."
    )
    min_item_interactions: Optional[int] = Field(
        None, ge=0, description="Drop items with fewer interactions than this in the scope (0/1 = off). Paper: 5."
    )
    min_sequence_length: Optional[int] = Field(
        None, ge=0, description="Then drop users with fewer interactions than this in the scope (0/1 = off). Paper: 20."
    )
    max_history: Optional[int] = Field(
        None, ge=0, description="Cap each user's sequence (history + target) to its most recent N interactions (0 = no cap). Paper: 100."
    )
    recent_k: Optional[int] = Field(None, ge=1, description="K: the most recent interactions before a target form its short-term history. Paper: 10.")
    targets: Optional[Literal["all", "last"]] = Field(
        None, description="'all': every interaction in the window is a target; 'last': only each user's last one (synthetic data). Default: all."
    )
    min_recent: Optional[int] = Field(
        None,
        ge=0,
        description="A target becomes a sample only with at least this many inputs: earlier interactions in its (capped) "
        "sequence (under ties=strict, strictly earlier in time). "
        "Default 1: every sample has a non-empty recent history (the paper does not say).",
    )
    ties: Optional[Literal["pos", "strict"]] = Field(
        None,
        description="Ties in time: 'pos' (default): inputs are the interactions before the target in (time, pos) "
        "order, so they may share its timestamp; 'strict': only interactions strictly earlier than the target's time.",
    )
    max_users: Optional[int] = Field(
        None, ge=0, description="Keep a seeded random subset of at most N users among those that pass the filters (0 = all)."
    )
    seed: Optional[int] = Field(None, description="Seed of the max_users subsample. Default 0.")
    bucket_rows: int = Field(
        100_000,
        ge=1_000,
        description="Engine: users are processed in hash buckets of about this many interactions; bounds peak memory, not the result.",
    )
    chunk_elements: int = Field(
        1_000_000,
        ge=10_000,
        description="Engine: samples are built for groups of users holding about this many list elements; bounds peak memory.",
    )

    @model_validator(mode="after")
    def _one_window_form(self) -> "PrepareConfig":
        if self.window_last_months is not None and (self.window_start is not None or self.window_end is not None):
            raise ValueError("give either window_last_months or window_start/window_end, not both")
        return self

    def seed_affects_output(self) -> bool:
        """Never per seed in `automr run --seeds`: the seed of max_users chooses the data, which seeds share."""
        return False


def _preset_model() -> type[StageConfig]:
    """A preset holds protocol fields only, validated like PrepareConfig's (unknown keys are errors)."""
    from pydantic import create_model

    fields = {name: (PrepareConfig.model_fields[name].annotation, PrepareConfig.model_fields[name]) for name in PROTOCOL_FIELDS}
    return create_model("Preset", __base__=StageConfig, **fields)  # type: ignore[call-overload]


PresetModel = _preset_model()


# `fetch:NAME` data: the folder under ../shared/data that holds the same data, tried first.
FETCH_SHARED_NAMES: dict[str, str] = {"ml-100k": "movielens-100k"}


def resolve_data(data: Path) -> Path:
    """The data folder itself, or for `fetch:NAME` the shared copy if present, else the fetched one."""
    text = str(data)
    if not text.startswith("fetch:"):
        return Path(data)
    name = text.removeprefix("fetch:")
    shared = Path.cwd().parent / "shared" / "data" / FETCH_SHARED_NAMES.get(name, name)
    if (shared / "interactions.csv.gz").is_file() or (shared / "interactions.parquet").is_file():
        return shared
    from automr.data.fetch import fetch_dataset

    return fetch_dataset(name)


def presets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The protocol fields a preset sets (name in automr/presets/ or a YAML path), validated."""
    from automr.config import format_validation_error
    from pydantic import ValidationError

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = presets_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(
                f"unknown preset {name_or_path!r}. Available presets: {', '.join(available_presets())}; "
                "or pass the path of a preset YAML file."
            )
    raw = read_yaml(path)
    try:
        model = PresetModel.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, f"preset {path}")) from None
    return {k: v for k, v in model.model_dump().items() if v is not None}


def resolve_prepare(cfg: PrepareConfig) -> tuple[PrepareConfig, dict[str, str]]:
    """Fill every protocol field: paper defaults < preset < the user's YAML and flags.

    Returns (the complete config, where each protocol field came from). Fields are taken one by
    one from the highest layer that sets them, except two groups that only make sense whole:
    - window: the highest layer that sets any of window_start / window_end / window_last_months
      supplies the whole window (a preset's `window_last_months` is dropped when you pass
      `--window-start`); an end or start it leaves open means 'max' / 'min'.
    - split: `split_by` comes from the highest layer that sets it; valid_size / test_size from
      that layer or a higher one, else the mode's defaults (months 1/1, quantile 0.1/0.1), so a
      preset's month counts are never read as shares.
    The complete config is saved as OUT/config.yaml: `--config OUT/config.yaml` reproduces it.
    """
    layers: list[tuple[str, dict[str, Any]]] = [("paper default", dict(PAPER_DEFAULTS))]
    if cfg.preset:
        layers.append((f"preset {cfg.preset}", load_preset(cfg.preset)))
    user = {k: getattr(cfg, k) for k in PROTOCOL_FIELDS if getattr(cfg, k) is not None}
    layers.append(("config", user))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in PROTOCOL_FIELDS:
        if name in WINDOW_FIELDS or name == "split_by" or name in SPLIT_SIZE_FIELDS:
            continue
        for label, layer in layers:
            if layer.get(name) is not None:
                values[name], sources[name] = layer[name], label
    # window: whole from the highest layer that sets any part of it
    for label, layer in reversed(layers):
        if any(layer.get(k) is not None for k in WINDOW_FIELDS):
            window = {k: layer.get(k) for k in WINDOW_FIELDS}
            if window["window_last_months"] is None:
                window["window_start"] = window["window_start"] or "min"
                window["window_end"] = window["window_end"] or "max"
            values.update(window)
            sources.update({k: label for k in WINDOW_FIELDS})
            break
    # split: mode from the highest layer that sets it; sizes from that layer or above
    mode_level = max(i for i, (_, layer) in enumerate(layers) if layer.get("split_by") is not None)
    values["split_by"], sources["split_by"] = layers[mode_level][1]["split_by"], layers[mode_level][0]
    for k, default in zip(SPLIT_SIZE_FIELDS, SPLIT_MODE_DEFAULTS[values["split_by"]]):
        values[k], sources[k] = default, f"{values['split_by']} default"
        for label, layer in layers[mode_level:]:
            if layer.get(k) is not None:
                values[k], sources[k] = layer[k], label
    _check_split_sizes(values)
    complete = cfg.model_copy(update=values)
    return PrepareConfig.model_validate(complete.model_dump()), sources


def _check_split_sizes(values: dict[str, Any]) -> None:
    v, t = values["valid_size"], values["test_size"]
    if values["split_by"] == "months":
        bad = [f"{k}={values[k]}" for k in SPLIT_SIZE_FIELDS if float(values[k]) != int(values[k])]
        if bad:
            raise UserError(f"split_by=months needs whole months; found {', '.join(bad)}. Use whole numbers or split_by=quantile.")
    elif not (0 < v < 1 and 0 < t < 1 and v + t < 1):
        raise UserError(
            f"split_by=quantile needs valid_size and test_size in (0, 1) with a sum below 1; found valid_size={v}, test_size={t}."
        )


# --------------------------------------------------------------------------- time


def _parse_instant(text: str) -> int:
    """ISO date or datetime -> unix seconds, UTC unless the text carries an offset."""
    try:
        d = dt.datetime.fromisoformat(text)
    except ValueError:
        d = dt.datetime.combine(dt.date.fromisoformat(text), dt.time())
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp())


def add_months(ts: int, months: int) -> int:
    """Shift a unix time by calendar months (UTC), clamping the day (Mar 31 - 1 month = Feb 28/29)."""
    d = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    index = d.year * 12 + (d.month - 1) + months
    year, month = divmod(index, 12)
    day = min(d.day, calendar.monthrange(year, month + 1)[1])
    return int(d.replace(year=year, month=month + 1, day=day).timestamp())


def iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    d = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return d.strftime("%Y-%m-%d") if d.time() == dt.time() else d.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class Window:
    """Resolved instants (unix seconds): the window, the scope start, and the split boundaries."""

    start: int
    end: int  # exclusive
    scope_from: int | None  # first usable time (None: unbounded history)
    valid_start: int | None = None
    test_start: int | None = None

    def as_stats(self) -> dict[str, Any]:
        return {
            "start": iso(self.start),
            "end_exclusive": iso(self.end),
            "history_from": iso(self.scope_from) if self.scope_from is not None else "unbounded",
            "valid_start": iso(self.valid_start),
            "test_start": iso(self.test_start),
            "start_unix": self.start,
            "end_unix": self.end,
            "valid_start_unix": self.valid_start,
            "test_start_unix": self.test_start,
        }


def resolve_window(cfg: PrepareConfig, t_min: int, t_max: int) -> Window:
    """Window and (for split_by=months) split boundaries from the settings and the data's time range."""
    if cfg.window_last_months is not None:
        end = t_max + 1
        start = add_months(end, -cfg.window_last_months)
    else:
        start = t_min if cfg.window_start in (None, "min") else _parse_instant(cfg.window_start)
        end = t_max + 1 if cfg.window_end in (None, "max") else _parse_instant(cfg.window_end)
    if start >= end:
        raise UserError(f"the window is empty: start {iso(start)} is not before end {iso(end)} (end is exclusive).")
    window = Window(start=start, end=end, scope_from=None if cfg.history_before_window else start)
    if cfg.split_by == "months":
        window.test_start = add_months(end, -int(cfg.test_size or 0))
        window.valid_start = add_months(window.test_start, -int(cfg.valid_size or 0))
        if window.valid_start <= start:
            raise UserError(
                f"the window {iso(start)} .. {iso(end)} is too short for {int(cfg.valid_size or 0)} validation + "
                f"{int(cfg.test_size or 0)} test months with training targets before them; widen the window "
                "(window_start / window_last_months) or use smaller valid_size / test_size."
            )
    return window


def quantile_boundaries(time_counts: "pl.DataFrame", valid_size: float, test_size: float) -> tuple[int, int]:
    """(valid_start, test_start) from target-time counts (target_time, len), ties kept together.

    With targets sorted by time, test starts at the time of the target at rank
    floor((1 - test_size) * N), validation at rank floor((1 - test_size - valid_size) * N).
    """
    import polars as pl

    tc = time_counts.group_by("target_time").agg(pl.col("len").sum()).sort("target_time")
    tc = tc.with_columns(pl.col("len").cum_sum().alias("upto"))  # targets with time <= this
    n = int(tc["len"].sum())

    def time_at_rank(rank: int) -> int:
        return int(tc.filter(pl.col("upto") > rank)["target_time"][0])

    # floor with a tolerance: (1 - 0.1 - 0.1) * 10 is 7.999999999999999 in floating point
    return time_at_rank(math.floor((1 - test_size - valid_size) * n + 1e-9)), time_at_rank(math.floor((1 - test_size) * n + 1e-9))


