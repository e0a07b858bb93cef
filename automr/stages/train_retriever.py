"""train-retriever: fit the retriever MLP on annotated samples and save it with its metrics.

Inputs hand off through files: the annotate output (raw log-probabilities and the store rows of
each sample's memory), the memory store (keys z_m) and the query states z_t that build-memory
stored per sample (queries/{split}.npy), so no LLM runs here.

Early stopping. By default the stage stops on the validation *headroom share* (`select_metric`,
default "headroom_share"): the share of the oracle gain over random retrieval that the
retriever's argmax captures on the annotated validation samples -- no decoding needed,
comparable across label types, and smooth (every sample's gain in nats counts, not a few hits).
`run_train_retriever(cfg, metric=...)` takes another criterion as a callback (retriever -> float
or Criterion, higher is better, called after every epoch); `--recall-samples` builds one that
decodes validation samples with the whole AutoMR pipeline (`pipeline_metric` below). The paper
stops on that pipeline's Recall@1, but on the few samples one can decode per epoch that is a
handful of hits (64 samples at Recall@1 0.05: three), so `--recall-metric` defaults to NDCG@10,
which counts every target in the top 10; the log and history.jsonl give the hits either way.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from automr.config import save_config
from automr.errors import UserError
from automr.utils.io import atomic_dir, read_json, write_json
from automr.utils.logging import info

# How the stage names the validation figures: early stopping kept the epoch where they were best, so they
# are in-sample for the retriever (held-out figures come from `automr headroom` on test annotations).
CHOSE_THE_EPOCH = "validation (chose the epoch)"


def annotated_samples(acfg: Any, sample_index: np.ndarray, memory_sizes: list[int]) -> Any:
    """The prepared samples an annotate output covers (polars frame, annotation order), checked against
    the annotated memory sizes: the feature retriever and `automr headroom` read the samples' items and times."""
    from automr.data.schema import PreparedData

    frame = PreparedData.load(acfg.samples).split(acfg.split)[np.asarray(sample_index).tolist()]
    lens = frame["memory_items"].list.len().fill_null(0).to_numpy()
    if not np.array_equal(lens, np.asarray(memory_sizes)):
        raise UserError(
            f"the annotations of {acfg.samples} ({acfg.split}) do not match the memories of "
            f"{acfg.samples}/samples/{acfg.split}.parquet; annotate again from this prepared data."
        )
    return frame


def retrieval_data_from_files(annotations: str | Path, memory: str | Path | None = None, queries: str | Path | None = None,
                              features: Any = None):
    """RetrievalData of an annotate output: stored queries, the store's keys, and the raw log-probabilities.

    features: an ElementFeatures (automr.methods.feature_retriever) whose per-element features the data
    then carry. Returns (data, info) where info names the split, store folder, sample indices and
    (with features) the annotated samples' frame.
    """
    from automr.memory.annotate import META_FILE, load_annotations
    from automr.memory.build import load_queries
    from automr.memory.retriever import RetrievalData
    from automr.memory.store import MemoryStore
    from automr.stages.annotate import annotate_config

    annotations = Path(annotations)
    acfg = annotate_config(annotations)
    meta = read_json(annotations / META_FILE)
    mem = Path(memory) if memory is not None else Path(acfg.memory)
    store = MemoryStore.open(mem)
    if len(store) != meta["store_rows"] or store.meta.model_name != meta["store_model"]:
        raise UserError(
            f"the annotations in {annotations} index a store of {meta['store_rows']} elements built with "
            f"{meta['store_model']!r}, but {mem} holds {len(store)} elements built with {store.meta.model_name!r}. "
            "Use the store the annotations were made with (or annotate again)."
        )
    ann = load_annotations(annotations)
    q = load_queries(queries if queries is not None else mem, acfg.split)
    if q.shape[0] != meta["samples_in_split"]:
        raise UserError(
            f"query states for split {acfg.split!r} have {q.shape[0]} rows but the annotated split has "
            f"{meta['samples_in_split']} samples; build-memory and annotate must read the same prepared data."
        )
    idx = ann["sample_index"].to_numpy()
    Q = np.asarray(q[idx], np.float32)
    bad = np.isnan(Q).any(axis=1)
    if bad.any():
        raise UserError(
            f"{int(bad.sum())} annotated samples have no stored query state (e.g. sample {int(idx[bad][0])}); "
            "build-memory skipped their users (max_users?). Rebuild the memory covering them."
        )
    rows = [np.asarray(r, np.int64) for r in ann["memory_rows"].to_list()]
    frame = annotated_samples(acfg, idx, [len(r) for r in rows]) if features is not None else None
    data = RetrievalData(
        Q, store.key_matrix, rows, ann["logp_empty"].to_numpy(), [np.asarray(c, np.float64) for c in ann["logp_cand"].to_list()],
        None if frame is None else features.compute(frame),
    )
    return data, {"split": acfg.split, "memory": str(mem), "sample_index": idx, "store": store, "frame": frame}


