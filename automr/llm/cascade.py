"""Cascade attention: many short blocks attending to one shared prefix, without copying it.

Annotation scores every memory candidate [slot, marker, answer] after the same prompt prefix. Each
block's queries attend to the prefix (shared by all blocks) and causally to their own block. Packing
the blocks into one row with a block-diagonal mask wastes work quadratic in the packed length, and
batching them with the prefix KV copied per block costs memory traffic (the 60 ms / 53 GiB anchor of
issue 4). Cascade attention (Hydragen; FlashInfer's cascade/merge_state) splits the softmax instead:

  * part A: every block's queries against the prefix, as ONE attention call with no mask (the
    prefix K/V are read once for all blocks);
  * part B: each block against itself, causal (batched, tiny);
  * merge: the two partial softmaxes combine exactly through their log-sum-exps.

It plugs into transformers' attention interface: `cascade_attention()` switches the model's layers to
`automr_cascade` for one pass; the attention function reads the shared prefix K/V of its layer from
the `automr_prefix_k` / `automr_prefix_v` keywords that SplitLM passes down through the decoder layers,
or, for a decoding step, leaves attention to the cache passed as `automr_decode` (split.SplitCache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

ATTENTION_NAME = "automr_cascade"
_fused_ok: dict[str, bool] = {}


def _math_attention_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Reference attention returning (out (B, h, L, d) in q's dtype, lse (B, h, L) float32)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, h, L, S)
    if causal:
        L, S = s.shape[-2:]
        allowed = torch.ones(L, S, dtype=torch.bool, device=s.device).tril(S - L)
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ v.float()
    return out.to(q.dtype), lse


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v with its log-sum-exp, by the fused flash kernel where torch has one.

    q (B, h, L, d), k/v (B, h, S, d) with equal head counts -> (out (B, h, L, d), lse (B, h, L) float32).
    The flash kernels are torch's private ops (`_scaled_dot_product_flash_attention[_for_cpu]`), the
    only SDPA entry points that return the log-sum-exp; any failure falls back to the math version.
    """
    device = q.device.type
    if _fused_ok.get(device, True):
        try:
            if device == "cuda":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
            elif device == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
            else:
                raise NotImplementedError(device)
            return out, lse[..., : q.shape[-2]].float()
        except (RuntimeError, NotImplementedError, AttributeError):
            _fused_ok[device] = False
    return _math_attention_lse(q, k, v, causal, scale)


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Exact softmax over the union of two key sets from the two partial results (FlashInfer merge_state)."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse)[..., None]
    w_b = torch.exp(lse_b - lse)[..., None]
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)


def cascade_forward(q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, scale: float) -> Tensor:
    """Blocks attending to a shared prefix and causally to themselves.

    q (C, h, t, d); k, v (C, kv, t, d): each block's own keys; k_prefix, v_prefix (1, kv, P, d).
    Returns (C, h, t, d). Query heads sharing a KV head (GQA) are folded into the sequence axis of
    part A, so the prefix is read as is, never repeated per head or per block.
    """
    C, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    qa = q.view(C, kv, g, t, d).permute(1, 2, 0, 3, 4).reshape(1, kv, g * C * t, d)
    out_a, lse_a = attention_with_lse(qa, k_prefix, v_prefix, False, scale)
    out_a = out_a.view(kv, g, C, t, d).permute(2, 0, 1, 3, 4).reshape(C, h, t, d)
    lse_a = lse_a.view(kv, g, C, t).permute(2, 0, 1, 3).reshape(C, h, t)
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out_b, lse_b = attention_with_lse(q, k, v, True, scale)
    return merge_attention(out_a, lse_a, out_b, lse_b)


