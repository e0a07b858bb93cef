"""Raw-format readers: Amazon 2018 JSON lines and MovieLens 100K/1M into the common format.

Every fixture is written here, in the format's real encoding, with the awkward cases the real
files have: malformed lines, HTML entities, missing titles, duplicate rows, ties in time.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from automr.config import load_config
from automr.data.readers import convert_raw, decode_text
from automr.stages.import_data import ImportConfig
from automr.errors import UserError

# --------------------------------------------------------------------------- Amazon fixtures

REVIEWS = [
    {"reviewerID": "B_USER", "asin": "X1", "unixReviewTime": 300, "overall": 5.0, "reviewText": "fine"},
    {"reviewerID": "A_USER", "asin": "X2", "unixReviewTime": 200},
    {"reviewerID": "A_USER", "asin": "X1", "unixReviewTime": 200},  # tie with the line above: line order wins
    {"reviewerID": "A_USER", "asin": "X1", "unixReviewTime": 200},  # duplicate (user, item, time): dropped
    '{"reviewerID": "A_USER", "asin": "X3", unixReviewTime: BROKEN',  # malformed line 5
    {"reviewerID": "A_USER", "asin": "X3", "unixReviewTime": 100, "style": {"Format:": " Paperback"}},
    {"reviewerID": "B_USER", "asin": "X9", "unixReviewTime": 100},  # X9 has no title: dropped
    {"asin": "X1", "unixReviewTime": 50},  # no reviewerID: skipped
    {"reviewerID": "C_USER", "asin": "X4", "unixReviewTime": 400},  # X4 not in the metadata: dropped
    {"reviewerID": "B_USER", "asin": "X2", "unixReviewTime": 300},
]
META = [
    {"asin": "X1", "title": "Tom &amp;amp; Jerry &quot;Classics&quot;", "price": "$3"},
    {"asin": "X2", "title": "  Caf&eacute;\n  Stories  "},
    {"asin": "X3", "title": "&nbsp;"},  # empty once cleaned; the next X3 record has the title
    {"asin": "X3", "title": "The Third Book"},
    {"asin": "X9"},
    {"asin": "X9", "title": ""},
]


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(params=[False, True], ids=["json", "json.gz"])
def amazon(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    ext = ".json.gz" if request.param else ".json"
    return (
        _write_jsonl(tmp_path / f"Books{ext}", REVIEWS, gz=request.param),
        _write_jsonl(tmp_path / f"meta_Books{ext}", META, gz=request.param),
    )


def test_amazon_conversion_values(amazon: tuple[Path, Path], tmp_path: Path) -> None:
    reviews, meta = amazon
    out = tmp_path / "out"
    stats = convert_raw("amazon2018", reviews=reviews, meta=meta, out=out, quiet=True)

    # Ids: dense rank over sorted raw ids (A_USER=1, B_USER=2; X1=1, X2=2, X3=3).
    users = pl.read_parquet(out / "users.parquet")
    assert users.to_dict(as_series=False) == {"user_id": [1, 2], "source_id": ["A_USER", "B_USER"]}
    items = pl.read_parquet(out / "items.parquet")
    assert items.to_dict(as_series=False) == {
        "item_id": [1, 2, 3],
        "title": ['Tom & Jerry "Classics"', "Café Stories", "The Third Book"],
        "source_id": ["X1", "X2", "X3"],
    }
    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter.schema == {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "pos": pl.Int64}
    assert inter.rows() == [
        (1, 3, 100, 0),
        (1, 2, 200, 1),  # X2 came first in the file at the tied time 200
        (1, 1, 200, 2),
        (2, 1, 300, 0),
        (2, 2, 300, 1),
    ]
    assert stats["records_read"] == 10
    assert stats["skipped_malformed"] == 1
    assert stats["skipped_missing_fields"] == 1
    assert stats["dropped_untitled_items"] == 2  # X9 (empty title), X4 (absent from metadata)
    assert stats["dropped_untitled_interactions"] == 2
    assert stats["dropped_duplicates"] == 1
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 3, 5)
    assert json.loads((out / "stats.json").read_text())["interactions"] == 5
    # Nothing but the output folder is left next to it (no temp or DuckDB scratch folders).
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_amazon_json_and_gz_agree(tmp_path: Path) -> None:
    outs = []
    for gz in (False, True):
        ext = ".json.gz" if gz else ".json"
        r = _write_jsonl(tmp_path / f"r{ext}", REVIEWS, gz)
        m = _write_jsonl(tmp_path / f"m{ext}", META, gz)
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / f"o{int(gz)}", quiet=True)
        outs.append(tmp_path / f"o{int(gz)}")
    for name in ("interactions", "items", "users"):
        assert pl.read_parquet(outs[0] / f"{name}.parquet").equals(pl.read_parquet(outs[1] / f"{name}.parquet"))


def test_amazon_strict_names_file_and_line(tmp_path: Path) -> None:
    r = _write_jsonl(tmp_path / "reviews.json.gz", REVIEWS, gz=True)
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError, match=r"malformed JSON in .*reviews\.json\.gz, line 5: .*BROKEN"):
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", strict=True, quiet=True)
    assert not (tmp_path / "out").exists()


def test_amazon_strict_missing_field(tmp_path: Path) -> None:
    rows = [r for r in REVIEWS if isinstance(r, dict)]  # no malformed line: the missing reviewerID is next
    r = _write_jsonl(tmp_path / "reviews.json", rows)
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError, match=r"record 7 .* has no usable reviewerID"):
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", strict=True, quiet=True)


def test_amazon_require_titles(tmp_path: Path) -> None:
    r = _write_jsonl(tmp_path / "reviews.json", REVIEWS)
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError, match=r"2 of 5 items have no title \(e\.g\. X4, X9\)"):
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", require_titles=True, quiet=True)


def test_amazon_wrong_fields_says_found_and_expected(tmp_path: Path) -> None:
    r = _write_jsonl(tmp_path / "reviews.json", [{"user_id": "u", "parent_asin": "p", "timestamp": 1}])
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError) as info:
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", quiet=True)
    msg = str(info.value)
    assert "lacks required field(s) reviewerID, asin, unixReviewTime" in msg
    assert "found user_id, parent_asin, timestamp" in msg and "2023" in msg
    literal = tmp_path / "meta2014.json"
    literal.write_text("{'asin': 'X1', 'title': 'Python literal, not JSON'}\n")
    with pytest.raises(UserError, match=r"lacks required field\(s\) asin, title: .* are not JSON objects"):
        convert_raw("amazon2018", reviews=_write_jsonl(tmp_path / "ok.json", REVIEWS), meta=literal, out=tmp_path / "out", quiet=True)
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UserError, match=r"empty\.json \(reviews\) is empty"):
        convert_raw("amazon2018", reviews=tmp_path / "empty.json", meta=m, out=tmp_path / "out", quiet=True)


def test_amazon_missing_file_and_empty_result(tmp_path: Path) -> None:
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError, match="reviews file not found: .*nope.json"):
        convert_raw("amazon2018", reviews=tmp_path / "nope.json", meta=m, out=tmp_path / "out", quiet=True)
    only_untitled = _write_jsonl(tmp_path / "r.json", [{"reviewerID": "a", "asin": "X9", "unixReviewTime": 1}])
    with pytest.raises(UserError, match="no interactions left"):
        convert_raw("amazon2018", reviews=only_untitled, meta=m, out=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "r.json"]  # nothing half-written


def test_amazon_import_warns_with_examples(tmp_path: Path) -> None:
    r = _write_jsonl(tmp_path / "reviews.json", REVIEWS)
    m = _write_jsonl(tmp_path / "meta.json", META)
    stats = convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", quiet=True)
    malformed, missing, dupes = stats["warnings"]
    assert malformed.startswith("1 malformed lines of 10 were skipped, e.g. record 5 (counting non-empty lines)")
    assert "BROKEN" in malformed and "--strict" in malformed
    assert missing.startswith("1 records missing a field of 10 were skipped, e.g. record 8") and "no usable reviewerID" in missing
    assert dupes.startswith("1 records repeat an earlier record's user, item and timestamp")
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["warnings"] == stats["warnings"]


def test_truncated_gzip_and_millisecond_imports_are_clear_errors(tmp_path: Path) -> None:
    import duckdb

    from automr.data.readers import AMAZON_REVIEW_FIELDS, _create_from_json

    m = _write_jsonl(tmp_path / "meta.json", META)
    r = _write_jsonl(tmp_path / "reviews.json.gz", REVIEWS, gz=True)
    r.write_bytes(r.read_bytes()[:-40])
    with pytest.raises(UserError, match=r"reviews\.json\.gz is truncated: it ends before its gzip-compressed JSON lines data"):
        convert_raw("amazon2018", reviews=r, meta=m, out=tmp_path / "out", quiet=True)
    # Past the first lines' sniff (a large file), the full read says the same.
    with pytest.raises(UserError, match=r"reviews\.json\.gz is truncated"):
        _create_from_json(duckdb.connect(), "reviews", r, AMAZON_REVIEW_FIELDS, "*", False)
    ms = [{"reviewerID": f"U{u}", "asin": "X1", "unixReviewTime": 1_500_000_000_000 + u} for u in range(3)]
    with pytest.raises(UserError, match=r"ms\.json: the timestamps look like milliseconds.*divide the timestamp column by 1,000"):
        convert_raw("amazon2018", reviews=_write_jsonl(tmp_path / "ms.json", ms), meta=m, out=tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "ms.json", "reviews.json.gz"]  # nothing half-written


def test_failed_import_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    m = _write_jsonl(tmp_path / "meta.json", META)
    with pytest.raises(UserError):
        convert_raw("amazon2018", reviews=tmp_path / "missing.json", meta=m, out=out, quiet=True)
    assert (out / "marker").read_text() == "old"


# --------------------------------------------------------------------------- MovieLens fixtures


def _ml100k(folder: Path) -> Path:
    folder.mkdir(parents=True)
    # u.data: user \t item \t rating \t timestamp (GroupLens order is not chronological)
    (folder / "u.data").write_text("2\t3\t4\t500\n1\t2\t5\t100\n1\t1\t3\t100\n2\t1\t1\t400\n1\t3\t2\t50\n")
    genres = "|".join(["0"] * 19)
    rows = [
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{genres}",
        f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{genres}",
        f"3|Shawshank Redemption, The (1994)|01-Jan-1994||http://x|{genres}",
    ]
    (folder / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return folder


def _ml1m(folder: Path, encoding: str = "latin-1") -> Path:
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n1::914::3::978300760\n")
    movies = "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Misérables, Les (1995)::Drama|Musical\n914::My Fair Lady (1964)::Musical|Romance\n"
    (folder / "movies.dat").write_bytes(movies.encode(encoding))
    return folder


def test_ml100k_latin1_and_line_order_ties(tmp_path: Path) -> None:
    src = _ml100k(tmp_path / "ml-100k")
    out = tmp_path / "out"
    stats = convert_raw("ml-100k", source=tmp_path, out=out, quiet=True)  # parent of ml-100k/ works too
    items = pl.read_parquet(out / "items.parquet")
    assert items.to_dict(as_series=False) == {
        "item_id": [1, 2, 3],
        "title": ["Toy Story (1995)", "Misérables, Les (1995)", "Shawshank Redemption, The (1994)"],
    }
    inter = pl.read_parquet(out / "interactions.parquet")
    # user 1: item 3 @50, then items 2 and 1 tied @100 in file order (2 before 1); ids are kept.
    assert inter.rows() == [(1, 3, 50, 0), (1, 2, 100, 1), (1, 1, 100, 2), (2, 1, 400, 0), (2, 3, 500, 1)]
    assert not (out / "users.parquet").exists()
    assert stats["interactions"] == 5 and stats["dropped_duplicates"] == 0
    assert src.exists()


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_ml1m_both_encodings(tmp_path: Path, encoding: str) -> None:
    _ml1m(tmp_path / "src", encoding)
    out = tmp_path / "out"
    convert_raw("ml-1m", source=tmp_path / "src", out=out, quiet=True)
    items = pl.read_parquet(out / "items.parquet")
    assert items["title"].to_list() == ["Misérables, Les (1995)", "My Fair Lady (1964)", "One Flew Over the Cuckoo's Nest (1975)"]
    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter.rows() == [
        (1, 1193, 978300760, 0),  # tied with 914 at 978300760; 1193 is earlier in the file
        (1, 914, 978300760, 1),
        (1, 661, 978302109, 2),
        (2, 1193, 978298413, 0),
    ]


def test_movielens_wrong_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ratings.dat").write_text("1::1193::5::978300760\n")
    (src / "movies.dat").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    with pytest.raises(UserError, match=r"movies\.dat line 1 has 1 field\(s\) separated by '::', expected 3 \(MovieID::Title::Genres\)"):
        convert_raw("ml-1m", source=src, out=tmp_path / "out", quiet=True)
    (src / "movies.dat").write_text("x::Toy Story (1995)::Animation\n")
    with pytest.raises(UserError, match=r"line 1: column 'item_id' should be an integer, found 'x'"):
        convert_raw("ml-1m", source=src, out=tmp_path / "out", quiet=True)
    with pytest.raises(UserError, match=r"expected u\.data and u\.item .* found movies\.dat, ratings\.dat"):
        convert_raw("ml-100k", source=src, out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_duplicates_and_untitled_movies_dropped(tmp_path: Path) -> None:
    src = _ml1m(tmp_path / "src")
    with open(src / "ratings.dat", "a") as fh:
        fh.write("1::1193::5::978300760\n3::42::5::978300000\n")  # a duplicate, and a movie not in movies.dat
    stats = convert_raw("ml-1m", source=src, out=tmp_path / "out", quiet=True)
    assert (stats["dropped_duplicates"], stats["dropped_untitled_items"], stats["dropped_untitled_interactions"]) == (1, 1, 1)
    assert stats["interactions"] == 4 and stats["users"] == 2


def test_decode_text() -> None:
    assert decode_text("Café".encode("utf-8")) == "Café"
    assert decode_text("Café".encode("latin-1")) == "Café"


def test_import_config_checks_inputs_per_kind(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="amazon2018 needs --reviews FILE and --meta FILE; missing: meta"):
        load_config(ImportConfig, kind="amazon2018", reviews=tmp_path / "r.json", out=tmp_path / "o")
    with pytest.raises(UserError, match="ml-1m needs --source FOLDER holding ratings.dat \\+ movies.dat"):
        load_config(ImportConfig, kind="ml-1m", out=tmp_path / "o")


def test_cli_import_data(tmp_path: Path) -> None:
    _ml1m(tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "automr.cli", "import-data", "--kind", "ml-1m", "--source", str(tmp_path / "src"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rows/s" in proc.stderr or "rows_per_s" in proc.stderr
    assert pl.read_parquet(out / "interactions.parquet").height == 4
    assert "kind: ml-1m" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------- streaming benchmark

_STREAM_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from automr.data.readers import convert_raw
    reviews, meta, out = map(Path, sys.argv[1:4])
    t0 = time.perf_counter()
    stats = convert_raw("amazon2018", reviews=reviews, meta=meta, out=out, memory_limit="300MB", threads=2, quiet=True)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"peak_rss": peak_kib * 1024, "seconds": seconds, **stats}))
    """
)


