"""The keys and values of the last prompt prefix decoding computed, kept for the next call.

Every prompt begins with the same instruction (64 of a served ml-100k prompt's 71-127 tokens), and a
served user asked twice sends the same prompt twice. Causal attention makes a prefix's per-layer keys
and values a function of that prefix alone, so `SplitLM.prefill` reads back the longest run of
tokens (and positions) it shares with the last prefix it computed and computes only the rest.
Batched evaluation shares the instruction within a batch already; one request at a time (serving)
is where this pays.

Why not transformers' prefix caching (`DynamicCache` reuse): prefill keeps its own per-layer tensors
(split.SplitCache, cascade attention), not a transformers cache object.

The entry is only valid for the weights it was computed with: it is keyed by every parameter's
identity, storage and version counter (PyTorch bumps `_version` on every in-place change: an
optimizer step, `load_state_dict`, merging an adapter), so training between two calls, or a dtype
change, drops it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

Token = tuple[int, int]  # (token id, position id)
LayerKV = tuple[list[Tensor], list[Tensor]]  # per layer: keys, values (1, kv, T, d)


def weights_version(params: Iterable[Tensor]) -> tuple[tuple[int, int, int], ...]:
    """What changes when any weight does: each parameter's object, storage and in-place version."""
    return tuple((id(p), p.data_ptr(), p._version) for p in params)


@dataclass
class _Entry:
    tokens: list[Token]
    keys: list[Tensor]  # per layer (1, kv, T, d)
    values: list[Tensor]
    version: tuple[tuple[int, int, int], ...]


class PrefixCache:
    """One entry: the last prefix stored. `reusable(tokens)` says how many leading tokens it can give."""

    def __init__(self, params: Callable[[], Iterable[Tensor]]) -> None:
        self._params = params
        self._entry: _Entry | None = None
        self.reused_tokens = 0  # tokens read back instead of computed, over the cache's life
        self.computed_tokens = 0  # tokens computed through `store`

    def lookup(self, tokens: Sequence[Token]) -> tuple[int, LayerKV | None]:
        """(m, per-layer keys and values of the first m tokens) shared with the stored prefix; (0, None)."""
        e = self._entry
        if e is None:
            return 0, None
        m = len(os.path.commonprefix([e.tokens, list(tokens)]))  # any sequences, element by element
        if m == 0 or e.version != weights_version(self._params()):
            return 0, None
        self.reused_tokens += m
        return m, ([k[:, :, :m] for k in e.keys], [v[:, :, :m] for v in e.values])

    def store(self, tokens: Sequence[Token], keys: list[Tensor], values: list[Tensor], computed: int) -> None:
        """Keep `tokens`' keys and values (per layer (1, kv, T, d)) for the next lookup."""
        self._entry = _Entry(list(tokens), keys, values, weights_version(self._params()))
        self.computed_tokens += computed

    def clear(self) -> None:
        self._entry = None
