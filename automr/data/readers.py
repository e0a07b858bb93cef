"""Convert raw data sets into the common format: one folder per data set.

Common format (what `automr.data.common` reads and `prepare` consumes):
  OUT/interactions.parquet  user_id, item_id, timestamp (unix s), pos (0-based rank in the user's
                            chronological sequence): all int64, sorted by (user_id, pos)
  OUT/items.parquet         item_id int64, title str (cleaned, non-empty)[, source_id str]
  OUT/users.parquet         user_id int64, source_id str   (only where raw user ids are strings)
  OUT/stats.json            counts of everything read, dropped and written
  OUT/config.yaml           the config that made it (when run as a stage)

Rules, identical for every format (one SQL pipeline, `_finish`):
- `pos` orders a user's interactions by (timestamp, original line order): ties in time are
  common (Amazon timestamps are whole days) and line order is the only order the source gives.
- Items without a usable title are dropped with their interactions, and counted: a generative
  recommender names items by title, so an untitled item cannot be recommended or read.
- Duplicate (user, item, timestamp) rows keep the first line and are counted.
- String ids (Amazon) become int64 by dense rank over the sorted strings: deterministic, and the
  same raw file always gives the same ids. Integer ids (MovieLens) are kept.

Why DuckDB: the Amazon 2018 Books reviews file has tens of millions of lines. DuckDB parses JSON
lines in C++, spills to disk past `memory_limit` and writes Parquet itself, so no row ever becomes
a Python object; only the catalogue's titles visit Python (HTML unescaping).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal


from automr.config import StageConfig, save_config
from automr.errors import UserError

if TYPE_CHECKING:  # heavy imports stay out of `automr --help`
    import duckdb
    import polars as pl

Kind = Literal["amazon2018", "ml-100k", "ml-1m"]
KINDS: tuple[str, ...] = ("amazon2018", "ml-100k", "ml-1m")

AMAZON_REVIEW_FIELDS = {"reviewerID": "VARCHAR", "asin": "VARCHAR", "unixReviewTime": "BIGINT"}
AMAZON_META_FIELDS = {"asin": "VARCHAR", "title": "VARCHAR"}
TITLE_BATCH_ROWS = 100_000  # titles cleaned in Python per batch (bounded memory)
MOVIELENS_FILES = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat")}


# --------------------------------------------------------------------------- public API


def convert_raw(
    kind: Kind,
    *,
    out: Path,
    source: Path | None = None,
    reviews: Path | None = None,
    meta: Path | None = None,
    strict: bool = False,
    require_titles: bool = False,
    memory_limit: str = "4GB",
    threads: int | None = None,
    config: StageConfig | None = None,
    extra_stats: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Convert raw files of `kind` into a common-format folder `out`; returns the stats dict.

    A failure leaves no `out` behind (atomic folder). `config`, if given, is saved beside the data;
    `extra_stats` (e.g. the source's checksum) go into stats.json.
    """
    if kind not in KINDS:
        raise UserError(f"unknown raw format {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(out)
    log = _Log(quiet)
    t0 = time.perf_counter()
    with _duckdb(out, memory_limit, threads) as con, _atomic(out) as tmp:
        if kind == "amazon2018":
            if reviews is None or meta is None:
                raise UserError("amazon2018 needs both a reviews file and a metadata file")
            stats = _load_amazon(con, Path(reviews), Path(meta), strict=strict, log=log)
            map_ids = True
        else:
            if source is None:
                raise UserError(f"{kind} needs a source folder holding {' + '.join(MOVIELENS_FILES[kind])}")
            inter, items = read_movielens(kind, Path(source))
            stats = {"records_read": inter.height}
            _register(con, inter, items)
            map_ids = False
        stats = {"kind": kind, **(extra_stats or {}), **stats}
        origin = str(reviews if kind == "amazon2018" else source)
        stats.update(_finish(con, tmp, map_ids=map_ids, require_titles=require_titles, log=log, origin=origin))
        _summarise(stats, time.perf_counter() - t0, tmp, config, log)
    return stats


def write_common_format(
    interactions: "pl.DataFrame",
    items: "pl.DataFrame",
    out: Path,
    *,
    source: str,
    require_titles: bool = False,
    extra_stats: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write already-parsed frames (integer ids) through the same rules as `convert_raw`.

    interactions: user_id, item_id, timestamp (int64) in original line order;
    items: item_id, title (raw; cleaned here). Used by fetchers whose source is not a raw file.
    """
    log = _Log(quiet)
    t0 = time.perf_counter()
    inter = interactions.select("user_id", "item_id", "timestamp").with_row_index("ord")
    with _duckdb(Path(out), "2GB", None) as con, _atomic(Path(out)) as tmp:
        stats: dict[str, Any] = {"kind": source, "records_read": inter.height, **(extra_stats or {})}
        _register(con, inter, items)
        stats.update(_finish(con, tmp, map_ids=False, require_titles=require_titles, log=log, origin=source))
        _summarise(stats, time.perf_counter() - t0, tmp, None, log)
    return stats


# --------------------------------------------------------------------------- MovieLens


def read_movielens(kind: Kind, source: Path) -> tuple["pl.DataFrame", "pl.DataFrame"]:
    """Parse MovieLens 100K/1M files into (interactions with `ord`, items with raw titles).

    Accepts the folder holding the files or its parent (an unzipped archive: ml-100k/, ml-1m/).
    """
    import polars as pl

    data_name, item_name = MOVIELENS_FILES[kind]
    folder = _movielens_folder(kind, source)
    data_path, item_path = folder / data_name, folder / item_name
    if kind == "ml-100k":
        # u.data: user \t item \t rating \t timestamp ; u.item: id|title|date|video date|url|19 genre flags
        inter = _split_lines(data_path, "\t", ["user_id", "item_id", "rating", "timestamp"], "user id \\t item id \\t rating \\t timestamp")
        items = _split_lines(item_path, "|", ["item_id", "title"], "movie id|title|release date|...", min_fields=2)
    else:
        # ratings.dat: UserID::MovieID::Rating::Timestamp ; movies.dat: MovieID::Title::Genres
        inter = _split_lines(data_path, "::", ["user_id", "item_id", "rating", "timestamp"], "UserID::MovieID::Rating::Timestamp")
        items = _split_lines(item_path, "::", ["item_id", "title", "genres"], "MovieID::Title::Genres")
    inter = _to_int(inter, ["user_id", "item_id", "timestamp"], data_path).select(
        "ord", "user_id", "item_id", "timestamp"
    )
    items = _to_int(items, ["item_id"], item_path).select("item_id", pl.col("title"))
    return inter, items


def _movielens_folder(kind: Kind, source: Path) -> Path:
    names = MOVIELENS_FILES[kind]
    if not source.exists():
        raise UserError(f"{kind} source folder not found: {source}. Pass the folder holding {' + '.join(names)}.")
    for folder in (source, source / kind):
        if all((folder / n).is_file() for n in names):
            return folder
    found = sorted(p.name for p in source.iterdir()) if source.is_dir() else [source.name]
    raise UserError(
        f"{source} does not hold the {kind} files: expected {' and '.join(names)} "
        f"(in it or in {kind}/), found {', '.join(found[:12]) or 'nothing'}."
    )


def decode_text(data: bytes) -> str:
    """UTF-8 where the bytes are valid UTF-8, else latin-1 (GroupLens ships latin-1 files).

    Valid UTF-8 that was really meant as latin-1 is vanishingly rare, so this reads both the
    original files and re-encoded mirrors without mojibake.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_lines(path: Path, sep: str, names: list[str], layout: str, min_fields: int | None = None) -> "pl.DataFrame":
    """Split each non-empty line on `sep` (a multi-character separator is fine) into `names` columns.

    Lines with fewer fields than needed are a wrong file, not noise: fail naming the first one.
    """
    import polars as pl

    text = decode_text(path.read_bytes())
    lines = pl.Series("line", text.splitlines(), dtype=pl.Utf8)
    df = pl.DataFrame({"line": lines}).with_row_index("ord").filter(pl.col("line").str.strip_chars() != "")
    if df.height == 0:
        raise UserError(f"{path} is empty; expected lines like {layout}")
    need = min_fields or len(names)
    parts = df.select("ord", pl.col("line").str.split(sep).alias("f"))
    bad = parts.filter(pl.col("f").list.len() < need)
    if bad.height:
        line_no = int(bad["ord"][0]) + 1
        example = df.filter(pl.col("ord") == bad["ord"][0])["line"][0]
        raise UserError(
            f"{path} line {line_no} has {len(bad['f'][0])} field(s) separated by {sep!r}, expected {need} "
            f"({layout}); found {example[:120]!r}. Is this the right file for this format?"
        )
    return parts.select("ord", *[pl.col("f").list.get(i).alias(n) for i, n in enumerate(names[:need])])


def _to_int(df: "pl.DataFrame", cols: list[str], path: Path) -> "pl.DataFrame":
    import polars as pl

    out = df.with_columns([pl.col(c).str.strip_chars().cast(pl.Int64, strict=False).alias(c) for c in cols])
    for c in cols:
        bad = out.filter(pl.col(c).is_null())
        if bad.height:
            raw = df.filter(pl.col("ord") == bad["ord"][0])[c][0]
            raise UserError(
                f"{path} line {int(bad['ord'][0]) + 1}: column {c!r} should be an integer, found {raw!r}. "
                "Is this the right file for this format?"
            )
    return out


# --------------------------------------------------------------------------- Amazon 2018


def _load_amazon(con: "duckdb.DuckDBPyConnection", reviews: Path, meta: Path, *, strict: bool, log: "_Log") -> dict[str, Any]:
    """Stream reviews and metadata into DuckDB: table `reviews`, view `raw(ord, u, i, t)` of its
    complete records, and table `titles(i, title)`."""
    import polars as pl

    from automr.data.titles import clean_titles

    for p, what in ((reviews, "reviews"), (meta, "metadata")):
        if not p.is_file():
            raise UserError(f"Amazon {what} file not found: {p}. Pass a JSON lines file (.json or .json.gz).")
        _check_fields(con, p, AMAZON_REVIEW_FIELDS if what == "reviews" else AMAZON_META_FIELDS, what)

    stats: dict[str, Any] = {}
    with log.step(f"reading reviews {reviews.name}"):
        # row_number() OVER () is documented to follow the input order: it is the line order.
        _create_from_json(
            con,
            "reviews",
            reviews,
            AMAZON_REVIEW_FIELDS,
            "row_number() OVER () AS ord, reviewerID AS u, asin AS i, unixReviewTime AS t",
            strict,
        )
        n, n_empty, n_partial = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE u IS NULL AND i IS NULL AND t IS NULL),"
            " count(*) FILTER (WHERE (u IS NULL OR i IS NULL OR t IS NULL)"
            "   AND NOT (u IS NULL AND i IS NULL AND t IS NULL)) FROM reviews"
        ).fetchall()[0]
        if strict and n_partial:
            _fail_missing_field(con, reviews)
        con.execute("CREATE VIEW raw AS SELECT * FROM reviews WHERE u IS NOT NULL AND i IS NOT NULL AND t IS NOT NULL")
    stats.update(records_read=int(n), skipped_malformed=int(n_empty), skipped_missing_fields=int(n_partial))
    stats.update(_skipped_examples(con, reviews, bool(n_empty), bool(n_partial)))
    log.rate("reviews", int(n))

    with log.step(f"reading metadata {meta.name}"):
        _create_from_json(con, "meta", meta, AMAZON_META_FIELDS, "row_number() OVER () AS ord, asin AS i, title", strict)
        n_meta, n_meta_bad = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE i IS NULL) FROM meta"
        ).fetchall()[0]
        con.execute(
            "CREATE TABLE meta_reviewed AS SELECT ord, i, title FROM meta"
            " WHERE i IN (SELECT DISTINCT i FROM raw) AND title IS NOT NULL"
        )
        con.execute("DROP TABLE meta")
    stats.update(meta_records=int(n_meta), meta_skipped=int(n_meta_bad))

    with log.step("cleaning titles"):
        # HTML unescaping needs Python; titles of reviewed items come over in bounded batches
        # (the catalogue, never the reviews). Clean first, then keep each asin's first non-empty
        # title: the 2018 metadata repeats some asins.
        con.execute("CREATE TABLE cleaned (ord BIGINT, i VARCHAR, title VARCHAR)")
        reader = con.cursor().sql("SELECT ord, i, title FROM meta_reviewed").to_arrow_reader(TITLE_BATCH_ROWS)
        for batch in reader:
            part = clean_titles(pl.from_arrow(batch)).filter(pl.col("title") != "")  # type: ignore[arg-type]
            con.register("cleaned_df", part.to_arrow())
            con.execute("INSERT INTO cleaned SELECT ord, i, title FROM cleaned_df")
            con.unregister("cleaned_df")
        con.execute("CREATE TABLE titles AS SELECT i, arg_min(title, ord) AS title FROM cleaned GROUP BY i")
        con.execute("DROP TABLE cleaned")
        con.execute("DROP TABLE meta_reviewed")
    return stats


