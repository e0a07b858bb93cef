"""Content fingerprints: of the item catalogue (cache keys) and of files and folders (pipeline stamps).

Embeddings (ReLLa) and LLM summaries (TRSR) are functions of the titles behind item ids; a
cache keyed by `catalogue_hash` is never reused against a different catalogue.

`automr run` stamps each stage's inputs with `path_fingerprint` (size, mtime and, for files up to
`HASH_LIMIT`, a sha256) so that replacing an input file reruns the stages that read it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the stamps need no polars; only `catalogue_hash` takes a frame
    import polars as pl

HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed; larger ones are judged by size and mtime
Fingerprint = dict[str, Any]


def catalogue_hash(items: pl.DataFrame | Iterable[tuple[int, str]], length: int = 16) -> str:
    """Hex digest of (item_id, title) pairs in id order; independent of the rows' order.

    items: an items frame (item_id, title columns) or (item_id, title) pairs; both give one hash.
    """
    import polars as pl  # here, not at module level: the pipeline's stamps need no polars

    if not isinstance(items, pl.DataFrame):
        items = pl.DataFrame(list(items), schema={"item_id": pl.Int64, "title": pl.String}, orient="row")
    rows = items.select("item_id", "title").sort("item_id")
    h = hashlib.blake2b(digest_size=16)
    for item_id, title in zip(rows["item_id"].to_list(), rows["title"].to_list()):
        h.update(f"{item_id}\t{title}\n".encode())
    return h.hexdigest()[:length]


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (hashlib.file_digest is Python 3.11+; we support 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: Path, previous: Mapping[str, Any] | None = None, *, hash_limit: int = HASH_LIMIT) -> Fingerprint:
    """{size, mtime_ns, sha256} of a file; sha256 is None above `hash_limit`.

    A `previous` fingerprint with the same size and mtime lends its hash, as git's index does, so
    checking an unchanged pipeline reads no file twice.
    """
    st = path.stat()
    fp: Fingerprint = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": None}
    if st.st_size <= hash_limit:
        old = previous or {}
        same_stat = old.get("size") == fp["size"] and old.get("mtime_ns") == fp["mtime_ns"]
        fp["sha256"] = old["sha256"] if same_stat and old.get("sha256") else sha256_file(path)
    return fp


def path_fingerprint(
    path: Path, previous: Mapping[str, Any] | None = None, *, exclude: Iterable[Path] = (), hash_limit: int = HASH_LIMIT
) -> Fingerprint:
    """The fingerprint of a file ({kind: file, ...}), a folder ({kind: folder, files: {relative path: ...}}) or
    a path that does not exist ({kind: missing}). Files under a folder in `exclude` are left out (outputs
    that another stamp already covers, or the stage's own output inside its input)."""
    path = Path(path)
    old = previous or {}
    if path.is_file():
        return {"kind": "file", **file_fingerprint(path, old, hash_limit=hash_limit)}
    if not path.is_dir():
        return {"kind": "missing"}
    skip = [Path(e).resolve() for e in exclude]
    old_files = old.get("files") or {}
    files: dict[str, Fingerprint] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or any(f.resolve().is_relative_to(s) for s in skip):
            continue
        rel = f.relative_to(path).as_posix()
        files[rel] = file_fingerprint(f, old_files.get(rel), hash_limit=hash_limit)
    return {"kind": "folder", "files": files}


def _same_file(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same content: equal hashes where both have one (a byte-identical copy with a new mtime is the
    same input), else equal size and mtime."""
    if a.get("size") != b.get("size"):
        return False
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("mtime_ns") == b.get("mtime_ns")


def changed_parts(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between two `path_fingerprint`s: [] when the same; [""] for the path itself (a file
    changed, appeared or vanished); else the relative paths of a folder's added, removed or changed files."""
    old = old or {}
    if old.get("kind") != new.get("kind"):
        return [""]
    if new["kind"] == "file":
        return [] if _same_file(old, new) else [""]
    if new["kind"] == "missing":
        return []
    a, b = old.get("files") or {}, new.get("files") or {}
    return sorted(rel for rel in a.keys() | b.keys() if rel not in a or rel not in b or not _same_file(a[rel], b[rel]))


def is_within(path: Path, folders: Iterable[Path]) -> bool:
    """Whether `path` is one of `folders` or lies inside one (compared resolved, so `a/../b` is `b`)."""
    p = Path(path).resolve()
    return any(p.is_relative_to(Path(f).resolve()) for f in folders)
