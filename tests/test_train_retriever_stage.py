"""train-retriever stage: end to end on tiny annotated data; lowers the KL; saves a loadable retriever."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from memory_helpers import make_tiny_prepared, save_tiny_lm, single_thread, tiny_users

from automr.errors import UserError
from automr.memory.retriever import Retriever
from automr.stages.annotate import AnnotateConfig, run_annotate
from automr.stages.build_memory import BuildMemoryConfig, run_build_memory
from automr.stages.train_retriever import (
    TrainRetrieverConfig,
    retrieval_data_from_files,
    run_train_retriever,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("retr")
    prep = make_tiny_prepared(root / "data", tiny_users(n_users=8, seed=1))
    lm = str(save_tiny_lm(root / "lm"))
    mem = run_build_memory(BuildMemoryConfig(samples=prep, out=root / "mem", model=lm, progress=False))
    common = {"samples": prep, "memory": mem, "model": lm, "progress": False}
    train = run_annotate(AnnotateConfig(**common, out=root / "ann-train"))
    valid = run_annotate(AnnotateConfig(**common, out=root / "ann-valid", split="valid"))
    test = run_annotate(AnnotateConfig(**common, out=root / "ann-test", split="test"))
    return {"root": root, "mem": mem, "train": train, "valid": valid, "test": test, "common": common}


def test_stage_trains_and_lowers_kl(annotated: dict, tmp_path: Path) -> None:
    cfg = TrainRetrieverConfig(
        annotations=annotated["train"], valid_annotations=annotated["valid"], out=tmp_path / "r",
        epochs=40, patience=40, lr=3e-3, batch_size=16, hidden=32, temperature=0.1, progress=False,
    )
    out = run_train_retriever(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert m["final"]["train"]["kl"] < 0.7 * m["initial"]["train"]["kl"]
    assert m["early_stopping"] == "valid headroom_share" and m["epochs_run"] == 40
    assert m["best_metric_on"] == "validation (chose the epoch)" and m["valid_annotations"] == str(annotated["valid"])
    assert 0 <= m["best_epoch"] < 40 and m["n_valid"] > 0
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 40 and hist[-1]["train_kl"] < hist[0]["train_kl"]
    assert m["best_metric"] == pytest.approx(max(h["valid_headroom_share"] for h in hist))
    assert m["best_criterion"]["criterion"] == "headroom_share" and m["best_criterion"]["epoch"] == m["best_epoch"]
    assert all(h["criterion_samples"] == m["n_valid"] for h in hist)  # every epoch records what it averaged over
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


class _FakePipeline:
    """AutoMR without decoding: each recommend() puts the target at rank 2 (when k > 2) for one more sample."""

    def __init__(self) -> None:
        self.selector = type("Selector", (), {"retriever": None})()
        self.depths: list[int] = []

    def fit(self, data, work_dir) -> None:
        pass

    def recommend(self, samples, k: int) -> np.ndarray:
        self.depths.append(k)
        out = np.full((samples.height, k), -1, dtype=np.int64)
        found = min(len(self.depths), samples.height)
        if k > 2:
            out[:found, 2] = samples["target_item"].to_numpy()[:found]
        return out


def test_recall_samples_stop_on_the_pipelines_ndcg_at_10_by_default(annotated: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 9 A9: --recall-samples decodes to depth 10 and stops on NDCG@10 (recall@1 only when asked),
    logging and recording the hits@10 it rests on; metrics.json keeps the best epoch's criterion."""
    import automr.methods.automr as automr_method

    fake = _FakePipeline()
    monkeypatch.setattr(automr_method, "make_automr", lambda options, seed, retriever=None: fake)
    prepared = annotated["root"] / "data"
    cfg = TrainRetrieverConfig(annotations=annotated["train"], out=tmp_path / "r", epochs=3, patience=3, progress=False,
                               recall_samples=prepared, recall_n=4)
    assert cfg.recall_metric == "ndcg@10"
    out = run_train_retriever(cfg)
    m = json.loads((out / "metrics.json").read_text())
    n = min(4, pl.read_parquet(prepared / "samples" / "valid.parquet").height)
    assert fake.depths == [10, 10, 10] and m["early_stopping"] == "valid NDCG@10 of the AutoMR pipeline (4 samples)"
    assert m["best_epoch"] == 2 and m["best_criterion"] == {
        "epoch": 2, "criterion": "AutoMR pipeline ndcg@10", "criterion_value": pytest.approx(min(3, n) * 0.5 / n),
        "criterion_samples": n, "criterion_hits": min(3, n),
    }
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["criterion_hits"] for h in hist] == [min(e, n) for e in (1, 2, 3)]
    captured = capsys.readouterr()
    assert f"valid AutoMR pipeline ndcg@10 {0.5 / n:.4f} from 1 hits@10 of {n} samples" in captured.out
    assert "warning: retriever: the best epoch (2)" in captured.err  # 3 hits: too few to choose by

    fake.depths.clear()
    run_train_retriever(cfg.model_copy(update={"recall_metric": "recall@1", "out": tmp_path / "r1"}))
    assert fake.depths == [1, 1, 1]  # nothing at rank 0: no hits, and the first epoch is kept
    m1 = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert m1["early_stopping"].startswith("valid Recall@1 of the AutoMR pipeline")
    assert m1["best_criterion"]["criterion_hits"] == 0 and m1["best_epoch"] == 0