def _check_fields(con: "duckdb.DuckDBPyConnection", path: Path, fields: dict[str, str], what: str) -> None:
    """Sniff the keys of the first lines; a wrong file fails here with what was found vs expected."""
    if path.stat().st_size == 0:
        raise UserError(f"{path} ({what}) is empty; expected JSON lines with {', '.join(fields)}")
    try:
        described = con.execute(
            "DESCRIBE SELECT * FROM read_ndjson(?, ignore_errors=true, sample_size=2048, compression='auto')", [str(path)]
        ).fetchall()
    except Exception as exc:  # duckdb.Error: not JSON at all, unreadable gzip, ...
        from automr.data.common import TRUNCATED_MARKERS, unreadable

        if any(m in _first_line(exc).lower() for m in TRUNCATED_MARKERS):
            raise unreadable(path, exc) from None
        raise UserError(f"cannot read {path} as JSON lines ({what}): {_first_line(exc)}") from None
    found = [row[0] for row in described]
    missing = [f for f in fields if f not in found]
    if missing:
        hint = ""
        if found == ["json"] or not found:
            hint = (
                " The first lines are not JSON objects: is it JSON lines? (Amazon 2014 metadata uses Python "
                "literals, not JSON: convert it first.)"
            )
        elif "parent_asin" in found or "user_id" in found:
            hint = " This looks like the Amazon 2023 format; only the 2018 format is supported."
        raise UserError(
            f"{path} ({what}) lacks required field(s) {', '.join(missing)}: expected {', '.join(fields)}, "
            f"found {', '.join(found[:20]) or 'none'}.{hint}"
        )


