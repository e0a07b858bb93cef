"""How the command line ends: user mistakes exit 2 with one message, interruptions exit 130/143.

Most tests run the real command (`python -m automr ...`) in a subprocess, as a user would. Some
call main(argv) in the test process instead: where a subprocess cannot be reached (a stage
monkeypatched to hit a full disk, the version without installed metadata), and for --help of
every stage (a dozen subprocesses for text the same code prints; one subprocess still checks
prepare's --help at 80 columns end to end).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import pytest
import yaml
from memory_helpers import make_tiny_prepared

import automr
from automr.cli import _flag_type, main
from automr.config import load_config, read_yaml
from automr.data.protocol import PrepareConfig
from automr.errors import UserError
from automr.memory.store import MemoryStore
from automr.stages import STAGES
from automr.utils.io import atomic_dir

AUTOMR = [sys.executable, "-m", "automr"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AUTOMR, *args], check=False, capture_output=True, text=True, env=env, timeout=120)


def main_exit(argv: list[str]) -> int:
    """main(argv) in this process; its exit status."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return int(info.value.code or 0)


def folder_state(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to show that a failed command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["prepare", "--bogus"], "No such option: --bogus"),
        (["synthetic", "--n-users", "abc", "--out", "{tmp}/out"], "Invalid value for '--n-users'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
    ids=["unknown-flag", "bad-int", "unknown-subcommand"],
)
def test_usage_errors_exit_2_with_one_message(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = run_cli(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert proc.stderr.count("Error:") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_config_given_to_a_stage_without_c_gets_a_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("stages: {}\n")
    proc = run_cli("evaluate", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"automr evaluate -c {cfg}" in proc.stderr and f"automr run {cfg}" in proc.stderr
    assert "hint" not in run_cli("evaluate", "--bogus").stderr  # other usage errors: no hint


def test_pipeline_error_prints_the_stage_label_verbatim(tmp_path: Path) -> None:
    """`[stages.prepare]` survives printing (rich read it as markup), and an unquoted impossible
    date is reported with the other problems instead of a YAML-constructor traceback."""
    spec = tmp_path / "p.yaml"
    spec.write_text(f"stages:\n  prepare: {{data: /nonexistent, out: {tmp_path / 'd'}, recent_k: -3, window_start: 2017-13-01}}\n")
    proc = run_cli("run", str(spec))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{spec} [stages.prepare]" in proc.stderr
    assert "window_start: Value error, expected an ISO date" in proc.stderr and "'2017-13-01'" in proc.stderr
    assert "recent_k" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_unquoted_dates_in_yaml(tmp_path: Path) -> None:
    """A real date stays a date (validation accepts it); an impossible one reaches validation as text."""
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nout: o\nwindow_start: 2017-02-01\nwindow_end: 2017-02-30\n")
    raw = read_yaml(f)
    assert str(raw["window_start"]) == "2017-02-01" and not isinstance(raw["window_start"], str)
    assert raw["window_end"] == "2017-02-30"
    with pytest.raises(UserError) as info:
        load_config(PrepareConfig, f)
    assert "1 problem(s)" in str(info.value)
    assert "window_end: Value error, expected an ISO date such as 2017-01-01 (UTC) or 'max', found '2017-02-30'" in str(info.value)


# --------------------------------------------------------------------------- help and version
def stage_flags(stage_name: str) -> set[str]:
    """Every flag of a stage's command, as the CLI spells them (bool fields also get --no-X)."""
    cls = next(s for s in STAGES if s.name == stage_name).config_class()
    flags = {"--config", "--help"}
    for name, field in cls.model_fields.items():
        if name in getattr(cls, "cli_arguments", ()):  # given by position (`automr serve RUN`)
            continue
        flag = name.replace("_", "-")
        flags.add(f"--{flag}")
        if _flag_type(field.annotation)[0] is bool:
            flags.add(f"--no-{flag}")
    return flags


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*(?![\w.…-])", text))


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_help_at_80_columns_shows_every_flag_whole(stage: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main_exit([stage, "--help"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    missing = stage_flags(stage) - flags_in(out)
    assert not missing, f"flags cut short or missing in `automr {stage} --help` at 80 columns: {sorted(missing)}"
    assert max(len(line) for line in out.splitlines()) <= 80


def test_help_defaults_from_factories() -> None:
    """Fields with a default factory show the factory's value (they printed PydanticUndefined)."""
    proc = run_cli("build-memory", "--help")
    assert proc.returncode == 0
    assert "[default: train,valid,test]" in " ".join(proc.stdout.split())
    assert "PydanticUndefined" not in proc.stdout


def test_prepare_help_in_a_real_80_column_terminal() -> None:
    proc = run_cli("prepare", "--help", env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    for flag in ("--window-last-months", "--min-item-interactions", "--history-before-window", "--no-history-before-window"):
        assert flag in flags_in(proc.stdout), flag
    assert stage_flags("prepare") <= flags_in(proc.stdout)


def test_python_m_automr_and_version() -> None:
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"automr {version('automr')}\n"
    helped = run_cli("--help")
    assert helped.returncode == 0 and "python -m automr" in helped.stdout
    assert all(s.name in helped.stdout for s in STAGES)


def test_version_falls_back_to_the_source_tree(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", not_installed)
    assert main_exit(["--version"]) == 0
    assert capsys.readouterr().out == f"automr {automr.__version__}\n"


# --------------------------------------------------------------------------- broken memory store
@pytest.fixture
def store_and_samples(tmp_path: Path) -> tuple[Path, Path]:
    samples = make_tiny_prepared(tmp_path / "prep")
    folder = tmp_path / "mem"
    rng = np.random.default_rng(0)
    with MemoryStore.create(folder, hidden_size=4, max_value_tokens=2, model_name="tiny", layer=1) as store:
        store.append([1, 1], [3, 4], [10, 20], rng.random((2, 4)), [rng.random((1, 4)), rng.random((2, 4))])
    return folder, samples


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: (f / "meta.json").write_text('{"hidden_size": 4, "max_value'), "meta.json is not valid JSON"),
        (lambda f: (f / "index.bin").unlink(), "index.bin missing"),
    ],
    ids=["broken-meta-json", "missing-index-bin"],
)
def test_broken_memory_store_exits_2_naming_the_file(store_and_samples: tuple[Path, Path], damage, needle: str) -> None:
    folder, samples = store_and_samples
    damage(folder)
    before = folder_state(folder.parent)
    out = folder.parent / "ann"
    proc = run_cli("annotate", "--samples", str(samples), "--memory", str(folder), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr and str(folder) in proc.stderr
    assert "rebuild the store" in proc.stderr
    assert not out.exists()
    assert folder_state(folder.parent) == before


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("meta.json", "[1, 2]", "meta.json holds a JSON list, expected an object"),
        ("meta.json", None, "missing 'hidden_size'; unknown key 'hiden_size'"),
        ("meta.json", "bad-dtype", "value_dtype 'int8' is not one of float16, float32"),
        ("commit.json", '{"n_rows": ', "commit.json is not valid JSON"),
    ],
    ids=["meta-not-a-mapping", "meta-keys", "meta-dtype", "broken-commit"],
)
def test_memory_store_open_reports_damaged_json(store_and_samples: tuple[Path, Path], name: str, text: str | None, needle: str) -> None:
    folder, _ = store_and_samples
    meta = json.loads((folder / "meta.json").read_text())
    if text is None:
        meta["hiden_size"] = meta.pop("hidden_size")
        text = json.dumps(meta)
    elif text == "bad-dtype":
        meta["value_dtype"] = "int8"
        text = json.dumps(meta)
    (folder / name).write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)):
        MemoryStore.open(folder)


# --------------------------------------------------------------------------- full disk
def _full_disk_stage(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make `automr synthetic` start writing its output folder and then hit `error`."""

    def run(cfg) -> None:
        with atomic_dir(cfg.out) as tmp:
            (tmp / "interactions.parquet").write_bytes(b"half")
            raise error

    monkeypatch.setattr("automr.stages.synthetic.run_synthetic", run)


def test_full_disk_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    target = out / "interactions.parquet"
    _full_disk_stage(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)))
    assert main_exit(["synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: the disk is full (No space left on device) writing {target}." in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_full_disk_without_a_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """polars reports a full disk as a ComputeError whose text alone says it, wrapped here in another error."""
    import polars as pl

    try:
        raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")
    except pl.exceptions.ComputeError as inner:
        wrapped = RuntimeError("writing samples failed")
        wrapped.__cause__ = inner
    _full_disk_stage(monkeypatch, wrapped)
    assert main_exit(["synthetic", "--out", str(tmp_path / "syn")]) == 2
    err = capsys.readouterr().err
    assert "the disk is full (No space left on device) writing an output file (the error did not name it: parquet:" in err
    assert list(tmp_path.iterdir()) == []


def test_other_errors_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not a user mistake: it propagates (its traceback is what a bug report needs)."""
    _full_disk_stage(monkeypatch, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(OSError, match="Permission denied"):
        main(["synthetic", "--out", str(tmp_path / "syn")])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- interruptions
@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data that `automr prepare` needs a few seconds for (30,000 users, ~720k interactions)."""
    from automr.data.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("interrupt") / "data"
    write_synthetic(SyntheticSpec(n_users=30_000), out, quiet=True)
    return out


def _default_signals() -> None:
    """In the child: SIGINT/SIGTERM back to default, in case the test runner was started with them
    ignored (a background job of a non-interactive shell ignores SIGINT, and children inherit it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupt_when_writing(args: list[str], out: Path, sig: signal.Signals) -> subprocess.CompletedProcess[str]:
    """Run the command, send `sig` once it is writing `out` (its temporary folder exists), wait for it."""
    # preexec_fn: the only way to reset an inherited SIG_IGN before exec; it only sets two dispositions.
    proc = subprocess.Popen(
        [*AUTOMR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_signals,  # noqa: PLW1509
    )
    deadline = time.monotonic() + 120
    try:
        while not any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir()):
            assert proc.poll() is None, f"ended before it was interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "never started writing its output"
            time.sleep(0.01)
        time.sleep(0.2)  # inside the stage's work, not at its first step
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("how", ["prepare", "run"])
def test_interrupted_stage_exits_128_plus_signal_and_leaves_nothing(synthetic_data: Path, tmp_path: Path, how: str, sig: signal.Signals) -> None:
    out = tmp_path / "prepared"
    settings = {"data": str(synthetic_data), "preset": "synthetic", "out": str(out)}
    if how == "prepare":
        args = ["prepare", *(f"--{k}={v}" for k, v in settings.items())]
    else:
        spec = tmp_path / "pipeline.yaml"
        spec.write_text(yaml.safe_dump({"stages": {"prepare": settings}}))
        args = ["run", str(spec)]
    proc = interrupt_when_writing(args, out, sig)
    assert proc.returncode == 128 + sig, proc.stderr
    assert f"interrupted ({sig.name})" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared.")]


def test_a_list_flag_repeats_and_splits_on_commas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--runs A --runs B,C` keeps all three (a repeated flag used to keep only its last value, silently)."""
    import automr.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_stage", lambda stage, cfg, overwrite=False: seen.append(cfg))
    runs = [tmp_path / name for name in "abc"]
    for r in runs:
        r.mkdir()
    code = main_exit(["report", "--runs", str(runs[0]), "--runs", f"{runs[1]},{runs[2]}", "--out", str(tmp_path / "o")])
    assert code == 0 and [Path(p) for p in seen[0].runs] == runs
