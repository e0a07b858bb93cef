"""annotate: labels equal a direct per-candidate computation; resumable; 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from memory_helpers import make_tiny_prepared, save_tiny_lm, single_thread, tiny_titles

from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.llm.loading import load_lm
from automr.llm.prompts import PromptBuilder
from automr.llm.split import SplitLM
from automr.memory import labels as L
from automr.memory.annotate import encode_sample, load_annotations, sample_candidates
from automr.stages.annotate import run_annotate
from automr.stages.build_memory import run_build_memory
from automr.stages.annotate import AnnotateConfig
from automr.stages.build_memory import BuildMemoryConfig
from automr.memory.store import MemoryStore

REPO = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("annotate")
    prep = make_tiny_prepared(root / "data")
    lm_dir = save_tiny_lm(root / "lm")
    mem = run_build_memory(BuildMemoryConfig(samples=prep, out=root / "mem", model=str(lm_dir), progress=False))
    base = {"samples": prep, "memory": mem, "model": str(lm_dir), "progress": False}
    ann = run_annotate(AnnotateConfig(**base, out=root / "ann", part_size=8))
    return {"root": root, "prep": prep, "lm_dir": lm_dir, "mem": mem, "ann": ann, "base": base}


def test_labels_match_direct_computation(setup: dict) -> None:
    df = load_annotations(setup["ann"])
    samples = PreparedData.load(setup["prep"]).split("train")
    assert df["sample_index"].to_list() == np.flatnonzero(samples["memory_items"].list.len().to_numpy() > 0).tolist()
    lm = load_lm(setup["lm_dir"])
    split = SplitLM(lm)
    builder = PromptBuilder.for_lm(lm)
    store = MemoryStore.open(setup["mem"])
    for r in (0, df.height // 2, df.height - 1):
        row = df.row(r, named=True)
        s = samples.row(row["sample_index"], named=True)
        rows, values = sample_candidates(store, s["user_id"], s["memory_items"], s["memory_times"])
        assert rows.tolist() == row["memory_rows"]
        prompt = encode_sample(builder, tiny_titles(), s["recent_items"], s["target_item"], 16)
        with torch.no_grad():
            empty = split.answer_logprob([prompt], [None])
            direct = torch.cat([split.answer_logprob([prompt], [v]) for v in values])  # value spliced at layer L
        np.testing.assert_allclose(row["logp_empty"], float(empty[0]), rtol=1e-4)
        np.testing.assert_allclose(row["logp_cand"], direct.double().numpy(), rtol=1e-4)
        assert len(set(np.round([row["logp_empty"], *row["logp_cand"]], 5))) > 1  # the slot changes log P(answer)


def test_stats_are_saved(setup: dict) -> None:
    stats = json.loads((setup["ann"] / "stats.json").read_text())
    df = load_annotations(setup["ann"])
    want = L.label_statistics(df["logp_empty"].to_numpy(), [np.asarray(c) for c in df["logp_cand"]]).as_dict()
    for k in ("best_gain", "random_gain", "headroom", "peak_ratio_prob_diff", "peak_ratio_loglik_gain"):
        assert stats[k] == pytest.approx(want[k])
    assert stats["headroom"] > 0 and stats["annotated"] == df.height
    assert stats["peak_ratio_loglik_gain"] > stats["peak_ratio_prob_diff"] >= 1.0


def _part_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def test_stop_and_resume_gives_identical_labels(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AnnotateConfig(**setup["base"], out=tmp_path / "a", part_size=4, stop_after=2)
    run_annotate(cfg)
    first = _part_bytes(tmp_path / "a")
    assert len(first) == 2 and not (tmp_path / "a" / "stats.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        load_annotations(tmp_path / "a")

    calls = []
    orig = SplitLM.score_candidates
    monkeypatch.setattr(SplitLM, "score_candidates", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    run_annotate(cfg.model_copy(update={"stop_after": None}))
    ref = load_annotations(setup["ann"])
    got = load_annotations(tmp_path / "a")
    assert len(calls) == ref.height - 8  # finished parts were not redone
    assert {k: v for k, v in _part_bytes(tmp_path / "a").items() if k in first} == first
    assert got.equals(ref)


def test_crash_midway_then_resume(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orig = SplitLM.score_candidates
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        return orig(self, *a, **k)

    monkeypatch.setattr(SplitLM, "score_candidates", flaky)
    cfg = AnnotateConfig(**setup["base"], out=tmp_path / "a", part_size=3)
    with pytest.raises(RuntimeError, match="simulated"):
        run_annotate(cfg)
    assert len(_part_bytes(tmp_path / "a")) == 2  # the two complete parts, nothing half-written
    assert not [p for p in (tmp_path / "a").iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(SplitLM, "score_candidates", orig)
    run_annotate(cfg)
    assert load_annotations(tmp_path / "a").equals(load_annotations(setup["ann"]))
    with pytest.raises(UserError, match="other settings"):
        run_annotate(cfg.model_copy(update={"max_samples": 5}))


def test_two_processes_match_one(setup: dict, tmp_path: Path) -> None:
    """torchrun starts 2 CPU processes; each builds/annotates its users, rank 0 merges."""
    root = setup["root"]
    base = {k: str(v) for k, v in setup["base"].items() if k != "progress"} | {"progress": False}
    pipe = {
        "stages": {
            "build-memory": {"samples": base["samples"], "model": base["model"], "out": str(tmp_path / "mem2"),
                             "batch_size": 4, "progress": False},
            "annotate": base | {"memory": str(tmp_path / "mem2"), "out": str(tmp_path / "ann2"), "part_size": 8},
            "annotate-same-store": base | {"stage": "annotate", "out": str(tmp_path / "ann2s"), "part_size": 8},
        }
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "automr.cli", "run", str(tmp_path / "pipe.yaml")]
    res = subprocess.run(cmd, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    one, two = MemoryStore.open(setup["mem"]), MemoryStore.open(tmp_path / "mem2")
    assert json.loads((tmp_path / "mem2" / "build_stats.json").read_text())["processes"] == 2
    assert one.index_frame().drop("offset").equals(two.index_frame().drop("offset"))
    np.testing.assert_allclose(two.key_matrix, one.key_matrix, rtol=1e-5, atol=1e-5)
    for s in ("train", "valid", "test"):
        np.testing.assert_allclose(np.load(tmp_path / "mem2" / "queries" / f"{s}.npy"),
                                   np.load(setup["mem"] / "queries" / f"{s}.npy"), rtol=1e-5, atol=1e-5)

    ref = load_annotations(setup["ann"])
    names = {p.name[:9] for p in (tmp_path / "ann2s").glob("part-*.parquet")}
    assert names == {"part-r000", "part-r001"}  # both processes wrote parts
    same = load_annotations(tmp_path / "ann2s")
    assert same.drop("logp_empty", "logp_cand").equals(ref.drop("logp_empty", "logp_cand"))
    np.testing.assert_allclose(same["logp_empty"].to_numpy(), ref["logp_empty"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(same["logp_cand"].to_list()), np.concatenate(ref["logp_cand"].to_list()), rtol=1e-6)
    own = load_annotations(tmp_path / "ann2")
    np.testing.assert_allclose(np.concatenate(own["logp_cand"].to_list()), np.concatenate(ref["logp_cand"].to_list()), rtol=1e-4)
    assert json.loads((tmp_path / "ann2" / "stats.json").read_text())["last_run"]["processes"] == 2
    assert not list(root.glob(".*-work")) and not list(tmp_path.glob(".*-work"))
    assert pl.read_parquet(next((tmp_path / "ann2").glob("part-r001-*.parquet"))).height > 0



def test_nothing_to_annotate_is_a_clear_error(setup: dict, tmp_path: Path) -> None:
    from conftest import make_prepared
    from memory_helpers import HISTORY_CAP, RECENT_K, tiny_users

    prep = make_prepared(tmp_path / "d", tiny_users(), items=tiny_titles(), recent_k=RECENT_K, history_cap=HISTORY_CAP,
                         samples={"valid": []})
    cfg = AnnotateConfig(**(setup["base"] | {"samples": prep}), out=tmp_path / "a", split="valid")
    with pytest.raises(UserError, match="no sample of split 'valid' can be annotated"):
        run_annotate(cfg)
    assert not (tmp_path / "a").exists()


def test_a_rebuilt_store_restarts_annotation_but_other_settings_refuse(setup: dict, tmp_path: Path) -> None:
    """Resuming keeps parts only while the memory store is the one they were computed on."""
    import shutil

    mem = tmp_path / "mem"
    shutil.copytree(setup["mem"], mem)
    cfg = AnnotateConfig(**(setup["base"] | {"memory": mem}), out=tmp_path / "ann", part_size=8)
    run_annotate(cfg)
    before = load_annotations(cfg.out)
    # build-memory re-ran at another layer (as `automr run` does after an upstream change): stale labels
    shutil.rmtree(mem)
    run_build_memory(BuildMemoryConfig(samples=setup["prep"], out=mem, model=str(setup["lm_dir"]), split_layer=1,
                                       progress=False))
    run_annotate(cfg)
    after = load_annotations(cfg.out)
    fresh = load_annotations(run_annotate(cfg.model_copy(update={"out": tmp_path / "fresh", "resume": False})))
    assert after["sample_index"].to_list() == before["sample_index"].to_list()
    assert not np.allclose(np.concatenate(after["logp_cand"].to_list()), np.concatenate(before["logp_cand"].to_list()))
    np.testing.assert_allclose(np.concatenate(after["logp_cand"].to_list()), np.concatenate(fresh["logp_cand"].to_list()), rtol=1e-6)
    with pytest.raises(UserError, match="other settings"):
        run_annotate(cfg.model_copy(update={"max_samples": 3}))