def _create_from_json(
    con: "duckdb.DuckDBPyConnection", table: str, path: Path, fields: dict[str, str], select: str, strict: bool
) -> None:
    import duckdb

    cols = "{" + ", ".join(f"'{k}': '{v}'" for k, v in fields.items()) + "}"
    sql = (
        f"CREATE TABLE {table} AS SELECT {select} FROM read_ndjson(?, columns={cols}, "
        f"ignore_errors={'false' if strict else 'true'}, compression='auto')"
    )
    try:
        con.execute(sql, [str(path)])
    except duckdb.IOException as exc:  # a truncated or corrupt .gz surfaces here, past the first lines' sniff
        from automr.data.common import unreadable

        raise unreadable(path, exc) from None
    except duckdb.InvalidInputException as exc:
        if not strict:
            raise UserError(f"cannot read {path}: {_first_line(exc)}") from None
        line, text = _locate_bad_json_line(path, list(fields))
        where = f"line {line}: {text[:200]!r}" if line else _first_line(exc)
        raise UserError(
            f"malformed JSON in {path}, {where}. Fix or remove that line, or import without --strict to skip "
            "(and count) malformed lines."
        ) from None


def _locate_bad_json_line(path: Path, fields: list[str]) -> tuple[int | None, str]:
    """Exact 1-based number of the first line that is not a JSON object with `fields`.

    Only runs when a strict import already failed. DuckDB's own line number is off by one in
    some versions, so the error message names the line found here instead.
    """
    import gzip

    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        for no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                return no, raw.decode("utf-8", "replace").rstrip("\n")
            if not isinstance(obj, dict):
                return no, raw.decode("utf-8", "replace").rstrip("\n")
    return None, ""


