"""Early stopping: the best validation value so far, when it was seen, and how long ago.

One implementation for every training loop (LoRA fine-tuning, the retriever, SASRec). Written by
hand because it is a few lines and the libraries that offer one (Lightning's EarlyStopping
callback, ignite's handler) come with their own trainer loop, which none of ours uses.

Rules:
  * `update(value, epoch)` returns True when `value` is better than the best so far: strictly
    lower (mode "min") or higher (mode "max"). Tuples compare in order, so a second entry breaks
    ties of the first (SASRec: Recall@1, then NDCG@10).
  * NaN is worse than every number: it never beats a number, and any number beats a NaN best.
  * With no best yet (`best is None`), the first value is the best whatever it is (even NaN), so
    there is always a best state to restore. A loop that must beat a bound first starts from it
    (fine-tuning starts at best = inf: a NaN or infinite first loss is not an improvement).
  * `should_stop` once `patience` updates in a row brought no improvement.

The fields are plain values, so a checkpoint can save and restore them as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Value = float | tuple[float, ...]


@dataclass
class EarlyStopping:
    """Best value, the epoch (or step) it was measured at, and the updates since then."""

    patience: int
    mode: Literal["min", "max"] = "min"
    best: Value | None = None
    best_epoch: int = -1
    bad_updates: int = 0  # updates in a row without improvement

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def _rank(self, value: Value) -> tuple[float, ...]:
        """`value` as a tuple where larger is better and NaN is the worst possible entry."""
        entries = value if isinstance(value, tuple) else (value,)
        sign = 1.0 if self.mode == "max" else -1.0
        return tuple(-math.inf if math.isnan(v) else sign * float(v) for v in entries)

    def is_better(self, value: Value) -> bool:
        """Would `value` count as an improvement (without recording it)?"""
        return self.best is None or self._rank(value) > self._rank(self.best)

    def update(self, value: Value, epoch: int) -> bool:
        """Record one validation value measured at `epoch`; True if it is the new best."""
        if self.is_better(value):
            self.best, self.best_epoch, self.bad_updates = value, epoch, 0
            return True
        self.bad_updates += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once `patience` updates in a row brought no improvement."""
        return self.bad_updates >= self.patience
