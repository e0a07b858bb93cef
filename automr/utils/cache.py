"""automr's user cache: one home for where converted models, fetched data and embeddings shared
between runs live.

Everything here is a cache: keyed by content (a catalogue hash, a model's weights), so a file is
either right for its key or absent, and deleting the folder only costs recomputation.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/automr, else ~/.cache/automr."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "automr"


def user_cache_dir(kind: str, env: str) -> Path:
    """The folder of one kind of shared cache: $`env` where set (tests point it at a temporary folder),
    else `kind`/ in the user cache."""
    value = os.environ.get(env)
    return Path(value) if value else default_cache_dir() / kind
