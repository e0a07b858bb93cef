"""Early stopping of the retriever on validation Recall@1 of the whole AutoMR pipeline.

The paper stops training when Recall@1 of the full pipeline (retrieve, splice, decode, ground) stops
improving on validation samples. That needs the LLM and decoding after every epoch, so it is an
option (`train-retriever --recall-samples PREPARED`), and the default stops on the annotations'
headroom share instead (automr/memory/train_stage.py). The model, store and decoder are loaded once;
only the retriever inside the AutoMR selector changes between epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from automr.memory.retriever import Retriever


def pipeline_recall_at_1(samples: Path, options: dict[str, Any], n: int, seed: int, placeholder: "Retriever",
                         work_dir: Path) -> Callable[["Retriever"], float]:
    """A metric(retriever) -> Recall@1 of AutoMR with that retriever on a seeded subset of n validation samples."""
    from automr.data.schema import PreparedData
    from automr.eval.evaluator import select_subset
    from automr.memory.recommender import make_automr

    data = PreparedData.load(samples)
    split = data.split("valid")
    valid = split[select_subset(split.height, n, seed).tolist()]
    rec = make_automr(dict(options) | {"top_k": 1}, seed, retriever=placeholder)
    rec.fit(data, work_dir)
    targets = valid["target_item"].to_numpy()

    def recall_at_1(retriever: "Retriever") -> float:
        rec.selector.retriever = retriever
        top = rec.recommend(valid, 1)[:, 0]
        return float(np.mean(top == targets)) if len(targets) else 0.0

    return recall_at_1
