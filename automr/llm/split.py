"""Split forward: lower layers [0, L), a memory slot spliced in at layer L, upper layers [L, N).

AutoMR combines a retrieved memory element with the prompt *inside* the model: the element's
layer-L states are placed in a slot between the recent history and the response marker, and only
the upper layers see them (DESIGN.md "Combine"). This module runs a Llama-like *ForCausalLM layer
by layer (its own `model.model.layers`, `embed_tokens`, `rotary_emb`, `norm`, `lm_head` modules),
building its own 4D additive masks and position ids, so that

  * the lower layers never see the slot: the marker and answer run at positions P+S.. with a gap
    where the slot will be (so relative positions in the upper layers are those of a real sequence);
  * at layer L the slot's states are spliced between prefix and marker;
  * the upper layers run on prefix + slot + marker + answer as one ordinary causal sequence.

A slot given as token ids is text: it runs through the lower layers too, exactly as if written in
the prompt. No slot reproduces the plain model.

The annotation kernel (`score_candidates`) exploits the layout: the prompt's lower- and
upper-layer KV are computed once, and the candidate [slot, marker, answer] blocks run as a batch
whose positions all start at P, each attending to the shared prompt by cascade attention
(automr/llm/cascade.py: the prompt's keys are read once for all blocks, never copied) and to itself
causally (DESIGN.md "Annotation").

Decoding (`prefill`, `step`) keeps a `SplitCache`: each prompt's keys and values once, shared by all
its beams, and each beam's generated tokens in preallocated buffers; key/value tensors are shaped
(B, kv_heads, T, head_dim).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from automr.errors import UserError
from automr.llm.loading import LM
from automr.llm.prefix_cache import LowerStash, PrefixCache
from automr.llm.prompts import EncodedPrompt

Slot = Tensor | Sequence[int] | None
RowsKV = tuple[list[Tensor], list[Tensor], Tensor]  # per layer keys, values (B, kv, P, d); valid columns (B, P)


# -- caches ----------------------------------------------------------------------------------
class SplitCache:
    """The KV cache of rows being decoded (beams): each sample's prompt once, each row's own tokens.

    Beam search decodes up to `beams` rows per sample, all continuing that sample's prompt. Per layer
    one preallocated buffer per sample holds its prompt's keys (right-padded; lower layers without
    the slot, upper layers with it) and then its beams' generated tokens, time-major:

        [prompt (P) | token 0 of beams 0..W-1 | token 1 of beams 0..W-1 | ...]   (A, kv, P + G*W, d)

    so a step is one attention call per layer over the samples: each sample's beams (x query heads
    of a KV head) are queries against its columns so far, a mask keeps a beam to the prompt and its
    own tokens (`attend`). The prompt is never copied per beam; new keys are written in place;
    `reorder` (beam search picking the next beams, always within their sample) gathers only the
    generated columns into a second buffer (ping-pong). The previous cache concatenated every
    layer's whole cache at every step and index_selected it per beam, prompt included (issue 9 B3).
    Samples no row refers to any more are dropped at the next `reorder`.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], valid: list[Tensor], layer_group: list[int],
                 next_pos: Tensor, beams: int = 1, max_new_tokens: int = 16) -> None:
        """keys/values per layer (A, kv, P_i, d) right-padded; valid (A, P_g) bool per layer group
        (lower, upper) and `layer_group` per layer; next_pos (A,): each sample's first generated
        position. One row per sample to start with; `beams` rows per sample at most; the buffers
        hold `max_new_tokens` and grow when exceeded."""
        self.valid, self.layer_group, self.next_pos = valid, layer_group, next_pos
        self.width = max(1, int(beams))
        self.prompt_len = [int(k.shape[2]) for k in keys]
        self.tokens = max(1, int(max_new_tokens))  # G: generated tokens the buffers hold
        self._bufs = [self._alloc(keys, values, self.tokens) for _ in range(2)]  # current, spare
        self.row_sample: list[int] = list(range(int(next_pos.shape[0])))
        self.row_slot: list[int] = [0] * len(self.row_sample)  # each row's beam column in its sample
        self.t = 0  # tokens generated per row (the same for every row)
        self._layout()

    def _alloc(self, keys: list[Tensor], values: list[Tensor], tokens: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, (A, kv, P + tokens * width, d) key and value buffers starting with keys / values[:, :, :P].

        Zeros, not empty: masked columns still meet the values in attention's product (0 x NaN is NaN)."""
        out = []
        for k, v, P in zip(keys, values, self.prompt_len):
            shape = (k.shape[0], k.shape[1], P + tokens * self.width, k.shape[3])
            bk, bv = k.new_zeros(shape), v.new_zeros(shape)
            bk[:, :, :P], bv[:, :, :P] = k[:, :, :P], v[:, :, :P]
            out.append((bk, bv))
        return out

    def _generated(self, buf: Tensor, layer: int) -> Tensor:
        """The generated columns of a layer's buffer as (A, kv, G, W, d) (a view)."""
        A, kv, _, d = buf.shape
        return buf[:, :, self.prompt_len[layer]:].view(A, kv, -1, self.width, d)

    def _layout(self) -> None:
        """Row -> (sample, beam column) index tensors, and forget the step's masks."""
        dev = self.next_pos.device
        self._sample = torch.as_tensor(self.row_sample, dtype=torch.long, device=dev)
        self._slot = torch.as_tensor(self.row_slot, dtype=torch.long, device=dev)
        self._grid = self._sample * self.width + self._slot
        self._masks: dict[int, Tensor] = {}  # by layer group, for step `_masks_t`
        self._masks_t = -1

    @property
    def batch_size(self) -> int:
        """Rows (what `SplitLM.step` feeds one token each)."""
        return len(self.row_sample)

    def positions(self) -> Tensor:
        """(rows, 1) position id of each row's next token."""
        return (self.next_pos.index_select(0, self._sample) + self.t)[:, None]

    def reorder(self, index: Tensor | Sequence[int]) -> None:
        """Rows become the old rows `index` (reorder, drop or repeat: beam search), in place."""
        rows = index.tolist() if isinstance(index, Tensor) else [int(i) for i in index]
        samples, parents = [self.row_sample[i] for i in rows], [self.row_slot[i] for i in rows]
        self._drop_unused_samples(samples)
        slots, seen = [], {}
        for s in samples:
            slots.append(seen.get(s, 0))
            seen[s] = slots[-1] + 1
        if max(seen.values(), default=0) > self.width:
            raise ValueError(f"{max(seen.values())} rows of one sample for a cache of {self.width} beams")
        if self.t:
            self._gather_generated(samples, slots, parents)
        self.row_sample, self.row_slot = samples, slots
        self._layout()

    def _gather_generated(self, samples: list[int], slots: list[int], parents: list[int]) -> None:
        """Beam column j of each sample takes its parent column's tokens so far, into the spare buffer."""
        A, t = int(self.next_pos.shape[0]), self.t
        table = [[0] * self.width for _ in range(A)]  # unused columns copy column 0: never read
        for s, j, p in zip(samples, slots, parents):
            table[s][j] = p
        parent = torch.as_tensor(table, dtype=torch.long, device=self.next_pos.device)
        for layer, ((ck, cv), (sk, sv)) in enumerate(zip(*self._bufs)):
            src_k, src_v = self._generated(ck, layer)[:, :, :t], self._generated(cv, layer)[:, :, :t]
            idx = parent[:, None, None, :, None].expand_as(src_k)
            torch.gather(src_k, 3, idx, out=self._generated(sk, layer)[:, :, :t])
            torch.gather(src_v, 3, idx, out=self._generated(sv, layer)[:, :, :t])
        self._bufs.reverse()

    def _drop_unused_samples(self, samples: list[int]) -> None:
        """Keep only the samples in `samples` (renumbered in place), when some sample lost all its rows."""
        used = sorted(set(samples))
        if len(used) == int(self.next_pos.shape[0]):
            return
        sel = torch.as_tensor(used, dtype=torch.long, device=self.next_pos.device)
        self._bufs = [[(k.index_select(0, sel), v.index_select(0, sel)) for k, v in buf] for buf in self._bufs]
        self.valid = [m.index_select(0, sel) for m in self.valid]
        self.next_pos = self.next_pos.index_select(0, sel)
        new = {s: j for j, s in enumerate(used)}
        samples[:] = [new[s] for s in samples]

    def make_room(self) -> None:
        """Before a step: double the buffers' generated columns when they are full."""
        if self.t < self.tokens:
            return
        keep = [[b[:, :, : P + self.t * self.width] for b in kv] for kv, P in zip(self._bufs[0], self.prompt_len)]
        self.tokens *= 2
        self._bufs = [self._alloc([k for k, _ in keep], [v for _, v in keep], self.tokens) for _ in range(2)]
        for (bk, bv), (k, v) in zip(self._bufs[0], keep):
            bk[:, :, : k.shape[2]], bv[:, :, : v.shape[2]] = k, v

    def _mask(self, layer: int, groups: int) -> Tensor:
        """(A, 1, W*g, P + (t+1)*W) bool: a sample's prompt (not its padding), and for beam j's queries
        (g query heads each) the generated columns of beam j; one per layer group and step."""
        gi = self.layer_group[layer]
        if self._masks_t != self.t:  # a new step
            self._masks, self._masks_t = {}, self.t
        mask = self._masks.get(gi)
        if mask is None:
            dev, W, valid = self.next_pos.device, self.width, self.valid[gi]
            own = (torch.arange(W * groups, device=dev)[:, None] // groups
                   == torch.arange((self.t + 1) * W, device=dev)[None] % W)  # (W*g, (t+1)*W)
            A, P = valid.shape
            mask = torch.cat([valid[:, None, None, :].expand(A, 1, W * groups, P),
                              own[None, None].expand(A, 1, -1, -1)], dim=-1)
            self._masks[gi] = mask
        return mask

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Layer `layer`'s attention for one step: the rows' new key/value (R, kv, 1, d) go to column t
        of their beam, then queries (R, h, 1, d) attend as `_mask` allows -> (R, h, 1, d)."""
        h, d = query.shape[1], query.shape[3]
        bk, bv = self._bufs[0][layer]
        A, kv = bk.shape[:2]
        g, W, t = h // kv, self.width, self.t
        self._generated(bk, layer)[self._sample, :, t, self._slot] = key[:, :, 0]
        self._generated(bv, layer)[self._sample, :, t, self._slot] = value[:, :, 0]
        q = query.new_zeros((A * W, h, d))
        q[self._grid] = query[:, :, 0]
        q = q.view(A, W, kv, g, d).permute(0, 2, 1, 3, 4).reshape(A, kv, W * g, d)  # a KV head's queries together
        n = self.prompt_len[layer] + (t + 1) * W
        out = torch.nn.functional.scaled_dot_product_attention(
            q, bk[:, :, :n], bv[:, :, :n], attn_mask=self._mask(layer, g), scale=scale)  # (A, kv, W*g, d)
        return out.view(A, kv, W, g, d).permute(0, 2, 1, 3, 4).reshape(A * W, h, d)[self._grid][:, :, None]


@dataclass
class _Row:
    """One sequence's plan: what the lower layers see, and where the slot states go at layer L."""

    lower_ids: list[int]
    lower_pos: list[int]
    splice_at: int  # index in the lower sequence before which `states` are inserted
    states: Tensor | None  # (S, H) or None
    n_answer: int  # answer tokens at the end of the upper sequence (to score)
    prompt_len: int  # the prompt's tokens (prefix_ids) at the start of lower_ids: what the query state read

    @property
    def upper_len(self) -> int:
        return len(self.lower_ids) + (0 if self.states is None else int(self.states.shape[0]))

    @property
    def answer_ids(self) -> list[int]:
        return self.lower_ids[len(self.lower_ids) - self.n_answer:]


# -- the split model -------------------------------------------------------------------------
class SplitLM:
    """Runs an LM as lower layers [0, L) + slot + upper layers [L, N) (see the module docstring)."""

    def __init__(self, lm: LM, split_layer: int | None = None, compile: bool = False) -> None:
        self.lm = lm
        base = lm.base_model
        core = getattr(base, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if core is None or any(not hasattr(core, a) for a in needed) or base.get_output_embeddings() is None:
            raise UserError(
                f"{type(base).__name__} is not laid out like Llama (model.model.{{{', '.join(needed)}}} + lm_head); "
                "the split forward supports Llama-like decoder-only families (Llama, Qwen2, Mistral, SmolLM...)."
            )
        cfg = base.config
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            raise UserError(
                f"{type(base).__name__} uses sliding-window layers, which the split forward's masks do not model; "
                "use a model without sliding-window attention (for Qwen2, use_sliding_window=False)."
            )
        if cfg._attn_implementation not in ("sdpa", "eager"):
            raise UserError(
                f"attention implementation {cfg._attn_implementation!r} does not take custom 4D masks; "
                "load the model with attn_implementation='sdpa' (load_lm does)."
            )
        self.core = core
        self.lm_head = base.get_output_embeddings()
        self.num_layers = int(cfg.num_hidden_layers)
        L = self.num_layers // 2 if split_layer is None else int(split_layer)
        if not 0 <= L <= self.num_layers:
            raise UserError(f"split_layer {L} is outside [0, {self.num_layers}] for {lm.name}.")
        self.split_layer = L
        self.pad_id = int(lm.tokenizer.pad_token_id)
        # transformers 5.24 calls the layers' cache argument `cache` (`past_key_values` before): a
        # name the layer does not know would be swallowed by **kwargs and the cache silently unused.
        params = inspect.signature(type(core.layers[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Decoding's prefill reads back the keys of the prompt prefix it computed last (the shared
        # instruction; a served user's whole prompt when asked again) while the weights are unchanged.
        self.prefix_cache = PrefixCache(lambda: self.lm.model.parameters())
        # ... and the lower layers' work on the prompts whose query state it computed last (AutoMR's
        # z_t), so their prefill runs only what follows each prompt through the lower layers.
        self.lower_stash = LowerStash(lambda: self.lm.model.parameters())
        # compile=True: the annotation kernel's passes run torch.compile'd (one graph per pass of
        # L or N-L layers): element-wise work (norms, rotary, SiLU) is fused and the per-op Python
        # launch cost, which bounds a 7B annotation on an H100, mostly goes. Shapes vary per sample: dynamic.
        self._kernel_pass = self._layers_pass
        if compile:
            self._kernel_pass = torch.compile(self._layers_pass, dynamic=True)

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.core.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.core.embed_tokens.weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.core.embed_tokens.weight.shape[1])

    # -- building blocks --------------------------------------------------------------------
    def _additive(self, allowed: Tensor) -> Tensor:
        """(B, Q, K) bool -> (B, 1, Q, K) additive float mask (0 where allowed, dtype min elsewhere).

        The dtype minimum rather than -inf keeps fully masked rows (padding queries) finite.
        """
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def _causal_allowed(self, key_valid: Tensor, q_len: int) -> Tensor:
        """Queries are the last q_len of K key columns; each sees valid earlier keys and itself."""
        B, K = key_valid.shape
        dev = key_valid.device
        qi = torch.arange(K - q_len, K, device=dev)[:, None]  # (Q, 1) absolute column of each query
        kj = torch.arange(K, device=dev)[None, :]  # (1, K)
        causal = kj <= qi
        allowed = causal[None] & key_valid[:, None, :]  # (B, Q, K)
        return allowed | (kj == qi)[None]

    def _run(self, hidden: Tensor, start: int, end: int, pos: Tensor, mask: Tensor | None, **extra: Any) -> Tensor:
        """Decoder layers [start, end) on hidden (B, T, H) at positions pos (B, T) under mask (B, 1, T, K).

        `extra` keywords reach the attention function (cascade.py's `automr_decode`)."""
        if start >= end:
            return hidden
        cos_sin = self.core.rotary_emb(hidden, pos)
        for i in range(start, end):
            out = self.core.layers[i](
                hidden,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                position_embeddings=cos_sin,
                **{self._cache_kw: None},
                **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.core.norm(hidden))

    def _embed(self, ids: Tensor) -> Tensor:
        return self.core.embed_tokens(ids)

    def _tensor(self, rows: Sequence[Sequence[int]], pad: int, side: str = "right") -> tuple[Tensor, Tensor]:
        """Pad int lists into (B, T) long and a (B, T) bool validity mask."""
        T = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), T), pad, dtype=torch.long)
        valid = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, r in enumerate(rows):
            if not r:
                continue
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            out[b, sl] = torch.as_tensor(list(r), dtype=torch.long)
            valid[b, sl] = True
        return out.to(self.device), valid.to(self.device)

    def _slot_states(self, slot: Tensor) -> Tensor:
        if slot.ndim != 2 or slot.shape[1] != self.hidden_size:
            raise ValueError(f"a state slot must be (S, {self.hidden_size}); got {tuple(slot.shape)}")
        return slot.to(device=self.device, dtype=self.dtype)

    # -- raw lower / upper ------------------------------------------------------------------
    def lower(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Hidden state after layer L-1 (= HF hidden_states[L]) of (B, T) ids -> (B, T, H).

        attention_mask (B, T) marks real tokens (either padding side); position ids default to
        each row's count of real tokens so far, as in HF generation.
        """
        input_ids = input_ids.to(self.device)
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(self.device).bool())
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
        mask = self._additive(self._causal_allowed(valid, input_ids.shape[1]))
        return self._run(self._embed(input_ids), 0, self.split_layer, position_ids.to(self.device), mask)

    def upper(self, hidden: Tensor, position_ids: Tensor, mask4d: Tensor) -> Tensor:
        """Upper layers + final norm + lm_head: hidden (B, T, H) -> logits (B, T, V).

        mask4d is additive (0 = attend), shaped (B, 1, T, T); see `causal_mask`.
        """
        h = self._run(hidden, self.split_layer, self.num_layers, position_ids.to(self.device), mask4d)
        return self._logits(h)

    def causal_mask(self, attention_mask: Tensor) -> Tensor:
        """(B, T) validity -> the (B, 1, T, T) additive causal mask `upper` expects."""
        valid = attention_mask.to(self.device).bool()
        return self._additive(self._causal_allowed(valid, valid.shape[1]))

    def full_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """lower + upper on plain ids: equals model(input_ids, attention_mask).logits."""
        input_ids = input_ids.to(self.device)
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(self.device).bool())
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
        h = self.lower(input_ids, valid, pos)
        return self.upper(h, pos, self.causal_mask(valid))

    # -- states for memory keys, values and queries -----------------------------------------
    @torch.no_grad()
    def hidden_states(self, prompts: Sequence[Sequence[int]], layer: int | None = None) -> tuple[Tensor, list[int]]:
        """Right-padded (B, T, H) states after `layer` layers (default L) and each prompt's length."""
        layer = self.split_layer if layer is None else int(layer)
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers}]")
        ids, valid = self._tensor(prompts, self.pad_id, "right")
        pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
        mask = self._additive(self._causal_allowed(valid, ids.shape[1]))
        h = self._run(self._embed(ids), 0, layer, pos, mask)
        return h, [len(p) for p in prompts]

    def last_token_states(self, prompts: Sequence[Sequence[int]], layer: int | None = None) -> Tensor:
        """State after `layer` layers (default L) at each prompt's last token: (B, H) (query z_t, key z_m).

        Where the prefix cache holds the keys of the prompts' shared first tokens (the instruction, once
        a prefill has run), only the rest of each prompt runs, attending to them."""
        layer = self.split_layer if layer is None else int(layer)
        fast = self._last_states_after_cached_prefix(prompts, layer)
        if fast is not None:
            return fast
        h, lens = self.hidden_states(prompts, layer)
        idx = torch.as_tensor([n - 1 for n in lens], device=h.device)
        return h[torch.arange(len(lens), device=h.device), idx]

    @torch.no_grad()
    def _last_states_after_cached_prefix(self, prompts: Sequence[Sequence[int]], layer: int) -> Tensor | None:
        """`last_token_states` from the cached keys of the prompts' shared first tokens and the rest of
        each prompt through layers [0, layer) by cascade attention; None when nothing is cached."""
        if not prompts or not 0 < layer <= self.num_layers or min(map(len, prompts)) < 2:
            return None
        shared = os.path.commonprefix([list(p) for p in prompts])[: min(map(len, prompts)) - 1]  # each keeps a token
        m, head = self.prefix_cache.lookup(list(zip(shared, range(len(shared)))))  # positions 0.. as hidden_states
        if head is None:
            return None
        ids, _ = self._tensor([p[m:] for p in prompts], self.pad_id, "right")  # (B, T) the rest, right-padded
        pos = (m + torch.arange(ids.shape[1], device=self.device))[None].expand(len(prompts), -1)
        stash = layer == self.split_layer  # the query state's layer: the prefill of these prompts can read it back
        h, keys, values = self._pass(self._embed(ids), pos, 0, layer, (head[0][:layer], head[1][:layer]), capture=stash)
        if stash:
            for b, p in enumerate(prompts):
                n = len(p) - m
                self.lower_stash.put(p, m, h[b, :n], [k[b : b + 1, :, :n] for k in keys], [v[b : b + 1, :, :n] for v in values])
        last = torch.as_tensor([len(p) - m - 1 for p in prompts], device=h.device)
        return h[torch.arange(len(prompts), device=h.device), last]

    def token_states(self, prompts: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                     layer: int | None = None) -> list[Tensor]:
        """States after `layer` layers (default L) of the tokens in each [start, end) span: (S_i, H) each."""
        return self.prompt_states(prompts, spans, layer)[1]

    def prompt_states(self, prompts: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                      layer: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Last-token states (B, H) and span states [(S_i, H)] from one pass (memory key + value)."""
        h, lens = self.hidden_states(prompts, layer)
        last = h[torch.arange(len(lens), device=h.device), torch.as_tensor([n - 1 for n in lens], device=h.device)]
        vals = []
        for b, (s, e) in enumerate(spans):
            if not 0 <= s <= e <= lens[b]:
                raise ValueError(f"span {(s, e)} outside prompt {b} of length {lens[b]}")
            vals.append(h[b, s:e].clone())
        return last, vals

    # -- rows with slots --------------------------------------------------------------------
    def plan(self, prompt: EncodedPrompt, slot: Slot) -> _Row:
        """The row `answer_logprob` runs for (prompt, slot): lower ids and positions, splice point, answer."""
        return self._plan(prompt, slot, True)

    def _plan(self, prompt: EncodedPrompt, slot: Slot, with_answer: bool) -> _Row:
        tail = list(prompt.marker_ids) + (list(prompt.answer_ids) if with_answer else [])
        n_ans = len(prompt.answer_ids) if with_answer else 0
        P = len(prompt.prefix_ids)
        if isinstance(slot, Tensor) and slot.numel() > 0:
            states = self._slot_states(slot)
            S = int(states.shape[0])
            ids = list(prompt.prefix_ids) + tail
            pos = list(range(P)) + list(range(P + S, P + S + len(tail)))
            return _Row(ids, pos, P, states, n_ans, P)
        text = [] if slot is None or isinstance(slot, Tensor) else [int(t) for t in slot]
        ids = list(prompt.prefix_ids) + text + tail
        return _Row(ids, list(range(len(ids))), len(ids), None, n_ans, P)

    def _forward_rows(self, rows: Sequence[_Row]) -> tuple[Tensor, Tensor]:
        """Lower layers, splice, upper layers on left-padded rows.

        Returns the upper layers' output (B, Tu, H) (before the final norm) and its validity (B, Tu).
        """
        B = len(rows)
        ids, low_valid = self._tensor([r.lower_ids for r in rows], self.pad_id, "left")
        Tl = ids.shape[1]
        low_pos = torch.zeros((B, Tl), dtype=torch.long)
        for b, r in enumerate(rows):
            if r.lower_pos:
                low_pos[b, Tl - len(r.lower_pos):] = torch.as_tensor(r.lower_pos)
        low_pos = low_pos.to(self.device)
        h = self._run(self._embed(ids), 0, self.split_layer, low_pos,
                      self._additive(self._causal_allowed(low_valid, Tl)))

        if all(r.states is None for r in rows):  # no splice: the upper rows are the lower rows
            up_h, up_valid, up_pos = h, low_valid, low_pos
        else:
            up_h, up_valid, up_pos = self._splice([h[b, Tl - len(r.lower_ids):] for b, r in enumerate(rows)], rows)
        out = self._run(up_h, self.split_layer, self.num_layers, up_pos,
                        self._additive(self._causal_allowed(up_valid, up_h.shape[1])))
        return out, up_valid

    def _splice(self, lower: Sequence[Tensor], rows: Sequence[_Row]) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's lower-layer output (n_low, H) with its slot states inserted, left-padded.

        Returns the upper layers' input (B, Tu, H), its validity (B, Tu) and positions (B, Tu).
        """
        B, Tu = len(rows), max(r.upper_len for r in rows)
        up_h = lower[0].new_zeros((B, Tu, lower[0].shape[-1]))
        up_valid = torch.zeros((B, Tu), dtype=torch.bool, device=self.device)
        up_pos = torch.zeros((B, Tu), dtype=torch.long, device=self.device)
        for b, (row_h, r) in enumerate(zip(lower, rows)):
            if r.states is not None:
                row_h = torch.cat([row_h[: r.splice_at], r.states, row_h[r.splice_at:]], dim=0)
            n = row_h.shape[0]
            up_h[b, Tu - n:] = row_h
            up_valid[b, Tu - n:] = True
            up_pos[b, Tu - n:] = torch.arange(n, device=self.device)
        return up_h, up_valid, up_pos

    def upper_answer_logprob(self, lower: Sequence[Tensor], rows: Sequence[_Row]) -> Tensor:
        """log P(answer) per row (B,) from each row's precomputed lower-layer output (n_low, H).

        The fine-tuning path with frozen lower layers (automr/llm/slot_finetune.py): the lower
        outputs of a row are computed once and reused, only the upper layers run (differentiably).
        Equals `answer_logprob` when `lower` is what the lower layers give for `rows`.
        """
        return self._answer_scores(self.upper_forward(lower, rows), rows, [r.answer_ids for r in rows])

    def upper_forward(self, lower: Sequence[Tensor], rows: Sequence[_Row]) -> Tensor:
        """The upper layers' output (B, Tu, H) (before the final norm) from each row's lower-layer output."""
        up_h, up_valid, up_pos = self._splice(lower, rows)
        mask = self._additive(self._causal_allowed(up_valid, up_h.shape[1]))
        return self._run(up_h, self.split_layer, self.num_layers, up_pos, mask)

    def answer_hidden(self, out: Tensor, rows: Sequence[_Row]) -> Tensor:
        """The states (N, H) that predict each answer token of left-padded rows, rows in order (N = answer tokens).

        Before the final norm: `_logits` (norm + LM head) maps them to logits."""
        Tu = out.shape[1]
        sel_b = [b for b, r in enumerate(rows) for _ in range(r.n_answer)]
        sel_t = [Tu - r.n_answer - 1 + k for r in rows for k in range(r.n_answer)]
        return out[torch.as_tensor(sel_b, dtype=torch.long, device=self.device),
                   torch.as_tensor(sel_t, dtype=torch.long, device=self.device)]

    def answer_states(self, rows: Sequence[_Row]) -> Tensor:
        """`answer_hidden` of `_forward_rows(rows)` (rows planned with their answers): the fine-tuning
        forward, differentiable, with the tokens every row begins with (the instruction: a third of an
        ml-100k prompt) run once for the batch instead of once per row.

        The shared tokens' keys and values are computed once (batch 1) and every row's own tokens attend
        to them (cascade.py's `prefixed_causal_attention` under autograd), right-padded after them; their
        gradient sums over the rows. Equal to the left-padded per-row forward up to float rounding.
        """
        C = _shared_length(rows) if len(rows) > 1 else 0
        if not C:
            out, _ = self._forward_rows(rows)
            return self.answer_hidden(out, rows)
        ids = torch.as_tensor([rows[0].lower_ids[:C]], device=self.device)
        pos = torch.as_tensor([rows[0].lower_pos[:C]], device=self.device)
        _, *common = self._pass(self._embed(ids), pos, 0, self.num_layers)  # keys, values: (1, kv, C, d) per layer
        out, _, _, (_, up_len) = self._prompt_pass(rows, C, common, capture=False)  # (B, Tu - C, H), right-padded
        return self._right_padded_answers(out, rows, up_len)

    def upper_answer_states(self, lower: Sequence[Tensor], rows: Sequence[_Row]) -> Tensor:
        """`answer_hidden` of `upper_forward(lower, rows)` (frozen lower layers, each row's lower output
        cached), with the rows' shared first tokens run once through the upper layers, as `answer_states`
        does through all of them: their lower outputs are equal, being the frozen layers' of equal tokens."""
        C = _shared_length(rows) if len(rows) > 1 else 0
        if not C:
            return self.answer_hidden(self.upper_forward(lower, rows), rows)
        L, N, dev = self.split_layer, self.num_layers, self.device
        pos = torch.as_tensor([rows[0].lower_pos[:C]], device=dev)
        _, *common = self._pass(lower[0][None, :C], pos, L, N)  # keys, values (1, kv, C, d) of the upper layers
        own = [x[C:] if r.states is None else torch.cat([x[C : r.splice_at], r.states, x[r.splice_at :]])
               for x, r in zip(lower, rows)]  # each row after the shared tokens, its slot spliced in
        h = torch.nn.utils.rnn.pad_sequence(own, batch_first=True)  # right-padded (B, Tu - C, H)
        pos = C + torch.arange(h.shape[1], device=dev)[None].expand(len(rows), -1)
        out, _, _ = self._pass(h, pos, L, N, (common[0], common[1]))
        return self._right_padded_answers(out, rows, [o.shape[0] for o in own])

    def _right_padded_answers(self, out: Tensor, rows: Sequence[_Row], lengths: Sequence[int]) -> Tensor:
        """The states (N, H) predicting each answer token, from right-padded rows of real `lengths`."""
        sel_b = [b for b, r in enumerate(rows) for _ in range(r.n_answer)]
        sel_t = [n - r.n_answer - 1 + k for r, n in zip(rows, lengths) for k in range(r.n_answer)]
        return out[torch.as_tensor(sel_b, dtype=torch.long, device=self.device),
                   torch.as_tensor(sel_t, dtype=torch.long, device=self.device)]

    def _answer_scores(self, out: Tensor, rows: Sequence[_Row], answers: Sequence[Sequence[int]]) -> Tensor:
        """Sum of log P(answer token) per left-padded row, computing logits only where needed."""
        owner = [b for b, r in enumerate(rows) for _ in range(r.n_answer)]
        targets = [int(ans[k]) for r, ans in zip(rows, answers) for k in range(r.n_answer)]
        scores = torch.zeros(len(rows), dtype=torch.float32, device=self.device)
        if not owner:
            return scores
        logp = self._logits(self.answer_hidden(out, rows)).float().log_softmax(-1)
        tok = logp.gather(1, torch.as_tensor(targets, device=self.device)[:, None])[:, 0]
        return scores.index_add(0, torch.as_tensor(owner, device=self.device), tok)

    def answer_logprob(self, prompts: Sequence[EncodedPrompt], slots: Sequence[Slot]) -> Tensor:
        """log P(answer | prefix, slot, marker) per prompt: (B,) float32.

        A slot is (S, H) layer-L states (spliced at L), token ids (text, run through every layer) or
        None / empty (plain BIGRec). Differentiable when grad is enabled (training with slots).
        """
        if len(prompts) != len(slots):
            raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
        if not prompts:
            return torch.zeros(0, device=self.device)
        rows = [self._plan(p, s, True) for p, s in zip(prompts, slots)]
        out, _ = self._forward_rows(rows)
        return self._answer_scores(out, rows, [p.answer_ids for p in prompts])

    # -- annotation kernel ------------------------------------------------------------------
    def _layers_pass(self, hidden: Tensor, pos: Tensor, start: int, end: int,
                     prefix: tuple[list[Tensor], list[Tensor]] | None,
                     capture: bool = False, rows: RowsKV | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Layers [start, end) under the `automr_cascade` attention (automr/llm/cascade.py).

        prefix None: hidden (B, P, H) holds prompts (right-padded: causal attention never reads the
        padding), attended causally; returns their per-layer keys and values (each (B, kv, P, d)).
        prefix (keys, values) per layer: hidden (C, t, H) holds right-padded blocks, each attending to
        that shared prefix and causally to itself (cascade attention: the prefix is read once for all
        blocks, never copied); returns no keys unless `capture` (decoding's prefill keeps them).
        rows (keys, values per layer (B, kv, P, d), valid (B, P)): each row of hidden attends to its own
        stored prefix instead (cascade.rows_prefixed_attention).
        """
        capture = capture or (prefix is None and rows is None)
        cos_sin = self.core.rotary_emb(hidden, pos)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for j, i in enumerate(range(start, end)):
            extra: dict = {}
            if prefix is not None:
                extra = {"automr_prefix_k": prefix[0][j], "automr_prefix_v": prefix[1][j]}
            if rows is not None:
                extra = {"automr_rows": (rows[0][j], rows[1][j], rows[2])}
            if capture:
                captured: list[Tensor] = []
                extra["automr_capture"] = captured
            out = self.core.layers[i](
                hidden, attention_mask=None, position_ids=pos, use_cache=False, position_embeddings=cos_sin,
                **{self._cache_kw: None}, **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out
            if capture:
                keys.append(captured[0])
                values.append(captured[1])
        return hidden, keys, values

    def _pass(self, hidden: Tensor, pos: Tensor, start: int, end: int,
              prefix: tuple[list[Tensor], list[Tensor]] | None = None,
              capture: bool = False, rows: RowsKV | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`_layers_pass` (compiled when SplitLM was made with compile=True) with the model's attention switched."""
        from automr.llm.cascade import cascade_attention

        with cascade_attention(self.lm.base_model.config):
            return self._kernel_pass(hidden, pos, start, end, prefix, capture, rows)

    @torch.no_grad()
    def score_candidates(self, prompt: EncodedPrompt, candidates: Sequence[Tensor], include_empty: bool = True,
                         chunk_size: int | None = None) -> Tensor:
        """log P(answer | slot = c) for every candidate (first entry: the empty slot if include_empty).

        Lower layers run on the prefix once, and on marker+answer once per distinct slot length
        (their positions depend on it); upper layers run on the prefix once; the candidate blocks
        [slot_c, marker, answer] run batched, `chunk_size` candidates per pass (default: about 2,048
        block tokens per pass on CPU, 16,384 on CUDA), each seeing the prefix and itself, positions
        starting at P. Equals `answer_logprob` per candidate.
        """
        lengths_all = [int(c.shape[0]) if c.numel() else 0 for c in candidates]
        if include_empty:
            lengths_all = [0] + lengths_all
        if not lengths_all:
            return torch.zeros(0)
        if not prompt.answer_ids:
            return torch.zeros(len(lengths_all))
        # Every host-to-device copy happens here, before any GPU work is queued: a blocking copy in
        # the middle would wait for the queue to drain and leave the GPU idle while Python catches up.
        states = self._candidate_states(candidates)  # (sum S, H) on the device
        P = len(prompt.prefix_ids)
        tail = list(prompt.marker_ids) + list(prompt.answer_ids)
        T, M, A = len(tail), len(prompt.marker_ids), len(prompt.answer_ids)
        L, N = self.split_layer, self.num_layers
        dev = self.device
        pre_ids = torch.as_tensor([prompt.prefix_ids], device=dev)
        tail_ids = torch.as_tensor(tail, device=dev)
        answer = torch.as_tensor(prompt.answer_ids, device=dev)
        lengths = sorted(set(lengths_all))
        S_max = lengths[-1]
        slot_len = torch.as_tensor(lengths_all, device=dev)  # (C,)
        start_of = slot_len.cumsum(0) - slot_len  # (C,) each candidate's first row in `states`
        which_len = torch.as_tensor([lengths.index(S) for S in lengths_all], device=dev)  # (C,) row of tail_low

        # Lower layers: prefix once (keys kept), then the tail once per distinct slot length.
        pre_pos = torch.arange(P, device=dev)[None]
        pre_low, *low_kv = self._pass(self._embed(pre_ids), pre_pos, 0, L)
        lens = torch.as_tensor(lengths, device=dev)
        tail_pos = P + lens[:, None] + torch.arange(T, device=dev)[None]  # (n_lengths, T)
        tails = self._embed(tail_ids)[None].expand(len(lengths), -1, -1).contiguous()
        tail_low = self._pass(tails, tail_pos, 0, L, tuple(low_kv))[0] if L > 0 else tails

        # Upper layers: prefix once (keys kept), then the candidate blocks [slot, marker, answer], batched.
        _, *up_kv = self._pass(pre_low, pre_pos, L, N)
        C = len(lengths_all)
        t = S_max + T
        if chunk_size is None:  # block tokens per pass (activations only: nothing is quadratic in the batch)
            chunk_size = max(1, (16384 if dev.type == "cuda" else 2048) // t)
        col = torch.arange(t, device=dev)  # (t,)
        ans_col = torch.arange(A, device=dev)
        scores = []
        for c0 in range(0, C, chunk_size):
            S = slot_len[c0:c0 + chunk_size]  # (n,)
            n = int(S.shape[0])
            x = self._blocks(states, start_of[c0:c0 + chunk_size], S, tail_low, which_len[c0:c0 + chunk_size], t)
            out = self._pass(x, P + col[None].expand(n, -1), L, N, tuple(up_kv))[0]  # (n, t, H)
            first = S + (M - 1)  # the last marker token predicts answer[0]
            rows = out[torch.arange(n, device=dev)[:, None], first[:, None] + ans_col[None]]  # (n, A, H)
            logp = self._logits(rows).float().log_softmax(-1)  # (n, A, V)
            scores.append(logp.gather(2, answer[None, :, None].expand(n, -1, 1))[..., 0].sum(1))
        return torch.cat(scores).cpu()

    def _blocks(self, states: Tensor, start: Tensor, S: Tensor, tail_low: Tensor, which_len: Tensor, t: int) -> Tensor:
        """Right-padded blocks [slot states, tail states, zeros] (n, t, H), gathered on the device.

        states (sum S, H): all slots; start/S (n,): each block's first row in `states` and slot length;
        tail_low (n_lengths, T, H): the marker+answer after layer L for each slot length; which_len (n,).
        """
        T = tail_low.shape[1]
        col = torch.arange(t, device=S.device)[None]  # (1, t)
        in_slot = col < S[:, None]  # (n, t)
        in_tail = (col >= S[:, None]) & (col < S[:, None] + T)
        x = torch.zeros((S.shape[0], t, self.hidden_size), device=S.device, dtype=self.dtype)
        if states.shape[0]:
            slot_idx = (start[:, None] + col).clamp(max=states.shape[0] - 1)
            x = torch.where(in_slot[..., None], states[slot_idx], x)
        tail_idx = (col - S[:, None]).clamp(0, T - 1)
        return torch.where(in_tail[..., None], tail_low[which_len[:, None], tail_idx], x)

    def _candidate_states(self, candidates: Sequence[Tensor]) -> Tensor:
        """All candidates' slot states concatenated (sum S, H), moved to the device in one copy."""
        parts = [c for c in candidates if c.numel()]
        for c in parts:
            if c.ndim != 2 or c.shape[1] != self.hidden_size:
                raise ValueError(f"a state slot must be (S, {self.hidden_size}); got {tuple(c.shape)}")
        if not parts:
            return torch.zeros((0, self.hidden_size), device=self.device, dtype=self.dtype)
        on_device = [c.to(self.dtype) for c in parts if c.device == self.device]
        if len(on_device) == len(parts):
            return torch.cat(on_device)
        return torch.cat([c.to(device="cpu", dtype=self.dtype) for c in parts]).to(self.device)

    @torch.no_grad()
    def score_candidates_naive(self, prompt: EncodedPrompt, candidates: Sequence[Tensor], include_empty: bool = True,
                               chunk_size: int | None = None) -> Tensor:
        """Same result as `score_candidates`, each candidate through the whole model separately (baseline)."""
        slots: list[Slot] = ([None] if include_empty else []) + list(candidates)
        return torch.cat([self.answer_logprob([prompt], [s]) for s in slots]).cpu()

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[EncodedPrompt], slots: Sequence[Slot], *, beams: int = 1,
                max_new_tokens: int = 16) -> tuple[SplitCache, Tensor]:
        """Run prefix + slot + marker (answers ignored) for a batch; return the cache (one row per prompt)
        and the next-token logits (B, V) float32.

        The tokens every prompt begins with (the instruction) run once for the batch; the rest of each
        prompt runs right-padded after them by cascade attention (`_prompt_pass`). The cache holds up to
        `beams` rows per prompt; `max_new_tokens` sizes its buffers (they grow past it).
        """
        if len(prompts) != len(slots):
            raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
        plans = [self._plan(p, s, False) for p, s in zip(prompts, slots)]
        C = _shared_length(plans)
        common = self._shared_prompt_kv(plans[0], C) if C else None
        out, keys, values, (low_len, up_len) = self._prompt_pass(plans, C, common)
        B = len(plans)
        last = out[torch.arange(B, device=self.device), torch.as_tensor(up_len, device=self.device) - 1]
        if common is not None:  # each sample's prompt whole: shared tokens + its own (one copy per sample, not per beam)
            keys = [torch.cat([c.expand(B, -1, -1, -1), k], dim=2) for c, k in zip(common[0], keys)]
            values = [torch.cat([c.expand(B, -1, -1, -1), v], dim=2) for c, v in zip(common[1], values)]
        L = self.split_layer
        width = {int(i >= L): k.shape[2] for i, k in enumerate(keys)}  # prompt columns of the lower / upper layers
        valid = [self._valid_columns([C + n for n in lens], width.get(g, 0)) for g, lens in enumerate((low_len, up_len))]
        next_pos = torch.as_tensor([r.upper_len for r in plans], dtype=torch.long, device=self.device)
        cache = SplitCache(keys, values, valid, [int(i >= L) for i in range(self.num_layers)], next_pos,
                           beams=beams, max_new_tokens=max_new_tokens)
        return cache, self._logits(last).float()

    def _shared_prompt_kv(self, plan: _Row, C: int) -> list[list[Tensor]]:
        """[keys, values] per layer (1, kv, C, d) of the C tokens every prompt of the batch begins with:
        what they share with the last such run is read back from `prefix_cache`, the rest computed
        attending to it (prefix_cache.py says why that is exact)."""
        tokens = list(zip(plan.lower_ids[:C], plan.lower_pos[:C]))
        m, head = self.prefix_cache.lookup(tokens)  # prefill runs under no_grad: nothing to backpropagate
        if m == C and head is not None:
            return [head[0], head[1]]
        pos = torch.as_tensor([plan.lower_pos[m:C]], device=self.device)
        entry = self.lower_stash.get(plan.lower_ids[: plan.prompt_len], m) if C <= plan.prompt_len else None
        if entry is not None:  # the lower layers ran for the query state: only the upper ones run here
            L = self.split_layer
            states, low_k, low_v = entry.after(m)
            upper_head = None if head is None else (head[0][L:], head[1][L:])
            _, up_k, up_v = self._pass(states[None, : C - m], pos, L, self.num_layers, upper_head, capture=True)
            keys = [k[:, :, : C - m] for k in low_k] + up_k
            values = [v[:, :, : C - m] for v in low_v] + up_v
            self.lower_stash.reused_tokens += C - m
        else:
            ids = torch.as_tensor([plan.lower_ids[m:C]], device=self.device)
            _, keys, values = self._pass(self._embed(ids), pos, 0, self.num_layers, head, capture=True)
        if head is not None:
            keys = [torch.cat([h, k], dim=2) for h, k in zip(head[0], keys)]
            values = [torch.cat([h, v], dim=2) for h, v in zip(head[1], values)]
        self.prefix_cache.store(tokens, keys, values, computed=C - m)
        return [keys, values]

    def _valid_columns(self, lengths: Tensor | Sequence[int], width: int) -> Tensor:
        """(B, width) bool: True on each row's first `lengths[b]` columns (right padding after)."""
        n = torch.as_tensor(lengths, device=self.device)[:, None]
        return torch.arange(width, device=self.device)[None] < n

    def _prompt_pass(self, plans: Sequence[_Row], C: int, common: list[list[Tensor]] | None, capture: bool = True
                     ) -> tuple[Tensor, list[Tensor], list[Tensor], tuple[list[int], list[int]]]:
        """Each prompt after its first C tokens (whose per-layer keys/values are `common`), right-padded.

        Lower layers on the rows without their slot states, the splice, upper layers with them. Returns
        the upper layers' output (B, Tu, H) (before the final norm), the rows' keys and values per layer
        (B, kv, T_i, d; none unless `capture`), and the real lengths of the rows in the lower and in the
        upper layers (after the C shared tokens).
        """
        L, N, dev = self.split_layer, self.num_layers, self.device
        ids, _ = self._tensor([r.lower_ids[C:] for r in plans], self.pad_id, "right")
        pos, _ = self._tensor([r.lower_pos[C:] for r in plans], 0, "right")
        low_len = [len(r.lower_ids) - C for r in plans]

        def part(start: int, end: int) -> tuple[list[Tensor], list[Tensor]] | None:
            return None if common is None else (common[0][start:end], common[1][start:end])

        stashed = None if torch.is_grad_enabled() else self._lower_from_stash(plans, C, common)
        if stashed is not None:
            h, low_k, low_v = stashed
        else:
            h, low_k, low_v = self._pass(self._embed(ids), pos, 0, L, part(0, L), capture=capture)
        if any(r.states is not None for r in plans):
            rows = [h[b, :n] if r.states is None else
                    torch.cat([h[b, : r.splice_at - C], r.states, h[b, r.splice_at - C : n]])
                    for b, (r, n) in enumerate(zip(plans, low_len))]
            h = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # right-padded (B, Tu, H)
            pos = C + torch.arange(h.shape[1], device=dev)[None].expand(len(plans), -1)
        up_len = [r.upper_len - C for r in plans]
        out, up_k, up_v = self._pass(h, pos, L, N, part(L, N), capture=capture)
        return out, low_k + up_k, low_v + up_v, (low_len, up_len)

    def _lower_from_stash(self, plans: Sequence[_Row], C: int, common: list[list[Tensor]] | None
                          ) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """`_prompt_pass`'s lower pass with each prompt read back from `lower_stash` (its query state's
        pass computed it): only what follows the prompt (the marker) runs, attending to its row's
        stored keys. The same (B, T, H) states after C, right-padded, and per-layer keys and values
        (B, kv, T, d); None unless every row's prompt after C is stashed."""
        ends = [max(r.prompt_len, C) for r in plans]  # row b: read back up to ends[b], computed after
        own = [self._stashed_after(r, C, common) for r in plans]
        if any(o is None for o in own) or all(len(r.lower_ids) <= e for r, e in zip(plans, ends)):
            return None
        states, keys, values = zip(*own)  # per row: (n_b, H); per lower layer (kv, n_b, d)
        L = self.split_layer
        shared = ([[k[0]] for k in common[0][:L]], [[v[0]] for v in common[1][:L]]) if common else ([[]] * L, [[]] * L)
        # What each row's tail attends to in layer i: the C shared tokens, then its own prompt's.
        seen_k = [_join_rows([shared[0][i] + [k[i]] for k in keys], dim=1) for i in range(L)]  # (B, kv, C + n, d)
        seen_v = [_join_rows([shared[1][i] + [v[i]] for v in values], dim=1) for i in range(L)]
        valid = self._valid_columns([C + s.shape[0] for s in states], seen_k[0].shape[2]) if L else None
        ids, _ = self._tensor([r.lower_ids[e:] for r, e in zip(plans, ends)], self.pad_id, "right")  # (B, t)
        pos, _ = self._tensor([r.lower_pos[e:] for r, e in zip(plans, ends)], 0, "right")
        h_tail, tk, tv = self._pass(self._embed(ids), pos, 0, L, None, capture=True, rows=(seen_k, seen_v, valid))
        self.lower_stash.reused_tokens += sum(s.shape[0] for s in states)
        t = [len(r.lower_ids) - e for r, e in zip(plans, ends)]  # each row's tail length
        h = _join_rows([[s, h_tail[b, : t[b]]] for b, s in enumerate(states)], dim=0)  # (B, T, H)
        low_k = [_join_rows([[k[i], tk[i][b, :, : t[b]]] for b, k in enumerate(keys)], dim=1) for i in range(L)]
        low_v = [_join_rows([[v[i], tv[i][b, :, : t[b]]] for b, v in enumerate(values)], dim=1) for i in range(L)]
        return h, low_k, low_v

    def _stashed_after(self, row: _Row, C: int, common: list[list[Tensor]] | None
                       ) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """The row's prompt tokens after the C shared ones, from `lower_stash`: states (n, H) and keys and
        values per lower layer (kv, n, d); n = 0 where the shared tokens cover the prompt; None if not stashed."""
        if row.prompt_len <= C and common is not None:
            L = self.split_layer
            empty = torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
            return empty, [k[0, :, :0] for k in common[0][:L]], [v[0, :, :0] for v in common[1][:L]]
        entry = self.lower_stash.get(row.lower_ids[: row.prompt_len], C)
        if entry is None:
            return None
        states, keys, values = entry.after(C)
        return states, [k[0] for k in keys], [v[0] for v in values]

    @torch.no_grad()
    def step(self, token_ids: Tensor, cache: SplitCache) -> Tensor:
        """Feed one token per row (R,) through every layer (the cache holds the slot from layer L up);
        updates `cache`. Returns the next-token logits (R, V) as float32."""
        from automr.llm.cascade import cascade_attention

        tok = token_ids.to(self.device).view(-1, 1)
        if tok.shape[0] != cache.batch_size:
            raise ValueError(f"{tok.shape[0]} tokens for a cache of {cache.batch_size} rows; use cache.reorder first")
        cache.make_room()
        with cascade_attention(self.lm.base_model.config):
            h = self._run(self._embed(tok), 0, self.num_layers, cache.positions(), None, automr_decode=cache)
        cache.t += 1
        return self._logits(h[:, -1]).float()


def _join_rows(parts: Sequence[Sequence[Tensor]], dim: int) -> Tensor:
    """Each row's parts joined along token axis `dim`, rows right-padded with zeros and stacked:
    parts[b] of shape (..., n, ...) -> (B, ..., max_b sum n, ...)."""
    rows = [torch.cat(list(p), dim=dim) for p in parts]
    T = max(r.shape[dim] for r in rows)
    out = rows[0].new_zeros((len(rows), *rows[0].shape[:dim], T, *rows[0].shape[dim + 1:]))
    for b, r in enumerate(rows):
        out[b].narrow(dim, 0, r.shape[dim]).copy_(r)
    return out


def _shared_length(plans: Sequence[_Row]) -> int:
    """Tokens (ids and positions) every row begins with, before any state slot, leaving each row its
    own tokens from the one that predicts its first answer token (its last one without an answer):
    rows whose answers begin alike (one prompt, many titles) must still get every answer state."""
    # os.path.commonprefix compares any sequences element by element, not only strings.
    shared = len(os.path.commonprefix([list(zip(r.lower_ids, r.lower_pos)) for r in plans]))
    limits = [len(r.lower_ids) - r.n_answer - 1 for r in plans] + [r.splice_at for r in plans if r.states is not None]
    return max(0, min([shared, *limits]))