def _first_incomplete(con: "duckdb.DuckDBPyConnection", *, partial: bool) -> tuple[int, list[str]]:
    """(record number, missing fields) of the first review record lacking some (partial) or all fields."""
    where = "(u IS NULL OR i IS NULL OR t IS NULL)" + (" AND NOT (u IS NULL AND i IS NULL AND t IS NULL)" if partial else " AND u IS NULL AND i IS NULL AND t IS NULL")
    row = con.execute(f"SELECT ord, u, i, t FROM reviews WHERE {where} ORDER BY ord LIMIT 1").fetchall()[0]
    return int(row[0]), [n for n, v in zip(AMAZON_REVIEW_FIELDS, row[1:]) if v is None]


EXAMPLE_SCAN_LINES = 2_000_000  # a skipped line's text is shown only if it is among the first ones (a Python scan)


def _record_text(path: Path, record: int) -> str | None:
    """The text of the `record`-th non-empty line (DuckDB's record number), if within EXAMPLE_SCAN_LINES."""
    import gzip
    import itertools

    if record > EXAMPLE_SCAN_LINES:
        return None
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        lines = (raw for raw in itertools.islice(fh, EXAMPLE_SCAN_LINES * 2) if raw.strip())
        raw = next(itertools.islice(lines, record - 1, None), None)
    return None if raw is None else raw.decode("utf-8", "replace").rstrip("\r\n")[:160]


