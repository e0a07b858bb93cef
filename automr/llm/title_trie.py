"""The prefix tree of the catalogue's answers (title tokens + EOS): what constrained decoding walks,
what the trie answer loss normalises over, and where trie priors keep their per-node terms."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
        self.parent: list[int] = [-1]  # each node's parent (-1 for the root)
        self.item_at: dict[int, int] = {}
        self.leaf_of: dict[int, int] = {}  # item -> the node its answer ends at (the item owning that node)
        self.max_len = 0
        for seq, item in zip(sequences, items):
            node = 0
            for tok in seq:
                nxt = self.children[node].get(int(tok))
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.parent.append(node)
                    self.children[node][int(tok)] = nxt
                node = nxt
            # Two items with one answer: the first keeps it (titles are made unique by `prepare`).
            if self.item_at.setdefault(node, int(item)) == int(item):
                self.leaf_of[int(item)] = node
            self.max_len = max(self.max_len, len(seq))
        self._allowed: dict[int, Tensor] = {}
        self._items_below = self._count_items_below()

    def _count_items_below(self) -> list[int]:
        """Per node, the items its subtree holds. (A child is always created after its parent, so one
        pass from the last node up counts them.)"""
        count = [0] * len(self.children)
        for node in range(len(self.children) - 1, -1, -1):
            count[node] = (node in self.item_at) + sum(count[c] for c in self.children[node].values())
        return count

    def settled(self, node: int) -> bool:
        """True when one item is left below `node` (answers end with EOS, so no answer is a prefix of
        another: that item's path is the only way on, every token of it forced)."""
        return node >= 0 and self._items_below[node] == 1

    def dead_nodes(self, items: Iterable[int]) -> set[int]:
        """The nodes every item below which is among `items`: where a beam that must not end on one of
        them has nothing left to find (items the tree does not hold are ignored)."""
        banned: dict[int, int] = {}  # node -> banned items below it
        for item in set(int(i) for i in items):
            node = self.leaf_of.get(item, -1)
            while node >= 0:
                banned[node] = banned.get(node, 0) + 1
                node = self.parent[node]
        return {node for node, n in banned.items() if n == self._items_below[node]}

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
