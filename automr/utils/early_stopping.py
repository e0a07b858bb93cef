"""Early stopping: the best validation value so far, when it was seen, and how long ago.

One implementation for every training loop (LoRA fine-tuning, the retriever, SASRec). Written by
hand because it is a few lines and the libraries that offer one (Lightning's EarlyStopping
callback, ignite's handler) come with their own trainer loop, which none of ours uses.

Rules:
  * `update(value, epoch)` returns True when `value` is better than the best so far: strictly
    lower (mode "min") or higher (mode "max"). Tuples compare in order, so a second entry breaks
    ties of the first (SASRec: NDCG@10, then Recall@10).
  * NaN is worse than every number: it never beats a number, and any number beats a NaN best.
  * With no best yet (`best is None`), the first value is the best whatever it is (even NaN), so
    there is always a best state to restore. A loop that must beat a bound first starts from it
    (fine-tuning starts at best = inf: a NaN or infinite first loss is not an improvement).
  * `should_stop` once `patience` updates in a row brought no improvement.

The fields are plain values, so a checkpoint can save and restore them as JSON.

`Criterion` is what a loop measured at one validation and what that rests on (issue 9 A9): a
mean over a few hits (Recall@1 on 857 samples: one hit) picks an epoch by chance, so every loop
logs and records its criterion's value with the samples and hits behind it, and `warn_if_thin`
says so when the best epoch was chosen on fewer than MIN_HITS hits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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


# Below this many hits a hit-based criterion is a handful of events: one more or one fewer hit moves
# it by over 5% of its value (a count's standard deviation is about its square root), enough to
# pick another epoch by chance.
MIN_HITS = 20


@dataclass(frozen=True)
class Criterion:
    """One validation measurement: the value early stopping compares and the evidence behind it.

    hits is the number of samples that contributed to a hit-based value (target in the top k for
    Recall@k and NDCG@k); None for a value every sample contributes to (a loss, a mean gain).
    `note` adds context to the log line (e.g. the tokens a loss averaged over).
    """

    name: str  # e.g. "ndcg@10", "loss", "headroom_share"
    value: float
    samples: int | None = None  # validation samples it averaged over (None: unknown, e.g. a callback's float)
    hits: int | None = None
    hit_name: str = "hits"  # what one hit is, e.g. "hits@10"
    note: str = ""

    def describe(self) -> str:
        """One log line's worth: 'valid ndcg@10 0.0412 from 311 hits@10 of 6,040 samples'."""
        text = f"valid {self.name} {self.value:.4f}"
        if self.hits is not None and self.samples is not None:
            text += f" from {self.hits:,} {self.hit_name} of {self.samples:,} samples"
        elif self.samples is not None:
            text += f" over {self.samples:,} samples"
        return text + (f" ({self.note})" if self.note else "")

    def record(self) -> dict[str, Any]:
        """The fields a history row or metrics file keeps (JSON-ready)."""
        return {"criterion": self.name, "criterion_value": self.value, "criterion_samples": self.samples, "criterion_hits": self.hits}

    @property
    def thin(self) -> bool:
        """True for a hit-based criterion that saw fewer than MIN_HITS hits."""
        return self.hits is not None and self.hits < MIN_HITS


def warn_if_thin(who: str, best: Criterion, epoch: int, fix: str) -> bool:
    """Warn (stderr) when the best epoch was chosen on fewer than MIN_HITS hits; True if it warned.

    `fix` says what the user can change (more validation samples, a deeper criterion).
    """
    if not best.thin:
        return False
    from automr.utils.logging import warn

    warn(
        f"{who}: the best epoch ({epoch}) was chosen on {best.describe()}; with fewer than {MIN_HITS} hits "
        f"that choice is mostly chance. {fix}"
    )
    return True
