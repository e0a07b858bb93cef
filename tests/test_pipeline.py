"""`automr run` stamps: changed inputs rerun exactly the stages that read them; evaluate checks every
method's options and paths before any method runs (the pipeline plan and `automr evaluate` alike)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automr.data.synthetic import SyntheticSpec, write_synthetic
from automr.errors import UserError
from automr.utils import fingerprint as fpmod
from automr.utils.fingerprint import changed_parts, path_fingerprint

AUTOMR = [sys.executable, "-m", "automr.cli"]
REPO = Path(__file__).resolve().parents[1]
TINY = {"n_users": 60, "n_series": 6, "n_filler": 30, "min_history": 6, "max_history": 8, "recent_k": 4}


def _automr(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([*AUTOMR, *args], cwd=cwd, capture_output=True, text=True, env=env, check=False)


def _status(stdout: str) -> dict[str, str]:
    """label -> its line of `automr run` output: 'up to date (...)' or the reason it ran."""
    lines = [ln[2:] for ln in stdout.splitlines() if ln.startswith("- ") and ": done in " not in ln]
    return dict(ln.split(": ", 1) for ln in lines)


# -- fingerprints ------------------------------------------------------------------------------
def test_file_fingerprint_sees_content_not_copies(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("1,2\n")
    before = path_fingerprint(f)
    assert before["kind"] == "file" and before["sha256"]
    os.utime(f, ns=(1, 1))  # same bytes, new mtime (a copy, a checkout): the same input
    assert changed_parts(before, path_fingerprint(f)) == []
    f.write_text("1,3\n")  # same size, other bytes
    assert changed_parts(before, path_fingerprint(f)) == [""]
    f.unlink()
    assert changed_parts(before, path_fingerprint(f)) == [""]


def test_large_files_are_judged_by_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 100)
    before = path_fingerprint(f, hash_limit=10)
    assert before["sha256"] is None
    os.utime(f, ns=(5, 5))
    assert changed_parts(before, path_fingerprint(f, hash_limit=10)) == [""]


def test_unchanged_files_are_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    first = path_fingerprint(tmp_path / "d")
    monkeypatch.setattr(fpmod, "sha256_file", lambda p: pytest.fail(f"{p} hashed again"))
    assert path_fingerprint(tmp_path / "d", first) == first


def test_folder_fingerprint_names_changed_files_and_skips_excluded(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    (d / "own").mkdir()
    before = path_fingerprint(d, exclude=[d / "own"])
    (d / "sub" / "b.txt").write_text("B")
    (d / "c.txt").write_text("c")
    (d / "a.txt").unlink()
    (d / "own" / "written-by-the-stage").write_text("z")
    assert changed_parts(before, path_fingerprint(d, exclude=[d / "own"])) == ["a.txt", "c.txt", "sub/b.txt"]


def test_stage_inputs_are_path_fields_and_path_strings_but_not_outputs_or_caches(tmp_path: Path, monkeypatch) -> None:
    from automr.pipeline import stage_inputs
    from automr.stages import get_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "test").mkdir()  # a bare word that names a folder here is not a path
    (tmp_path / "runs" / "m").mkdir(parents=True)
    stage = get_stage("evaluate")
    cfg = stage.config_class()(
        samples="data", methods=["bigrec", "automr"], run="eval", split="test",
        method_options={"bigrec": {"model": "runs/m", "cache_dir": "runs/cache", "decoding": "grounding"},
                        "automr": {"retriever": "runs/ret", "memory": "runs/mem"}},
    )
    got = stage_inputs(stage, cfg, produced=[Path("runs/ret")])
    assert got == [Path("data"), Path("runs/m"), Path("runs/ret")]  # runs/mem: neither existing nor produced


# -- automr run --------------------------------------------------------------------------------
def _two_chains(root: Path) -> Path:
    """Two independent chains, prepare -> evaluate, on raw-a and raw-b (external inputs)."""
    for name, seed in (("raw-a", 0), ("raw-b", 1)):
        write_synthetic(SyntheticSpec(**TINY, seed=seed), root / name, quiet=True)
    stages = {}
    for x in "ab":
        stages[f"prepare-{x}"] = {"stage": "prepare", "data": f"raw-{x}", "preset": "synthetic", "recent_k": 4, "out": f"data-{x}"}
        stages[f"evaluate-{x}"] = {"stage": "evaluate", "samples": f"data-{x}", "methods": ["popularity"], "run": f"eval-{x}", "n_boot": 20}
    (root / "p.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root / "p.yaml"


def test_run_reruns_exactly_the_stages_a_changed_input_affects(tmp_path: Path) -> None:
    _two_chains(tmp_path)
    first = _automr("run", "p.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert all(v.startswith("not run yet") for v in _status(first.stdout).values()), first.stdout

    second = _automr("run", "p.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert set(_status(second.stdout)) == {"prepare-a", "evaluate-a", "prepare-b", "evaluate-b"}
    assert all(v.startswith("up to date") for v in _status(second.stdout).values()), second.stdout

    # Replace raw-b's interactions with other data; the config stays the same.
    write_synthetic(SyntheticSpec(**TINY, seed=7), tmp_path / "other", quiet=True)
    shutil.copy(tmp_path / "other" / "interactions.parquet", tmp_path / "raw-b" / "interactions.parquet")
    metrics_a = (tmp_path / "eval-a" / "metrics.json").stat().st_mtime_ns
    third = _automr("run", "p.yaml", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    status = _status(third.stdout)
    assert status["prepare-b"] == "input raw-b/interactions.parquet changed", third.stdout
    assert status["evaluate-b"] == "prepare-b reran", third.stdout
    assert status["prepare-a"].startswith("up to date") and status["evaluate-a"].startswith("up to date")
    assert (tmp_path / "eval-a" / "metrics.json").stat().st_mtime_ns == metrics_a

    # A byte-identical copy (new mtime, same content) is not a change.
    shutil.copy(tmp_path / "other" / "interactions.parquet", tmp_path / "raw-b" / "interactions.parquet")
    fourth = _automr("run", "p.yaml", cwd=tmp_path)
    assert all(v.startswith("up to date") for v in _status(fourth.stdout).values()), fourth.stdout


def test_a_failed_rerun_does_not_look_up_to_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun that fails may leave a partly rewritten output: reverting the change must not make it look done."""
    import automr.stages.evaluate as evaluate_stage
    from automr.pipeline import run_pipeline_file

    spec = _two_chains(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert {s for _, s in run_pipeline_file(spec)} == {"ran"}
    original = spec.read_text()
    doc = yaml.safe_load(original)
    doc["stages"]["evaluate-a"]["n_boot"] = 30
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))

    def interrupted(cfg: object) -> None:
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(evaluate_stage, "run_evaluate", interrupted)
        with pytest.raises(RuntimeError):
            run_pipeline_file(spec)
    assert not (tmp_path / "eval-a" / ".automr-stage.json").exists()
    spec.write_text(original)  # the config as it was when eval-a was last complete
    outcomes = dict(run_pipeline_file(spec))
    assert outcomes == {"prepare-a": "up to date", "evaluate-a": "ran", "prepare-b": "up to date", "evaluate-b": "up to date"}


