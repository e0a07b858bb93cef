"""`automr synthetic`: seeded planted-interest data in the common format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from automr.data.synthetic import SyntheticSpec, write_synthetic


class SyntheticConfig(SyntheticSpec):
    """Settings of `automr synthetic`: what to generate, and where."""

    out: Path = Field(description="Output folder (common format + planted.parquet); replaced atomically.")

    def seed_affects_output(self) -> bool:
        """Never per seed in `automr run --seeds`: this seed chooses the data, and seeds replicate an experiment on one data set."""
        return False


def run_synthetic(cfg: SyntheticConfig) -> dict[str, Any]:
    """Stage entry point of `automr synthetic`."""
    return write_synthetic(cfg, cfg.out)
