"""Work on prompts kept for the next call: the last prefix decoding computed (`PrefixCache`), and the
lower layers of the prompts whose query state was computed (`LowerStash`, AutoMR's prefill).

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


@dataclass
class LowerEntry:
    """A prompt's layer-L states and lower-layer keys/values from its token `start` on."""

    start: int
    states: Tensor  # (T - start, H) after the lower layers
    keys: list[Tensor]  # per lower layer (1, kv, T - start, d)
    values: list[Tensor]
    version: tuple[tuple[int, int, int], ...]

    def after(self, m: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """States, keys and values of the tokens from `m` on (m >= start)."""
        o = m - self.start
        return self.states[o:], [k[:, :, o:] for k in self.keys], [v[:, :, o:] for v in self.values]


class LowerStash:
    """The lower layers' work on the last prompts whose query state was computed, for their prefill.

    AutoMR runs each prompt's lower layers twice: once for the query state z_t (the prompt's last
    token at layer L), then in the prefill of the prompt with its retrieved slot. The slot enters at
    layer L, after the prompt, so causal attention makes the prompt's layer-L states and lower keys
    the same both times: the prefill reads them back and runs only the marker after the slot through
    the lower layers. Keyed by the prompt's token ids (positions 0..T-1, as both passes place them)
    and valid for the weights they were computed with (`weights_version`). Holds the last `capacity`
    prompts (a served batch is up to 16; ~1.5 MB a prompt for SmolLM2 in float32).
    """

    def __init__(self, params: Callable[[], Iterable[Tensor]], capacity: int = 64) -> None:
        self._params = params
        self.capacity = capacity
        self._entries: dict[tuple[int, ...], LowerEntry] = {}
        self.reused_tokens = 0  # tokens whose lower layers were read back instead of computed

    def put(self, ids: Sequence[int], start: int, states: Tensor, keys: list[Tensor], values: list[Tensor]) -> None:
        key = tuple(ids)
        self._entries.pop(key, None)
        self._entries[key] = LowerEntry(start, states, keys, values, weights_version(self._params()))
        while len(self._entries) > self.capacity:  # dicts keep insertion order: the oldest goes
            del self._entries[next(iter(self._entries))]

    def get(self, ids: Sequence[int], m: int) -> LowerEntry | None:
        """The entry of prompt `ids` if it covers its tokens from `m` on with today's weights."""
        e = self._entries.get(tuple(ids))
        if e is None or e.start > m or e.version != weights_version(self._params()):
            return None
        return e

    def clear(self) -> None:
        self._entries.clear()
