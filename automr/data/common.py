"""Read a data set in the common format, streaming, with clear errors for bad input.

The common format (../shared/data, `automr import-data`, `automr synthetic`) is one folder with
  interactions.parquet | interactions.csv.gz | interactions.csv   user_id, item_id, timestamp, pos[, ...]
  items.parquet        | items.csv.gz        | items.csv          item_id, title[, ...]
`timestamp` is unix seconds (a column whose median is 1e11 or more is taken for milliseconds,
microseconds or nanoseconds and refused with how to convert; single values outside year 1 ..
5138 are malformed rows), `pos` the 0-based stored order of a user's interactions (the only
way to order interactions that share a timestamp). Extra columns are not used, except that
`prepare` compares them to tell exact duplicate rows (dropped) from near ones (kept).

Why two levels: `scan_common` is what most callers want (a clean lazy table and the catalogue);
`open_common` + `scan_raw` let `prepare` count what it skips. Interactions are never collected
here: a `pl.LazyFrame` is streamed by whoever consumes it (`collect_batches`, `sink_parquet`,
streaming aggregates), so memory does not grow with the number of interactions. Only the item
catalogue, which is small, is read whole.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automr.errors import UserError

if TYPE_CHECKING:  # keep `automr --help` free of heavy imports
    import polars as pl

INTERACTION_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp", "pos")
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title")
SUFFIXES: tuple[str, ...] = (".parquet", ".csv.gz", ".csv")


@dataclass(frozen=True)
class CommonFiles:
    """The two files of a common-format folder and their header columns."""

    folder: Path
    interactions: Path
    items: Path
    interaction_columns: tuple[str, ...]
    item_columns: tuple[str, ...]

    @property
    def ignored_columns(self) -> dict[str, list[str]]:
        """Columns present but not used (reported in the stats, e.g. `rating`)."""
        return {
            "interactions": [c for c in self.interaction_columns if c not in INTERACTION_COLUMNS],
            "items": [c for c in self.item_columns if c not in ITEM_COLUMNS],
        }


@dataclass
class Catalogue:
    """The item catalogue after cleaning, with counts of what was skipped."""

    items: "pl.DataFrame"  # item_id int64 (unique), title str (cleaned, non-empty)
    rows: int = 0
    malformed_rows: int = 0  # item_id not an integer
    duplicate_ids: int = 0  # later rows of an id seen before (the first row wins)
    untitled: int = 0  # title missing or empty after cleaning: the item cannot be named

    def as_stats(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "items_with_title": self.items.height,
            "malformed_rows_skipped": self.malformed_rows,
            "duplicate_ids_skipped": self.duplicate_ids,
            "items_without_title": self.untitled,
        }


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


TRUNCATED_MARKERS: tuple[str, ...] = ("truncated", "unexpected end", "end of stream", "compressed file ended", "end-of-stream")


def unreadable(path: Path, exc: BaseException) -> UserError:
    """The one message for a file that cannot be decoded (gzip, CSV, JSON lines, Parquet), naming the file.

    A truncated file (an interrupted download or copy) is the common case and is said so; the
    libraries word it in several ways ("Truncated compressed stream", "unexpected end of file",
    "Compressed file ended before the end-of-stream marker", ...).
    """
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = path.name.lower()
    kind = "Parquet" if name.endswith(".parquet") else "JSON lines" if ".json" in name else "CSV"
    kind = f"gzip-compressed {kind}" if name.endswith(".gz") else kind
    if isinstance(exc, EOFError) or any(m in first.lower() for m in TRUNCATED_MARKERS):
        return UserError(
            f"{path} is truncated: it ends before its {kind} data does ({first}). The file was probably cut short by an "
            "interrupted download or copy; re-create or re-download it (for gzip, `gzip -t FILE` checks a file)."
        )
    return UserError(f"{path} cannot be read as {kind}: {first}. Check that it is a valid {kind} file.")


def read_header(path: Path) -> tuple[str, ...]:
    """Column names of a Parquet or CSV(.gz) file, reading only its schema / first line."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return tuple(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise unreadable(path, exc) from None
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            first = fh.readline()
    except (OSError, EOFError) as exc:
        raise unreadable(path, exc) from None
    if not first.strip():
        raise UserError(f"{path} is empty: expected a CSV header line such as {','.join(INTERACTION_COLUMNS)}")
    text = first.decode("utf-8-sig", errors="replace")
    return tuple(c.strip() for c in next(csv.reader(io.StringIO(text))))


