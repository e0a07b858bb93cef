"""Output-folder safety: every stage passes through automr.stages.guard.run_stage.

The CLI tests run `python -m automr.cli` in a subprocess (exit code, message, no traceback) on a
tiny synthetic data set; each asserts that nothing of the user's was deleted and nothing was left
behind. The rest test the one implementation of atomic writes in automr/utils/io.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from automr.errors import UserError
from automr.utils.io import (
    OUTPUT_MARKER,
    atomic_dir,
    atomic_file,
    lock_path,
    output_lock,
    remove_stale_temporaries,
)

AUTOMR = [sys.executable, "-m", "automr.cli"]


def automr(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOMR, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, check=False,
                          env=None if env is None else os.environ | env)


def prepare(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return automr("prepare", "--data", data, "--preset", "synthetic", "--out", out, *extra, env=env)


def refused(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())  # rich wraps long lines
    for p in phrases:
        assert p in text, text


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) -> its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data set in the common format (written by our stage, so it carries the marker)."""
    from automr.data.synthetic import write_synthetic
    from automr.stages.synthetic import SyntheticConfig

    out = tmp_path_factory.mktemp("raw") / "syn"
    write_synthetic(SyntheticConfig(out=out, n_users=30, seed=3), out, quiet=True)
    return out


# --------------------------------------------------------------------------- inputs are never outputs
def test_out_equal_to_data_refuses_and_keeps_the_data(raw: Path) -> None:
    before = snapshot(raw)
    refused(prepare(raw, raw), "--out", "is the same folder as the input --data", "nothing was written")
    assert snapshot(raw) == before
    assert not lock_path(raw).exists()


def test_out_inside_or_above_an_input_refuses(raw: Path, tmp_path: Path) -> None:
    before = snapshot(raw)
    refused(prepare(raw, raw / "prepared"), "lies inside the input --data")
    assert not (raw / "prepared").exists()
    refused(prepare(raw, raw.parent), "contains the input --data")
    assert snapshot(raw) == before


def test_paths_in_mapping_and_string_fields_are_inputs(raw: Path, tmp_path: Path) -> None:
    from automr.stages.evaluate import EvaluateConfig
    from automr.stages.guard import check_overlap, config_paths

    memory = tmp_path / "mem"
    memory.mkdir()
    cfg = EvaluateConfig(samples=raw, methods=["automr"], run=memory, method_options={"automr": {"memory": str(memory), "decoding": "constrained"}})
    assert ("method_options.automr.memory", memory) in config_paths(cfg, exclude="run")
    assert "method_options.automr.decoding" not in dict(config_paths(cfg))  # not an existing path: not an input
    with pytest.raises(UserError, match=r"--run .* is the same folder as the input --method-options \(automr.memory\)"):
        check_overlap(cfg, "run", memory)


