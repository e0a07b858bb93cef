"""The memory store: round trip, memory mapping, growth, merge, crash consistency, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from automr.errors import UserError
from automr.memory import store as store_mod
from automr.memory.store import INDEX_DTYPE, MemoryStore, estimate_bytes_per_element, merge_stores

H, SMAX = 8, 5


def make_elements(n: int, seed: int = 0, users: int = 3):
    """n synthetic elements: user, item, time, pos, key [H], value [S_i, H] with 1 <= S_i <= SMAX."""
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, users, n)
    iid = rng.integers(100, 200, n)
    tim = rng.integers(1_000, 2_000, n)
    pos = np.arange(n)
    keys = rng.standard_normal((n, H)).astype(np.float32)
    vals = [rng.standard_normal((int(rng.integers(1, SMAX + 1)), H)).astype(np.float32) for _ in range(n)]
    return uid, iid, tim, pos, keys, vals


def test_round_trip_and_sizes(tmp_path):
    uid, iid, tim, pos, keys, vals = make_elements(7)
    s = MemoryStore.create(tmp_path / "m", H, SMAX, layer=3, model_name="tiny", extra={"note": "x"})
    r1 = s.append(uid[:4], iid[:4], tim[:4], keys[:4], vals[:4], positions=pos[:4])
    r2 = s.append(uid[4:], iid[4:], tim[4:], keys[4:], vals[4:], positions=pos[4:])
    assert r1.tolist() == [0, 1, 2, 3] and r2.tolist() == [4, 5, 6]
    s.close()

    s = MemoryStore.open(tmp_path / "m")
    assert len(s) == 7 and s.meta.layer == 3 and s.meta.model_name == "tiny" and s.meta.extra == {"note": "x"}
    np.testing.assert_array_equal(s.keys(range(7)), keys)
    for got, want in zip(s.values(range(7)), vals):
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float16))
    idx = s.index
    np.testing.assert_array_equal(idx["user_id"], uid)
    np.testing.assert_array_equal(idx["item_id"], iid)
    np.testing.assert_array_equal(idx["time"], tim)
    np.testing.assert_array_equal(idx["pos"], pos)
    chunks = list(s.iter_chunks(chunk=3))
    assert [c[0].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), keys)
    padded, lengths = s.values_padded([6, 0])
    assert padded.shape == (2, max(len(vals[6]), len(vals[0])), H)
    np.testing.assert_array_equal(padded[0, : lengths[0]], vals[6].astype(np.float16))
    assert not padded[0, lengths[0] :].any()
    # bytes: key f32 + value tokens f16 + 48-byte index record
    tokens = sum(len(v) for v in vals)
    assert s.n_tokens == tokens
    assert s.total_bytes == 7 * (H * 4 + 48) + tokens * H * 2
    assert s.bytes_per_element == pytest.approx(s.total_bytes / 7)
    assert estimate_bytes_per_element(H, tokens / 7) == pytest.approx(s.bytes_per_element)
    assert INDEX_DTYPE.itemsize == 48


def test_reads_are_memory_mapped(tmp_path):
    uid, iid, tim, pos, keys, vals = make_elements(5)
    with MemoryStore.create(tmp_path / "m", H, SMAX) as s:
        s.append(uid, iid, tim, keys, vals)
    s = MemoryStore.open(tmp_path / "m")
    assert isinstance(s.key_matrix, np.memmap) and isinstance(s.value_tokens, np.memmap) and isinstance(s.index, np.memmap)
    v = s.values([3])[0]
    assert isinstance(v, np.memmap) and not v.flags.writeable  # a view of the file, not a loaded copy
    assert np.shares_memory(v, s.value_tokens)
    assert (tmp_path / "m" / "keys.bin").stat().st_size == 5 * H * 4


def test_torch_inputs_and_float16_overflow(tmp_path):
    torch = pytest.importorskip("torch")
    s = MemoryStore.create(tmp_path / "m", H, SMAX)
    k = torch.randn(2, H, dtype=torch.bfloat16)
    v = [torch.randn(3, H, dtype=torch.bfloat16), torch.randn(1, H)]
    s.append(torch.tensor([1, 2]), [5, 6], [10, 11], k, v)
    np.testing.assert_array_equal(s.keys([0, 1]), k.float().numpy())
    np.testing.assert_array_equal(s.values([0])[0], v[0].float().numpy().astype(np.float16))
    with pytest.raises(UserError, match="float16 range"):
        s.append([1], [7], [12], np.zeros((1, H)), [np.full((1, H), 1e6)])
    assert len(s) == 2


def test_growth_across_reopen_rows_for_and_lookup(tmp_path):
    f = tmp_path / "m"
    with MemoryStore.create(f, H, SMAX) as s:
        # user 7 appended out of time order; ties in time broken by pos
        s.append([7, 7, 8], [1, 2, 3], [30, 10, 10], np.ones((3, H)), [np.ones((1, H))] * 3, positions=[2, 0, 0])
    reader = MemoryStore.open(f)
    with MemoryStore.open(f, mode="a") as s:
        assert len(s) == 3
        rows = s.append([7, 7], [4, 1], [20, 40], np.zeros((2, H)), [np.zeros((2, H))] * 2, positions=[1, 3])
        assert rows.tolist() == [3, 4]
    assert len(reader) == 3  # a reader sees the commit it opened with ...
    reader.refresh()
    assert len(reader) == 5  # ... and new rows after refresh
    s = MemoryStore.open(f)
    assert s.rows_for(7).tolist() == [1, 3, 0, 4]  # times 10, 20, 30, 40
    assert s.rows_for(8).tolist() == [2]
    assert s.rows_for(99).tolist() == []
    assert s.rows_for(7, [1, 2], [40, 10]).tolist() == [4, 1]
    with pytest.raises(UserError, match="no element for user 7, item 9"):
        s.rows_for(7, [1, 9], [40, 10])
    assert s.rows_for(7, [1, 9], [40, 10], missing="mark").tolist() == [4, -1]
    assert s.lookup(7, 4, 20) == 3
    with pytest.raises(KeyError):
        s.lookup(7, 4, 21)
    assert s.users().tolist() == [7, 8]
    assert s.index_frame()["row"].to_list() == [0, 1, 2, 3, 4]


def test_rows_for_tail_after_serving_appends(tmp_path):
    """Appends after the sorted user index was built are still found (the unsorted tail)."""
    s = MemoryStore.create(tmp_path / "m", H, SMAX)
    s.append([1, 2], [10, 20], [5, 5], np.ones((2, H)), [np.ones((1, H))] * 2)
    assert s.rows_for(1).tolist() == [0]
    s.append([1], [11], [3], np.ones((1, H)), [np.ones((1, H))])  # older than row 0
    assert s.rows_for(1).tolist() == [2, 0]
    assert s.lookup(1, 11, 3) == 2


def test_duplicate_item_time_pairs_align_in_order(tmp_path):
    s = MemoryStore.create(tmp_path / "m", H, SMAX)
    s.append([1, 1], [10, 10], [5, 5], np.ones((2, H)), [np.ones((1, H))] * 2, positions=[0, 1])
    assert s.rows_for(1, [10, 10], [5, 5]).tolist() == [0, 1]
    assert s.lookup(1, 10, 5, pos=1) == 1


def build_sorted(folder, elems):
    uid, iid, tim, pos, keys, vals = elems
    order = np.lexsort((iid, pos, tim, uid))
    with MemoryStore.create(folder, H, SMAX, layer=2) as s:
        s.append(uid[order], iid[order], tim[order], keys[order], [vals[i] for i in order], positions=pos[order])


def test_merge_of_shards_equals_one_store(tmp_path):
    elems = make_elements(40, seed=1, users=6)
    uid, iid, tim, pos, keys, vals = elems
    build_sorted(tmp_path / "one", elems)
    shards = []
    for rank in range(3):  # users partitioned across 3 "processes", each appending in its own order
        sel = np.flatnonzero(uid % 3 == rank)[::-1]
        f = tmp_path / f"shard{rank}"
        with MemoryStore.create(f, H, SMAX, layer=2) as s:
            for chunk in np.array_split(sel, 2):
                s.append(uid[chunk], iid[chunk], tim[chunk], keys[chunk], [vals[i] for i in chunk], positions=pos[chunk])
        shards.append(f)
    merged = merge_stores(shards, tmp_path / "merged", chunk=7)
    one = MemoryStore.open(tmp_path / "one")
    assert len(merged) == len(one) == 40
    np.testing.assert_array_equal(np.asarray(merged.index), np.asarray(one.index))
    np.testing.assert_array_equal(np.asarray(merged.key_matrix), np.asarray(one.key_matrix))
    np.testing.assert_array_equal(np.asarray(merged.value_tokens), np.asarray(one.value_tokens))
    assert merged.meta.extra["merged_from"] == [str(p) for p in shards]
    assert not list((tmp_path).glob(".merged.tmp-*"))


def test_merge_rejects_overlap_and_mismatch(tmp_path):
    elems = make_elements(6)
    build_sorted(tmp_path / "a", elems)
    build_sorted(tmp_path / "b", elems)
    with pytest.raises(UserError, match="duplicated element"):
        merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    MemoryStore.create(tmp_path / "c", H + 1, SMAX, layer=2).close()
    with pytest.raises(UserError, match="hidden_size: 8 vs 9"):
        merge_stores([tmp_path / "a", tmp_path / "c"], tmp_path / "out")


def test_interrupted_append_never_corrupts_committed_rows(tmp_path, monkeypatch):
    f = tmp_path / "m"
    uid, iid, tim, pos, keys, vals = make_elements(6)
    s = MemoryStore.create(f, H, SMAX)
    s.append(uid[:3], iid[:3], tim[:3], keys[:3], vals[:3])

    # crash 1: the process dies after the data files were written, before the commit
    def die(*a, **k):
        raise KeyboardInterrupt("killed before commit")

    monkeypatch.setattr(MemoryStore, "_write_commit", die)
    with pytest.raises(KeyboardInterrupt):
        s.append(uid[3:], iid[3:], tim[3:], keys[3:] + 100, [v + 100 for v in vals[3:]])
    monkeypatch.undo()
    s.close()
    assert (f / "keys.bin").stat().st_size == 6 * H * 4  # the uncommitted tail is on disk ...
    r = MemoryStore.open(f)
    assert len(r) == 3  # ... but invisible
    np.testing.assert_array_equal(r.keys([0, 1, 2]), keys[:3])

    # crash 2: the process dies half-way through writing the values file
    real = MemoryStore._write_at

    def half(self, name, offset, data):
        if name == "values.bin":
            real(self, name, offset, data[: len(data) // 2])
            raise KeyboardInterrupt("killed mid-write")
        real(self, name, offset, data)

    s = MemoryStore.open(f, mode="a")
    monkeypatch.setattr(MemoryStore, "_write_at", half)
    with pytest.raises(KeyboardInterrupt):
        s.append(uid[3:], iid[3:], tim[3:], keys[3:] - 5, vals[3:])
    monkeypatch.undo()
    s.close()
    assert len(MemoryStore.open(f)) == 3

    # recovery: the next append overwrites the garbage tail; everything reads back exactly
    with MemoryStore.open(f, mode="a") as s:
        assert s.append(uid[3:], iid[3:], tim[3:], keys[3:], vals[3:]).tolist() == [3, 4, 5]
    r = MemoryStore.open(f)
    np.testing.assert_array_equal(r.keys(range(6)), keys)
    for got, want in zip(r.values(range(6)), vals):
        np.testing.assert_array_equal(got, want.astype(np.float16))
    assert (f / "keys.bin").stat().st_size == 6 * H * 4


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no memory store at .*does not exist"):
        MemoryStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no meta.json"):
        MemoryStore.open(tmp_path / "empty")
    s = MemoryStore.create(tmp_path / "m", H, SMAX, model_name="tiny", layer=1)
    with pytest.raises(UserError, match="hidden size 12 but memory store .* holds hidden size 8 \\(model 'tiny', layer 1\\)"):
        s.append([1], [1], [1], np.zeros((1, 12)), [np.zeros((1, 12))])
    with pytest.raises(UserError, match="values\\[0\\] have hidden size 12"):
        s.append([1], [1], [1], np.zeros((1, H)), [np.zeros((2, 12))])
    with pytest.raises(UserError, match="6 tokens; this store holds 1..5"):
        s.append([1], [1], [1], np.zeros((1, H)), [np.zeros((6, H))])
    with pytest.raises(UserError, match="inconsistent lengths"):
        s.append([1, 2], [1], [1], np.zeros((1, H)), [np.zeros((1, H))])
    with pytest.raises(UserError, match="already open for appending"):
        MemoryStore.open(tmp_path / "m", mode="a")
    with pytest.raises(UserError, match="already holds a memory store"):
        MemoryStore.create(tmp_path / "m", H, SMAX)
    with pytest.raises(UserError, match="value_dtype must be one of"):
        MemoryStore.create(tmp_path / "x", H, SMAX, value_dtype="int8")
    s.close()
    with pytest.raises(UserError, match="read-only"):
        MemoryStore.open(tmp_path / "m").append([1], [1], [1], np.zeros((1, H)), [np.zeros((1, H))])
    assert len(MemoryStore.open(tmp_path / "m")) == 0
    # a damaged store (data files shorter than the commit says) is reported, not read as garbage
    with MemoryStore.open(tmp_path / "m", mode="a") as s:
        s.append([1], [1], [1], np.zeros((1, H)), [np.zeros((1, H))])
    with open(tmp_path / "m" / "keys.bin", "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(UserError, match="damaged"):
        MemoryStore.open(tmp_path / "m")


def test_format_version_checked(tmp_path):
    MemoryStore.create(tmp_path / "m", H, SMAX).close()
    meta = (tmp_path / "m" / "meta.json").read_text().replace(f'"format_version": {store_mod.FORMAT_VERSION}', '"format_version": 99')
    (tmp_path / "m" / "meta.json").write_text(meta)
    with pytest.raises(UserError, match="format version 99"):
        MemoryStore.open(tmp_path / "m")
