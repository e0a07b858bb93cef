"""`automr prepare`: the temporal protocol (automr/data/protocol.py) applied by the streaming engine
(automr/data/prepare.py).

The config is the protocol's own settings class (`PrepareConfig`), which the library resolves
(presets, windows, splits); this module is the command's entry point.
"""

from __future__ import annotations

from typing import Any

from automr.data.protocol import PrepareConfig



def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Stage entry point of `automr prepare` (the engine lives in automr/data/prepare.py)."""
    from automr.data.prepare import prepare

    return prepare(cfg)


