"""Cascade attention: blocks attending to a shared prefix equal ordinary attention over [prefix, block]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from automr.llm import cascade
from automr.llm.cascade import ATTENTION_NAME, attention_with_lse, cascade_attention, cascade_forward


def _reference(q, k, v, kp, vp, scale):
    """Each block: softmax over [prefix, its own keys (causal)] by plain SDPA on copied keys."""
    C, h, t, d = q.shape
    g = h // k.shape[1]
    keys = torch.cat([kp.expand(C, -1, -1, -1), k], dim=2).repeat_interleave(g, dim=1)
    vals = torch.cat([vp.expand(C, -1, -1, -1), v], dim=2).repeat_interleave(g, dim=1)
    P = kp.shape[2]
    allowed = torch.ones(t, P + t, dtype=torch.bool).tril(P)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_cascade_equals_attention_over_the_copied_prefix(heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    C, t, P, d = 5, 7, 11, 16
    q = torch.randn(C, heads, t, d, generator=g)
    k, v = (torch.randn(C, kv_heads, t, d, generator=g) for _ in range(2))
    kp, vp = (torch.randn(1, kv_heads, P, d, generator=g) for _ in range(2))
    out = cascade_forward(q, k, v, kp, vp, d ** -0.5)
    torch.testing.assert_close(out, _reference(q, k, v, kp, vp, d ** -0.5), rtol=1e-5, atol=1e-5)


def test_fused_and_math_log_sum_exp_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    for causal in (False, True):
        fused = attention_with_lse(q, k, v, causal, 0.3)
        math = cascade._math_attention_lse(q, k, v, causal, 0.3)
        torch.testing.assert_close(fused[0], math[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[1], math[1], rtol=1e-5, atol=1e-5)
        s = (q @ k.transpose(-1, -2)) * 0.3
        if causal:
            s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(math[1], torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_the_model_attention_is_restored_even_after_an_error() -> None:
    class Cfg:
        _attn_implementation = "sdpa"

    cfg = Cfg()
    with pytest.raises(ValueError):
        with cascade_attention(cfg):
            assert cfg._attn_implementation == ATTENTION_NAME
            raise ValueError("boom")
    assert cfg._attn_implementation == "sdpa"


@pytest.mark.slow
def test_compiled_kernel_gives_the_eager_scores() -> None:
    """SplitLM(compile=True) (what `annotate --compile` uses on a GPU) scores exactly as the eager kernel."""
    from automr.llm.loading import build_tiny_lm
    from automr.llm.prompts import EncodedPrompt
    from automr.llm.split import SplitLM

    lm = build_tiny_lm([f"title {i} of a thing" for i in range(50)], hidden_size=64, num_layers=4)
    g = torch.Generator().manual_seed(0)
    V = lm.model.config.vocab_size
    eager, compiled = SplitLM(lm), SplitLM(lm, compile=True)
    for n_cands, prefix in [(7, 30), (12, 41)]:  # a second shape must not need a new graph to be right
        ids = torch.randint(0, V, (prefix + 3 + 5,), generator=g).tolist()
        prompt = EncodedPrompt(ids[:prefix], ids[prefix:prefix + 3], ids[prefix + 3:])
        cands = [torch.randn(2 + i % 3, 64, generator=g) for i in range(n_cands)]
        torch.testing.assert_close(compiled.score_candidates(prompt, cands), eager.score_candidates(prompt, cands),
                                   rtol=1e-5, atol=1e-5)
