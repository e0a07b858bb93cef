"""The prefix tree of the catalogue's answers (title tokens + EOS): what constrained decoding walks,
what the trie answer loss normalises over, and where trie priors keep their per-node terms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.prompts import PromptBuilder


class TitleTrie:
    """Prefix tree over token sequences (item answers: title tokens + EOS).

    Nodes are integers (0 = root, -1 = dead). `allowed(node)` lists the tokens that extend a
    valid prefix; the node reached after a full sequence maps to its item.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], items: Sequence[int]) -> None:
        if len(sequences) != len(items):
            raise ValueError(f"{len(sequences)} sequences but {len(items)} items")
        self.children: list[dict[int, int]] = [{}]
        self.item_at: dict[int, int] = {}
        self.max_len = 0
        for seq, item in zip(sequences, items):
            node = 0
            for tok in seq:
                nxt = self.children[node].get(int(tok))
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.children[node][int(tok)] = nxt
                node = nxt
            # Two items with one answer: the first keeps it (titles are made unique by `prepare`).
            self.item_at.setdefault(node, int(item))
            self.max_len = max(self.max_len, len(seq))
        self._allowed: dict[int, Tensor] = {}
        self._settled = self._single_item_nodes()

    def _single_item_nodes(self) -> list[bool]:
        """Per node, whether its subtree holds exactly one item: from there every token is forced.
        (A child is always created after its parent, so one pass from the last node up counts them.)"""
        count = [0] * len(self.children)
        for node in range(len(self.children) - 1, -1, -1):
            count[node] = (node in self.item_at) + sum(count[c] for c in self.children[node].values())
        return [c == 1 for c in count]

    def settled(self, node: int) -> bool:
        """True when one item is left below `node` (answers end with EOS, so no answer is a prefix of
        another: that item's path is the only way on, every token of it forced)."""
        return node >= 0 and self._settled[node]

    def __len__(self) -> int:
        return len(self.item_at)

    def advance(self, node: int, token: int) -> int:
        """The node after `token`, or -1 when it leaves the tree."""
        if node < 0:
            return -1
        return self.children[node].get(int(token), -1)

    def allowed(self, node: int) -> Tensor:
        """Tokens that continue a valid prefix from `node` (long tensor, CPU; empty when dead)."""
        t = self._allowed.get(node)
        if t is None:
            keys = [] if node < 0 else sorted(self.children[node])
            t = torch.tensor(keys, dtype=torch.long)
            self._allowed[node] = t
        return t


def build_trie(builder: "PromptBuilder", catalogue: Sequence[tuple[int, str]]) -> TitleTrie:
    """Trie over `builder.answer_ids(title)` of every (item_id, title)."""
    return TitleTrie([builder.answer_ids(t) for _, t in catalogue], [i for i, _ in catalogue])