def _skipped_examples(con: "duckdb.DuckDBPyConnection", path: Path, malformed: bool, partial: bool) -> dict[str, str]:
    """One example per kind of skipped review record, for the import's warnings."""
    out = {}
    for key, wanted, is_partial in (("skipped_malformed_example", malformed, False), ("skipped_missing_fields_example", partial, True)):
        if wanted:
            record, names = _first_incomplete(con, partial=is_partial)
            text = _record_text(path, record)
            missing = "not a JSON object with " if not is_partial else "no usable "
            out[key] = f"record {record} (counting non-empty lines), {missing}{', '.join(names)}" + (f": {text!r}" if text else "")
    return out


def _fail_missing_field(con: "duckdb.DuckDBPyConnection", path: Path) -> None:
    record, names = _first_incomplete(con, partial=True)
    raise UserError(
        f"{path}: record {record} (counting non-empty lines) has no usable {', '.join(names)} "
        f"(expected {', '.join(AMAZON_REVIEW_FIELDS)}, {AMAZON_REVIEW_FIELDS['unixReviewTime']} time). "
        "Fix the record, or import without --strict to skip and count such records."
    )


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


# --------------------------------------------------------------------------- shared pipeline


def _register(con: "duckdb.DuckDBPyConnection", inter: "pl.DataFrame", items: "pl.DataFrame") -> None:
    """Load parsed frames as `reviews(ord, u, i, t)` (viewed as `raw`) and `titles(i, title)` (cleaned, non-empty)."""
    import polars as pl

    from automr.data.titles import clean_titles

    raw = inter.select(
        pl.col("ord").cast(pl.Int64),
        pl.col("user_id").cast(pl.Int64).alias("u"),
        pl.col("item_id").cast(pl.Int64).alias("i"),
        pl.col("timestamp").cast(pl.Int64).alias("t"),
    )
    titles = (
        clean_titles(items.select(pl.col("item_id").cast(pl.Int64), pl.col("title").cast(pl.Utf8)))
        .filter(pl.col("title").is_not_null() & (pl.col("title") != ""))
        .unique(subset="item_id", keep="first", maintain_order=True)
        .select(pl.col("item_id").alias("i"), "title")
    )
    for name, df in (("reviews", raw), ("titles", titles)):
        con.register(f"{name}_df", df.to_arrow())
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_df")
        con.unregister(f"{name}_df")
    con.execute("CREATE VIEW raw AS SELECT * FROM reviews")