# --------------------------------------------------------------------------- existing outputs
def test_unrelated_folder_refused_then_replaced_with_overwrite(raw: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / f".thesis.tex.tmp-{dead_pid()}").write_text("the editor's, named like ours")  # not ours to clean
    before = snapshot(mine)
    refused(prepare(raw, mine), "automr did not write", "thesis.tex", "--overwrite")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no lock, no temporaries

    proc = prepare(raw, mine, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "replaced" in proc.stderr and "thesis.tex" in proc.stderr
    assert set(before) & set(snapshot(mine)) == set() and (mine / "samples" / "train.parquet").is_file()
    assert json.loads((mine / OUTPUT_MARKER).read_text())["stage"] == "prepare"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_puts_the_folder_back_when_the_stage_fails(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    proc = prepare(tmp_path / "no-such-data", mine, "--overwrite")
    refused(proc, "restored")
    assert snapshot(mine) == {"notes.txt": hashlib.sha256(b"keep").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failed_stage_leaves_no_output_folder(tmp_path: Path) -> None:
    proc = automr("evaluate", "--samples", tmp_path / "missing", "--methods", "popularity", "--run", tmp_path / "run")
    refused(proc, "does not exist")
    assert list(tmp_path.iterdir()) == []  # the guard's claim (folder + marker) is taken back


def test_out_naming_a_file_refuses_and_leaves_no_orphan(raw: Path, tmp_path: Path) -> None:
    f = tmp_path / "results"
    f.write_text("a file of the user's")
    refused(prepare(raw, f), "is an existing file", "nothing was written")
    assert f.read_text() == "a file of the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no .results.old-PID, no lock


def test_rerun_over_own_output_and_over_an_earlier_versions_output(raw: Path, tmp_path: Path) -> None:
    from automr.data.prepare import prepare as prepare_in_process
    from automr.data.protocol import PrepareConfig

    out = tmp_path / "prep"
    prepare_in_process(PrepareConfig(data=raw, preset="synthetic", out=out))  # the library call alone: marker too
    assert (out / OUTPUT_MARKER).is_file()
    proc = prepare(raw, out)
    assert proc.returncode == 0, proc.stderr
    (out / OUTPUT_MARKER).unlink()  # as an earlier version left it: config.yaml only
    proc = prepare(raw, out)
    assert proc.returncode == 0, proc.stderr
    assert (out / OUTPUT_MARKER).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_foreign_config_yaml_does_not_make_a_folder_ours(raw: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("learning_rate: 3\nmy_own_key: true\n")
    refused(prepare(raw, other), "automr did not write")
    assert (other / "config.yaml").read_text() == "learning_rate: 3\nmy_own_key: true\n"


# --------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_removed_live_ones_kept(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    dead, live = dead_pid(), os.getpid()
    stale = [tmp_path / f".prep.tmp-{dead}-x1", tmp_path / f".prep.old-{dead}"]
    # a live process's; another output's; a user's folder set aside by a killed --overwrite run
    kept = [tmp_path / f".prep.tmp-{live}-x2", tmp_path / f".other.tmp-{dead}-x3", tmp_path / f".prep.set-aside-by-automr-{dead}"]
    stale[0].mkdir()
    (stale[0] / "keys.bin").write_bytes(b"0" * 1000)
    for p in stale[1:] + kept:
        p.write_text("partial")
    proc = prepare(raw, out)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 stale temporaries" in proc.stderr and "interrupted `--overwrite` run set aside" in proc.stderr
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_stale_temporaries_inside_a_resumable_output(tmp_path: Path) -> None:
    out = tmp_path / "annotations"
    (out / "checkpoint").mkdir(parents=True)
    dead, live = dead_pid(), os.getpid()
    stale = [out / f".part-r000-00003.parquet.tmp-{dead}", out / f".checkpoint.tmp-{dead}-abc", out / "checkpoint" / f".state.json.tmp-{dead}"]
    kept = [out / f".part-r001-00003.parquet.tmp-{live}", out / "part-r000-00002.parquet", out / ".timing-r000.json"]
    stale[1].mkdir()
    for p in [stale[0], stale[2], *kept]:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(out)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_failed_atomic_writes_leave_no_temporary(tmp_path: Path) -> None:
    with pytest.raises(OSError), atomic_file(tmp_path / "part.parquet") as tmp:
        tmp.write_text("half")
        raise OSError("No space left on device")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "store") as tmp:
        (tmp / "keys.npy").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(tmp_path / "ok.txt", durable=True) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.txt"] and (tmp_path / "ok.txt").read_text() == "whole"


def test_atomic_dir_refuses_a_file_and_replaces_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"), atomic_dir(tmp_path / "f"):
        pass
    for text in ("one", "two"):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "v.txt").write_text(text)
    assert (tmp_path / "d" / "v.txt").read_text() == "two" and (tmp_path / "d" / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
    assert remove_stale_temporaries(tmp_path / "d") == []


# --------------------------------------------------------------------------- one writer at a time
def test_second_process_refuses_while_the_first_holds_the_lock(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    with output_lock(out):
        proc = prepare(raw, out)
    refused(proc, "in use by another automr process", f"pid {os.getpid()}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, our lock released


def test_only_rank_zero_locks_under_torchrun(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    with output_lock(out):  # as rank 0 would hold it
        proc = prepare(raw, out, env={"RANK": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (out / "samples" / "train.parquet").is_file()


def test_stale_lock_of_a_dead_process_is_taken_over(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": "here", "time": "then"}))
    proc = prepare(raw, out)
    assert proc.returncode == 0, proc.stderr
    assert "took over the lock" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]  # released and removed


def test_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with output_lock(out):
        with output_lock(out):
            assert lock_path(out).is_file()
        assert lock_path(out).is_file()
    assert not lock_path(out).exists()


def test_two_runs_of_one_pipeline_file(raw: Path, tmp_path: Path) -> None:
    spec = tmp_path / "p.yaml"
    spec.write_text(f"stages:\n  prepare: {{data: {raw}, preset: synthetic, out: {tmp_path / 'prep'}}}\n")
    with output_lock(spec.resolve()):
        proc = automr("run", spec)
    refused(proc, "in use by another automr process", "automr run")
    assert not (tmp_path / "prep").exists()
    proc = automr("run", spec)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "prep" / OUTPUT_MARKER).is_file() and not lock_path(spec).exists()


def test_lock_failures_of_the_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import errno
    from contextlib import ExitStack

    from automr.stages import guard

    def failing(code: int):
        def lock(target: Path, advice: str):
            raise OSError(code, os.strerror(code))
        return lock

    monkeypatch.setattr(guard, "output_lock", failing(errno.ENOLCK))  # no locks on this file system: warn, run
    with ExitStack() as stack:
        guard._enter_lock(stack, tmp_path / "o", "", "--out o", writable=True)
    assert "running without that lock" in capsys.readouterr().err
    monkeypatch.setattr(guard, "output_lock", failing(errno.EACCES))  # cannot write there: the stage could not either
    with pytest.raises(UserError, match="must be writable"), ExitStack() as stack:
        guard._enter_lock(stack, tmp_path / "o", "", "--out o", writable=True)
    with ExitStack() as stack:  # a pipeline file in a read-only folder: the stages still lock their outputs
        guard._enter_lock(stack, tmp_path / "p.yaml", "", "p.yaml", writable=False)
    assert "running without that lock" in capsys.readouterr().err