def element_features_for(cfg: "TrainRetrieverConfig") -> Any:
    """The ElementFeatures of a `--features cheap` run (popularity of the annotated data's training period,
    title embeddings cached in `feature_cache`), None for the paper's retriever."""
    if cfg.features == "none":
        return None
    from automr.data.schema import PreparedData
    from automr.methods.feature_retriever import ElementFeatures
    from automr.stages.annotate import annotate_config

    data = PreparedData.load(annotate_config(cfg.annotations).samples)
    return ElementFeatures.build(data, cfg.feature_similarity, cfg.feature_cache, progress=cfg.progress)


def run_train_retriever(cfg: TrainRetrieverConfig, metric: Callable[[Any], float | Criterion] | None = None) -> Path:
    """The `train-retriever` stage; `metric` is the early-stopping hook (see the module docstring)."""
    from automr.memory import labels as L
    from automr.memory.retriever import Retriever, evaluate_retriever, train_retriever

    feats = element_features_for(cfg)
    train, tinfo = retrieval_data_from_files(cfg.annotations, cfg.memory, cfg.queries, feats)
    valid = vinfo = None
    if cfg.valid_annotations is not None:
        valid, vinfo = retrieval_data_from_files(cfg.valid_annotations, cfg.memory or tinfo["memory"], cfg.queries, feats)
        if Path(vinfo["memory"]).resolve() != Path(tinfo["memory"]).resolve():
            raise UserError(
                f"training annotations use the store {tinfo['memory']} but validation annotations {vinfo['memory']}; "
                "annotate both splits against the same store."
            )
    rcfg = cfg.retriever_config()
    untrained = Retriever.new(train.hidden_size, rcfg, () if feats is None else feats.names)
    untrained.features = feats
    initial = {"train": evaluate_retriever(untrained, train)}
    if valid is not None:
        initial["valid"] = evaluate_retriever(untrained, valid)
    stopping = "callback" if metric is not None else f"valid {rcfg.select_metric}" if valid is not None else "none (last epoch)"
    with tempfile.TemporaryDirectory(prefix="automr-recall-") as work:  # the decoder's work folder, if any
        if metric is None and cfg.recall_samples is not None:

            metric = pipeline_metric(cfg.recall_samples, cfg.recall_options, cfg.recall_n, cfg.seed, untrained, Path(work),
                                     cfg.recall_metric)
            stopping = f"valid {display_name(cfg.recall_metric)} of the AutoMR pipeline ({cfg.recall_n} samples)"
        result = train_retriever(rcfg, train, valid, metric, progress=cfg.progress, features=feats)
    final = {"train": evaluate_retriever(result.retriever, train)}
    if valid is not None:
        final["valid"] = evaluate_retriever(result.retriever, valid)

    def recent_share(d: Any) -> float:
        g = d.gains()
        return L.headroom_share([x[-1] for x in g], g)

    metrics: dict[str, Any] = {
        "early_stopping": stopping,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "best_criterion": result.best_criterion,
        "best_metric_on": CHOSE_THE_EPOCH if valid is not None or metric is not None else "none (last epoch kept)",
        "valid_annotations": str(cfg.valid_annotations) if cfg.valid_annotations is not None else None,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "samples_per_s": result.samples_per_s,
        "kind": result.retriever.kind,
        "feature_names": list(result.retriever.feature_names),
        "label_type": rcfg.label_type,
        "temperature": rcfg.temperature,
        "n_train": len(train),
        "n_valid": len(valid) if valid is not None else 0,
        "initial": initial,
        "final": final,
        "baseline_most_recent_headroom_share": {"train": recent_share(train)}
        | ({"valid": recent_share(valid)} if valid is not None else {}),
    }
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        result.retriever.info |= {"annotations": str(cfg.annotations), "memory": tinfo["memory"], "split": tinfo["split"]}
        result.retriever.save(tmp)
        (tmp / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.history))
        write_json(tmp / "metrics.json", metrics)
        save_config(cfg, tmp)  # the stage config (a superset of the retriever's, which is in retriever.json)
    tinfo["store"].close()
    if vinfo is not None:
        vinfo["store"].close()
    fmt = lambda d: f"KL {d['kl']:.4f}, top-1 {d['top1']:.3f}, headroom share {d['headroom_share']:+.3f}"  # noqa: E731
    lines = [(f"train-retriever ({result.retriever.kind}, {rcfg.label_type}, T={rcfg.temperature:g}): {len(result.history)} epochs, best {result.best_epoch} "
              f"({metrics['best_metric_on']}: {result.best_metric:.4f}), early stopping on {metrics['early_stopping']}"),
             f"  train: {fmt(final['train'])} (untrained: KL {initial['train']['kl']:.4f})"]
    if valid is not None:
        lines.append(f"  {CHOSE_THE_EPOCH}: {fmt(final['valid'])} (untrained: KL {initial['valid']['kl']:.4f}); most recent element: "
                     f"headroom share {metrics['baseline_most_recent_headroom_share']['valid']:+.3f}")
    lines.append(f"  -> {out}")
    info("\n".join(lines))
    return out


