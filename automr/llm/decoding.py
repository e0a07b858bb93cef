"""Decoding for the generative recommender: beam search, grounding and constrained decoding.

Everything runs over `SplitLM.prefill` / `SplitLM.step`, so the memory slot (layer-L states,
text, or nothing) works the same for BIGRec, AutoMR and the retrieval baselines.

- `beam_search`: batched beam search (BIGRec: 4 beams), the Hugging Face algorithm (2 x beams
  candidates per step, an end-of-sequence among the best `beams` candidates closes a hypothesis,
  scores are sum log-prob / length ** length_penalty). Finished samples leave the batch.
- Grounding (BIGRec): the generated text and every item title are embedded by the *base* model
  (last layer, last token, title tokenized exactly like an answer) and all items are ranked by L2
  distance: a full ranking. Item embeddings are cached on disk, keyed by model name + catalogue.
- Constrained decoding (D3-style): a prefix tree over every item's answer tokens (title + EOS)
  restricts each beam step to valid continuations, so every finished beam is a catalogue item.
  The ranking is the finished beams in score order; with fewer beams than k the rest is -1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM
    from automr.llm.prompts import EncodedPrompt, PromptBuilder
    from automr.llm.split import Slot, SplitLM

NEG_INF = float("-inf")
# Bump when the embedding recipe changes, so stale caches are not reused.
_EMBED_RECIPE = "answer-ids+bos/last-layer/last-token/v1"


# ---------------------------------------------------------------------------------------------
# Prefix tree of item answers
# ---------------------------------------------------------------------------------------------


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

    def mask(self, nodes: Sequence[int], vocab_size: int, device: torch.device) -> Tensor:
        """(R, V) additive mask: 0 for allowed continuations of each row's node, -inf elsewhere."""
        allowed = [self.allowed(n) for n in nodes]
        rows = torch.repeat_interleave(torch.arange(len(nodes)), torch.tensor([len(a) for a in allowed]))
        cols = torch.cat(allowed) if allowed else torch.zeros(0, dtype=torch.long)
        out = torch.full((len(nodes), vocab_size), NEG_INF, device=device)
        out[rows.to(device), cols.to(device)] = 0.0
        return out


def build_trie(builder: "PromptBuilder", catalogue: Sequence[tuple[int, str]]) -> TitleTrie:
    """Trie over `builder.answer_ids(title)` of every (item_id, title)."""
    return TitleTrie([builder.answer_ids(t) for _, t in catalogue], [i for i, _ in catalogue])


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


@dataclass
class Hypothesis:
    """One generated answer."""

    tokens: list[int]  # generated tokens, EOS excluded
    score: float  # sum log-prob / (generated length incl. EOS) ** length_penalty
    logprob: float  # sum of token log-probabilities
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    item: int | None = None  # constrained decoding: the catalogue item it spells


@dataclass
class DecodeStats:
    """Work done, for throughput reports."""

    samples: int = 0
    steps: int = 0
    tokens: int = 0  # rows fed through `step` (one generated token each)
    prompt_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: "DecodeStats") -> None:
        self.samples += other.samples
        self.steps += other.steps
        self.tokens += other.tokens
        self.prompt_tokens += other.prompt_tokens
        self.seconds += other.seconds


