"""Config of the AutoMR retriever (kept free of torch so `automr --help` stays fast).

The retriever itself lives in automr/memory/retriever.py; this module only describes its knobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from automr.config import StageConfig

FORMAT_VERSION = 1
WEIGHTS_FILE, SPEC_FILE = "retriever.safetensors", "retriever.json"
FEATURES_FILE = "features.npz"  # a feature retriever's ElementFeatures (automr/methods/feature_retriever.py)


class RetrieverConfig(StageConfig):
    """Architecture, labels and training of the retriever: MLP(z_t) scored against memory keys."""

    hidden: int = Field(256, ge=1, description="Hidden width of the 2-layer MLP that maps the query z_t to a query vector (paper: 256).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after the MLP's hidden layer (0 = none).")
    score_scale: Literal["inv_sqrt_h", "none"] = Field(
        "inv_sqrt_h",
        description="Scale of the scores MLP(z_t)^T z_m: 'inv_sqrt_h' divides by sqrt(H) (as attention does, so "
        "initial scores are O(1) and S starts near uniform, like the labels); 'none' is the paper's bare dot product.",
    )
    normalize: Literal["standardize", "none"] = Field(
        "standardize",
        description="Standardise queries and keys per dimension with training-set mean and std (saved with the "
        "model). LLM states have a few huge 'massive activation' dimensions that would otherwise dominate.",
    )
    label_type: Literal["prob_diff", "loglik_gain"] = Field(
        "loglik_gain",
        description="Target S': 'prob_diff' = softmax(P(y|z_t,z_m) - P(y|z_t)) (the paper's, nearly uniform at "
        "real scales); 'loglik_gain' = softmax((log P(y|z_t,z_m) - log P(y|z_t)) / temperature).",
    )
    temperature: float = Field(1.0, gt=0.0, description="Temperature of the 'loglik_gain' labels (nats); lower = peakier labels.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay (L2).")
    batch_size: int = Field(64, ge=1, description="Samples per mini-batch (memories of different sizes are padded and masked).")
    epochs: int = Field(100, ge=1, description="Maximum training epochs.")
    patience: int = Field(10, ge=1, description="Stop after this many epochs without a better validation metric (paper: 10).")
    select_metric: Literal["headroom_share", "top1", "neg_kl"] = Field(
        "headroom_share",
        description="Built-in validation metric for early stopping when no callback is given: share of the oracle "
        "headroom captured by the argmax, top-1 agreement with the labels' argmax, or minus the KL.",
    )
    top_k: int = Field(1, ge=1, description="Elements retrieved per query at inference (argmax = 1).")
    features: Literal["none", "cheap"] = Field(
        "none",
        description="What the retriever sees of each element: 'none' = only its key z_m (the paper's); 'cheap' = also "
        "cheap features (days and interactions ago, item popularity, repeat of a recent item, title similarity to the "
        "recent titles; automr/methods/feature_retriever.py), standardised, through a small MLP added to the score.",
    )
    feature_similarity: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="features 'cheap': include the title-similarity features (MiniLM sentence encoder); 'auto' = when "
        "the encoder package is installed.",
    )
    feature_hidden: int = Field(32, ge=1, description="features 'cheap': hidden width of the feature MLP.")
    seed: int = Field(0, description="Seed for initialisation, shuffling and dropout.")


def retriever_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a retriever this version can load (None when it is).

    Here, free of torch, so `automr evaluate` and `automr run` check a `retriever` path before any
    method runs; `Retriever.load` raises the same message.
    """
    folder = Path(folder)
    if not (folder / SPEC_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return (
            f"no retriever at {folder}: expected {SPEC_FILE} and {WEIGHTS_FILE}. Train one with `automr train-retriever` "
            "or check the path."
        )
    try:
        spec = json.loads((folder / SPEC_FILE).read_text())
        version = spec.get("format_version")
    except (json.JSONDecodeError, AttributeError):
        return f"retriever {folder} has an unreadable {SPEC_FILE}; train it again with `automr train-retriever`."
    if version != FORMAT_VERSION:
        return f"retriever {folder} has format version {version!r}; expected {FORMAT_VERSION}"
    if spec.get("kind") == "features" and not (folder / FEATURES_FILE).is_file():
        return (f"the feature retriever {folder} has no {FEATURES_FILE} (its popularity counts and title embeddings); "
                "train it again with `automr train-retriever --features cheap`.")
    return None


def retriever_top_k(folder: str | Path) -> int:
    """The top_k a retriever folder was saved with (1 when unreadable: `Retriever.load` reports why), torch-free,
    so a memory method can size its slot reserve before loading the model."""
    try:
        return int(json.loads((Path(folder) / SPEC_FILE).read_text())["config"].get("top_k", 1))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return 1