# --------------------------------------------------------------------------- headroom: which split
@pytest.fixture(scope="module")
def retriever(annotated: dict) -> Path:
    """A retriever that early-stopped on annotated["valid"]."""
    cfg = TrainRetrieverConfig(annotations=annotated["train"], valid_annotations=annotated["valid"],
                               out=annotated["root"] / "retriever", epochs=5, patience=5, hidden=16, progress=False)
    return run_train_retriever(cfg)


def test_headroom_default_split_is_test(annotated: dict, retriever: Path, tmp_path: Path) -> None:
    from automr.cli import main
    from automr.stages.headroom import HeadroomConfig, run_headroom

    cfg = HeadroomConfig(annotations=annotated["test"], out=tmp_path / "h", retriever=retriever, n_boot=50)
    assert cfg.split == "test"
    h = run_headroom(cfg)
    assert h["split"] == "test" and h["held_out"] and not h["seen_by_early_stopping"]
    assert h["split_label"] == "test (held out)"
    md = (tmp_path / "h" / "headroom.md").read_text()
    assert "test (held out)" in md and "seen by early stopping" not in md
    # validation annotations without `split: valid`: refused (exit 2, no traceback), nothing written
    argv = ["headroom", "--annotations", str(annotated["valid"]), "--out", str(tmp_path / "v"), "--retriever", str(retriever)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and not (tmp_path / "v").exists()


def test_headroom_split_refusal_message(annotated: dict, retriever: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from automr.cli import main

    with pytest.raises(SystemExit):
        main(["headroom", "--annotations", str(annotated["valid"]), "--out", str(tmp_path / "v"), "--retriever", str(retriever)])
    err = capsys.readouterr().err
    assert "'valid' split" in err and "split: valid" in err and "Traceback" not in err


def test_headroom_on_early_stopping_split_is_labelled(annotated: dict, retriever: Path, tmp_path: Path) -> None:
    """The retriever's own valid annotations, and another folder of the same validation samples, are 'seen'."""
    import yaml

    from automr.stages.headroom import HeadroomConfig, run_headroom

    again = run_annotate(AnnotateConfig(**annotated["common"], out=tmp_path / "ann-valid-2", split="valid"))
    for i, ann in enumerate([annotated["valid"], again]):
        out = tmp_path / f"h{i}"
        h = run_headroom(HeadroomConfig(annotations=ann, split="valid", out=out, retriever=retriever, n_boot=50))
        assert h["seen_by_early_stopping"] and not h["held_out"]
        assert h["split_label"] == "valid (seen by early stopping)"
        assert json.loads((out / "headroom.json").read_text())["split_label"] == "valid (seen by early stopping)"
        assert "valid (seen by early stopping)" in (out / "headroom.md").read_text()
    # a retriever that early-stopped on other samples: the same validation split is not 'seen'
    other = tmp_path / "other-retriever"
    other.mkdir()
    cfg = yaml.safe_load((retriever / "config.yaml").read_text()) | {"valid_annotations": str(annotated["train"])}
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    from automr.memory.annotate import load_annotations
    from automr.stages.annotate import annotate_config
    from automr.stages.headroom import seen_by_early_stopping

    idx = load_annotations(annotated["valid"])["sample_index"].to_numpy()
    assert not seen_by_early_stopping(annotated["valid"], other, annotate_config(annotated["valid"]), idx)


def test_feature_retriever_stage_headroom_and_inference_score_the_same_features(annotated: dict, tmp_path: Path) -> None:
    """--features cheap: trained, saved with its kind and features, judged by `automr headroom`, and AutoMR's
    selector at inference computes the same features and makes the same choices as headroom's scoring."""
    from automr.data.schema import PreparedData
    from automr.methods.automr import make_automr
    from automr.methods.feature_retriever import (BASE_FEATURES, SIMILARITY_FEATURES, ElementFeatures, encoder_installed,
                                                  load_retriever, select_elements)
    from automr.stages.headroom import HeadroomConfig, run_headroom
    from automr.stages.train_retriever import element_features_for

    cfg = TrainRetrieverConfig(annotations=annotated["train"], valid_annotations=annotated["valid"], out=tmp_path / "rf",
                               epochs=5, patience=5, hidden=16, progress=False, features="cheap",
                               feature_cache=tmp_path / "emb-cache")
    out = run_train_retriever(cfg)
    names = BASE_FEATURES + (SIMILARITY_FEATURES if encoder_installed() else ())
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "features" and m["feature_names"] == list(names)
    r = load_retriever(out)
    assert r.kind == "features" and r.feature_names == names and isinstance(r.features, ElementFeatures)
    # the saved features are the ones training computed
    data, _ = retrieval_data_from_files(annotated["train"], features=element_features_for(cfg))
    again, _ = retrieval_data_from_files(annotated["train"], features=r.features)
    assert data.features is not None and len(data.features) == len(data)
    for a, b in zip(data.features, again.features):
        np.testing.assert_array_equal(a, b)
    h = run_headroom(HeadroomConfig(annotations=annotated["test"], out=tmp_path / "h", retriever=out, n_boot=20,
                                    methods=["automr", "random"]))
    assert h["held_out"] and np.isfinite(h["methods"]["automr"]["share"])
    # inference: the selector's choices on the test samples are headroom's
    test, tinfo = retrieval_data_from_files(annotated["test"], features=r.features)
    frame = tinfo["frame"]
    keys = [np.asarray(test.key_bank[rows]) for rows in test.memory_rows]
    judged = select_elements(r, frame, test.queries, keys, 1)[:, 0].tolist()
    common = annotated["common"]
    rec = make_automr({"model": common["model"], "memory": str(common["memory"]), "retriever": str(out), "num_beams": 2,
                       "device": "cpu", "progress": False}, 0)
    rec.fit(PreparedData.load(common["samples"]), tmp_path / "w")
    assert rec.choose(frame) == [[j] for j in judged]
    assert rec.query_counts["computed"] == 0  # the stored z_t, as headroom reads them


def test_compare_retrievers_script_trains_both_kinds_per_seed(annotated: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """benchmarks/compare_retrievers.py on the tiny annotations: both kinds per seed, held-out shares in compare.json."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_retrievers.py"
    spec = importlib.util.spec_from_file_location("compare_retrievers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare", "--train", str(annotated["train"]), "--valid", str(annotated["valid"]),
                                      "--test", str(annotated["test"]), "--out", str(out), "--seeds", "0,1", "--epochs", "3",
                                      "--hidden", "16", "--feature-similarity", "no", "--n-boot", "20"])
    mod.main()
    s = json.loads((out / "compare.json").read_text())
    assert [r["seed"] for r in s["seeds"]] == [0, 1] and s["n_test"] > 0
    for r in s["seeds"]:
        assert np.isfinite(r["paper"]["share"]) and np.isfinite(r["features"]["share"])
        assert json.loads((Path(r["features"]["folder"]) / "retriever.json").read_text())["kind"] == "features"
        d = r["features_minus_paper"]["diff"]
        assert d == pytest.approx(r["features"]["share"] - r["paper"]["share"], abs=1e-9)
    assert "features - paper" in capsys.readouterr().out
    (out / "paper-seed-0" / "retriever.json").unlink()  # not this script's folder any more: refused, not deleted
    with pytest.raises(SystemExit, match="not a retriever.json folder"):
        mod.main()
    assert (out / "paper-seed-0").is_dir()


def test_oracle_diagnostic_evaluates_exactly_the_annotated_samples_with_their_best_element(
        annotated: dict, tmp_path: Path) -> None:
    """`oracle` puts in the slot the element whose label is highest (the argmax of logp_cand), on the
    samples `annotated` names and no others; it refuses samples it has no labels for."""
    from automr.eval.evaluator import load_predictions
    from automr.memory.annotate import load_annotations
    from automr.stages.evaluate import EvaluateConfig, run_evaluate

    common = annotated["common"]
    memory = {"model": common["model"], "memory": str(common["memory"]), "device": "cpu", "progress": False,
              "num_beams": 2, "max_new_tokens": 4}
    labels = load_annotations(annotated["test"])
    cfg = EvaluateConfig(samples=common["samples"], methods=["random", "oracle"], run=tmp_path / "eval", n_boot=10,
                         exclude_history=False, annotated=annotated["test"],
                         method_options={"random": memory, "oracle": memory | {"annotations": str(annotated["test"])}})
    run_evaluate(cfg)
    info = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert info["n_eval"] == labels.height
    pred = load_predictions(tmp_path / "eval", "oracle").join(
        pl.DataFrame({"row": labels["sample_index"], "best": [int(np.argmax(c)) for c in labels["logp_cand"]]}),
        on="row", how="left")
    assert pred.height == labels.height and pred["best"].null_count() == 0
    assert pred["retrieved_index"].to_list() == pred["best"].to_list()
    assert pred["retrieved_index"].to_list() != load_predictions(tmp_path / "eval", "random")["retrieved_index"].to_list()

    other = cfg.model_copy(update={"annotated": None, "split": "valid", "run": tmp_path / "all", "methods": ["oracle"],
                                        "method_options": {"oracle": cfg.method_options["oracle"]}})
    with pytest.raises(UserError, match="not in the annotations"):
        run_evaluate(other)  # the valid samples have no labels in the test annotations
    wrong_split = cfg.model_copy(update={"annotated": annotated["valid"], "run": tmp_path / "v"})
    assert any("labels the 'valid' split" in p for p in wrong_split.problems())