def _check_columns(path: Path, found: tuple[str, ...], expected: tuple[str, ...], what: str) -> None:
    missing = [c for c in expected if c not in found]
    if not missing:
        return
    hint = ""
    lowered = {c.lower(): c for c in found}
    renames = [f"'{lowered[m]}' -> '{m}'" for m in missing if m in lowered]
    if renames:
        hint = f" Column names are case-sensitive: rename {', '.join(renames)}."
    raise UserError(
        f"{path}: {what} file lacks required column(s) {', '.join(missing)}. "
        f"Found columns: {', '.join(found) or '(none)'}; expected at least: {', '.join(expected)} "
        f"(extra columns are ignored).{hint}"
    )


def open_common(folder: str | Path) -> CommonFiles:
    """Locate and check the files of a common-format folder (no data is read but headers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"data folder {folder} does not exist (or is not a folder). Pass a folder in the common format, "
            "e.g. ../shared/data/movielens-100k, or create one with `automr import-data` / `automr synthetic`."
        )
    found: dict[str, Path | None] = {stem: _find(folder, stem) for stem in ("interactions", "items")}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        looked = "; ".join(f"{', '.join(stem + s for s in SUFFIXES)}" for stem in missing)
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise UserError(
            f"{folder} is not a common-format data folder: looked for {looked} and found none. "
            f"Files present: {', '.join(present) or '(empty folder)'}."
        )
    inter, items = found["interactions"], found["items"]
    assert inter is not None and items is not None
    inter_cols, item_cols = read_header(inter), read_header(items)
    _check_columns(inter, inter_cols, INTERACTION_COLUMNS, "interactions")
    _check_columns(items, item_cols, ITEM_COLUMNS, "items")
    return CommonFiles(folder, inter, items, inter_cols, item_cols)


def _to_int64(name: str, dtype: "pl.DataType") -> "pl.Expr":
    """Cast a column to int64; values that are not integers become null (counted as malformed)."""
    import polars as pl

    col = pl.col(name)
    if dtype == pl.Utf8 or dtype == pl.String:
        as_int = col.str.strip_chars().cast(pl.Int64, strict=False)
        if name == "timestamp":  # "881250949.0" is a fine timestamp; "1.5" as an id is not
            as_int = pl.coalesce(as_int, col.str.strip_chars().cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False))
        return as_int.alias(name)
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("s").alias(name)
    if isinstance(dtype, pl.Date):
        return (col.cast(pl.Int64) * 86_400).alias(name)
    if dtype.is_float() and name == "timestamp":
        return col.floor().cast(pl.Int64, strict=False).alias(name)
    if dtype.is_integer():
        return col.cast(pl.Int64, strict=False).alias(name)
    return pl.lit(None, dtype=pl.Int64).alias(name)  # a float id or a nested type: every row malformed


# Unix seconds outside [MIN_SECONDS, MAX_SECONDS) are not seconds. MAX: 1e11 s is the year 5138,
# while 1e11 ms is March 1973, so any millisecond time after 1973 is above it. MIN: 0001-01-01,
# the earliest instant Python's datetime can name.
MAX_SECONDS = 10**11
MIN_SECONDS = -62_135_596_800
# (threshold, unit, divisor): a median above the threshold means the column is in that unit.
TIME_UNITS: tuple[tuple[int, str, int], ...] = (
    (10**17, "nanoseconds", 10**9),
    (10**14, "microseconds", 10**6),
    (MAX_SECONDS, "milliseconds", 10**3),
)
WRONG_FIELDS, NOT_INTEGER, TIME_RANGE = "wrong number of fields", "value not an integer", "timestamp out of range"
ROW_HASH = "other_columns_hash"  # hash of the columns beyond INTERACTION_COLUMNS (exact-duplicate test)


@dataclass
class MalformedRows:
    """Rows of the interactions file that cannot be used, counted by reason with a few examples each.

    Reasons: WRONG_FIELDS (a CSV row whose field count differs from the header's), NOT_INTEGER
    (user_id, item_id, timestamp or pos missing or not an integer), TIME_RANGE (a timestamp that
    cannot be unix seconds). `large_times` counts integer rows per TIME_UNITS threshold, so the
    caller can tell a whole column in milliseconds from a few bad rows (`time_unit_error`).
    """

    counts: dict[str, int] = field(default_factory=lambda: {WRONG_FIELDS: 0, NOT_INTEGER: 0, TIME_RANGE: 0})
    examples: dict[str, list[str]] = field(default_factory=lambda: {WRONG_FIELDS: [], NOT_INTEGER: [], TIME_RANGE: []})
    integer_rows: int = 0
    large_times: dict[int, int] = field(default_factory=lambda: {t: 0 for t, _, _ in TIME_UNITS})
    large_example: int | None = None
    max_examples: int = 3

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, n: int, examples: list[str]) -> None:
        self.counts[reason] += n
        room = self.max_examples - len(self.examples[reason])
        self.examples[reason].extend(examples[: max(room, 0)])

    def handler(self, row: Any) -> str:  # pyarrow's invalid_row_handler (row.number is None when streaming)
        text = (row.text or "").rstrip("\r\n")
        self.add(WRONG_FIELDS, 1, [f"{text[:120]!r} ({row.actual_columns} fields, expected {row.expected_columns})"])
        return "skip"

    def check(self, raw: "pl.DataFrame", cast: "pl.DataFrame") -> None:
        """Count (with examples taken from `raw`) the rows of a cast batch that are not well-formed."""
        ints = has_integers()
        not_int = cast.select((~ints).sum()).item()
        if not_int:
            self.add(NOT_INTEGER, int(not_int), _examples(raw, cast.select(~ints).to_series(), self.max_examples))
        t = cast.filter(ints)["timestamp"]
        self.integer_rows += t.len()
        for threshold in self.large_times:
            self.large_times[threshold] += int((t >= threshold).sum())
        if self.large_example is None and (t >= MAX_SECONDS).any():
            self.large_example = int(t.filter(t >= MAX_SECONDS)[0])
        out = cast.select(ints & ~time_in_range()).to_series()
        if out.any():
            self.add(TIME_RANGE, int(out.sum()), _examples(raw, out, self.max_examples))

    def as_stats(self) -> dict[str, dict[str, Any]]:
        return {r: {"rows": n, "examples": self.examples[r]} for r, n in self.counts.items()}


def _examples(raw: "pl.DataFrame", mask: "pl.Series", n: int) -> list[str]:
    """The first `n` rows of `raw` where `mask` holds, as `user_id=1, item_id='abc', ...` text."""
    rows = raw.filter(mask).head(n).select(INTERACTION_COLUMNS).rows()
    return [", ".join(f"{c}={'(empty)' if v is None else repr(v) if isinstance(v, str) else v}" for c, v in zip(INTERACTION_COLUMNS, r)) for r in rows]


def time_unit_error(path: Path | str, n: int, large_times: dict[int, int], example: int | None) -> UserError | None:
    """A UserError when most of `n` timestamps are too large to be seconds (their median is above
    MAX_SECONDS), naming the unit they look like and how to convert; None otherwise.

    large_times: for each TIME_UNITS threshold, how many timestamps are at or above it; example:
    one of them. Half of the values above a threshold is the same test as a median above it, and
    needs only streaming counts, not the values.
    """
    import datetime as dt

    for threshold, unit, divisor in TIME_UNITS:
        big = large_times.get(threshold, 0)
        if n and 2 * big > n:
            t = example if example is not None else threshold
            as_unit = dt.datetime.fromtimestamp(t // divisor, dt.timezone.utc).strftime("%Y-%m-%d")
            return UserError(
                f"{path}: the timestamps look like {unit}, not unix seconds: {big:,} of {n:,} rows are at least 1e{len(str(threshold)) - 1} "
                f"(e.g. {t}, which is {as_unit} in {unit} but the year {1970 + t // 31_556_952:,} in seconds). The common "
                f"format stores unix seconds (UTC): divide the timestamp column by {divisor:,} (integer division, e.g. "
                f"polars' pl.col('timestamp') // {divisor}) and write the file again."
            )
    return None


def estimate_rows(files: CommonFiles) -> int:
    """Rows in the interactions file: exact for Parquet, an over-estimate for CSV (sizes buckets)."""
    path = files.interactions
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    # Common-format rows compress to ~6-8 bytes in gzip and take ~25 bytes as text; assume fewer
    # bytes per row so the estimate errs high (smaller buckets are harmless, bigger ones cost memory).
    return max(1, path.stat().st_size // (4 if path.name.endswith(".gz") else 12))


class DirtyValues(Exception):
    """A typed read met a value that is not an integer: re-read with `typed=False` (counts it)."""


def _open_batches(files: CommonFiles, rows: int, malformed: MalformedRows, columns: list[str], typed: bool) -> Iterator[Any]:
    """pyarrow record batches of `columns` (the extra ones always as text for CSV)."""
    import pyarrow as pa

    path = files.interactions
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns)
    import pyarrow.csv as pc

    types = {c: pa.int64() if typed and c in INTERACTION_COLUMNS else pa.string() for c in columns}
    return pc.open_csv(
        path,
        read_options=pc.ReadOptions(block_size=1 << 20),
        parse_options=pc.ParseOptions(invalid_row_handler=malformed.handler),
        convert_options=pc.ConvertOptions(column_types=types, include_columns=columns),
    )


def iter_raw_batches(
    files: CommonFiles,
    rows: int = 500_000,
    malformed: MalformedRows | None = None,
    *,
    typed: bool = False,
    row_hash: bool = False,
) -> Iterator["pl.DataFrame"]:
    """Stream the interactions as DataFrames of int64 columns; a malformed value becomes null.

    CSV goes through pyarrow's streaming reader (constant memory, gzip read incrementally, proper
    quoting). Every unusable row is counted in `malformed` by reason, with examples: rows with a
    wrong number of fields are skipped by the reader; rows with a non-integer value (null here) or
    a timestamp out of range stay in the batch and fail `is_well_formed`.
    typed=True parses integers in pyarrow directly (zero-copy, ~2x faster) and raises DirtyValues
    at the first non-integer value; the caller then starts again with typed=False, which reads
    every value as text and turns the bad ones into counted nulls.
    row_hash=True adds ROW_HASH, a hash of the file's other columns (absent when it has none), so
    that exact duplicates can be told from rows that differ only in, say, `rating`.
    """
    import polars as pl
    import pyarrow as pa

    path = files.interactions
    counter = malformed if malformed is not None else MalformedRows()
    extras = files.ignored_columns["interactions"] if row_hash else []
    try:
        pending: list[pl.DataFrame] = []
        n = 0
        for batch in _open_batches(files, rows, counter, [*INTERACTION_COLUMNS, *extras], typed):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            pending.append(df)
            n += df.height
            if n >= rows:
                yield _cast_raw(pl.concat(pending), counter, extras)
                pending, n = [], 0
        if pending:
            yield _cast_raw(pl.concat(pending), counter, extras)
    except pa.ArrowInvalid as exc:
        if typed and "conversion error" in str(exc):
            raise DirtyValues(str(exc)) from None
        raise unreadable(path, exc) from None
    except (OSError, EOFError) as exc:
        raise unreadable(path, exc) from None


def _cast_raw(df: "pl.DataFrame", malformed: MalformedRows, extras: list[str]) -> "pl.DataFrame":
    """int64 columns (+ ROW_HASH); the careful conversion (whitespace, '1.5e9' timestamps) runs only on dirty batches."""
    import polars as pl

    strings = [c for c in INTERACTION_COLUMNS if df.schema[c] == pl.Utf8]
    out = df.select([pl.col(c).cast(pl.Int64, strict=False) if c in strings else _to_int64(c, df.schema[c]) for c in INTERACTION_COLUMNS])
    if strings and any(out[c].null_count() > df[c].null_count() for c in strings):
        out = df.select([_to_int64(c, df.schema[c]) for c in INTERACTION_COLUMNS])
    malformed.check(df, out)
    if extras:
        # polars' hash is stable within a process, which is all deduplication needs; rows equal in
        # the four columns and in this 64-bit hash are taken as equal (a false match needs a
        # collision among one user's rows that share item, timestamp and pos).
        out = out.with_columns(df.select(pl.struct(extras).hash().alias(ROW_HASH)))
    return out


def scan_raw(files: CommonFiles) -> "pl.LazyFrame":
    """`iter_raw_batches` as a lazy frame (for callers that want polars' lazy API)."""
    import polars as pl
    from polars.io.plugins import register_io_source

    def source(with_columns: list[str] | None, predicate: Any, n_rows: int | None, batch_size: int | None) -> Iterator[pl.DataFrame]:
        seen = 0
        for df in iter_raw_batches(files, rows=batch_size or 500_000):
            if with_columns is not None:
                df = df.select(with_columns)
            if predicate is not None:
                df = df.filter(predicate)
            if n_rows is not None:
                df = df.head(n_rows - seen)
                seen += df.height
            yield df
            if n_rows is not None and seen >= n_rows:
                return

    return register_io_source(source, schema={c: pl.Int64 for c in INTERACTION_COLUMNS})


def has_integers() -> "pl.Expr":
    """user_id, item_id, timestamp and pos are all integers (not null after the cast)."""
    import polars as pl

    return pl.all_horizontal(pl.col(c).is_not_null() for c in INTERACTION_COLUMNS)


def time_in_range() -> "pl.Expr":
    import polars as pl

    return pl.col("timestamp").is_between(MIN_SECONDS, MAX_SECONDS, closed="left")


def is_well_formed() -> "pl.Expr":
    """A usable row: four integers and a timestamp that can be unix seconds."""
    return has_integers() & time_in_range()


def read_catalogue(files: CommonFiles) -> Catalogue:
    """Read the item catalogue whole (it is small), clean titles, keep the first row per id."""
    import polars as pl

    from automr.data.titles import clean_titles

    path = files.items
    try:
        if path.name.endswith(".parquet"):
            raw = pl.read_parquet(path, columns=list(ITEM_COLUMNS))
        else:
            raw = pl.read_csv(path, columns=list(ITEM_COLUMNS), infer_schema=False)
    except (OSError, EOFError) as exc:  # polars reports a truncated gzip as OSError
        raise unreadable(path, exc) from None
    except pl.exceptions.PolarsError as exc:
        raise UserError(f"{path} cannot be parsed: {str(exc).splitlines()[0]}. Check that it is a valid table with item_id,title.") from None
    rows = raw.height
    raw = raw.with_columns(_to_int64("item_id", raw.schema["item_id"]), pl.col("title").cast(pl.Utf8))
    ok = raw.filter(pl.col("item_id").is_not_null())
    unique = ok.unique(subset="item_id", keep="first", maintain_order=True)
    cleaned = clean_titles(unique)
    titled = cleaned.filter(pl.col("title").is_not_null() & (pl.col("title") != ""))
    return Catalogue(
        items=titled.select("item_id", "title"),
        rows=rows,
        malformed_rows=rows - ok.height,
        duplicate_ids=ok.height - unique.height,
        untitled=unique.height - titled.height,
    )


def scan_common(folder: str | Path) -> tuple["pl.LazyFrame", "pl.DataFrame"]:
    """(interactions, items) of a common-format folder.

    interactions: lazy, int64 user_id, item_id, timestamp, pos; malformed rows dropped and rows
    whose item has no title dropped (an untitled item cannot be recommended by name). It is not
    sorted: order by (user_id, timestamp, pos) where order matters.
    items: item_id, title (cleaned, non-empty, one row per id).
    """
    import polars as pl

    files = open_common(folder)
    cat = read_catalogue(files)
    lf = scan_raw(files).filter(is_well_formed() & pl.col("item_id").is_in(cat.items["item_id"].implode()))
    return lf, cat.items
