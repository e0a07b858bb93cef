"""train-retriever stage: end to end on tiny annotated data; lowers the KL; saves a loadable retriever."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from memory_helpers import make_tiny_prepared, save_tiny_lm, single_thread, tiny_users

from automr.errors import UserError
from automr.stages.annotate import run_annotate
from automr.stages.build_memory import run_build_memory
from automr.memory.retriever import Retriever
from automr.stages.annotate import AnnotateConfig
from automr.stages.build_memory import BuildMemoryConfig
from automr.stages.train_retriever import TrainRetrieverConfig
from automr.stages.train_retriever import retrieval_data_from_files, run_train_retriever

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("retr")
    prep = make_tiny_prepared(root / "data", tiny_users(n_users=8, seed=1))
    lm = str(save_tiny_lm(root / "lm"))
    mem = run_build_memory(BuildMemoryConfig(samples=prep, out=root / "mem", model=lm, splits=["train", "valid"], progress=False))
    common = {"samples": prep, "memory": mem, "model": lm, "progress": False}
    train = run_annotate(AnnotateConfig(**common, out=root / "ann-train"))
    valid = run_annotate(AnnotateConfig(**common, out=root / "ann-valid", split="valid"))
    return {"root": root, "mem": mem, "train": train, "valid": valid}


def test_stage_trains_and_lowers_kl(annotated: dict, tmp_path: Path) -> None:
    cfg = TrainRetrieverConfig(
        annotations=annotated["train"], valid_annotations=annotated["valid"], out=tmp_path / "r",
        epochs=40, patience=40, lr=3e-3, batch_size=16, hidden=32, temperature=0.1, progress=False,
    )
    out = run_train_retriever(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["train"]["kl"] < 0.7 * m["initial"]["train"]["kl"]
    assert m["early_stopping"] == "valid headroom_share" and m["epochs_run"] == 40
    assert 0 <= m["best_epoch"] < 40 and m["n_valid"] > 0
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 40 and hist[-1]["train_kl"] < hist[0]["train_kl"]
    assert m["best_metric"] == pytest.approx(max(h["valid_headroom_share"] for h in hist))
    r = Retriever.load(out)
    assert r.config.temperature == 0.1 and r.info["split"] == "train"
    data, _ = retrieval_data_from_files(annotated["train"])
    keys = [data.key_bank[rows] for rows in data.memory_rows[:5]]
    picks = r.select_batch(data.queries[:5], keys)
    assert ((picks[:, 0] >= 0) & (picks[:, 0] < np.array([len(k) for k in keys]))).all()


def test_metric_hook_drives_early_stopping(annotated: dict, tmp_path: Path) -> None:
    calls = []

    def metric(retriever: Retriever) -> float:
        calls.append(1)
        return -float(len(calls))  # gets worse every epoch: stop after patience

    cfg = TrainRetrieverConfig(annotations=annotated["train"], out=tmp_path / "r", epochs=50, patience=3, progress=False)
    out = run_train_retriever(cfg, metric=metric)
    m = json.loads((out / "metrics.json").read_text())
    assert len(calls) == 4 and m["best_epoch"] == 0 and m["stopped_early"] and m["early_stopping"] == "callback"


def test_queries_must_exist_for_the_split(annotated: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no query states"):
        retrieval_data_from_files(annotated["train"], queries=tmp_path)