__all__ = ["TrainRetrieverConfig", "retrieval_data_from_files", "run_train_retriever"]

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from automr.memory.retriever import Retriever
    from automr.utils.early_stopping import Criterion


def display_name(metric: str) -> str:
    """'ndcg@10' -> 'NDCG@10', 'recall@1' -> 'Recall@1' (as the paper and the reports write them)."""
    return metric.replace("ndcg", "NDCG").replace("recall", "Recall")


def pipeline_metric(samples: Path, options: dict[str, Any], n: int, seed: int, placeholder: "Retriever",
                    work_dir: Path, metric: str = "ndcg@10") -> Callable[[Retriever], Criterion]:
    """A criterion(retriever): `metric` of AutoMR with that retriever on a seeded subset of n validation
    samples, with the hits@K it rests on (the ranking is decoded to the metric's depth K)."""
    from automr.data.schema import PreparedData
    from automr.eval.metrics import (
        metric_depth,
        rank_summary,
        ranking_criterion,
        target_ranks,
    )
    from automr.methods.automr import make_automr
    from automr.utils.seeding import select_subset

    data = PreparedData.load(samples)
    split = data.split("valid")
    valid = split[select_subset(split.height, n, seed).tolist()]
    rec = make_automr(dict(options) | {"slot_elements": 1}, seed, retriever=placeholder)
    rec.fit(data, work_dir)
    targets, depth = valid["target_item"].to_numpy(), metric_depth(metric)

    def criterion(retriever: Retriever) -> Criterion:
        rec.selector.retriever = retriever
        ranks = target_ranks(rec.recommend(valid, depth), targets)
        return ranking_criterion(metric, rank_summary(ranks), label=f"AutoMR pipeline {metric}")

    return criterion



from pydantic import Field, field_validator

from automr.args import LogArgs
from automr.config import parse_mapping
from automr.memory.retriever_config import RetrieverConfig


class TrainRetrieverConfig(RetrieverConfig, LogArgs):
    """Train the retriever on annotated samples (inputs, output, and every RetrieverConfig knob)."""

    annotations: Path = Field(description="annotate output folder of the training samples")
    out: Path = Field(description="output folder: retriever.safetensors, retriever.json, metrics.json, history.jsonl, config.yaml")
    valid_annotations: Path | None = Field(
        None, description="annotate output folder of validation samples (early stopping; without it every epoch runs and the last is kept)"
    )
    memory: Path | None = Field(None, description="memory store folder (default: the one the annotations were made with)")
    queries: Path | None = Field(None, description="folder of query states {split}.npy (default: MEMORY/queries)")
    feature_cache: Path | None = Field(
        None, description="features 'cheap': folder caching the catalogue's title embeddings between runs (default: none, "
        "computed each run; the retriever folder keeps its own copy either way)",
    )
    recall_samples: Path | None = Field(
        None,
        description="prepared data folder: early-stop on `recall_metric` of the whole AutoMR pipeline (decoding "
        "`recall_n` validation samples after every epoch) instead of `select_metric` on the annotations",
    )
    recall_n: int = Field(64, ge=1, description="validation samples decoded per epoch for the pipeline's early stopping (seeded subset)")
    recall_metric: Literal["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"] = Field(
        "ndcg@10",
        description="the pipeline's validation metric with --recall-samples: ndcg@10 counts every target in the top 10; "
        "recall@1 (the paper's) is a few hits on recall_n samples",
    )
    recall_options: dict[str, Any] = Field(
        default_factory=dict,
        description="`automr` method options for the pipeline's early stopping (adapter or model, memory, decoding, num_beams, "
        "...; YAML mapping); the retriever is the one being trained",
    )

    @field_validator("recall_options", mode="before")
    @classmethod
    def _parse_recall_options(cls, value: Any) -> Any:
        return parse_mapping(value)  # YAML text from the command line

    def retriever_config(self) -> RetrieverConfig:
        """The RetrieverConfig part (saved with the retriever)."""
        return RetrieverConfig(**{k: getattr(self, k) for k in RetrieverConfig.model_fields})


