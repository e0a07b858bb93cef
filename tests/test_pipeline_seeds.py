"""`automr run --seeds`: seed-dependent stages run once per seed into seed-S folders, the others are shared,
stamps work per seed, and the report gathers every seed (the rule: automr/pipeline_seeds.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automr.data.synthetic import SyntheticSpec, write_synthetic
from automr.errors import UserError
from automr.pipeline import plan_pipeline
from automr.pipeline_seeds import parse_seeds, stage_output
from automr.stages import BY_NAME

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_users": 60, "n_series": 6, "n_filler": 30, "min_history": 6, "max_history": 8, "recent_k": 4}


def _automr(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "automr", *args], cwd=cwd, capture_output=True, text=True, env=env, check=False)


def _chain(root: Path) -> Path:
    """prepare (shared) -> evaluate (per seed: its seed draws the subset and the bootstrap) -> report (gathers)."""
    write_synthetic(SyntheticSpec(**TINY, seed=0), root / "raw", quiet=True)
    stages = {
        "prepare": {"data": "raw", "preset": "synthetic", "recent_k": 4, "out": "runs/x/data"},
        "evaluate": {"samples": "runs/x/data", "methods": ["popularity"], "run": "runs/x/eval", "n_boot": 20, "n_eval": 8},
        "report": {"runs": ["runs/x/eval"], "out": "runs/x/report"},
    }
    (root / "p.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root / "p.yaml"


def test_seeds_run_per_seed_folders_and_share_the_rest(tmp_path: Path) -> None:
    _chain(tmp_path)
    first = _automr("run", "p.yaml", "--seeds", "0,1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    x = tmp_path / "runs" / "x"
    assert (x / "data" / ".automr-stage.json").is_file() and not (x / "seed-0" / "data").exists()  # shared
    stamps = {s: json.loads((x / f"seed-{s}" / "eval" / ".automr-stage.json").read_text()) for s in (0, 1)}
    assert stamps[0]["id"] != stamps[1]["id"] and not (x / "eval").exists()
    seeds = {s: json.loads((x / f"seed-{s}" / "eval" / "eval.json").read_text())["seed"] for s in (0, 1)}
    assert seeds == {0: 0, 1: 1}
    report = yaml.safe_load((x / "report" / "config.yaml").read_text())
    assert report["runs"] == ["runs/x/seed-0/eval", "runs/x/seed-1/eval"]
    assert "2 seed run(s): seed 0, seed 1" in (x / "report" / "report.md").read_text()

    second = _automr("run", "p.yaml", "--seeds", "0,1", cwd=tmp_path)  # stamps hold per seed
    assert second.returncode == 0, second.stderr
    for label in ("prepare", "evaluate/seed-0", "evaluate/seed-1", "report"):
        assert f"- {label}: up to date" in second.stdout, second.stdout
    third = _automr("run", "p.yaml", "--seeds", "0,1,2", cwd=tmp_path)  # a new seed runs only itself and the report
    assert third.returncode == 0, third.stderr
    assert "- evaluate/seed-0: up to date" in third.stdout and "- evaluate/seed-2: not run yet" in third.stdout
    assert "- report: config changed" in third.stdout


def test_plan_shares_pinned_and_seed_free_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """synthetic-tiny with seeds: data, the model (seed pinned), memory and annotations (no subset) shared;
    the retriever, headroom and evaluation per seed, each reading its own seed's retriever."""
    monkeypatch.chdir(tmp_path)
    plan = {label: (cfg, stage_output(BY_NAME[c], cfg)) for label, c, cfg in
            plan_pipeline(REPO / "configs" / "synthetic-tiny.yaml", check_paths=True, seeds=[0, 3])}
    for shared in ("synthetic", "prepare", "tiny-lm", "build-memory", "annotate-train", "annotate-valid", "report"):
        assert shared in plan
    root = Path("runs/synthetic-tiny")
    for s in (0, 3):
        cfg, out = plan[f"train-retriever/seed-{s}"]
        assert out == root / f"seed-{s}" / "retriever" and cfg.seed == s
        cfg, out = plan[f"evaluate/seed-{s}"]
        assert Path(cfg.method_options["automr"]["retriever"]) == root / f"seed-{s}" / "retriever"
        assert cfg.method_options["automr"]["memory"] == "runs/synthetic-tiny/memory"
    assert plan["report"][0].runs == [root / "seed-0" / "eval", root / "seed-3" / "eval"]
    assert plan["report"][0].headroom == [root / "seed-0" / "headroom", root / "seed-3" / "headroom"]


def test_seed_subsets_make_memory_per_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build-memory with max_samples picks its subset by seed, so it runs per seed, and so does what reads it."""
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load((REPO / "configs" / "synthetic-tiny.yaml").read_text())
    spec["stages"]["build-memory"]["max_samples"] = 30
    spec["seeds"] = [0, 1]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    labels = [label for label, _, _ in plan_pipeline(tmp_path / "p.yaml")]
    assert "build-memory/seed-1" in labels and "annotate-train/seed-1" in labels and "tiny-lm" in labels


def test_bad_seeds_are_user_errors(tmp_path: Path) -> None:
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("a,b", "1,1", ""):
        with pytest.raises(UserError):
            parse_seeds(bad)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"seeds": "0,1", "stages": {"prepare": {"data": "x", "out": "y"}}}))
    with pytest.raises(UserError, match="seeds"):
        plan_pipeline(tmp_path / "p.yaml")


def test_seed_independent_methods_evaluated_once_and_reused_per_seed(tmp_path: Path) -> None:
    """configs/movielens-100k-cpu.yaml's layout: a pinned evaluate-shared stage read by each seed's evaluate."""
    write_synthetic(SyntheticSpec(**TINY, seed=0), tmp_path / "raw", quiet=True)
    common = {"samples": "runs/x/data", "n_boot": 20, "n_eval": 8, "subset_seed": 0}
    stages = {
        "prepare": {"data": "raw", "preset": "synthetic", "recent_k": 4, "out": "runs/x/data"},
        "evaluate-shared": {"stage": "evaluate", **common, "seed": 0, "methods": ["popularity"], "run": "runs/x/eval-shared"},
        "evaluate": {**common, "methods": ["popularity"], "reuse": ["runs/x/eval-shared"], "run": "runs/x/eval"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"seeds": [0, 1], "stages": stages}, sort_keys=False))
    done = _automr("run", "p.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    x = tmp_path / "runs" / "x"
    assert (x / "eval-shared" / "metrics.json").is_file() and not (x / "seed-0" / "eval-shared").exists()
    shared = json.loads((x / "eval-shared" / "metrics.json").read_text())["popularity"]
    for s in (0, 1):
        info = json.loads((x / f"seed-{s}" / "eval" / "eval.json").read_text())
        assert info["seed"] == s and info["timings"]["popularity"]["reused_from"] == "runs/x/eval-shared"
        assert json.loads((x / f"seed-{s}" / "eval" / "metrics.json").read_text())["popularity"] == shared
    assert done.stdout.count("popularity: reused from runs/x/eval-shared") == 2
