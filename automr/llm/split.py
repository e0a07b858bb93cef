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

Caches follow the decoder layers' protocol `cache.update(k, v, layer_idx) -> (k_all, v_all)`, with
key/value tensors shaped (B, kv_heads, T, head_dim).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from automr.errors import UserError
from automr.llm.loading import LM
from automr.llm.prompts import EncodedPrompt

Slot = Tensor | Sequence[int] | None


# -- caches ----------------------------------------------------------------------------------
class KVStore:
    """Per-layer key/value tensors of the rows being decoded; `update` appends along the sequence."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        old_k = self.keys.get(layer_idx)
        if old_k is not None:
            key = torch.cat([old_k, key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx] = key
        self.values[layer_idx] = value
        return key, value

    def select(self, index: Tensor) -> "KVStore":
        out = KVStore()
        out.keys = {i: t.index_select(0, index) for i, t in self.keys.items()}
        out.values = {i: t.index_select(0, index) for i, t in self.values.items()}
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        t = self.keys.get(layer_idx)
        return 0 if t is None else int(t.shape[-2])


@dataclass
class SplitCache:
    """Lower- and upper-layer KV caches of a batch being decoded, with per-row bookkeeping.

    The lower cache of a row holds no slot positions (the slot exists only from layer L up); the
    upper cache does. Rows are left-padded; `*_valid` mark real columns. `next_pos` is the
    position id of each row's next token (after P + S + marker + generated tokens).
    """

    lower: KVStore
    upper: KVStore
    lower_valid: Tensor  # (B, T_lower) bool
    upper_valid: Tensor  # (B, T_upper) bool
    next_pos: Tensor  # (B,) long

    @property
    def batch_size(self) -> int:
        return int(self.next_pos.shape[0])

    def select(self, index: Tensor) -> "SplitCache":
        """Rows `index` of this cache (reorder, drop or repeat rows: beam search)."""
        index = index.to(self.next_pos.device)
        return SplitCache(
            self.lower.select(index),
            self.upper.select(index),
            self.lower_valid.index_select(0, index),
            self.upper_valid.index_select(0, index),
            self.next_pos.index_select(0, index),
        )


@dataclass
class _Row:
    """One sequence's plan: what the lower layers see, and where the slot states go at layer L."""

    lower_ids: list[int]
    lower_pos: list[int]
    splice_at: int  # index in the lower sequence before which `states` are inserted
    states: Tensor | None  # (S, H) or None
    n_answer: int  # answer tokens at the end of the upper sequence (to score)

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

    def _run(self, hidden: Tensor, start: int, end: int, pos: Tensor, mask: Tensor, cache: KVStore | None) -> Tensor:
        """Decoder layers [start, end) on hidden (B, T, H) at positions pos (B, T) under mask (B, 1, T, K)."""
        if start >= end:
            return hidden
        cos_sin = self.core.rotary_emb(hidden, pos)
        for i in range(start, end):
            out = self.core.layers[i](
                hidden,
                attention_mask=mask,
                position_ids=pos,
                use_cache=cache is not None,
                position_embeddings=cos_sin,
                **{self._cache_kw: cache},
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
        return self._run(self._embed(input_ids), 0, self.split_layer, position_ids.to(self.device), mask, None)

    def upper(self, hidden: Tensor, position_ids: Tensor, mask4d: Tensor) -> Tensor:
        """Upper layers + final norm + lm_head: hidden (B, T, H) -> logits (B, T, V).

        mask4d is additive (0 = attend), shaped (B, 1, T, T); see `causal_mask`.
        """
        h = self._run(hidden, self.split_layer, self.num_layers, position_ids.to(self.device), mask4d, None)
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
        h = self._run(self._embed(ids), 0, layer, pos, mask, None)
        return h, [len(p) for p in prompts]

    def last_token_states(self, prompts: Sequence[Sequence[int]], layer: int | None = None) -> Tensor:
        """State after `layer` layers (default L) at each prompt's last token: (B, H) (query z_t, key z_m)."""
        h, lens = self.hidden_states(prompts, layer)
        idx = torch.as_tensor([n - 1 for n in lens], device=h.device)
        return h[torch.arange(len(lens), device=h.device), idx]

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
            return _Row(ids, pos, P, states, n_ans)
        text = [] if slot is None or isinstance(slot, Tensor) else [int(t) for t in slot]
        ids = list(prompt.prefix_ids) + text + tail
        return _Row(ids, list(range(len(ids))), len(ids), None, n_ans)

    def _forward_rows(self, rows: Sequence[_Row], *, cache: bool) -> tuple[Tensor, Tensor, SplitCache | None]:
        """Lower layers, splice, upper layers on left-padded rows.

        Returns the upper layers' output (B, Tu, H) (before the final norm), its validity
        (B, Tu) and, when cache=True, the KV caches for decoding.
        """
        B = len(rows)
        ids, low_valid = self._tensor([r.lower_ids for r in rows], self.pad_id, "left")
        Tl = ids.shape[1]
        low_pos = torch.zeros((B, Tl), dtype=torch.long)
        for b, r in enumerate(rows):
            if r.lower_pos:
                low_pos[b, Tl - len(r.lower_pos):] = torch.as_tensor(r.lower_pos)
        low_pos = low_pos.to(self.device)
        lower_kv = KVStore() if cache else None
        h = self._run(self._embed(ids), 0, self.split_layer, low_pos,
                      self._additive(self._causal_allowed(low_valid, Tl)), lower_kv)

        if all(r.states is None for r in rows):  # no splice: the upper rows are the lower rows
            up_h, up_valid, up_pos = h, low_valid, low_pos
        else:
            up_h, up_valid, up_pos = self._splice([h[b, Tl - len(r.lower_ids):] for b, r in enumerate(rows)], rows)
        upper_kv = KVStore() if cache else None
        out = self._run(up_h, self.split_layer, self.num_layers, up_pos,
                        self._additive(self._causal_allowed(up_valid, up_h.shape[1])), upper_kv)
        sc = None
        if cache:
            if len(lower_kv.keys) != self.split_layer or len(upper_kv.keys) != self.num_layers - self.split_layer:
                raise RuntimeError("the decoder layers did not fill the KV cache (unsupported transformers version?)")
            next_pos = torch.as_tensor([r.upper_len for r in rows], dtype=torch.long, device=self.device)
            sc = SplitCache(lower_kv, upper_kv, low_valid, up_valid, next_pos)
        return out, up_valid, sc

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
        up_h, up_valid, up_pos = self._splice(lower, rows)
        mask = self._additive(self._causal_allowed(up_valid, up_h.shape[1]))
        out = self._run(up_h, self.split_layer, self.num_layers, up_pos, mask, None)
        return self._answer_scores(out, rows, [r.answer_ids for r in rows])

    def _answer_scores(self, out: Tensor, rows: Sequence[_Row], answers: Sequence[Sequence[int]]) -> Tensor:
        """Sum of log P(answer token) per left-padded row, computing logits only where needed."""
        Tu = out.shape[1]
        sel_b, sel_t, targets, owner = [], [], [], []
        for b, (r, ans) in enumerate(zip(rows, answers)):
            A = r.n_answer
            for k in range(A):
                sel_b.append(b)
                sel_t.append(Tu - A - 1 + k)
                targets.append(int(ans[k]))
                owner.append(b)
        scores = torch.zeros(len(rows), dtype=torch.float32, device=self.device)
        if not sel_b:
            return scores
        h = out[torch.as_tensor(sel_b, device=self.device), torch.as_tensor(sel_t, device=self.device)]
        logp = self._logits(h).float().log_softmax(-1)
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
        out, _, _ = self._forward_rows(rows, cache=False)
        return self._answer_scores(out, rows, [p.answer_ids for p in prompts])

    # -- annotation kernel ------------------------------------------------------------------
    def _layers_pass(self, hidden: Tensor, pos: Tensor, start: int, end: int,
                     prefix: tuple[list[Tensor], list[Tensor]] | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Layers [start, end) under the `automr_cascade` attention (automr/llm/cascade.py).

        prefix None: hidden (1, P, H) is one unpadded prompt, attended causally; returns its per-layer
        keys and values (each (1, kv, P, d)). prefix (keys, values) per layer: hidden (C, t, H) holds
        right-padded blocks, each attending to that shared prefix and causally to itself (cascade
        attention: the prefix is read once for all blocks, never copied); returns no keys.
        """
        cos_sin = self.core.rotary_emb(hidden, pos)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for j, i in enumerate(range(start, end)):
            if prefix is None:
                captured: list[Tensor] = []
                extra: dict = {"automr_capture": captured}
            else:
                extra = {"automr_prefix_k": prefix[0][j], "automr_prefix_v": prefix[1][j]}
            out = self.core.layers[i](
                hidden, attention_mask=None, position_ids=pos, use_cache=False, position_embeddings=cos_sin,
                **{self._cache_kw: None}, **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out
            if prefix is None:
                keys.append(captured[0])
                values.append(captured[1])
        return hidden, keys, values

    def _pass(self, hidden: Tensor, pos: Tensor, start: int, end: int,
              prefix: tuple[list[Tensor], list[Tensor]] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """`_layers_pass` (compiled when SplitLM was made with compile=True) with the model's attention switched."""
        from automr.llm.cascade import cascade_attention

        with cascade_attention(self.lm.base_model.config):
            return self._kernel_pass(hidden, pos, start, end, prefix)

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
    def prefill(self, prompts: Sequence[EncodedPrompt], slots: Sequence[Slot]) -> tuple[SplitCache, Tensor]:
        """Run prefix + slot + marker (answers ignored) for a batch; return the cache and next-token logits (B, V)."""
        if len(prompts) != len(slots):
            raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
        rows = [self._plan(p, s, False) for p, s in zip(prompts, slots)]
        out, _, cache = self._forward_rows(rows, cache=True)
        return cache, self._logits(out[:, -1]).float()

    @torch.no_grad()
    def step(self, token_ids: Tensor, cache: SplitCache) -> Tensor:
        """Feed one token per row (B,) through lower (no slot) and upper (with slot) layers; updates `cache`.

        Returns the next-token logits (B, V) as float32.
        """
        tok = token_ids.to(self.device).view(-1, 1)
        B = tok.shape[0]
        if B != cache.batch_size:
            raise ValueError(f"{B} tokens for a cache of {cache.batch_size} rows; use cache.select first")
        pos = cache.next_pos[:, None]
        one = torch.ones((B, 1), dtype=torch.bool, device=self.device)
        cache.lower_valid = torch.cat([cache.lower_valid, one], dim=1)
        cache.upper_valid = torch.cat([cache.upper_valid, one], dim=1)
        h = self._run(self._embed(tok), 0, self.split_layer, pos, self._additive(cache.lower_valid[:, None, :]),
                      cache.lower)
        h = self._run(h, self.split_layer, self.num_layers, pos, self._additive(cache.upper_valid[:, None, :]),
                      cache.upper)
        cache.next_pos = cache.next_pos + 1
        return self._logits(h[:, -1]).float()
