"""Every shipped pipeline config validates (stages, their settings and each method's options)."""

from __future__ import annotations

from pathlib import Path

import pytest

from automr.data.protocol import load_preset
from automr.pipeline import plan_pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "synthetic-tiny.yaml", "movielens-1m.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates(path: Path) -> None:
    planned = plan_pipeline(path)
    assert planned, f"{path.name} plans no stage"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} should start with a comment naming its command"
    assert f"automr run configs/{path.name}" in path.read_text()


def _by_command(planned: list, command: str) -> list:
    return [cfg for _, cmd, cfg in planned if cmd == command]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_headroom_stages_judge_the_split_they_name(path: Path) -> None:
    """A headroom stage on annotations of another split than its `split` (default test) would fail at run time."""
    planned = plan_pipeline(path)
    splits = {Path(c.out): c.split for c in _by_command(planned, "annotate")}
    for h in _by_command(planned, "headroom"):
        if Path(h.annotations) in splits:
            assert splits[Path(h.annotations)] == h.split, f"{path.name}: headroom on {h.annotations} names split {h.split}"


def test_full_demo_reports_both_adapters_on_exact_memory() -> None:
    planned = plan_pipeline(Path(__file__).resolve().parents[1] / "configs" / "demo-full.yaml")
    finetunes = {c.memory_aware_prob: Path(c.out) for c in _by_command(planned, "finetune")}
    assert set(finetunes) == {0.0, 0.5}
    assert {c.mode for c in _by_command(planned, "build-memory")} == {"exact"}
    on_adapter = {}
    for ev in _by_command(planned, "evaluate"):
        for m, opts in ev.method_options.items():
            on_adapter.setdefault(Path(opts["adapter"]), set()).add(m)
    for adapter in finetunes.values():
        assert on_adapter[adapter] >= {"bigrec", "random", "automr"}, adapter
    (report,) = _by_command(planned, "report")
    assert report.variants and report.runs_label
    headroom_splits = {Path(h.out): h.split for h in _by_command(planned, "headroom")}
    assert headroom_splits[Path(report.headroom[0])] == "test"


@pytest.mark.parametrize("name", ["paper-amazon2018-books.yaml", "paper-amazon2018-movies.yaml"])
def test_paper_configs_hold_the_papers_setting(name: str) -> None:
    """The two configs for a GPU user: the paper's protocol, Llama-2-7B, BIGRec's hyperparameters, 3 seeds."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    planned = plan_pipeline(path)
    (imp,) = _by_command(planned, "import-data")
    assert imp.kind == "amazon2018"
    (prep,) = _by_command(planned, "prepare")
    assert prep.preset == "paper" and str(load_preset("paper")["window_start"]).startswith("2017-01-01")
    (ft,) = _by_command(planned, "finetune")
    assert "Llama-2-7b" in str(ft.model) and ft.device == "cuda"
    assert (ft.lora_r, ft.lora_alpha, ft.lora_dropout, ft.lr) == (8, 16, 0.05, 1e-4)
    assert ft.target_modules == ["q_proj", "v_proj"] and ft.batch_size * ft.grad_accum == 128
    assert ft.max_train_samples == 1024
    evaluations = _by_command(planned, "evaluate")
    assert len(evaluations) == 3, "one evaluation per seed"
    ev = evaluations[0]
    assert ev.method_options["bigrec"]["num_beams"] == 4
    assert {"popularity", "sasrec", "bigrec", "random", "automr"} <= set(ev.methods)
    assert "seeds: [0, 1, 2]" in path.read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_seeded_configs_score_the_same_samples_for_every_seed(path: Path) -> None:
    """Per-seed evaluations of a subset must pin its seed: else each seed scores other samples, which the
    memory (built for one subset) may not cover, and the seeds' results would not pair."""
    evaluations = _by_command(plan_pipeline(path), "evaluate")
    seeds = {ev.seed for ev in evaluations}
    if len(seeds) > 1:
        for ev in evaluations:
            assert ev.n_eval == 0 or ev.subset_seed is not None, f"{path.name}: {ev.run} draws its subset per seed"