def _finish(
    con: "duckdb.DuckDBPyConnection", tmp: Path, *, map_ids: bool, require_titles: bool, log: "_Log", origin: str
) -> dict[str, Any]:
    """From raw(ord, u, i, t) and titles(i, title): drop, dedupe, map ids, order, write Parquet.

    origin names the input in errors (the reviews file, the MovieLens folder, a fetcher's source).
    """
    with log.step("dropping untitled items and duplicates"):
        stats = _keep_titled_unique(con, require_titles)
    _check_time_unit(con, origin)
    with log.step("mapping ids and ordering sequences"):
        _map_and_order(con, map_ids)
    with log.step("writing Parquet"):
        stats |= _write_tables(con, tmp, map_ids)
    return stats


def _keep_titled_unique(con: "duckdb.DuckDBPyConnection", require_titles: bool) -> dict[str, Any]:
    """Table kept = raw without untitled items and exact (user, item, time) duplicates; what was dropped."""
    n_items_all, n_untitled_items, n_untitled_rows = con.execute(
        "SELECT count(DISTINCT i), count(DISTINCT i) FILTER (WHERE NOT has_title),"
        " count(*) FILTER (WHERE NOT has_title)"
        " FROM (SELECT i, i IN (SELECT i FROM titles) AS has_title FROM raw)"
    ).fetchall()[0]
    if require_titles and n_untitled_items:
        examples = [r[0] for r in con.execute(
            "SELECT DISTINCT i FROM raw WHERE i NOT IN (SELECT i FROM titles) ORDER BY i LIMIT 5"
        ).fetchall()]
        raise UserError(
            f"{n_untitled_items} of {n_items_all} items have no title (e.g. {', '.join(map(str, examples))}); "
            "add them to the metadata, or import without --require-titles to drop them with their "
            f"{n_untitled_rows} interactions."
        )
    con.execute(
        "CREATE TABLE kept AS SELECT * FROM raw WHERE i IN (SELECT i FROM titles)"
        " QUALIFY row_number() OVER (PARTITION BY u, i, t ORDER BY ord) = 1"
    )
    n_raw = con.execute("SELECT count(*) FROM raw").fetchall()[0][0]
    n_kept = con.execute("SELECT count(*) FROM kept").fetchall()[0][0]
    con.execute("DROP VIEW raw")
    con.execute("DROP TABLE reviews")
    stats = {
        "dropped_untitled_items": int(n_untitled_items),
        "dropped_untitled_interactions": int(n_untitled_rows),
        "dropped_duplicates": int(n_raw - n_untitled_rows - n_kept),
    }
    if n_kept == 0:
        raise UserError(
            f"no interactions left to write: read {n_raw} usable records, {n_untitled_rows} of them on items "
            f"without a title, {stats['dropped_duplicates']} duplicates. Check that the metadata matches the reviews."
        )
    return stats


