"""The `automr evaluate` command line that the recipe and decoding benchmarks run in subprocesses.

One home for it, so the learning curve and the decoding sweep judge BIGRec the same way: constrained
decoding into full rankings, the evaluator's history exclusion, one grounding cache per output folder
(grounding embeds titles with the base model, BIGRec's rule, so every adapter shares it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def evaluate_command(samples: Path, split: str, n_eval: int, run: Path, *, methods: str = "bigrec",
                     seed: int = 0, adapter: Path | None = None, num_beams: int = 10,
                     cache_dir: Path | None = None, decoding: dict[str, Any] | None = None) -> list[str]:
    """`python -m automr evaluate` of `methods` on `n_eval` seeded samples of `split` into `run`;
    BIGRec (when listed) reads `adapter` with constrained decoding and the extra `decoding` options."""
    cmd = [sys.executable, "-m", "automr", "evaluate", "--samples", str(samples), "--split", split,
           "--n-eval", str(n_eval), "--methods", methods, "--run", str(run), "--seed", str(seed)]
    if "bigrec" in methods.split(","):
        if adapter is None:
            raise ValueError("BIGRec needs an adapter folder")
        opts = {"adapter": str(adapter), "decoding": "constrained", "num_beams": num_beams, "batch_size": 10,
                **({"cache_dir": str(cache_dir)} if cache_dir is not None else {}), **(decoding or {})}
        cmd += ["--method-options", json.dumps({"bigrec": opts})]
    return cmd
