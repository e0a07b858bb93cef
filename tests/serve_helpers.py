"""A tiny trained run for the serving tests: prepared data, a random-init 4-layer Llama, an exact
memory store, an untrained retriever, and an `automr evaluate` run over them (its config.yaml and
predictions are what `automr serve RUN` loads and what the API must reproduce).

Built once per test session (about 10 s on a busy 2-core machine).
"""

from __future__ import annotations

from pathlib import Path

from memory_helpers import make_tiny_prepared, save_tiny_lm, tiny_users

LM_OPTS = {"num_beams": 2, "progress": False, "device": "cpu", "batch_size": 4, "decoding": "constrained"}
METHODS = ["popularity", "bigrec", "recent", "automr", "automr@wide"]  # a variant: automr with 4 beams
K = 4  # the tiny data's recent window (memory_helpers.RECENT_K)


def build_tiny_run(root: Path) -> Path:
    """Write the run under `root`; returns the evaluate folder (root / 'eval')."""
    from automr.memory.retriever import Retriever, RetrieverConfig
    from automr.stages.build_memory import BuildMemoryConfig, run_build_memory
    from automr.stages.evaluate import EvaluateConfig, run_evaluate

    data = make_tiny_prepared(root / "data", tiny_users(6))
    model = save_tiny_lm(root / "model")
    run_build_memory(BuildMemoryConfig(samples=data, out=root / "memory", model=str(model), device="cpu", progress=False))
    retriever = Retriever.new(64, RetrieverConfig(seed=3))
    retriever.save(root / "retriever")
    llm = {"model": str(model), **LM_OPTS}
    memory = llm | {"memory": str(root / "memory")}
    cfg = EvaluateConfig(
        samples=data, methods=METHODS, run=root / "eval", n_boot=10, exclude_history=False,
        method_options={"bigrec": llm, "recent": memory, "automr": memory | {"retriever": str(root / "retriever")},
                        "automr@wide": memory | {"retriever": str(root / "retriever"), "num_beams": 4}},
    )
    run_evaluate(cfg)
    return root / "eval"


def merged_histories(data: Path) -> tuple[dict, list]:
    """Each user's whole history merged from the sample slices (build-memory's), and the test samples' placements."""
    import polars as pl

    from automr.data.schema import SPLITS, PreparedData
    from automr.memory.build import place_samples

    d = PreparedData.load(data)
    histories, placements, _ = place_samples({s: d.split(s).with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)) for s in SPLITS})
    return histories, [p for p in placements if p.split == "test"]


def history_before(histories: dict, placement) -> tuple[list[int], list[int]]:
    """(items, times) of a user's merged history before a sample's target: what a server would hold then."""
    h = histories[placement.user_id]
    end = placement.recent_start + placement.n_recent
    return h.items[:end], h.times[:end]