def _map_and_order(con: "duckdb.DuckDBPyConnection", map_ids: bool) -> None:
    """Table seq = kept with dense ids (or the raw ones) and each user's pos in (time, read order)."""
    if map_ids:
        # Dense rank over sorted raw ids: deterministic for a given input.
        con.execute("CREATE TABLE umap AS SELECT u, row_number() OVER (ORDER BY u) AS user_id FROM (SELECT DISTINCT u FROM kept)")
        con.execute("CREATE TABLE imap AS SELECT i, row_number() OVER (ORDER BY i) AS item_id FROM (SELECT DISTINCT i FROM kept)")
        ids = "kept JOIN umap USING (u) JOIN imap USING (i)"
    else:
        con.execute("CREATE TABLE imap AS SELECT DISTINCT i, i AS item_id FROM kept")
        ids = "(SELECT *, u AS user_id, i AS item_id FROM kept)"
    con.execute(
        f"CREATE TABLE seq AS SELECT user_id::BIGINT AS user_id, item_id::BIGINT AS item_id, t::BIGINT AS timestamp,"
        f" (row_number() OVER (PARTITION BY user_id ORDER BY t, ord) - 1)::BIGINT AS pos FROM {ids}"
    )
    con.execute("DROP TABLE kept")


def _write_tables(con: "duckdb.DuckDBPyConnection", tmp: Path, map_ids: bool) -> dict[str, Any]:
    """interactions/items(/users).parquet from seq and the id maps; their sizes and time range."""
    _copy(con, "SELECT user_id, item_id, timestamp, pos FROM seq ORDER BY user_id, pos", tmp / "interactions.parquet")
    source_col = ", m.i::VARCHAR AS source_id" if map_ids else ""
    _copy(
        con,
        f"SELECT m.item_id::BIGINT AS item_id, t.title{source_col} FROM imap m JOIN titles t USING (i) ORDER BY item_id",
        tmp / "items.parquet",
    )
    if map_ids:
        _copy(con, "SELECT user_id::BIGINT AS user_id, u::VARCHAR AS source_id FROM umap ORDER BY user_id", tmp / "users.parquet")
    users, items, n, t_min, t_max = con.execute(
        "SELECT count(DISTINCT user_id), count(DISTINCT item_id), count(*), min(timestamp), max(timestamp) FROM seq"
    ).fetchall()[0]
    shared = con.execute(
        "SELECT count(*) FROM (SELECT title FROM imap JOIN titles USING (i) GROUP BY title HAVING count(*) > 1)"
    ).fetchall()[0][0]
    return {
        "users": int(users), "items": int(items), "interactions": int(n),
        "titles_shared_by_several_items": int(shared), "time_min": int(t_min), "time_max": int(t_max),
    }


def _check_time_unit(con: "duckdb.DuckDBPyConnection", origin: str) -> None:
    """The common format holds unix seconds: refuse times whose median says ms, us or ns (see common.TIME_UNITS)."""
    from automr.data.common import TIME_UNITS, time_unit_error

    limits = [t for t, _, _ in TIME_UNITS]
    row = con.execute(
        "SELECT count(*), " + ", ".join(f"count(*) FILTER (WHERE t >= {t})" for t in limits) + ", max(t) FROM kept"
    ).fetchall()[0]
    error = time_unit_error(origin, int(row[0]), dict(zip(limits, map(int, row[1:-1]))), row[-1])
    if error is not None:
        raise error


def _copy(con: "duckdb.DuckDBPyConnection", query: str, path: Path) -> None:
    con.execute(f"COPY ({query}) TO '{_sql_str(path)}' (FORMAT parquet, COMPRESSION zstd)")


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


