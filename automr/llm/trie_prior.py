"""Priors over the title prefix tree that constrained decoding adds to each beam step.

Why (issue 10): after the fine-tuning a CPU affords, constrained decoding collapses onto a handful
of titles: on 150 ml-100k validation users the top-1 was one of 4 items and every top 10 came
from 25 (BENCHMARKS.md, "Learning curve"). The model has learned a marginal over titles (short
ones, whose few tokens cost little) faster than how the history changes it. Two corrections, both
exact sums over a title's path in the tree, so a beam adds one table entry per step:

    score(title) = log P(title | prompt)
                   - reference_weight  * log P(title | the same instruction, no history)
                   + popularity_weight * log P_pop(title)

each term renormalised over the tokens the tree allows (as `beam_scores: trie`). The reference
term is pointwise mutual information with the history when its weight is 1 (contrastive decoding
against the model's own history-free answer); the popularity term puts back the catalogue's real
marginal (interaction counts before the validation period, as the popularity baseline counts
them). With both weights 1 the score is log P(history | title) + log P_pop(title) up to a constant
when the model's history-free answer is its marginal: Bayes' rule with the data's prior instead of
the model's. The weights are evaluation settings, chosen on validation samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.title_trie import TitleTrie
    from automr.llm.prompts import PromptBuilder
    from automr.llm.split import SplitLM


class TriePrior:
    """Per-node log-prior terms, each aligned with `trie.allowed(node)` (sorted token ids).

    Nodes without a table (a forced token, or a node no title of the prior's reaches) add 0.
    """

    def __init__(self, trie: TitleTrie, tables: Mapping[int, Tensor]) -> None:
        for node, table in tables.items():
            if table.shape != (len(trie.allowed(node)),):
                raise ValueError(f"node {node}: table of shape {tuple(table.shape)} for {len(trie.allowed(node))} allowed tokens")
        self.trie, self.tables = trie, dict(tables)

    def step_bias(self, nodes: Sequence[int]) -> Tensor:
        """(N,) the prior's term of every allowed continuation of `nodes`, concatenated in the order
        `_BeamRun._continuations` lists them (node by node, tokens ascending)."""
        parts = [self.tables.get(n) if n in self.tables else torch.zeros(len(self.trie.allowed(n))) for n in nodes]
        return torch.cat(parts) if parts else torch.zeros(0)

    def path_sum(self, answer: Sequence[int]) -> float:
        """The prior's total over one answer's path (title tokens + EOS)."""
        total, node = 0.0, 0
        for tok in answer:
            allowed = self.trie.allowed(node).tolist()
            if node in self.tables:
                total += float(self.tables[node][allowed.index(int(tok))])
            node = self.trie.advance(node, int(tok))
            if node < 0:
                raise ValueError(f"answer {list(answer)} is not in the title trie")
        return total

    @staticmethod
    def combine(weighted: Sequence[tuple[float, TriePrior]]) -> TriePrior | None:
        """sum_i w_i * prior_i (None when every weight is 0)."""
        used = [(w, p) for w, p in weighted if w != 0.0]
        if not used:
            return None
        trie = used[0][1].trie
        tables: dict[int, Tensor] = {}
        for w, p in used:
            for node, table in p.tables.items():
                tables[node] = tables.get(node, torch.zeros_like(table)) + w * table
        return TriePrior(trie, tables)


def popularity_prior(trie: TitleTrie, counts: Mapping[int, float], smoothing: float = 1.0) -> TriePrior:
    """log P_pop(token | prefix): the share of the (smoothed) counts of the titles below each child.

    `smoothing` is added to every item's count, so an item never seen keeps a finite score.
    """
    n = len(trie.children)
    mass = [0.0] * n
    for node in range(n - 1, -1, -1):  # children are created after their parent: reverse order is bottom-up
        item = trie.item_at.get(node)
        own = 0.0 if item is None else float(counts.get(item, 0.0)) + smoothing
        mass[node] = own + sum(mass[c] for c in trie.children[node].values())
    tables = {}
    for node, kids in enumerate(trie.children):
        if len(kids) > 1 and mass[node] > 0:
            tables[node] = torch.tensor([math.log(mass[kids[t]]) - math.log(mass[node]) for t in sorted(kids)])
    return TriePrior(trie, tables)


@torch.no_grad()
def reference_prior(split: SplitLM, builder: PromptBuilder, trie: TitleTrie, titles: Sequence[str],
                    batch_size: int = 64) -> TriePrior:
    """log P(token | prefix) under the model's prompt with no recent titles, renormalised over the tree.

    Every title is scored teacher-forced after that one prompt; the prompt's tokens run once per batch
    (`SplitLM.answer_states` shares the rows' common first tokens), so the cost is about the catalogue's
    answer tokens. Each branching node's row is read from the first title that passes through it.
    """
    tables: dict[int, Tensor] = {}
    for start in range(0, len(titles), batch_size):
        prompts = [builder.encode([], answer=t) for t in titles[start : start + batch_size]]
        rows = [split.plan(p, None) for p in prompts]
        logits = split._logits(split.answer_states(rows)).float()  # (N answer tokens, V)
        offset = 0
        for p in prompts:
            node = 0
            for k, tok in enumerate(p.answer_ids):
                allowed = trie.allowed(node)
                if len(allowed) > 1 and node not in tables:
                    tables[node] = logits[offset + k, allowed].log_softmax(-1).cpu()
                node = trie.advance(node, int(tok))
            offset += len(p.answer_ids)
    return TriePrior(trie, tables)