@pytest.mark.benchmark
def test_amazon_streaming_peak_rss(tmp_path: Path) -> None:
    """Convert ~2M generated review lines; peak RSS must stay far below the file size.

    The same rows as Python dicts would take several times the file size, so a reader that
    materialises rows in Python fails this; DuckDB streaming with a 1 GB limit passes.
    """
    import duckdb

    n_lines, n_items = 2_000_000, 200_000
    reviews, meta = tmp_path / "reviews.json", tmp_path / "meta.json"
    con = duckdb.connect()
    # Realistic lines: ids like Amazon's, a ~300-character review text, extra fields ignored by the reader.
    con.execute(
        f"""COPY (SELECT 'A' || lpad((hash(i) % 400000)::VARCHAR, 13, '0') AS reviewerID,
                        'B' || lpad((hash(i * 7) % {n_items})::VARCHAR, 9, '0') AS asin,
                        1300000000 + (hash(i * 13) % 200000000)::BIGINT AS unixReviewTime,
                        (1 + i % 5)::DOUBLE AS overall,
                        repeat('lorem ipsum ', 25) || i::VARCHAR AS reviewText,
                        'Some Reviewer' AS reviewerName
                 FROM range({n_lines}) t(i)) TO '{reviews}' (FORMAT json)"""
    )
    con.execute(
        f"""COPY (SELECT 'B' || lpad(i::VARCHAR, 9, '0') AS asin, 'Book &amp; title number ' || i::VARCHAR AS title
                 FROM range({n_items}) t(i)) TO '{meta}' (FORMAT json)"""
    )
    con.close()
    size = reviews.stat().st_size
    as_python = _python_objects_bytes(reviews, n_lines)
    proc = subprocess.run(
        [sys.executable, "-c", _STREAM_SCRIPT, str(reviews), str(meta), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\nreviews file {size / 2**20:.0f} MiB, {n_lines:,} lines (as Python dicts ~{as_python / 2**20:.0f} MiB): "
        f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB, {result['seconds']:.1f} s, "
        f"{n_lines / result['seconds']:,.0f} rows/s, {result['interactions']:,} interactions"
    )
    assert result["records_read"] == n_lines
    assert result["peak_rss"] < 0.75 * size
    assert result["peak_rss"] < 0.25 * as_python


def _python_objects_bytes(path: Path, n_lines: int, sample: int = 20_000) -> float:
    """What the file would occupy as json.loads dicts: measured on a sample, scaled to n_lines."""
    import tracemalloc

    tracemalloc.start()
    with open(path, "rb") as fh:
        rows = [json.loads(next(fh)) for _ in range(sample)]
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del rows
    return current / sample * n_lines