@contextmanager
def _duckdb(out: Path, memory_limit: str, threads: int | None) -> Iterator["duckdb.DuckDBPyConnection"]:
    """An in-memory DuckDB that spills to a scratch folder next to `out` (same disk) past `memory_limit`.

    In-memory tables still spill to temp_directory, and skip the file-backed database's
    checkpoint writes (3x faster on the 2M-line benchmark).
    """
    import duckdb

    from automr.utils.io import temp_dir

    scratch = temp_dir(out, "duckdb")  # named by our pid: a killed import's scratch is removed later
    con = duckdb.connect(":memory:")
    try:
        try:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        except duckdb.Error as exc:
            raise UserError(f"invalid memory_limit {memory_limit!r} (use e.g. 4GB or 500MB): {_first_line(exc)}") from None
        con.execute(f"SET temp_directory = '{_sql_str(scratch / 'spill')}'")
        con.execute("SET preserve_insertion_order = true")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        yield con
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _atomic(out: Path) -> Iterator[Path]:
    from automr.utils.io import atomic_dir

    with atomic_dir(out) as tmp:
        yield tmp


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------- reporting


class _Log:
    """Rich status spinner per step and a timing line after it (silent when quiet)."""

    def __init__(self, quiet: bool) -> None:
        from automr.utils.logging import get_console

        self.quiet = quiet
        self.console = get_console(stderr=True)
        self._last = 0.0

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.quiet:
            yield
        else:
            with self.console.status(f"{what} ..."):
                yield
        self._last = time.perf_counter() - t0
        if not self.quiet:
            self.console.print(f"[green]done[/green] {what} ({self._last:.1f} s)")

    def rate(self, what: str, n: int) -> None:
        if not self.quiet and self._last > 0:
            self.console.print(f"  {n:,} {what} lines at {n / self._last:,.0f} rows/s")


def _summarise(stats: dict[str, Any], seconds: float, tmp: Path, config: StageConfig | None, log: _Log) -> None:
    from automr.utils.io import write_json

    stats["seconds"] = round(seconds, 3)
    stats["rows_per_s"] = round(stats.get("records_read", 0) / seconds, 1) if seconds > 0 else None
    stats["warnings"] = import_warnings(stats)
    write_json(tmp / "stats.json", stats)
    if config is not None:
        save_config(config, tmp)
    if log.quiet:
        return
    from rich.table import Table

    table = Table(title=f"import {stats['kind']}", show_header=False)
    for key in (
        "users", "items", "interactions", "records_read", "skipped_malformed", "skipped_missing_fields",
        "dropped_untitled_items", "dropped_untitled_interactions", "dropped_duplicates",
        "titles_shared_by_several_items", "rows_per_s", "seconds",
    ):
        if key in stats:
            value = stats[key]
            table.add_row(key, f"{value:,}" if isinstance(value, (int, float)) else str(value))
    log.console.print(table)
    for warning in stats["warnings"]:  # soft_wrap: one line each, so logs can be searched
        log.console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)


def import_warnings(stats: dict[str, Any]) -> list[str]:
    """What the import dropped that a user should know about, each with an example where one is known."""
    out = []
    for key, what in (("skipped_malformed", "malformed lines"), ("skipped_missing_fields", "records missing a field")):
        if stats.get(key):
            example = stats.get(f"{key}_example")
            out.append(
                f"{stats[key]:,} {what} of {stats['records_read']:,} were skipped" + (f", e.g. {example}" if example else "")
                + ". Use --strict to stop at the first one instead."
            )
    if stats.get("dropped_duplicates"):
        out.append(
            f"{stats['dropped_duplicates']:,} records repeat an earlier record's user, item and timestamp and were dropped "
            "(the first is kept): a repeated interaction would be its own copy's recent history."
        )
    return out


__all__ = [
    "KINDS",
    "convert_raw",
    "decode_text",
    "read_movielens",
    "write_common_format",
]
