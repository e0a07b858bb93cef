"""The AutoMR memory store: one element per (user, older interaction), file-backed and appendable.

An element m holds
  key    float32 [H]        the layer-L last-token state of the prompt whose window ends at m (z_m)
  value  float16 [S_m, H]   what the combine step splices into the slot (layer-L title states,
                            1 <= S_m <= max_value_tokens; S_m varies per element)
  and its identity: user_id, item_id, time (unix seconds), pos (the interaction's position in the
  user's stored order, -1 when unknown; it breaks ties in time).

Why this layout
  A store for a real data set is larger than RAM (Books, Llama-2-7B: ~150 KB per element, millions
  of elements), so every array is a raw little-endian file read through `np.memmap`: reads touch
  only the pages they need and nothing is copied until the caller asks for it. Values are kept as
  one flat token array [T, H] plus (offset, length) per element rather than padded to the maximum:
  titles vary from a few tokens to the cap, so padding would waste most of the file.

Folder layout (format version 1)
  meta.json     static description: hidden size, max tokens, dtypes, layer, model, mode, value kind
  index.bin     INDEX_DTYPE records [N]: user_id, item_id, time, pos, offset, length (all int64)
  keys.bin      float32 [N, H]
  values.bin    value dtype [T, H] (T = sum of lengths)
  commit.json   {"n_rows": N, "n_tokens": T} -- the only thing that makes rows visible
  .lock         taken (flock) by the single writer

Erasure (`erase`, for serving's DELETE of a user's memory) zeroes an element's key and value bytes
in place and marks its index record ERASED; the row numbers of the other elements do not change.

Consistency: an append writes index, keys and values at the committed ends of the files, fsyncs
them, and only then replaces commit.json atomically (write temp, fsync, rename). Readers map only
the committed prefix, and the next append overwrites and truncates whatever an interrupted append
left behind, so a crash mid-append never corrupts committed rows. One writer at a time (`mode="a"`
takes an exclusive lock); any number of readers, which see new commits after `refresh()`.

Sharding: under `accelerate launch` each process builds its own store folder (users partitioned
across processes) and `merge_stores(shards, out)` combines them into one, sorted by (user, time,
pos) so the result does not depend on how the users were partitioned.

Typical use
  store = MemoryStore.create(folder, hidden_size=576, max_value_tokens=16, layer=15, model_name=...)
  rows = store.append(user_ids, item_ids, times, keys, values, positions=pos)   # [N] int64
  store.close()
  store = MemoryStore.open(folder)                       # read-only, memory-mapped
  rows = store.rows_for(user, sample_memory_items, sample_memory_times)        # aligned, [n]
  K = store.keys(rows)            # ndarray [n, H] float32
  V = store.values(rows)          # list of read-only memmap views [S_i, H]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from automr.errors import UserError

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype(
    [
        ("user_id", "<i8"),
        ("item_id", "<i8"),
        ("time", "<i8"),
        ("pos", "<i8"),
        ("offset", "<i8"),  # first token of the value in values.bin
        ("length", "<i8"),  # S_m, number of value tokens
    ]
)
KEY_DTYPE = np.dtype("<f4")
VALUE_DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
MODES = ("exact", "chunked")
ERASED = -1  # user_id, item_id, time and pos of an erased element (MemoryStore.erase)
VALUE_KINDS = ("title_states", "key_vector")

_META, _COMMIT, _INDEX, _KEYS, _VALUES, _LOCK = (
    "meta.json",
    "commit.json",
    "index.bin",
    "keys.bin",
    "values.bin",
    ".lock",
)


@dataclass(frozen=True)
class StoreMeta:
    """What a store holds; fixed at creation and checked when stores are merged or paired with a model.

    mode: how build-memory computed the states -- "exact" (each element's own prompt run alone) or
    "chunked" (several windows of a user computed in one pass). value_kind: "title_states" (the
    layer-L states of the item's title tokens) or "key_vector" (the value is the key itself, S=1).
    """

    hidden_size: int
    max_value_tokens: int
    value_dtype: str = "float16"
    key_dtype: str = "float32"
    layer: int | None = None
    model_name: str | None = None
    mode: str = "exact"
    value_kind: str = "title_states"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def compatibility_problems(self, other: StoreMeta) -> list[str]:
        """Fields that must agree for two stores to be merged (everything but `extra`)."""
        names = ("hidden_size", "max_value_tokens", "value_dtype", "key_dtype", "layer", "model_name", "mode", "value_kind")
        return [f"{n}: {getattr(self, n)!r} vs {getattr(other, n)!r}" for n in names if getattr(self, n) != getattr(other, n)]


def estimate_bytes_per_element(hidden_size: int, value_tokens: float, value_dtype: str = "float16") -> float:
    """Bytes one element takes on disk: key + value tokens + index record (for sizing a store)."""
    return hidden_size * KEY_DTYPE.itemsize + value_tokens * hidden_size * VALUE_DTYPES[value_dtype].itemsize + INDEX_DTYPE.itemsize


def store_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a memory store this version can open (None when it is).

    `MemoryStore.open` raises it; `automr evaluate` and `automr run` call it first, so a bad `memory`
    path is reported before any method runs.
    """
    folder = Path(folder)
    if not (folder / _META).is_file():
        what = "does not exist" if not folder.exists() else "has no meta.json"
        return (
            f"no memory store at {folder}: the folder {what}. Build one with `automr build-memory` "
            "(or MemoryStore.create), or check the path."
        )
    try:
        version = _read_store_json(folder, _META).get("format_version")
    except UserError as exc:  # damaged meta.json: the one message that names the file
        return str(exc)
    if version != FORMAT_VERSION:
        return (
            f"memory store {folder} has format version {version!r}; this automr reads "
            f"version {FORMAT_VERSION}. Rebuild the store with this version."
        )
    return None


class MemoryStore:
    """A memory-mapped, appendable store of memory elements. Build with `create`, read with `open`."""

    # ------------------------------------------------------------------ construction
    def __init__(self, folder: Path, meta: StoreMeta, mode: Literal["r", "a"], durable: bool) -> None:
        self.folder = folder
        self.meta = meta
        self.mode = mode
        self.durable = durable
        self._vdtype = VALUE_DTYPES[meta.value_dtype]
        self._lock_fd: int | None = None
        self._n = 0
        self._t = 0
        self._maps: dict[str, np.ndarray] = {}
        self._sorted_n = 0  # rows covered by the sorted user index
        self._order: np.ndarray = np.zeros(0, np.int64)  # rows sorted by (user, time, pos, row)
        self._order_users: np.ndarray = np.zeros(0, np.int64)
        if mode == "a":
            self._acquire_lock()
        self._read_commit()

    @classmethod
    def create(
        cls,
        folder: str | Path,
        hidden_size: int,
        max_value_tokens: int,
        value_dtype: str = "float16",
        *,
        layer: int | None = None,
        model_name: str | None = None,
        mode: str = "exact",
        value_kind: str = "title_states",
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        durable: bool = True,
    ) -> MemoryStore:
        """Create an empty store in `folder` and return it open for appending (mode "a").

        durable=False skips fsync (faster bulk builds on a machine you trust not to crash; the
        commit is still written last, so a crashed *process* cannot corrupt the store).
        """
        problems = []
        if hidden_size < 1:
            problems.append(f"hidden_size must be >= 1, found {hidden_size}")
        if max_value_tokens < 1:
            problems.append(f"max_value_tokens must be >= 1, found {max_value_tokens}")
        if value_dtype not in VALUE_DTYPES:
            problems.append(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, found {value_dtype!r}")
        if mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
        if value_kind not in VALUE_KINDS:
            problems.append(f"value_kind must be one of {', '.join(VALUE_KINDS)}, found {value_kind!r}")
        if problems:
            raise UserError("cannot create memory store: " + "; ".join(problems))
        folder = Path(folder)
        if (folder / _META).exists():
            if not overwrite:
                raise UserError(
                    f"{folder} already holds a memory store. Open it with MemoryStore.open(folder, mode='a') "
                    "to append, choose another folder, or pass overwrite=True to replace it."
                )
            for name in (_META, _COMMIT, _INDEX, _KEYS, _VALUES):
                (folder / name).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        meta = StoreMeta(
            hidden_size=int(hidden_size),
            max_value_tokens=int(max_value_tokens),
            value_dtype=value_dtype,
            layer=layer,
            model_name=model_name,
            mode=mode,
            value_kind=value_kind,
            extra=dict(extra or {}),
        )
        for name in (_INDEX, _KEYS, _VALUES):
            (folder / name).touch()
        _atomic_json(folder / _COMMIT, {"n_rows": 0, "n_tokens": 0}, durable)
        # meta.json last: a folder without it is not a store, so a crash here leaves nothing half-made.
        _atomic_json(folder / _META, asdict(meta), durable)
        return cls(folder, meta, "a", durable)

    @classmethod
    def open(cls, folder: str | Path, mode: Literal["r", "a"] = "r", *, durable: bool = True) -> MemoryStore:
        """Open an existing store: "r" read-only (any number of readers), "a" to append (one writer)."""
        folder = Path(folder)
        if mode not in ("r", "a"):
            raise UserError(f"mode must be 'r' or 'a', found {mode!r}")
        problem = store_problem(folder)
        if problem:
            raise UserError(problem)
        return cls(folder, _meta_from_json(folder, _read_store_json(folder, _META)), mode, durable)

    def close(self) -> None:
        """Drop the memory maps and release the writer lock."""
        self._maps.clear()
        if self._lock_fd is not None:
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"MemoryStore({str(self.folder)!r}, n={self._n}, H={m.hidden_size}, layer={m.layer}, "
            f"value_kind={m.value_kind!r}, {self.total_bytes / 2**20:.1f} MiB)"
        )

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self._n

    @property
    def hidden_size(self) -> int:
        return self.meta.hidden_size

    @property
    def n_tokens(self) -> int:
        """Total value tokens T stored (sum of the elements' S_m)."""
        return self._t

    @property
    def total_bytes(self) -> int:
        """Committed bytes on disk (index + keys + values; excludes any uncommitted tail)."""
        h = self.meta.hidden_size
        return self._n * (INDEX_DTYPE.itemsize + h * KEY_DTYPE.itemsize) + self._t * h * self._vdtype.itemsize

    @property
    def bytes_per_element(self) -> float:
        """Average committed bytes per element (0 for an empty store)."""
        return self.total_bytes / self._n if self._n else 0.0

    def refresh(self) -> None:
        """Re-read the commit so a reader sees rows appended by a writer since it opened."""
        self._read_commit()

    # ------------------------------------------------------------------ writing
    def append(
        self,
        user_ids: Sequence[int] | np.ndarray,
        item_ids: Sequence[int] | np.ndarray,
        times: Sequence[int] | np.ndarray,
        keys: Any,
        values: Sequence[Any],
        positions: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Append N elements and commit them; returns their rows (int64 [N]).

        keys: [N, H] (numpy or torch, any float dtype; stored float32).
        values: N arrays/tensors [S_i, H] with 1 <= S_i <= max_value_tokens (stored in value_dtype).
        Truncating a title to max_value_tokens is the caller's decision (which tokens to keep),
        so longer values are an error here rather than silently cut.
        """
        self._require_writer()
        uid = _as_int64(user_ids, "user_ids")
        n = len(uid)
        iid = _as_int64(item_ids, "item_ids")
        tim = _as_int64(times, "times")
        pos = _as_int64(positions, "positions") if positions is not None else np.full(n, -1, np.int64)
        h = self.meta.hidden_size
        k = _to_numpy(keys).astype(KEY_DTYPE, copy=False)
        if k.ndim == 1 and n == 1:
            k = k[None]
        lens = [len(iid), len(tim), len(pos), len(values)]
        if any(x != n for x in lens) or k.ndim != 2 or k.shape[0] != n:
            raise UserError(
                f"append got inconsistent lengths: user_ids {n}, item_ids {lens[0]}, times {lens[1]}, "
                f"positions {lens[2]}, keys {tuple(k.shape)}, values {lens[3]}; all must describe the same N elements"
            )
        if k.shape[1] != h:
            raise UserError(self._hidden_mismatch("keys", k.shape[1]))
        parts = []
        for i, v in enumerate(values):
            a = _to_numpy(v)
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2 or a.shape[1] != h:
                if a.ndim == 2:
                    raise UserError(self._hidden_mismatch(f"values[{i}]", a.shape[1]))
                raise UserError(f"values[{i}] must be [S, {h}], found shape {tuple(a.shape)}")
            if not 1 <= a.shape[0] <= self.meta.max_value_tokens:
                raise UserError(
                    f"values[{i}] has {a.shape[0]} tokens; this store holds 1..{self.meta.max_value_tokens} per "
                    "element. Truncate the title states before appending, or create the store with a larger max_value_tokens."
                )
            parts.append(a)
        lengths = np.array([p.shape[0] for p in parts], np.int64)
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with the fix
            flat = np.concatenate(parts, axis=0).astype(self._vdtype, copy=False) if parts else np.zeros((0, h), self._vdtype)
        if not np.isfinite(k).all():
            raise UserError("append got non-finite keys (NaN or inf); check the model's forward pass")
        if not np.isfinite(flat).all():
            raise UserError(
                f"append got values that are not finite in {self.meta.value_dtype} (NaN, or states beyond the "
                "float16 range of 65504). Create the store with value_dtype='float32' for this model."
            )
        return self._append_raw(uid, iid, tim, pos, k, flat, lengths)

    def _append_raw(
        self,
        uid: np.ndarray,
        iid: np.ndarray,
        tim: np.ndarray,
        pos: np.ndarray,
        keys: np.ndarray,  # [N, H] float32
        flat: np.ndarray,  # [T_new, H] value dtype
        lengths: np.ndarray,  # [N] int64
    ) -> np.ndarray:
        """Write already-validated arrays at the committed ends of the files, then commit."""
        n = len(uid)
        if n == 0:
            return np.zeros(0, np.int64)
        rec = np.empty(n, INDEX_DTYPE)
        rec["user_id"], rec["item_id"], rec["time"], rec["pos"] = uid, iid, tim, pos
        rec["length"] = lengths
        rec["offset"] = self._t + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        h = self.meta.hidden_size
        self._write_at(_INDEX, self._n * INDEX_DTYPE.itemsize, rec.tobytes())
        self._write_at(_KEYS, self._n * h * KEY_DTYPE.itemsize, np.ascontiguousarray(keys, KEY_DTYPE).tobytes())
        self._write_at(_VALUES, self._t * h * self._vdtype.itemsize, np.ascontiguousarray(flat, self._vdtype).tobytes())
        rows = np.arange(self._n, self._n + n, dtype=np.int64)
        self._write_commit(self._n + n, self._t + int(lengths.sum()))
        self._n += n
        self._t += int(lengths.sum())
        self._maps.clear()
        return rows

    def erase(self, rows: Sequence[int] | np.ndarray) -> int:
        """Overwrite elements in place: keys and values with zeros, identity with ERASED (-1); returns how many.

        Serving's right to erasure (a user deletes their memory): the states are gone from the
        files, not only from an index. Rows keep their numbers (the space is not reclaimed), and an
        erased row belongs to no user, so `rows_for` never returns it again.
        """
        self._require_writer()
        r = np.unique(self._check_rows(rows))
        if not len(r):
            return 0
        h, idx = self.meta.hidden_size, np.asarray(self.index)
        offsets, lengths = idx["offset"][r], idx["length"][r]
        with open(self.folder / _KEYS, "r+b") as f:
            for row in r.tolist():
                f.seek(row * h * KEY_DTYPE.itemsize)
                f.write(bytes(h * KEY_DTYPE.itemsize))
            self._sync(f)
        with open(self.folder / _VALUES, "r+b") as f:
            for off, ln in zip(offsets.tolist(), lengths.tolist()):
                f.seek(off * h * self._vdtype.itemsize)
                f.write(bytes(ln * h * self._vdtype.itemsize))
            self._sync(f)
        with open(self.folder / _INDEX, "r+b") as f:
            for row in r.tolist():
                rec = idx[row].copy()
                rec["user_id"] = rec["item_id"] = rec["time"] = rec["pos"] = ERASED
                f.seek(row * INDEX_DTYPE.itemsize)
                f.write(rec.tobytes())
            self._sync(f)
        self._maps.clear()
        self._sorted_n = 0  # the sorted user index still lists the erased rows under their user
        return len(r)

    def _sync(self, f: Any) -> None:
        if self.durable:
            f.flush()
            os.fsync(f.fileno())

    def _write_at(self, name: str, offset: int, data: bytes) -> None:
        # Overwrite from the committed end and cut whatever an interrupted append left beyond it.
        with open(self.folder / name, "r+b") as f:
            f.seek(offset)
            f.write(data)
            f.truncate()
            if self.durable:
                f.flush()
                os.fsync(f.fileno())

    def _write_commit(self, n_rows: int, n_tokens: int) -> None:
        _atomic_json(self.folder / _COMMIT, {"n_rows": n_rows, "n_tokens": n_tokens}, self.durable)

    # ------------------------------------------------------------------ reading
    @property
    def index(self) -> np.ndarray:
        """The committed index records (INDEX_DTYPE [N]), memory-mapped."""
        return self._map(_INDEX, INDEX_DTYPE, (self._n,))

    @property
    def key_matrix(self) -> np.ndarray:
        """All committed keys, memory-mapped float32 [N, H] (read-only; index it with rows)."""
        return self._map(_KEYS, KEY_DTYPE, (self._n, self.meta.hidden_size))

    @property
    def value_tokens(self) -> np.ndarray:
        """All committed value tokens, memory-mapped [T, H] in the value dtype."""
        return self._map(_VALUES, self._vdtype, (self._t, self.meta.hidden_size))

    def keys(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Keys of `rows` as an ndarray [n, H] float32 (a gathered copy of just those rows)."""
        return self.key_matrix[self._check_rows(rows)]

    def values(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Values of `rows`: read-only memory-mapped views [S_i, H] (no data is copied)."""
        r = self._check_rows(rows)
        idx, vt = self.index, self.value_tokens
        off, ln = idx["offset"][r], idx["length"][r]
        return [vt[o : o + s] for o, s in zip(off.tolist(), ln.tolist())]

    def values_padded(self, rows: Sequence[int] | np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values of `rows` zero-padded into one array [n, S_max, H] plus lengths [n] (for batching)."""
        vals = self.values(rows)
        lengths = np.array([len(v) for v in vals], np.int64)
        s = pad_to if pad_to is not None else int(lengths.max(initial=0))
        out = np.zeros((len(vals), s, self.meta.hidden_size), self._vdtype)
        for i, v in enumerate(vals):
            out[i, : len(v)] = v[:s]
        return out, np.minimum(lengths, s)

    def rows_for(
        self,
        user_id: int,
        item_ids: Sequence[int] | np.ndarray | None = None,
        times: Sequence[int] | np.ndarray | None = None,
        *,
        missing: Literal["raise", "mark"] = "raise",
    ) -> np.ndarray:
        """Rows of one user's elements.

        Without item_ids: every element of the user, ordered by (time, pos, row).
        With item_ids and times (a sample's memory_items / memory_times): the rows aligned with
        them, [n] int64; the k-th repeat of an (item, time) pair maps to the k-th such element.
        An element not in the store raises UserError (missing="raise") or gives -1 ("mark").
        """
        rows = self._user_rows(int(user_id))
        if item_ids is None and times is None:
            return rows
        if item_ids is None or times is None:
            raise UserError("rows_for needs both item_ids and times (or neither)")
        want_i, want_t = _as_int64(item_ids, "item_ids"), _as_int64(times, "times")
        if len(want_i) != len(want_t):
            raise UserError(f"rows_for: {len(want_i)} item_ids but {len(want_t)} times")
        idx = self.index
        slots: dict[tuple[int, int], list[int]] = {}
        for r, i, t in zip(rows.tolist(), idx["item_id"][rows].tolist(), idx["time"][rows].tolist()):
            slots.setdefault((i, t), []).append(r)
        used: dict[tuple[int, int], int] = {}
        out = np.empty(len(want_i), np.int64)
        for j, key in enumerate(zip(want_i.tolist(), want_t.tolist())):
            k = used.get(key, 0)
            cand = slots.get(key)
            if cand is None or k >= len(cand):
                if missing == "raise":
                    raise UserError(
                        f"memory store {self.folder} has no element for user {user_id}, item {key[0]}, time {key[1]}. "
                        "The store was built from other samples (or is incomplete): rebuild it from this prepared data."
                    )
                out[j] = -1
                continue
            out[j] = cand[k]
            used[key] = k + 1
        return out

    def lookup(self, user_id: int, item_id: int, time: int, pos: int | None = None) -> int:
        """The row of one element; KeyError if absent. With pos=None the first match in (time, pos) order."""
        rows = self._user_rows(int(user_id))
        idx = self.index
        hit = (idx["item_id"][rows] == item_id) & (idx["time"][rows] == time)
        if pos is not None:
            hit &= idx["pos"][rows] == pos
        found = rows[hit]
        if len(found) == 0:
            raise KeyError(f"no memory element for user {user_id}, item {item_id}, time {time}, pos {pos}")
        return int(found[0])

    def users(self) -> np.ndarray:
        """Distinct user ids in the store (sorted)."""
        return np.unique(self.index["user_id"])

    def index_frame(self):  # -> polars.DataFrame
        """The index as a polars DataFrame (row, user_id, item_id, time, pos, offset, length), for inspection."""
        import polars as pl

        idx = np.asarray(self.index)
        cols = {"row": np.arange(self._n, dtype=np.int64)}
        cols.update({name: np.ascontiguousarray(idx[name]) for name in INDEX_DTYPE.names})
        return pl.DataFrame(cols)

    def iter_chunks(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (rows, index records, keys) in chunks, for streaming over a store larger than RAM."""
        for start in range(0, self._n, chunk):
            rows = np.arange(start, min(start + chunk, self._n), dtype=np.int64)
            yield rows, np.asarray(self.index[start : rows[-1] + 1]), np.asarray(self.key_matrix[start : rows[-1] + 1])

    # ------------------------------------------------------------------ internals
    def _read_commit(self) -> None:
        missing = [k for k in (_COMMIT, _INDEX, _KEYS, _VALUES) if not (self.folder / k).is_file()]
        if missing:
            raise UserError(
                f"memory store {self.folder} is damaged: {', '.join(missing)} missing (a store holds {_META}, "
                f"{_COMMIT}, {_INDEX}, {_KEYS} and {_VALUES}). It was deleted or copied incompletely; rebuild the "
                "store with `automr build-memory`."
            )
        c = _read_store_json(self.folder, _COMMIT)
        n, t = int(c["n_rows"]), int(c["n_tokens"])
        h = self.meta.hidden_size
        need = {
            _INDEX: n * INDEX_DTYPE.itemsize,
            _KEYS: n * h * KEY_DTYPE.itemsize,
            _VALUES: t * h * self._vdtype.itemsize,
        }
        short = [f"{k} ({(self.folder / k).stat().st_size} < {v} bytes)" for k, v in need.items() if (self.folder / k).stat().st_size < v]
        if short:
            raise UserError(
                f"memory store {self.folder} is damaged: commit.json lists {n} elements but "
                f"{', '.join(short)}. The files were truncated or copied incompletely; rebuild the store."
            )
        if (n, t) != (self._n, self._t):
            self._n, self._t = n, t
            self._maps.clear()

    def _map(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        m = self._maps.get(name)
        if m is None:
            if shape[0] == 0:
                m = np.zeros(shape, dtype)
                m.flags.writeable = False
            else:
                m = np.memmap(self.folder / name, dtype=dtype, mode="r", shape=shape)
            self._maps[name] = m
        return m

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(r) and (r.min() < 0 or r.max() >= self._n):
            raise IndexError(f"rows out of range for a store of {self._n} elements: min {r.min()}, max {r.max()}")
        return r

    def _user_rows(self, user_id: int) -> np.ndarray:
        """Rows of a user in (time, pos, row) order: a sorted index plus a scan of the recent tail.

        The sorted index is rebuilt only when the unsorted tail grows past 1/16 of the store, so
        serving (one append, then a query) stays cheap.
        """
        idx = self.index
        tail = self._n - self._sorted_n
        if self._sorted_n == 0 or tail > max(1024, self._n // 16) or tail < 0:
            order = np.lexsort((idx["pos"], idx["time"], idx["user_id"])).astype(np.int64)
            self._order, self._order_users, self._sorted_n = order, np.asarray(idx["user_id"])[order], self._n
            tail = 0
        lo = np.searchsorted(self._order_users, user_id, side="left")
        hi = np.searchsorted(self._order_users, user_id, side="right")
        rows = self._order[lo:hi]
        if tail:
            extra = self._sorted_n + np.flatnonzero(idx["user_id"][self._sorted_n :] == user_id)
            if len(extra):
                rows = np.concatenate([rows, extra])
                rows = rows[np.lexsort((rows, idx["pos"][rows], idx["time"][rows]))]
        return rows

    def _require_writer(self) -> None:
        if self.mode != "a":
            raise UserError(f"memory store {self.folder} is open read-only; open it with mode='a' to append")
        if self._lock_fd is None:
            raise UserError(f"memory store {self.folder} was closed; open it again to append")

    def _acquire_lock(self) -> None:
        import fcntl

        fd = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"memory store {self.folder} is already open for appending by another process or handle; "
                "a store has one writer at a time (shard per process and merge with merge_stores)."
            ) from None
        self._lock_fd = fd

    def _hidden_mismatch(self, what: str, got: int) -> str:
        m = self.meta
        return (
            f"{what} have hidden size {got} but memory store {self.folder} holds hidden size {m.hidden_size} "
            f"(model {m.model_name!r}, layer {m.layer}). The store was built with another model: use the "
            "matching model or rebuild the store."
        )


def merge_stores(
    shards: Iterable[str | Path],
    out: str | Path,
    *,
    chunk: int = 4096,
    overwrite: bool = False,
    durable: bool = True,
) -> MemoryStore:
    """Merge shard stores (one per process) into one store at `out`, sorted by (user, time, pos).

    The shards must agree on everything in StoreMeta but `extra`, and must not hold the same
    element (user, item, time, pos) twice -- that means two processes built the same user. The
    merge streams `chunk` elements at a time, so it needs little RAM whatever the store size, and
    writes into a temporary folder renamed on success. Returns the merged store, open read-only.
    """
    from automr.utils.io import atomic_dir

    paths = [Path(s) for s in shards]
    if not paths:
        raise UserError("merge_stores needs at least one shard folder")
    stores = [MemoryStore.open(p) for p in paths]
    try:
        base = stores[0].meta
        problems = [f"{p}: {q}" for p, s in zip(paths[1:], stores[1:]) for q in base.compatibility_problems(s.meta)]
        if problems:
            raise UserError(f"cannot merge memory stores built differently (compared with {paths[0]}): " + "; ".join(problems))
        out = Path(out)
        if (out / _META).exists() and not overwrite:
            raise UserError(f"{out} already holds a memory store; pass overwrite=True to replace it")
        # Global order over (shard, row): sort by user, time, pos, then shard and row for stability.
        src = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(stores)])
        srow = np.concatenate([np.arange(len(s), dtype=np.int64) for s in stores])
        recs = np.concatenate([np.asarray(s.index) for s in stores]) if len(src) else np.zeros(0, INDEX_DTYPE)
        order = np.lexsort((srow, src, recs["item_id"], recs["pos"], recs["time"], recs["user_id"]))
        ident = recs[["user_id", "item_id", "time", "pos"]][order]
        if len(ident) > 1:
            same = np.ones(len(ident) - 1, bool)
            for name in ("user_id", "item_id", "time", "pos"):
                same &= ident[name][1:] == ident[name][:-1]
            if same.any():
                j = int(np.flatnonzero(same)[0])
                dup = {k: int(ident[k][j]) for k in ("user_id", "item_id", "time", "pos")}
                raise UserError(
                    f"shards hold {int(same.sum())} duplicated element(s), e.g. {dup}: the same user was built "
                    "by two processes. Shard by user so each user is in exactly one shard."
                )
        extra = dict(base.extra)
        extra["merged_from"] = [str(p) for p in paths]
        with atomic_dir(out, overwrite=overwrite) as tmp:
            merged = MemoryStore.create(
                tmp, base.hidden_size, base.max_value_tokens, base.value_dtype, layer=base.layer,
                model_name=base.model_name, mode=base.mode, value_kind=base.value_kind, extra=extra, durable=durable,
            )
            offsets = [np.asarray(s.index["offset"]) for s in stores]
            lengths = [np.asarray(s.index["length"]) for s in stores]
            for start in range(0, len(order), chunk):
                sel = order[start : start + chunk]
                r, s_id, rw = recs[sel], src[sel], srow[sel]
                keys = np.empty((len(sel), base.hidden_size), KEY_DTYPE)
                for si in np.unique(s_id).tolist():
                    mask = s_id == si
                    keys[mask] = stores[si].key_matrix[rw[mask]]
                flat = np.concatenate(
                    [
                        stores[si].value_tokens[offsets[si][ri] : offsets[si][ri] + lengths[si][ri]]
                        for si, ri in zip(s_id.tolist(), rw.tolist())
                    ]
                )
                merged._append_raw(
                    r["user_id"].copy(), r["item_id"].copy(), r["time"].copy(), r["pos"].copy(),
                    keys, flat, r["length"].astype(np.int64),
                )
            merged.close()
    finally:
        for s in stores:
            s.close()
    return MemoryStore.open(out)


# ---------------------------------------------------------------------- helpers
def _read_store_json(folder: Path, name: str) -> dict[str, Any]:
    """A store's JSON file as a mapping; a damaged one is a UserError naming it (not a JSONDecodeError)."""
    path = folder / name
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"memory store {folder} is damaged: {path} is not valid JSON ({exc}). It was cut short or edited; "
            "rebuild the store with `automr build-memory`."
        ) from None
    if not isinstance(raw, dict):
        raise UserError(
            f"memory store {folder} is damaged: {path} holds a JSON {type(raw).__name__}, expected an object; "
            "rebuild the store with `automr build-memory`."
        )
    return raw


def _meta_from_json(folder: Path, raw: dict[str, Any]) -> StoreMeta:
    """StoreMeta of a meta.json mapping; missing or unknown keys are a UserError naming them."""
    names = {f.name for f in fields(StoreMeta)}
    required = {f.name for f in fields(StoreMeta) if f.default is MISSING and f.default_factory is MISSING}
    problems = [f"missing {k!r}" for k in sorted(required - raw.keys())]
    problems += [f"unknown key {k!r}" for k in sorted(raw.keys() - names)]
    if raw.get("value_dtype", "float16") not in VALUE_DTYPES:
        problems.append(f"value_dtype {raw['value_dtype']!r} is not one of {', '.join(VALUE_DTYPES)}")
    if problems:
        raise UserError(
            f"memory store {folder} is damaged: {folder / _META} has {'; '.join(problems)}. "
            "Rebuild the store with `automr build-memory`."
        )
    return StoreMeta(**raw)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an ndarray or torch tensor (any device/dtype; bfloat16 goes through float32)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        t = x.detach()
        if str(t.dtype) in ("torch.bfloat16",):
            import torch

            t = t.to(torch.float32)
        return t.cpu().numpy()
    return np.asarray(x)


def _as_int64(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    a = np.atleast_1d(a)
    if a.ndim != 1:
        raise UserError(f"{name} must be 1-D, found shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"{name} must be integers, found dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _atomic_json(path: Path, obj: Any, durable: bool) -> None:
    """Write JSON through a temp file + rename (+ fsync of file and folder when durable)."""
    from automr.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1), durable=durable)