def test_a_changed_config_reruns_its_stage_and_those_reading_from_it(tmp_path: Path, monkeypatch) -> None:
    from automr.pipeline import run_pipeline_file

    spec = _two_chains(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_pipeline_file(spec)
    doc = yaml.safe_load(spec.read_text())
    doc["stages"]["prepare-a"]["recent_k"] = 3
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    outcomes = dict(run_pipeline_file(spec))
    assert outcomes == {"prepare-a": "ran", "evaluate-a": "ran", "prepare-b": "up to date", "evaluate-b": "up to date"}



def _stamp_before_option(stamp_file: Path, option: str, *, keep_settings: bool) -> None:
    """Rewrite a stamp as an automr without `option` would have written it (a stamp from before stamps kept
    their settings, when `keep_settings` is False)."""
    from automr.pipeline import _digest

    stamp = json.loads(stamp_file.read_text())
    settings = {k: v for k, v in stamp["settings"].items() if k != option}
    stamp["config"] = _digest(settings)
    if keep_settings:
        stamp["settings"] = settings
    else:
        del stamp["settings"]
    stamp_file.write_text(json.dumps(stamp))


@pytest.mark.parametrize("keep_settings", [True, False])
def test_an_option_added_since_a_run_keeps_it_up_to_date_at_its_default(tmp_path: Path, monkeypatch, keep_settings) -> None:
    """A new option (here: `k` taken out of an old stamp) at its default leaves finished stages alone; set
    otherwise, it reruns its stage. A stamp without settings reads the options it knew from the saved config.yaml."""
    from automr.pipeline import run_pipeline_file

    spec = _two_chains(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_pipeline_file(spec)
    _stamp_before_option(tmp_path / "eval-a" / ".automr-stage.json", "k", keep_settings=keep_settings)
    if not keep_settings:
        saved = yaml.safe_load((tmp_path / "eval-a" / "config.yaml").read_text())
        del saved["k"]
        (tmp_path / "eval-a" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert set(dict(run_pipeline_file(spec)).values()) == {"up to date"}

    doc = yaml.safe_load(spec.read_text())
    doc["stages"]["evaluate-a"]["k"] = 12
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert dict(run_pipeline_file(spec))["evaluate-a"] == "ran"



def test_a_rerun_that_leaves_its_output_unchanged_keeps_the_later_stages_up_to_date(tmp_path: Path, monkeypatch) -> None:
    """A stage asked again with a setting that changes nothing it writes keeps its run id; a changed output does not."""
    import automr.stages.evaluate as evaluate_stage
    from automr.pipeline import run_pipeline_file

    spec = _two_chains(tmp_path)
    doc = yaml.safe_load(spec.read_text())
    doc["stages"]["report-a"] = {"stage": "report", "runs": ["eval-a"], "out": "report-a"}
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    run_pipeline_file(spec)
    doc["stages"]["evaluate-a"]["n_boot"] = 30
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    with monkeypatch.context() as m:
        m.setattr(evaluate_stage, "run_evaluate", lambda cfg: None)  # a rerun that writes nothing
        outcomes = dict(run_pipeline_file(spec))
    assert outcomes["evaluate-a"] == "ran" and outcomes["report-a"] == "up to date"
    doc["stages"]["evaluate-a"]["n_boot"] = 40
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert dict(run_pipeline_file(spec))["report-a"] == "ran"  # this time the evaluation rewrote its metrics


def test_a_legacy_stamp_without_a_saved_config_reruns_on_any_difference(tmp_path: Path, monkeypatch) -> None:
    from automr.pipeline import run_pipeline_file

    spec = _two_chains(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_pipeline_file(spec)
    _stamp_before_option(tmp_path / "eval-a" / ".automr-stage.json", "k", keep_settings=False)
    (tmp_path / "eval-a" / "config.yaml").unlink()
    assert dict(run_pipeline_file(spec))["evaluate-a"] == "ran"


# -- evaluate checks every method before running any -------------------------------------------
def test_evaluate_bad_retriever_after_a_valid_method_fails_before_anything_runs(prepared_factory, tmp_path: Path) -> None:
    data = prepared_factory(users={1: [1, 2, 3, 4], 2: [2, 3, 4, 5]})
    (tmp_path / "not-a-store").mkdir()
    options = {"automr": {"retriever": str(tmp_path / "no-retriever"), "memory": str(tmp_path / "not-a-store")}}
    proc = _automr("evaluate", "--samples", str(data), "--methods", "popularity,automr", "--run", str(tmp_path / "run"),
                   "--method-options", json.dumps(options), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "method automr: retriever: no retriever at" in err and "retriever.safetensors" in err
    assert "method automr: memory: no memory store at" in err and "has no meta.json" in err  # every problem at once
    assert not (tmp_path / "run").exists()


def test_build_methods_checks_each_kind_of_output(tmp_path: Path) -> None:
    from automr.methods.registry import build_methods

    ad = tmp_path / "ft"
    (ad / "adapter").mkdir(parents=True)
    (ad / "adapter" / "adapter_config.json").write_text("{}")
    (ad / "adapter" / "adapter_model.safetensors").write_text("")
    (tmp_path / "ret").mkdir()
    (tmp_path / "ret" / "retriever.json").write_text('{"format_version": 1}')
    (tmp_path / "ret" / "retriever.safetensors").write_text("")
    opts = {"bigrec": {"adapter": str(ad)}, "automr": {"retriever": str(tmp_path / "ret"), "queries": str(tmp_path / "q")},
            "popularity": {}}
    built, problems = build_methods(["popularity", "bigrec", "automr"], opts)
    assert set(built) == {"popularity", "bigrec", "automr"}  # the options themselves are fine
    assert len(problems) == 2, problems
    assert problems[0].startswith("method bigrec: adapter:") and "lacks config.yaml" in problems[0]
    assert problems[1].startswith("method automr: queries: no query folder")
    (ad / "config.yaml").write_text("model: smollm2\n")
    (tmp_path / "q").mkdir()
    assert build_methods(["popularity", "bigrec", "automr"], opts)[1] == []
    # Paths that an earlier stage of the same pipeline writes need not exist yet.
    _, later = build_methods(["automr"], {"automr": {"retriever": "runs/x/ret"}}, produced=[Path("runs/x")])
    assert later == []


def test_run_checks_method_paths_before_the_first_stage(tmp_path: Path) -> None:
    write_synthetic(SyntheticSpec(**TINY), tmp_path / "raw", quiet=True)
    spec = {"stages": {
        "prepare": {"data": "raw", "preset": "synthetic", "recent_k": 4, "out": "data"},
        "evaluate": {"samples": "data", "methods": ["popularity", "automr"], "run": "eval",
                     "method_options": {"automr": {"retriever": "runs/missing-retriever"}}},
    }}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _automr("run", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "evaluate: method automr: retriever: no retriever at" in " ".join(proc.stderr.split())
    assert not (tmp_path / "data").exists() and not (tmp_path / "eval").exists()


def test_plan_accepts_paths_that_earlier_stages_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from automr.pipeline import plan_pipeline

    monkeypatch.chdir(tmp_path)  # nothing of runs/synthetic-tiny exists here
    assert plan_pipeline(REPO / "configs" / "synthetic-tiny.yaml", check_paths=True)
    spec = yaml.safe_load((REPO / "configs" / "synthetic-tiny.yaml").read_text())
    del spec["stages"]["train-retriever"]  # now nothing writes runs/synthetic-tiny/retriever
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(UserError, match="method automr: retriever: no retriever at runs/synthetic-tiny/retriever"):
        plan_pipeline(tmp_path / "p.yaml", check_paths=True)
