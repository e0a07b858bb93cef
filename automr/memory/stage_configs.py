"""Configs of the AutoMR memory stages: build-memory, annotate, train-retriever.

Kept free of torch (and of the stage code) so `automr --help` stays fast; the stages live in
automr/memory/build.py, annotate.py and train_stage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from automr.config import StageConfig, parse_mapping
from automr.memory.retriever_config import RetrieverConfig

SPLIT_NAMES = ("train", "valid", "test")


class BuildMemoryConfig(StageConfig):
    """Build the memory store: one element (key z_m, value = title states) per older interaction."""

    samples: Path = Field(description="prepared data folder (output of `automr prepare`)")
    out: Path = Field(description="output folder: the memory store, queries/{split}.npy, build_stats.json, config.yaml")
    model: str = Field("smollm2", description="base model: 'smollm2', a Hugging Face folder, or a hub id")
    adapter: Path | None = Field(None, description="a `finetune` output folder (base model + LoRA adapter, merged); overrides `model`")
    split_layer: int | None = Field(None, ge=0, description="layer L whose states are stored (default: half the layers)")
    value_tokens: int = Field(16, ge=1, description="title tokens kept per value (the first ones)")
    value_kind: Literal["title_states", "key_vector"] = Field(
        "title_states", description="value spliced into the slot: the title's layer-L token states, or the key vector as a 1-token value"
    )
    mode: Literal["exact", "chunked"] = Field(
        "exact",
        description="exact: one forward per element on the window ending at it (the paper's z_m); chunked: one forward "
        "per `chunk_items` interactions of a user's history, keys/values read at each title inside the chunk (cheaper, approximate)",
    )
    chunk_items: int | None = Field(None, ge=1, description="interactions per chunk in chunked mode (default: the window size K)")
    window: int | None = Field(None, ge=1, description="K, titles in the window ending at an element (default: the longest recent_items in the samples)")
    splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: list(SPLIT_NAMES), description="sample splits whose memories (and queries) are built"
    )
    queries: bool = Field(True, description="also store each sample's query z_t in queries/{split}.npy (row-aligned with the samples parquet)")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")
    max_users: int | None = Field(None, ge=1, description="seeded random subset of users (CPU budgets); samples of other users get NaN queries")
    max_samples: int | dict[Literal["train", "valid", "test"], int] | None = Field(
        None,
        description="build only for a seeded subset of this many samples per split, or {split: n} (their elements and "
        "queries; other samples get NaN queries). With the same seed it is the subset `automr evaluate --n-eval N` scores, "
        "and `annotate` then picks only from it (CPU budgets on long histories)",
    )
    seed: int = Field(0, description="seed of the user and sample subsets")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (default: the model's context)")
    device: str = Field("auto", description="auto (each process's accelerator, else CPU), cpu or cuda")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    value_dtype: Literal["float16", "float32"] = Field("float16", description="on-disk dtype of the values")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> "BuildMemoryConfig":
        if not self.splits:
            raise ValueError("splits is empty; name at least one of train, valid, test")
        counts = self.max_samples.values() if isinstance(self.max_samples, dict) else [self.max_samples]
        if any(n is not None and n < 1 for n in counts):
            raise ValueError(f"max_samples must be at least 1 (got {self.max_samples!r}); leave it out to build every sample")
        return self

    def samples_cap(self, split: str) -> int | None:
        """max_samples for one split (None: all of its samples)."""
        if isinstance(self.max_samples, dict):
            return self.max_samples.get(split)  # type: ignore[call-overload]
        return self.max_samples


class AnnotateConfig(StageConfig):
    """Annotate samples: log P(answer) with the empty slot and with each memory element spliced in."""

    samples: Path = Field(description="prepared data folder (the one the memory store was built from)")
    memory: Path = Field(description="memory store folder (output of `automr build-memory`)")
    out: Path = Field(description="output folder: part-*.parquet (raw log-probabilities), stats.json, config.yaml")
    model: str = Field("smollm2", description="base model: 'smollm2', a Hugging Face folder, or a hub id (must be the store's model)")
    adapter: Path | None = Field(None, description="a `finetune` output folder (base model + LoRA adapter, merged); overrides `model`")
    split: Literal["train", "valid", "test"] = Field("train", description="which samples to annotate (train for training, valid for validation)")
    max_samples: int | None = Field(None, ge=1, description="seeded random subset of the eligible samples (CPU budgets)")
    seed: int = Field(0, description="seed of the sample subset")
    chunk_size: int | None = Field(None, ge=1, description="candidates packed per upper-layer pass (default: about 1024 tokens per pass)")
    part_size: int = Field(64, ge=1, description="samples per part file (the unit of resumption)")
    resume: bool = Field(True, description="keep finished part files of an earlier run with the same settings and do only the rest")
    stop_after: int | None = Field(None, ge=1, description="stop after writing this many part files in this invocation (time-boxed runs; rerun to resume)")
    temperature: float = Field(1.0, gt=0, description="temperature of the log-likelihood-gain labels in the printed statistics")
    max_length: int | None = Field(None, ge=16, description="cap on prompt tokens (default: the model's context)")
    allow_model_mismatch: bool = Field(False, description="annotate even if the store was built with another model name (not advised)")
    device: str = Field("auto", description="auto (each process's accelerator, else CPU), cpu or cuda")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    compile: bool = Field(
        False, description="torch.compile the kernel's layer passes (GPU, large models: 70 -> 50 ms per sample at the "
        "Llama-2-7B shape on an H100; compiling takes about 3 minutes once; no gain on CPU)",
    )
    progress: bool = Field(True, description="show a progress bar")


class TrainRetrieverConfig(RetrieverConfig):
    """Train the retriever on annotated samples (inputs, output, and every RetrieverConfig knob)."""

    annotations: Path = Field(description="annotate output folder of the training samples")
    out: Path = Field(description="output folder: retriever.safetensors, retriever.json, metrics.json, history.jsonl, config.yaml")
    valid_annotations: Path | None = Field(
        None, description="annotate output folder of validation samples (early stopping; without it every epoch runs and the last is kept)"
    )
    memory: Path | None = Field(None, description="memory store folder (default: the one the annotations were made with)")
    queries: Path | None = Field(None, description="folder of query states {split}.npy (default: MEMORY/queries)")
    recall_samples: Path | None = Field(
        None,
        description="prepared data folder: early-stop on validation Recall@1 of the whole AutoMR pipeline (decoding "
        "`recall_n` validation samples after every epoch) instead of `select_metric` on the annotations",
    )
    recall_n: int = Field(64, ge=1, description="validation samples decoded per epoch for the Recall@1 early stopping (seeded subset)")
    recall_options: dict[str, Any] = Field(
        default_factory=dict,
        description="`automr` method options for the Recall@1 early stopping (adapter or model, memory, decoding, num_beams, "
        "...; YAML mapping); the retriever is the one being trained",
    )
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("recall_options", mode="before")
    @classmethod
    def _parse_recall_options(cls, value: Any) -> Any:
        return parse_mapping(value)  # YAML text from the command line

    def retriever_config(self) -> RetrieverConfig:
        """The RetrieverConfig part (saved with the retriever)."""
        return RetrieverConfig(**{k: getattr(self, k) for k in RetrieverConfig.model_fields})
