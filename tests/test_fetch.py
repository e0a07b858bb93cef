"""ml-100k fetcher: GroupLens first, the RecBole wheel on PyPI as fallback, sha256-verified, cached.

The default tests build a fake GroupLens zip and a fake RecBole wheel holding the same tiny data
in each source's own format, so both parsers are pinned and must agree. The real download is
marked slow.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import urllib.error
import zipfile
from pathlib import Path

import polars as pl
import pytest

from automr.data import fetch
from automr.errors import UserError

GENRES = "|".join(["0"] * 19)
U_DATA = "1\t2\t5\t881250949\n1\t1\t3\t881250949\n2\t267\t4\t881250000\n2\t3\t1\t881260000\n"
U_ITEM = (
    f"1|Toy Story (1995)|01-Jan-1995||http://x|{GENRES}\n"
    f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{GENRES}\n"
    f"3|Land Before Time III: The Time of the Great Giving (1995) (V)|||http://x|{GENRES}\n"
    f"267|unknown||||{GENRES}\n"
)
INTER_ATOMIC = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + U_DATA
ITEM_ATOMIC = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tMisérables, Les\t1995\tDrama Musical\n"
    "3\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's\n"
    "267\tunkonwn\tunkonwn\tunknown\n"
)
EXPECTED_TITLES = {
    1: "Toy Story (1995)",
    2: "Misérables, Les (1995)",
    3: "Land Before Time III: The Time of the Great Giving (1995) (V)",
    267: "unknown",
}


def _fake_zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", U_DATA)
        zf.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))  # GroupLens ships latin-1
        zf.writestr("ml-100k/README", "fake")
    return path.read_bytes()


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        zf.writestr(fetch.RECBOLE_ML100K + "ml-100k.inter", INTER_ATOMIC)
        zf.writestr(fetch.RECBOLE_ML100K + "ml-100k.item", ITEM_ATOMIC.encode("utf-8"))
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """GroupLens unreachable; `pip download` serves a fake wheel whose hash is the trusted one."""
    (tmp_path / "src").mkdir()
    wheel = _fake_wheel(tmp_path / "src" / fetch.RECBOLE_WHEEL)
    calls = {"urlopen": 0, "pip": 0}

    def no_network(url: str, timeout: float) -> None:
        calls["urlopen"] += 1
        raise urllib.error.URLError("Name or service not known")

    def fake_pip(requirement: str, dest: Path) -> Path:
        calls["pip"] += 1
        assert requirement == f"recbole=={fetch.RECBOLE_VERSION}"
        return Path(shutil.copy(wheel, dest / wheel.name))

    monkeypatch.setattr(fetch.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(fetch, "pip_download", fake_pip)
    monkeypatch.setattr(fetch, "RECBOLE_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    return calls


def test_recbole_atomic_titles_match_grouplens(tmp_path: Path) -> None:
    inter, items = fetch.read_recbole_ml100k(_fake_wheel(tmp_path / "w.whl"))
    assert dict(zip(items["item_id"], items["title"])) == EXPECTED_TITLES
    assert inter.rows() == [(1, 2, 881250949), (1, 1, 881250949), (2, 267, 881250000), (2, 3, 881260000)]


def test_fallback_to_pypi_then_cache(offline: dict[str, int], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = fetch.fetch_dataset("ml-100k", cache_dir=cache, timeout=1, quiet=True)
    assert out == cache / "datasets" / "ml-100k"
    assert offline == {"urlopen": 1, "pip": 1}
    assert (cache / "raw" / fetch.RECBOLE_WHEEL).is_file()
    items = pl.read_parquet(out / "items.parquet")
    assert dict(zip(items["item_id"], items["title"])) == EXPECTED_TITLES
    inter = pl.read_parquet(out / "interactions.parquet")
    # Tie at 881250949: file order (item 2 before item 1) decides pos.
    assert inter.rows() == [(1, 2, 881250949, 0), (1, 1, 881250949, 1), (2, 267, 881250000, 0), (2, 3, 881260000, 1)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "pypi:recbole==1.2.1" and stats["interactions"] == 4

    # Second call: converted data is cached, nothing is fetched.
    assert fetch.fetch_dataset("ml-100k", cache_dir=cache, quiet=True) == out
    assert offline == {"urlopen": 1, "pip": 1}
    # force: converts again, but the verified wheel in the cache is reused.
    fetch.fetch_dataset("ml-100k", cache_dir=cache, force=True, timeout=1, quiet=True)
    assert offline == {"urlopen": 2, "pip": 1}


def test_grouplens_zip_and_recbole_wheel_agree(offline: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    via_pypi = fetch.fetch_dataset("ml-100k", cache_dir=tmp_path / "c1", quiet=True)
    payload = _fake_zip(tmp_path / "ml-100k.zip")
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setattr(fetch, "ML100K_ZIP_SHA256", hashlib.sha256(payload).hexdigest())
    via_grouplens = fetch.fetch_dataset("ml-100k", cache_dir=tmp_path / "c2", quiet=True)
    assert json.loads((via_grouplens / "stats.json").read_text())["source"] == fetch.ML100K_URL
    for name in ("interactions", "items"):
        assert pl.read_parquet(via_pypi / f"{name}.parquet").equals(pl.read_parquet(via_grouplens / f"{name}.parquet"))


def test_checksum_mismatch_everywhere_is_a_clear_error(offline: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _fake_zip(tmp_path / "ml-100k.zip")
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.setattr(fetch, "RECBOLE_WHEEL_SHA256", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as info:
        fetch.fetch_dataset("ml-100k", cache_dir=cache, quiet=True)
    msg = str(info.value)
    assert "checksum mismatch for ml-100k.zip" in msg and f"checksum mismatch for {fetch.RECBOLE_WHEEL}" in msg
    assert "import-data --kind ml-100k" in msg
    assert not (cache / "datasets").exists()
    assert list((cache / "raw").iterdir()) == []  # unverified downloads are deleted


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.default_cache_dir() == tmp_path / "xdg" / "automr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.default_cache_dir() == tmp_path / "home" / ".cache" / "automr"


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown data set 'ml-25m'; fetchable: ml-100k"):
        fetch.fetch_dataset("ml-25m", cache_dir=tmp_path)


@pytest.mark.slow
def test_real_fetch(tmp_path: Path) -> None:
    """Network: GroupLens if reachable, else `pip download recbole==1.2.1` (checks the real hashes)."""
    out = fetch.fetch_dataset("ml-100k", cache_dir=tmp_path, timeout=5, quiet=True)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
    items = pl.read_parquet(out / "items.parquet")
    titles = dict(zip(items["item_id"], items["title"]))
    assert titles[1] == "Toy Story (1995)" and titles[64] == "Shawshank Redemption, The (1994)"
    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter.group_by("user_id").agg(pl.len())["len"].min() == 20
