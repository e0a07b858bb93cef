"""File helpers shared by every stage: the one implementation of atomic writes, output markers,
stale temporaries and output locks.

Every temporary this package makes is named `.{NAME}.tmp-{PID}...` (or `.{NAME}.old-{PID}` for a
folder being replaced) next to the NAME it will become, so a later run can tell a temporary whose
process is gone (killed, or a full disk) from one that is still being written, and remove only
the former (`remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from automr.errors import UserError

# The file that says "automr wrote this folder": atomic_dir puts it in every folder it produces, and
# the stage guard (automr/stages/guard.py) in every output folder it creates or claims.
OUTPUT_MARKER = ".automr-output.json"
# Written by earlier versions into their outputs (`automr run`'s stamp); such folders are ours too.
LEGACY_MARKERS = (".automr-stage.json",)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:[-.].*)?$")


# --------------------------------------------------------------------------- temporaries
def temp_path(path: Path, suffix: str = "") -> Path:
    """The temporary sibling of `path` written by this process (`.{name}.tmp-{pid}{suffix}`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def temp_prefix(name: str, tag: str = "") -> str:
    """The name prefix of this process's temporary folders for `name` (for tempfile's prefix=)."""
    return f".{name}.tmp-{os.getpid()}-" + (f"{tag}-" if tag else "")


def temp_dir(near: Path, tag: str = "") -> Path:
    """A new private folder beside `near` (same disk, so it can be renamed onto it), named by our pid."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(near.name, tag), dir=near.parent))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without signalling)."""
    if pid <= 0:  # os.kill(0, ...) would address our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(entry: Path, name: str | None) -> bool:
    m = _TEMP_RE.match(entry.name)
    return m is not None and (name is None or m["name"] == name) and not pid_alive(int(m["pid"]))


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree (whatever `path` is; nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path, *, inside: bool = True) -> list[Path]:
    """Remove the temporaries of `out` left by processes that are gone; returns what was removed.

    Looks beside `out` (temporaries named after it) and, with `inside`, everywhere inside it (a
    resumable stage's parts and checkpoints); a temporary whose process still runs is kept.
    """
    out = Path(out)
    found: list[Path] = []
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir() if _stale(p, out.name)]
    if inside and out.is_dir() and not out.is_symlink():
        for root, dirs, files in os.walk(out):
            stale = [Path(root) / n for n in dirs + files if _stale(Path(root) / n, None)]
            dirs[:] = [d for d in dirs if Path(root) / d not in stale]  # do not walk into what goes
            found += stale
    for p in found:
        remove_path(p)
    return found


# --------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_file(path: Path, *, durable: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary name to write; it becomes `path` (os.replace) only if the block succeeds.

    Readers never see a partial file, and a failed write (an error, a full disk) removes its
    temporary. `durable` fsyncs the file and its folder, so the rename survives a power cut.
    `suffix` ends the temporary name for writers that append their own (np.save adds .npy).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Write a text file through a temporary name so readers never see a partial file."""
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any, *, durable: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", durable=durable)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    A failed stage therefore never leaves a half-written output folder behind. The folder gets
    OUTPUT_MARKER, so later runs know automr wrote it. `final` naming a file is refused before any
    work (replacing a file with a folder is never what a stage means).
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"{final} is a file, but a folder is to be written there; choose another path (nothing was written).")
    if final.exists() and not overwrite:
        raise FileExistsError(final)
    remove_stale_temporaries(final, inside=False)  # our own earlier, killed attempts at this folder
    tmp = temp_dir(final)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; outputs should get ordinary permissions
    try:
        yield tmp
        write_marker(tmp)
        _put_in_place(tmp, final, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename `tmp` onto `final`, the old `final` (if any) set aside first and removed after."""
    if not final.exists() and not final.is_symlink():
        tmp.rename(final)
        return
    if not overwrite:
        raise FileExistsError(final)
    backup = final.with_name(f".{final.name}.old-{os.getpid()}")
    remove_path(backup)
    final.rename(backup)
    tmp.rename(final)
    remove_path(backup)


# --------------------------------------------------------------------------- ownership
def write_marker(folder: Path, stage: str | None = None) -> None:
    """Mark `folder` as written by automr (which stage, version, process, time)."""
    from automr import __version__

    info = {"automr": __version__, "stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(folder) / OUTPUT_MARKER, info)


def has_marker(folder: Path) -> bool:
    """Whether `folder` holds OUTPUT_MARKER or a marker of an earlier version."""
    return any((Path(folder) / name).is_file() for name in (OUTPUT_MARKER, *LEGACY_MARKERS))


# --------------------------------------------------------------------------- output locks
_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth (re-entrant)


def lock_path(target: Path) -> Path:
    """The lock file of an output folder (or pipeline file): `.{name}.lock` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def output_lock(target: Path, advice: str = "Wait for it to finish.") -> Iterator[None]:
    """Hold the exclusive lock of `target` for the block, or refuse with the holder's pid.

    An advisory `flock` on `.{name}.lock` (standard library, rather than an O_EXCL file plus pid
    checks): the kernel releases it when the holder dies, so a lock left by a killed run is simply
    taken over, and a recycled pid can never keep it. The file holds the holder's pid for the
    message. Re-entrant within one process (`automr run` holds a lock that a stage takes again).
    """
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = lock.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(lock, target, advice)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)  # while still locked, so no one holds a lock on a deleted file
        os.close(fd)


def _acquire(lock: Path, target: Path, advice: str) -> int:
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"{target} is in use by another automr process ({holder}; lock file {lock}). {advice}") from None
        except OSError:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            raise
        try:  # the holder before us may have deleted the file after we opened it: lock the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    if previous != "unknown holder":
        from automr.utils.logging import note

        note(f"automr: took over the lock of {target} left by a process that is gone ({previous})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    """'pid N on HOST since T' from a lock file's content, best effort."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(info['pid'])} on {info.get('host', '?')} since {info.get('time', '?')}: {info.get('command', '')}"
    except (ValueError, KeyError, TypeError, OSError):
        return "unknown holder"


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
