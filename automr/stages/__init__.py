"""The one registry of stages: every subcommand of `automr` and every section of `automr run`.

A stage is a module `automr.stages.<module>` holding its typed config and a thin runner over the
library. The CLI builds one subcommand per entry (flags from the config's fields) and the
pipeline runner reads `output_field` to find where each stage writes. Both run a stage only through
`run_stage` (automr/stages/guard.py: output checks, lock, stale temporaries). Modules are imported
only when needed, and importing one never imports torch, so `automr --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from automr.errors import UserError

if TYPE_CHECKING:
    from automr.config import StageConfig


@dataclass(frozen=True)
class Stage:
    """One command: its name, where it lives, the config field naming its output, its help line.

    `output_is_cache`: the output is a cache shared by many runs (fetch's cache_dir), not a folder
    the stage owns: it is locked while written but never claimed, refused or replaced as a whole.
    """

    name: str
    module: str
    config: str
    run: str
    output_field: str | None
    help: str
    output_is_cache: bool = False

    def config_class(self) -> type["StageConfig"]:
        return getattr(importlib.import_module(f"automr.stages.{self.module}"), self.config)

    def runner(self) -> Callable[[Any], Any]:
        return getattr(importlib.import_module(f"automr.stages.{self.module}"), self.run)


STAGES: tuple[Stage, ...] = (
    Stage("import-data", "import_data", "ImportConfig", "run_import", "out",
          "Convert raw data (Amazon 2018 JSON lines, MovieLens 100K/1M) into a common-format folder "
          "(interactions.parquet, items.parquet, stats.json)."),
    # fetch writes into the user cache (cache_dir None): no output folder to stamp; a no-op once fetched.
    Stage("fetch", "fetch", "FetchConfig", "run_fetch", "cache_dir",
          "Download a public data set (ml-100k) into the user cache, verify its checksum, convert it "
          "to the common format and print the folder.", output_is_cache=True),
    Stage("synthetic", "synthetic", "SyntheticConfig", "run_synthetic", "out",
          "Write seeded synthetic data with a planted long-term interest (series part 1 as an old "
          "cue, part 2 as the last interaction) plus planted.parquet."),
    Stage("prepare", "prepare", "PrepareConfig", "run_prepare", "out",
          "Read a data set, apply the temporal protocol (window, filters, K recent + memory) and "
          "write samples/{train,valid,test}.parquet, items.parquet and stats.json."),
    Stage("finetune", "finetune", "FinetuneConfig", "run_finetune", "out",
          "LoRA (or --recipe full) fine-tuning of the generative recommender (BIGRec) on prepared samples, loss on "
          "the target title only; resumable checkpoints, early stopping; writes adapter/ (or model/) and train_log.jsonl."),
    Stage("tiny-lm", "tiny_lm", "TinyLMConfig", "run_tiny_lm", "out",
          "Build a tiny random Llama (tokenizer trained on the catalogue titles) and train its upper layers "
          "memory-aware on prepared samples: a model folder for CPU tests and demos of the whole pipeline."),
    Stage("build-memory", "build_memory", "BuildMemoryConfig", "run_build_memory", "out",
          "Build the AutoMR memory store: one element (layer-L key z_m, title-state value) per older "
          "interaction, once per user, plus each sample's query z_t (queries/{split}.npy). Shards by user "
          "under torchrun."),
    Stage("annotate", "annotate", "AnnotateConfig", "run_annotate", "out",
          "Score every sample's answer with the empty slot and with each memory element spliced in "
          "(shared-prefix kernel); raw log-probabilities in resumable parts, label statistics in stats.json."),
    Stage("train-retriever", "train_retriever", "TrainRetrieverConfig", "run_train_retriever", "out",
          "Train the retriever MLP on annotations (KL to the labels), early-stopping on the validation "
          "headroom share; writes retriever.safetensors, metrics.json, history.jsonl."),
    Stage("headroom", "headroom", "HeadroomConfig", "run_headroom", "out",
          "Share of the oracle headroom over random retrieval that each retrieval method (automr, random, "
          "recent, oldest, rella) captures on annotated samples, with 95% intervals."),
    Stage("evaluate", "evaluate", "EvaluateConfig", "run_evaluate", "run",
          "Fit/load each method, rank all items for every test sample, and write metrics.json "
          "(Recall@K, NDCG@K, 95% bootstrap intervals) and a Markdown table."),
    Stage("serve", "serve", "ServeConfig", "run_serve", None,
          "Serve a trained run over HTTP on 127.0.0.1 (recommendations with their why, interactions that grow "
          "each user's memory, a web page); state in SQLite + a memory store that survive restarts."),
    Stage("recommend", "recommend", "RecommendConfig", "run_recommend", None,
          "Recommend for one user of a server's state (--user) or a history file (--history), printed as JSON: "
          "the same call as the server's."),
    Stage("report", "report", "ReportConfig", "run_report", "out",
          "Results table, box plot of AutoMR against random retrieval over runs, plot of when the "
          "retrieved memories happened, and a static HTML report, from evaluation runs."),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    """The stage called `name`, with a clear error for an unknown one."""
    if name not in BY_NAME:
        raise UserError(f"unknown stage {name!r}; expected one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def run_stage(stage: Stage, cfg: StageConfig, *, overwrite: bool = False) -> Any:
    """Run `stage` on `cfg` behind the output-folder checks and lock (automr/stages/guard.py)."""
    from automr.stages.guard import run_stage as guarded

    return guarded(stage, cfg, STAGES, overwrite=overwrite)