@torch.no_grad()
def beam_search(
    split: "SplitLM",
    prompts: Sequence["EncodedPrompt"],
    slots: Sequence["Slot"],
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    trie: TitleTrie | None = None,
    stats: DecodeStats | None = None,
) -> list[list[Hypothesis]]:
    """Up to `num_beams` hypotheses per prompt, best first.

    With `trie`, every step is restricted to the tree's continuations (log-probabilities are the
    model's, not renormalised), and only complete items are returned.
    """
    import time

    t0 = time.perf_counter()
    B, nb = len(prompts), int(num_beams)
    if nb < 1:
        raise ValueError("num_beams must be >= 1")
    if B == 0:
        return []
    eos = int(split.lm.tokenizer.eos_token_id)
    pad = split.pad_id
    cache, logits = split.prefill(prompts, slots)  # logits (B, V)
    dev = logits.device
    expand = torch.arange(B, device=dev).repeat_interleave(nb)
    cache = cache.select(expand)
    logits = logits.index_select(0, expand)  # (B*nb, V)
    scores = torch.full((B, nb), NEG_INF, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only beam 0 may expand at step 0
    tokens: list[list[list[int]]] = [[[] for _ in range(nb)] for _ in range(B)]
    nodes: list[list[int]] = [[0] * nb for _ in range(B)]
    active = list(range(B))  # samples whose beams are rows of `cache`, in row order
    done_hyps: list[list[Hypothesis]] = [[] for _ in range(B)]
    n_fed = 0
    steps = 0

    def add(b: int, hyp: Hypothesis) -> None:
        hyps = done_hyps[b]
        hyps.append(hyp)
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[nb:]

    for t in range(max_new_tokens):
        steps += 1
        V = logits.shape[-1]
        logp = logits.float().log_softmax(-1)  # (R, V), R = len(active) * nb
        if trie is not None:
            logp = logp + trie.mask([n for b in active for n in nodes[b]], V, dev)
        cand = (scores.view(-1, 1) + logp).view(len(active), nb * V)
        top_v, top_i = cand.topk(min(2 * nb, nb * V), dim=1)  # (A, 2nb)
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        last = t == max_new_tokens - 1
        norm = (t + 1) ** length_penalty
        keep: list[tuple[int, int, list[tuple[float, int, int]]]] = []  # (row block, sample, beams)
        for a, b in enumerate(active):
            beams: list[tuple[float, int, int]] = []  # (score, origin beam, token)
            for rank, (v, i) in enumerate(zip(top_v_l[a], top_i_l[a])):
                if v == NEG_INF:
                    break
                beam, tok = divmod(i, V)
                if tok == eos:
                    if rank < nb:  # as in HF: only an EOS among the best `nb` candidates ends a beam
                        item = None
                        if trie is not None:
                            item = trie.item_at.get(trie.advance(nodes[b][beam], tok))
                        add(b, Hypothesis(list(tokens[b][beam]), v / norm, v, True, item))
                    continue
                beams.append((v, beam, tok))
                if len(beams) == nb:
                    break
            hyps = done_hyps[b]
            finished = not beams or (
                len(hyps) >= nb and beams[0][0] / norm <= hyps[-1].score  # HF's non-exhaustive stop rule
            )
            if last and not finished and trie is None:
                # Cut at max_new_tokens: the running beams are hypotheses too (as HF finalises).
                for v, beam, tok in beams:
                    add(b, Hypothesis(tokens[b][beam] + [tok], v / norm, v, False))
            if finished or last:
                continue
            beams += [(NEG_INF, 0, pad)] * (nb - len(beams))  # dead beams stay -inf
            keep.append((a, b, beams))
        if not keep:
            break
        sel = torch.tensor([a * nb + beam for a, _, beams in keep for _, beam, _ in beams], device=dev)
        cache = cache.select(sel)
        new_tok = torch.tensor([tok for _, _, beams in keep for _, _, tok in beams], device=dev)
        scores = torch.tensor([[v for v, _, _ in beams] for _, _, beams in keep], device=dev)
        for _, b, beams in keep:
            old_t, old_n = tokens[b], nodes[b]
            tokens[b] = [old_t[beam] + [tok] for _, beam, tok in beams]
            if trie is not None:
                nodes[b] = [trie.advance(old_n[beam], tok) if v > NEG_INF else -1 for v, beam, tok in beams]
        active = [b for _, b, _ in keep]
        logits = split.step(new_tok, cache)
        n_fed += int(new_tok.numel())
    if stats is not None:
        stats.samples += B
        stats.steps += steps
        stats.tokens += n_fed
        stats.prompt_tokens += sum(len(p.prefix_ids) + len(p.marker_ids) for p in prompts)
        stats.seconds += time.perf_counter() - t0
    return done_hyps


# ---------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------


def _bos_ids(tokenizer: object) -> list[int]:
    """[BOS] when the tokenizer adds one by default (Llama-style), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    return [int(bos)] if ids and ids[0] == bos else []


@torch.no_grad()
def last_token_embeddings(
    lm: "LM", token_lists: Sequence[Sequence[int]], batch_size: int = 64, progress: bool = False
) -> Tensor:
    """Last-layer hidden state (after the final norm) at each sequence's last token: (N, H) float32 CPU.

    Sequences are sorted by length and right-padded per batch, so padding costs little.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    base = lm.base_model
    core = getattr(base, base.base_model_prefix)  # the decoder stack (LlamaModel, ...)
    dev = lm.device
    pad = int(lm.tokenizer.pad_token_id)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out = torch.zeros((len(token_lists), lm.hidden_size), dtype=torch.float32)
    bar = Progress(TextColumn("embedding titles"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task("embed", total=len(order))
        for s in range(0, len(order), batch_size):
            _embed_batch(core, order[s : s + batch_size], token_lists, out, pad, dev)
            bar.advance(task, min(batch_size, len(order) - s))
    return out


def _embed_batch(core: torch.nn.Module, idx: list[int], token_lists: Sequence[Sequence[int]], out: Tensor,
                 pad: int, dev: torch.device) -> None:
    """Embed the sequences `idx` into rows `idx` of `out` (no_grad comes from the caller)."""
    seqs = [list(token_lists[i]) or [pad] for i in idx]
    T = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, : len(q)] = torch.tensor(q)
        mask[r, : len(q)] = 1
    h = core(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state  # (b, T, H)
    last = torch.tensor([len(q) - 1 for q in seqs], device=h.device)
    out[torch.tensor(idx)] = h[torch.arange(len(seqs), device=h.device), last].float().cpu()


def catalogue_hash(catalogue: Sequence[tuple[int, str]]) -> str:
    h = hashlib.sha256()
    for item, title in catalogue:
        h.update(f"{int(item)}\t{title}\n".encode())
    return h.hexdigest()[:16]


class GroundingIndex:
    """Item-title embeddings of one model, and L2 ranking of generated texts against them."""

    def __init__(self, lm: "LM", builder: "PromptBuilder", item_ids: np.ndarray, embeddings: Tensor) -> None:
        self.lm = lm
        self.builder = builder
        self.item_ids = np.asarray(item_ids, dtype=np.int64)  # (N,)
        self.embeddings = embeddings.to(lm.device, torch.float32)  # (N, H)
        self._bos = _bos_ids(lm.tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """A text tokenized like an answer (title + EOS), behind BOS where the tokenizer uses one."""
        return self._bos + self.builder.answer_ids(text)

    @classmethod
    def build(
        cls,
        lm: "LM",
        builder: "PromptBuilder",
        catalogue: Sequence[tuple[int, str]],
        cache_dir: Path | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> "GroundingIndex":
        """Embed every title (or load them from `cache_dir`, keyed by model name + catalogue)."""
        import time

        ids = np.array([i for i, _ in catalogue], dtype=np.int64)
        path = None
        if cache_dir is not None:
            key = hashlib.sha256(f"{lm.name}\n{_EMBED_RECIPE}".encode()).hexdigest()[:12]
            safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in lm.name)[:80]
            path = Path(cache_dir) / "item_embeddings" / f"{safe}-{key}-{catalogue_hash(catalogue)}.npy"
            if path.is_file():
                emb = np.load(path)
                if emb.shape == (len(ids), lm.hidden_size):
                    print(f"grounding: loaded {len(ids)} item embeddings from {path}")
                    return cls(lm, builder, ids, torch.from_numpy(emb))
        index = cls(lm, builder, ids, torch.zeros((0, lm.hidden_size)))
        t0 = time.perf_counter()
        seqs = [index.text_ids(t) for _, t in catalogue]
        emb = last_token_embeddings(lm, seqs, batch_size, progress=progress)
        dt = time.perf_counter() - t0
        ntok = sum(map(len, seqs))
        print(f"grounding: embedded {len(ids)} item titles in {dt:.1f}s ({len(ids) / max(dt, 1e-9):.0f} items/s, "
              f"{ntok / max(dt, 1e-9):.0f} tokens/s)")
        if path is not None:
            from automr.utils.io import atomic_file

            with atomic_file(path, suffix=".npy") as tmp:  # np.save appends .npy to a name without it
                np.save(tmp, emb.numpy())
        index.embeddings = emb.to(lm.device)
        return index

    def distances(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """L2 distance of each text's embedding to every item: (B, N) float32."""
        q = last_token_embeddings(self.lm, [self.text_ids(t) for t in texts], batch_size).to(self.embeddings.device)
        return torch.cdist(q, self.embeddings)  # (B, N)

    def rank(self, texts: Sequence[str], k: int | None = None) -> np.ndarray:
        """Item ids by increasing distance: (B, N) full ranking, or the first k: (B, k)."""
        d = self.distances(texts)
        n = d.shape[1]
        if k is None or k >= n:
            order = torch.sort(d, dim=1, stable=True).indices  # ties: catalogue order
        else:
            order = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
        out = self.item_ids[order.cpu().numpy()]
        if k is not None and k > n:
            out = np.concatenate([out, np.full((len(texts), k - n), -1, dtype=np.int64)], axis=1)
        return out


# ---------------------------------------------------------------------------------------------
# From hypotheses to rankings
# ---------------------------------------------------------------------------------------------


def decode_text(tokenizer: object, tokens: Sequence[int]) -> str:
    """Generated tokens -> the title text (special tokens dropped, whitespace trimmed)."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()  # type: ignore[attr-defined]


def constrained_topk(hyps: Sequence[Sequence[Hypothesis]], k: int) -> np.ndarray:
    """(B, k) items of the finished beams in score order, -1 where fewer than k."""
    out = np.full((len(hyps), k), -1, dtype=np.int64)
    for b, hs in enumerate(hyps):
        seen: list[int] = []
        for h in hs:
            if h.item is not None and h.item not in seen:
                seen.append(h.item)
        out[b, : min(k, len(seen))] = seen[:k]
    return out


def max_answer_tokens(builder: "PromptBuilder", titles: Sequence[str]) -> int:
    """Longest answer (title + EOS) in tokens: the generation budget."""
    return max((len(builder.answer_ids(t)) for t in titles), default=1)


def tokens_per_second(stats: DecodeStats) -> float:
    return stats.tokens / stats.seconds if stats.seconds > 0 else math.nan
