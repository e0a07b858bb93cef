"""Argument groups shared by stage configs and method options: model, device and dtype, progress.

Each group is a pydantic mixin (a StageConfig with a few fields); a config inherits the groups it
needs, so its flags and YAML keys stay flat and keep one name, one type, one default and one help
text everywhere (`--model`, `--adapter`, `--device`, `--dtype`, `--progress/--no-progress`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from automr.config import StageConfig

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_DEVICE: Device = "auto"
DEVICE_HELP = "auto (the GPU when there is one, each process's own under torchrun; else CPU), cpu, or cuda (pick a GPU with CUDA_VISIBLE_DEVICES)"


class ModelNameArgs(StageConfig):
    """The base model of a stage that takes no adapter."""

    model: str = Field("smollm2", description="base model: 'smollm2', a Hugging Face folder, or a hub id")


class ModelArgs(ModelNameArgs):
    """The model of a stage that can also start from a `finetune` output."""

    adapter: Path | None = Field(
        None, description="a `finetune` output folder (base model + LoRA adapter, merged); overrides `model`"
    )


class DeviceOnlyArgs(StageConfig):
    """The torch device of a model that always runs in float32 (SASRec, the sentence encoder)."""

    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP)


class DeviceArgs(DeviceOnlyArgs):
    """The torch device and weights dtype of a language model."""

    dtype: Dtype = Field("auto", description="weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")


class LogArgs(StageConfig):
    """Console output of a stage's long loops."""

    progress: bool = Field(True, description="show progress bars on long loops (off a terminal: each bar's final line)")


__all__ = ["DEFAULT_DEVICE", "Device", "DeviceArgs", "DeviceOnlyArgs", "Dtype", "LogArgs", "ModelArgs", "ModelNameArgs"]
