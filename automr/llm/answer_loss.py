"""The answer loss of fine-tuning: over the whole vocabulary, or over the catalogue's title prefix tree.

Why `trie` exists (issue 10): with the usual cross-entropy (`full`) the model is trained to spend
its probability on every token, including text that is no item, while constrained decoding only
ever compares the tokens the title trie allows. The `trie` loss normalises each answer token's
probability over the tokens the trie allows after the answer's prefix (the same TitleTrie that
constrained decoding uses, automr/llm/decoding.py):

    loss = -sum_t [ logit(y_t) - logsumexp_{v allowed at t} logit(v) ]

so the model learns to choose among real items. Positions where the trie allows one token only
(most tokens after a title's first few) contribute exactly 0 and are skipped: the LM head then
runs only on the branching positions, which makes the trie loss cheaper than the full one.

Both losses are sums over answer tokens; the fine-tuning loop divides by the answer tokens of a
step (forced tokens count in the denominator), so per-token figures of the two stay comparable.

With a `TriePrior` (automr/llm/trie_prior.py) the trie loss scores logit + prior at every branching
position: the model is trained as the residual of a fixed prior (the catalogue's popularity), so it
starts where the prior is and has to learn only what the history adds. Decoding must add the same
prior (`popularity_prior` of the generative methods) to score what was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.title_trie import TitleTrie
    from automr.llm.trie_prior import TriePrior

Head = Callable[[Tensor], Tensor]  # answer-position hidden states (N, H) -> logits (N, V)


class AnswerLoss:
    """Summed answer-token NLL: `full` (no trie) or renormalised over `trie`'s allowed tokens."""

    def __init__(self, trie: TitleTrie | None = None, prior: TriePrior | None = None) -> None:
        if prior is not None and trie is None:
            raise ValueError("a prior over the title trie needs the trie loss")
        self.trie, self.prior = trie, prior
        self._branching: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        self._bias: dict[tuple[int, ...], list[Tensor]] = {}  # the prior's terms at each branching position

    @property
    def kind(self) -> str:
        return "full" if self.trie is None else "trie"

    def branching(self, answer: Sequence[int]) -> list[tuple[int, Tensor]]:
        """(position, allowed token ids) of every answer position where the trie allows more than one token.

        An answer the trie does not hold (a title outside the catalogue) is a programming error: the
        trie is built from the same titles and the same `PromptBuilder.answer_ids` as the answers.
        """
        key = tuple(int(t) for t in answer)
        got = self._branching.get(key)
        if got is not None:
            return got
        assert self.trie is not None
        out: list[tuple[int, Tensor]] = []
        bias: list[Tensor] = []
        node = 0
        for k, tok in enumerate(key):
            allowed = self.trie.allowed(node)
            if len(allowed) > 1:
                out.append((k, allowed))
                if self.prior is not None:
                    bias.append(self.prior.step_bias([node]))
            node = self.trie.advance(node, tok)
            if node < 0:
                raise ValueError(f"answer {list(key)} leaves the title trie at position {k}: it is no catalogue title")
        self._branching[key], self._bias[key] = out, bias
        return out

    def sums(self, head: Head, hidden: Tensor, answers: Sequence[Sequence[int]], full_too: bool = False) -> tuple[Tensor, Tensor | None]:
        """(this loss's summed NLL, differentiable; the full-vocabulary summed NLL, detached, when `full_too`).

        hidden (N, H): the states that predict each answer token, answers concatenated in order
        (N = total answer tokens); `head` maps them to logits.
        """
        targets = torch.as_tensor([int(t) for a in answers for t in a], dtype=torch.long, device=hidden.device)  # (N,)
        if self.trie is None:
            nll = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
            return nll, nll.detach() if full_too else None
        rows, allowed = self._branching_rows(answers)
        rows = rows.to(hidden.device)
        full = None
        if full_too:
            logits_all = head(hidden).float()  # (N, V)
            full = F.cross_entropy(logits_all, targets, reduction="sum").detach()
            logits = logits_all[rows]  # (M, V)
        else:
            logits = head(hidden[rows]).float()  # (M, V): the head runs on branching positions only
        if not len(rows):
            return hidden.sum() * 0.0, full  # every token forced: zero loss, still a graph to backpropagate
        lengths = torch.as_tensor([len(a) for a in allowed], device=hidden.device)
        at = (torch.repeat_interleave(torch.arange(len(rows), device=hidden.device), lengths), torch.cat(allowed).to(hidden.device))
        if self.prior is not None:  # logit + prior on the allowed tokens (the others are masked out below)
            bias = torch.cat([b for a in answers for b in self._bias[tuple(int(t) for t in a)]]).to(logits)
            logits = logits.index_put(at, bias, accumulate=True)
        mask = torch.zeros_like(logits, dtype=torch.bool)  # (M, V): True where the trie allows the token
        mask[at] = True
        lse = logits.masked_fill(~mask, float("-inf")).logsumexp(-1)  # (M,)
        picked = logits.gather(1, targets[rows][:, None])[:, 0]  # (M,)
        return (lse - picked).sum(), full

    def _branching_rows(self, answers: Sequence[Sequence[int]]) -> tuple[Tensor, list[Tensor]]:
        """Flat row indices of the branching positions (M,) and their allowed token ids."""
        rows: list[int] = []
        allowed: list[Tensor] = []
        offset = 0
        for a in answers:
            for k, ids in self.branching(a):
                rows.append(offset + k)
                allowed.append(ids)
            offset += len(a)
        return torch.as_tensor(rows, dtype=torch.long), allowed
