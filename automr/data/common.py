"""Read a data set in the common format, streaming, with clear errors for bad input.

The common format (../shared/data, `automr import-data`, `automr synthetic`) is one folder with
  interactions.parquet | interactions.csv.gz | interactions.csv   user_id, item_id, timestamp, pos[, ...]
  items.parquet        | items.csv.gz        | items.csv          item_id, title[, ...]
`timestamp` is unix seconds, `pos` the 0-based stored order of a user's interactions (the only
way to order interactions that share a timestamp). Extra columns are ignored.

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


def read_header(path: Path) -> tuple[str, ...]:
    """Column names of a Parquet or CSV(.gz) file, reading only its schema / first line."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return tuple(pq.read_schema(path).names)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{path} is not a readable Parquet file: {exc}") from None
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            first = fh.readline()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); is it a valid {'gzip ' if path.name.endswith('.gz') else ''}CSV file?") from None
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


@dataclass
class SkippedRows:
    """CSV rows skipped because their number of fields differs from the header's (counted, a few kept)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def handler(self, row: Any) -> str:  # pyarrow's invalid_row_handler
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"line {row.number}: expected {row.expected_columns} fields, found {row.actual_columns}")
        return "skip"


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


def iter_raw_batches(
    files: CommonFiles, rows: int = 500_000, skipped: SkippedRows | None = None, *, typed: bool = False
) -> Iterator["pl.DataFrame"]:
    """Stream the interactions as DataFrames of int64 columns; a malformed value becomes null.

    CSV goes through pyarrow's streaming reader (constant memory, gzip read incrementally, proper
    quoting); rows with a wrong number of fields are skipped and counted in `skipped`. A row is
    well-formed when user_id, item_id, timestamp and pos are all integers (`is_well_formed`).
    typed=True parses integers in pyarrow directly (zero-copy, ~2x faster) and raises DirtyValues
    at the first non-integer value; the caller then starts again with typed=False, which reads
    every value as text and turns the bad ones into counted nulls.
    """
    import polars as pl
    import pyarrow as pa

    path = files.interactions
    cols = list(INTERACTION_COLUMNS)
    try:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            batches: Iterator[Any] = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=cols)
        else:
            import pyarrow.csv as pc

            counter = skipped if skipped is not None else SkippedRows()
            batches = pc.open_csv(
                path,
                read_options=pc.ReadOptions(block_size=1 << 20),
                parse_options=pc.ParseOptions(invalid_row_handler=counter.handler),
                convert_options=pc.ConvertOptions(
                    column_types={c: pa.int64() if typed else pa.string() for c in cols}, include_columns=cols
                ),
            )
        pending: list[pl.DataFrame] = []
        n = 0
        for batch in batches:
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            pending.append(df)
            n += df.height
            if n >= rows:
                yield _cast_raw(pl.concat(pending))
                pending, n = [], 0
        if pending:
            yield _cast_raw(pl.concat(pending))
    except pa.ArrowInvalid as exc:
        if typed and "conversion error" in str(exc):
            raise DirtyValues(str(exc)) from None
        raise UserError(f"{path} cannot be read: {str(exc).strip().splitlines()[0]}. Check that it is a valid (gzip) CSV or Parquet file.") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path} cannot be read: {str(exc).strip().splitlines()[0]}. Check that it is a valid (gzip) CSV or Parquet file.") from None


def _cast_raw(df: "pl.DataFrame") -> "pl.DataFrame":
    """int64 columns; the careful conversion (whitespace, '1.5e9' timestamps) runs only on dirty batches."""
    import polars as pl

    strings = [c for c in INTERACTION_COLUMNS if df.schema[c] == pl.Utf8]
    fast = df.select([pl.col(c).cast(pl.Int64, strict=False) if c in strings else _to_int64(c, df.schema[c]) for c in INTERACTION_COLUMNS])
    if strings and any(fast[c].null_count() > df[c].null_count() for c in strings):
        return df.select([_to_int64(c, df.schema[c]) for c in INTERACTION_COLUMNS])
    return fast


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


def is_well_formed() -> "pl.Expr":
    import polars as pl

    return pl.all_horizontal(pl.col(c).is_not_null() for c in INTERACTION_COLUMNS)


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
