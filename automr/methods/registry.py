"""The registry of methods: a name -> the factory that builds its Recommender.

Factories are imported only when a method is built, so listing the methods (for `--help`) loads
no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from automr.errors import UserError
from automr.methods.base import Recommender

# method name -> "module:factory"; factory(options: dict, seed: int) -> Recommender.
METHODS: dict[str, str] = {
    "popularity": "automr.methods.popularity:make",
    "sasrec": "automr.methods.sasrec:make",
    "bigrec": "automr.methods.bigrec:make_bigrec",
    "automr": "automr.methods.automr:make_automr",
    "random": "automr.methods.automr:make_random",
    "recent": "automr.methods.automr:make_recent",
    "rella": "automr.methods.rella:make",
    "trsr": "automr.methods.trsr:make",
}


def make_method(name: str, options: dict[str, Any] | None = None, seed: int = 0) -> Recommender:
    """Build a method by name, with a clear error for an unknown one."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    module, _, attr = METHODS[name].partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"method {name!r} is not available in this build ({exc})") from None
    return factory(options or {}, seed)