def prefixed_causal_attention(q: Tensor, k: Tensor, v: Tensor, k_prefix: Tensor, v_prefix: Tensor, scale: float) -> Tensor:
    """`cascade_forward`'s result, differentiable in every input: the fine-tuning path.

    The fused kernels of `attention_with_lse` give the log-sum-exp no gradient, so the two-part merge
    would train on a wrong gradient (measured: 99% of a LoRA gradient's entries off, some by 260x). Here
    the shared prefix's K/V (1, kv, P, d) are joined to each block's (expanded, then copied by the cat:
    P x kv x d per block, small beside the projections the shared prefix saves) and one masked
    attention runs. Shapes as in `cascade_forward`.
    """
    C, P = q.shape[0], k_prefix.shape[2]
    every = torch.ones(C, P, dtype=torch.bool, device=q.device)  # each block sees the whole prefix
    return rows_prefixed_attention(q, k, v, k_prefix.expand(C, -1, -1, -1), v_prefix.expand(C, -1, -1, -1), every, scale)


def rows_prefixed_attention(q: Tensor, k: Tensor, v: Tensor, k_rows: Tensor, v_rows: Tensor, rows_valid: Tensor,
                            scale: float) -> Tensor:
    """Blocks attending to a prefix of their own row (each row its own, right-padded) and causally to themselves.

    The prefill of prompts whose lower-layer keys the query state's pass already computed (split.py,
    `LowerStash`): only each prompt's last few tokens run, attending to their row's stored keys. One
    masked attention over [row prefix, block]: the blocks are a few tokens, so the copy the cat makes is small.
    q (B, h, t, d); k, v (B, kv, t, d); k_rows, v_rows (B, kv, P, d); rows_valid (B, P) bool. Returns (B, h, t, d).
    """
    B, h, t, _ = q.shape
    P = k_rows.shape[2]
    keys = torch.cat([k_rows, k], dim=2)  # (B, kv, P + t, d)
    values = torch.cat([v_rows, v], dim=2)
    g = h // keys.shape[1]
    if g > 1:
        keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat([rows_valid[:, None, :].expand(B, t, P), causal[None].expand(B, t, t)], dim=2)  # (B, t, P + t)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None], scale=scale)


def _automr_cascade(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                    scaling: float | None = None, dropout: float = 0.0, automr_prefix_k: Tensor | None = None,
                    automr_prefix_v: Tensor | None = None, automr_capture: list | None = None,
                    automr_decode: Any = None, automr_rows: tuple[Tensor, Tensor, Tensor] | None = None,
                    **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention-interface function: (C, h, t, d) queries -> (C, t, h, d) output.

    With a prefix (automr_prefix_k/v, this layer's shared K/V): cascade attention. Without: plain
    causal self-attention of unpadded or right-padded rows (the prompt-prefix pass). `automr_capture`, a list, receives
    this layer's keys and values, so the prefix pass needs no KV cache object. Everything arrives as
    keywords, not looked up by layer index, so one compiled graph serves every layer. `automr_decode`, a
    split.SplitCache: one decoding step, answered by the cache's `attend` (each prompt stored once per
    sample, read by all its beams). `automr_rows` (keys, values, valid): each row's own stored prefix
    (`rows_prefixed_attention`).
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if automr_decode is not None:
        return automr_decode.attend(module.layer_idx, query, key, value, scale).transpose(1, 2), None
    if automr_capture is not None:
        automr_capture.extend([key, value])
    if automr_rows is not None:
        out = rows_prefixed_attention(query, key, value, *automr_rows, scale)
    elif automr_prefix_k is None or automr_prefix_v is None:
        g = query.shape[1] // key.shape[1]
        if g > 1:
            key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    elif torch.is_grad_enabled() and (query.requires_grad or automr_prefix_k.requires_grad):
        out = prefixed_causal_attention(query, key, value, automr_prefix_k, automr_prefix_v, scale)
    else:
        out = cascade_forward(query, key, value, automr_prefix_k, automr_prefix_v, scale)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _automr_cascade)


@contextlib.contextmanager
def cascade_attention(config: Any) -> Iterator[None]:
    """Within the block, the model whose `config` this is runs its attention as `automr_cascade`."""
    _register()
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
