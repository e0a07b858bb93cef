"""Decoding for the generative recommender: beam search, grounding and constrained decoding.

Everything runs over `SplitLM.prefill` / `SplitLM.step`, so the memory slot (layer-L states,
text, or nothing) works the same for BIGRec, AutoMR and the retrieval baselines.

- `beam_search`: batched beam search (BIGRec: 4 beams), the Hugging Face algorithm (2 x beams
  candidates per step, an end-of-sequence among the best `beams` candidates closes a hypothesis,
  scores are sum log-prob / length ** length_penalty). Finished samples leave the batch, and only
  live beams are fed (split.SplitCache shares each prompt's cache across its beams).
- Grounding (BIGRec): the generated text and every item title are embedded by the *base* model
  (last layer, last token, title tokenized exactly like an answer) and all items are ranked by L2
  distance: a full ranking. Item embeddings are cached on disk: in the evaluation, keyed by model
  name + catalogue, and in the user cache, keyed by the weights' and titles' content.
- Constrained decoding (D3-style): a prefix tree over every item's answer tokens (title + EOS)
  restricts each beam step to valid continuations, so every finished beam is a catalogue item.
  Beam scores (`beam_scores`): `model` sums the model's log-probabilities over the vocabulary;
  `trie` renormalises each step's probabilities over the tokens the tree allows, so a forced
  token (the only continuation) costs 0. With `model` scores and length normalisation a title
  whose later tokens are near-certain gains from every extra token ("Decoding Matters" (D3)
  calls it the amplification bias); `trie` scores with `length_penalty: 0` (no normalisation)
  rank complete titles by the trie-normalised probability of the whole title, which is what
  `--answer-loss trie` trains. With `trie` scores a beam whose prefix leaves one item possible
  (`TitleTrie.settled`) is no longer fed through the model: each token left is forced and costs
  exactly 0, so its score is final and the search takes the same steps with fewer rows (scores
  equal up to the rounding a smaller batch gives; on ml-100k 78% of a title's tokens come after
  that point: SmolLM2 titles are ~6 tokens, unique after one or two; benchmarks/bench_settled_beams.py).
  When the ranking will drop the user's history (the evaluator's `exclude_history`), the beams are
  kept off those items (`banned`: the tree's nodes with only history items below are closed to
  that sample), so every beam slot goes to an item that can count (on ml-100k 9-19% of the top 10
  were history items, removed after decoding and replaced from the tail).
  A `TriePrior` (trie_prior.py) adds per-node terms to those scores: minus the model's
  history-free answer, plus the catalogue's popularity.
  The ranking is the finished beams in score order, then every other item by grounding distance
  to the best beam (`GroundingIndex.rank(..., first=beam_items(hyps))`): a full ranking too. The
  best beam spells a catalogue item, whose embedding the index holds: it is not embedded again.
  Why that tail score: it is BIGRec's own ranking rule applied to the model's best answer, so
  constrained and grounding rankings differ only in the head the beams decide, and it costs one
  embedding per sample; the trie's prefix log-probabilities would need a forward pass over every
  title per sample to rank items the beams never reached.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from automr.utils.fingerprint import catalogue_hash
from automr.utils.logging import info
from automr.utils.progress import rate_progress

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM
    from automr.llm.prompts import EncodedPrompt, PromptBuilder
    from automr.llm.split import Slot, SplitLM
    from automr.llm.title_trie import TitleTrie
    from automr.llm.trie_prior import TriePrior

NEG_INF = float("-inf")
# Bump when the embedding recipe changes, so stale caches are not reused.
_EMBED_RECIPE = "answer-ids+bos/last-layer/last-token/v1"


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------


@dataclass
class Hypothesis:
    """One generated answer."""

    tokens: list[int]  # generated tokens, EOS excluded
    score: float  # sum log-prob / (generated length incl. EOS) ** length_penalty
    logprob: float  # sum of token log-probabilities (over the trie's allowed tokens with beam_scores trie; plus a prior's terms)
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


Candidate = tuple[float, int, int]  # (sum log-prob, origin row, token)


class _BeamRun:
    """The state of one batched beam search, and its steps.

    Rows of `cache` / `logits` are the live beams only, grouped by sample in `active` order (row r
    belongs to active sample `group[r]`): a sample whose valid continuations run short keeps fewer
    than `nb` beams rather than feeding dead ones through the model (in constrained decoding on
    ml-100k that was over half the rows). With trie scores a settled row (one item left below its
    node) is not fed either: `logit_row` maps each row to its row of `logits` and `cache`, -1 for a
    settled one, whose one continuation scores 0 without logits. Each step: `_candidates` scores the
    rows' continuations, `_next_beams` picks a sample's next beams (an EOS closes a hypothesis),
    `_advance` reorders the cache (only the generated tokens move: split.SplitCache) and feeds the
    new tokens.
    """

    def __init__(self, split: "SplitLM", prompts: Sequence["EncodedPrompt"], slots: Sequence["Slot"], nb: int,
                 length_penalty: float, trie: TitleTrie | None, max_new_tokens: int, renormalise: bool = False,
                 prior: TriePrior | None = None, skip_settled: bool = True,
                 banned: Sequence[Iterable[int]] | None = None) -> None:
        self.split, self.nb, self.length_penalty, self.trie = split, nb, length_penalty, trie
        # Per sample, the trie nodes its beams must not enter (every item below them banned), or None.
        dead = [trie.dead_nodes(b) for b in banned] if banned is not None and trie is not None else []
        self.dead: list[set[int]] | None = dead if any(dead) else None
        self.renormalise = renormalise and trie is not None  # beam_scores trie
        # With model scores a forced token still costs its log-probability: every row is fed.
        self.skip_settled = skip_settled and self.renormalise
        self.prior = prior  # per-step terms added to the trie-renormalised log-probabilities (trie_prior.py)
        self.eos = int(split.lm.tokenizer.eos_token_id)
        B = len(prompts)
        # One row per sample to start with: all beams start identical, so only one may expand at step 0.
        self.cache, self.logits = split.prefill(prompts, slots, beams=nb, max_new_tokens=max_new_tokens)
        self.logit_row: list[int] = list(range(B))  # each row's row in logits / cache; -1: settled, not fed
        self.scores = torch.zeros(B, device=self.logits.device)  # (R,) sum log-prob of each row's beam
        self.tokens: list[list[int]] = [[] for _ in range(B)]  # each row's generated tokens
        self.nodes: list[int] = [0] * B  # each row's trie node
        self.group: list[int] = list(range(B))  # each row's index in `active`
        self.active = list(range(B))  # samples with live beams, in row order
        self.done: list[list[Hypothesis]] = [[] for _ in range(B)]  # best first, at most nb
        self.steps = 0
        self.fed = 0  # rows fed through `step`

    def close(self, b: int, hyp: Hypothesis) -> None:
        """Keep `hyp` among sample b's best `nb` hypotheses."""
        hyps = self.done[b]
        hyps.append(hyp)
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[self.nb :]

    def _continuations(self, logp: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate (row, token) pairs, grouped by row: each row's trie continuations (index lists,
        no dense mask), or without a trie each row's best 2 x nb tokens (a sample's best 2 x nb
        continuations are among them: within a row every candidate adds the same beam score)."""
        dev = logp.device
        if self.trie is None:  # every row is fed: logp has a row per row
            R, V = logp.shape
            toks = logp.topk(min(2 * self.nb, V), dim=1).indices  # (R, k)
            return torch.arange(R, device=dev).repeat_interleave(toks.shape[1]), toks.reshape(-1)
        allowed = [self.trie.allowed(n) for n in self.nodes]
        counts = torch.tensor([len(a) for a in allowed])
        return torch.arange(len(allowed)).repeat_interleave(counts).to(dev), torch.cat(allowed).to(dev)

    def _fed_logprobs(self, logp: Tensor, rows: Tensor, toks: Tensor) -> Tensor:
        """(N,) each candidate's log-probability from its row's logits; 0 for a settled row's forced
        token, which is exactly what renormalising over its one continuation gives it."""
        at = torch.as_tensor(self.logit_row, device=logp.device)[rows]  # (N,) row of logp, -1 settled
        fed = at >= 0
        if bool(fed.all()):
            return logp[at, toks]
        step = logp.new_zeros(len(rows))
        step[fed] = logp[at[fed], toks[fed]]
        return step

    def _allowed_by_bans(self, rows: Tensor, toks: Tensor) -> Tensor:
        """(N,) bool: candidate (row, token) does not enter a node of its sample's `dead` set."""
        assert self.dead is not None and self.trie is not None
        dead = [self.dead[self.active[a]] for a in self.group]  # per row
        children = self.trie.children
        ok = [not dead[r] or children[self.nodes[r]].get(t) not in dead[r]
              for r, t in zip(rows.tolist(), toks.tolist())]
        return torch.tensor(ok, dtype=torch.bool, device=rows.device)

    def _candidates(self) -> list[list[Candidate]]:
        """Per active sample, its best 2 x nb (sum log-prob, row, token) continuations, best first."""
        logp = self.logits.float().log_softmax(-1)  # (F, V): the fed rows
        rows, toks = self._continuations(logp)
        step = self._fed_logprobs(logp, rows, toks)  # (N,)
        bias = self.prior.step_bias(self.nodes).to(step.device) if self.prior is not None else None  # (N,)
        if self.dead is not None:  # off the banned items, before renormalising: over what is left
            keep = self._allowed_by_bans(rows, toks)
            rows, toks, step = rows[keep], toks[keep], step[keep]
            bias = None if bias is None else bias[keep]
            if not len(rows):
                return [[] for _ in self.active]
        if self.renormalise:
            step = _renormalise(step, rows, len(self.group))
        if bias is not None:
            step = step + bias
        vals = self.scores[rows] + step  # (N,), grouped by sample since rows are
        group = torch.as_tensor(self.group, device=vals.device)[rows]
        counts = torch.bincount(group, minlength=len(self.active))
        start = counts.cumsum(0) - counts
        width = int(counts.max())
        table = vals.new_full((len(self.active), width), NEG_INF)  # one sample's candidates per row
        table[group, torch.arange(len(vals), device=vals.device) - start[group]] = vals
        top_v, top_i = table.topk(min(2 * self.nb, width), dim=1)  # (A, k); -inf past a sample's count
        flat = (start[:, None] + top_i).clamp(max=len(vals) - 1)
        return [list(zip(v, r, t)) for v, r, t in zip(top_v.tolist(), rows[flat].tolist(), toks[flat].tolist())]

    def _next_beams(self, b: int, cands: list[Candidate], norm: float) -> list[Candidate]:
        """Sample b's best `nb` non-EOS continuations; an EOS among the best `nb` closes a hypothesis (as HF)."""
        beams: list[Candidate] = []
        for rank, (v, row, tok) in enumerate(cands):
            if v == NEG_INF:
                break
            if tok == self.eos:
                if rank < self.nb:
                    item = None if self.trie is None else self.trie.item_at.get(self.trie.advance(self.nodes[row], tok))
                    self.close(b, Hypothesis(list(self.tokens[row]), v / norm, v, True, item))
                continue
            beams.append((v, row, tok))
            if len(beams) == self.nb:
                break
        return beams

    def step(self, t: int, last: bool) -> bool:
        """One generation step (t = tokens generated so far); False when every sample is done."""
        self.steps += 1
        cands = self._candidates()
        norm = (t + 1) ** self.length_penalty
        keep: list[tuple[int, list[Candidate]]] = []  # (sample, next beams)
        for a, b in enumerate(self.active):
            beams = self._next_beams(b, cands[a], norm)
            hyps = self.done[b]
            finished = not beams or (
                len(hyps) >= self.nb and beams[0][0] / norm <= hyps[-1].score  # HF's non-exhaustive stop rule
            )
            if last and not finished and self.trie is None:
                # Cut at max_new_tokens: the running beams are hypotheses too (as HF finalises).
                for v, row, tok in beams:
                    self.close(b, Hypothesis(self.tokens[row] + [tok], v / norm, v, False))
            if not (finished or last):
                keep.append((b, beams))
        if keep:
            self._advance(keep)
        return bool(keep)

    def _advance(self, keep: list[tuple[int, list[Candidate]]]) -> None:
        """Rows become the kept beams: reorder the cache, extend tokens and trie nodes, feed the new tokens."""
        dev = self.logits.device
        beams = [c for _, bs in keep for c in bs]
        self.scores = torch.tensor([v for v, _, _ in beams], device=dev)
        self.tokens = [self.tokens[row] + [tok] for _, row, tok in beams]
        if self.trie is not None:
            self.nodes = [self.trie.advance(self.nodes[row], tok) for _, row, tok in beams]
        self.group = [a for a, (_, bs) in enumerate(keep) for _ in bs]
        self.active = [b for b, _ in keep]
        fed = [i for i, node in enumerate(self.nodes) if not self.trie.settled(node)] if self.skip_settled \
            else list(range(len(beams)))  # a settled row's parent was settled or fed: never the other way
        if fed:  # otherwise no row needs the model again: the cache is left as it is
            self.cache.reorder([self.logit_row[beams[i][1]] for i in fed])
            self.logits = self.split.step(torch.tensor([beams[i][2] for i in fed], device=dev), self.cache)
        else:
            self.logits = self.logits[:0]
        self.logit_row = [-1] * len(beams)
        for j, i in enumerate(fed):
            self.logit_row[i] = j
        self.fed += len(fed)


def _renormalise(logp: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Each candidate's log-probability renormalised over its row's candidates (the trie's allowed tokens).

    logp, rows (N,): candidates grouped by row; a row's log-sum-exp is taken by scatter, no dense mask.
    """
    peak = logp.new_full((n_rows,), NEG_INF).scatter_reduce(0, rows, logp, "amax")  # (R,)
    total = logp.new_zeros(n_rows).index_add(0, rows, (logp - peak[rows]).exp())  # (R,)
    return logp - (peak + total.log())[rows]


BEAM_SCORES = ("model", "trie")


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
    beam_scores: str = "model",
    prior: TriePrior | None = None,
    skip_settled: bool = True,
    banned: Sequence[Iterable[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Up to `num_beams` hypotheses per prompt, best first (the steps are `_BeamRun`'s).

    With `trie`, every step is restricted to the tree's continuations, and only complete items are
    returned. `beam_scores`: model (the model's log-probabilities over the vocabulary) or trie (each
    step renormalised over the tree's continuations: forced tokens cost 0; needs `trie`).
    `length_penalty` 0 scores by the plain sum (no length normalisation). `prior` adds its per-node
    terms to every step (automr/llm/trie_prior.py; needs beam_scores trie). `skip_settled` False
    feeds settled beams through the model too (the same hypotheses, slower: for tests and benchmarks).
    `banned` (with `trie`): per prompt, items its beams must not end on (the user's history when the
    ranking removes it: beam slots spent on them would be wasted); trie scores renormalise over the
    tokens that lead to an allowed item.
    """
    import time

    t0 = time.perf_counter()
    if int(num_beams) < 1:
        raise ValueError("num_beams must be >= 1")
    if beam_scores not in BEAM_SCORES or (beam_scores == "trie" and trie is None):
        raise ValueError(f"beam_scores must be one of {BEAM_SCORES}, and trie needs a prefix tree; got {beam_scores!r}")
    if prior is not None and beam_scores != "trie":
        raise ValueError("a trie prior adds trie-renormalised terms: it needs beam_scores trie")
    if not prompts:
        return []
    if banned is not None and len(banned) != len(prompts):
        raise ValueError(f"{len(banned)} banned-item lists for {len(prompts)} prompts")
    run = _BeamRun(split, prompts, slots, int(num_beams), length_penalty, trie, max_new_tokens, beam_scores == "trie", prior,
                   skip_settled, banned)
    prefill_s = time.perf_counter() - t0  # the prompts (and slots) through every layer, before the first step
    for t in range(max_new_tokens):
        if not run.step(t, last=t == max_new_tokens - 1):
            break
    if stats is not None:
        stats.samples += len(prompts)
        stats.steps += run.steps
        stats.tokens += run.fed
        stats.prompt_tokens += sum(len(p.prefix_ids) + len(p.marker_ids) for p in prompts)
        stats.seconds += time.perf_counter() - t0
        stats.extra["prefill_s"] = stats.extra.get("prefill_s", 0.0) + prefill_s
    return run.done


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


def shared_grounding_dir() -> Path:
    """Item embeddings shared by every run: $AUTOMR_GROUNDING_CACHE, else grounding/ in the user cache.
    An evaluation per seed would otherwise embed the whole catalogue again (440 s on Amazon books)."""
    from automr.utils.cache import user_cache_dir

    return user_cache_dir("grounding", "AUTOMR_GROUNDING_CACHE")


def _content_key(lm: "LM", ids: np.ndarray, seqs: Sequence[Sequence[int]]) -> str:
    """Hex digest of what the embeddings are a function of: the recipe, every weight of the model
    (a name can outlive a checkpoint rewritten in place), the item ids and their token sequences
    (tokenizer and answer format). Hashing SmolLM2's 540 MB of weights takes about a second, against
    minutes of embedding."""
    h = hashlib.blake2b(_EMBED_RECIPE.encode(), digest_size=16)
    for name, tensor in lm.model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for seq in seqs:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def _load_embeddings(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A cached (N, H) float32 array in item-id order, or None where absent or of another shape."""
    if not path.is_file():
        return None
    emb = np.load(path)
    if emb.shape != shape:
        return None
    info(f"grounding: loaded {shape[0]} item embeddings from {path}")
    return emb


def _save_embeddings(path: Path, emb: np.ndarray) -> None:
    """Write atomically; a cache folder that cannot be written is skipped (the embeddings are in memory)."""
    from automr.utils.io import atomic_file

    try:
        with atomic_file(path, suffix=".npy") as tmp:  # np.save appends .npy to a name without it
            np.save(tmp, emb)
    except OSError as e:
        info(f"grounding: could not cache item embeddings at {path} ({e}); continuing without")


@torch.no_grad()
def last_token_embeddings(
    lm: "LM", token_lists: Sequence[Sequence[int]], batch_size: int = 64, progress: bool = False
) -> Tensor:
    """Last-layer hidden state (after the final norm) at each sequence's last token: (N, H) float32 CPU.

    Sequences are sorted by length and right-padded per batch, so padding costs little.
    """
    base = lm.base_model
    core = getattr(base, base.base_model_prefix)  # the decoder stack (LlamaModel, ...)
    dev = lm.device
    pad = int(lm.tokenizer.pad_token_id)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out = torch.zeros((len(token_lists), lm.hidden_size), dtype=torch.float32)
    with rate_progress("texts", disable=not progress) as bar:
        task = bar.add_task("embedding titles", total=len(order))
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


class GroundingIndex:
    """Item-title embeddings of one model, and L2 ranking of generated texts against them."""

    def __init__(self, lm: "LM", builder: "PromptBuilder", item_ids: np.ndarray, embeddings: Tensor) -> None:
        self.lm = lm
        self.builder = builder
        self.item_ids = np.asarray(item_ids, dtype=np.int64)  # (N,)
        self.embeddings = embeddings.to(lm.device, torch.float32)  # (N, H)
        self._bos = _bos_ids(lm.tokenizer)
        self.last_distances: Tensor | None = None

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
        """Embed every title, or load them from `cache_dir` (keyed by model name + catalogue) or from the
        user cache shared by every run (keyed by content: the weights and the token sequences)."""
        import time

        ids = np.array([i for i, _ in catalogue], dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # cache files keep rows in item-id order, as catalogue_hash reads them
        safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in lm.name)[:80]
        paths = []
        if cache_dir is not None:
            key = hashlib.sha256(f"{lm.name}\n{_EMBED_RECIPE}".encode()).hexdigest()[:12]
            paths.append(Path(cache_dir) / "item_embeddings" / f"{safe}-{key}-{catalogue_hash(catalogue)}.npy")
            if (emb := _load_embeddings(paths[0], (len(ids), lm.hidden_size))) is not None:
                return cls(lm, builder, ids, torch.from_numpy(emb[np.argsort(order)]))
        index = cls(lm, builder, ids, torch.zeros((0, lm.hidden_size)))
        seqs = [index.text_ids(t) for _, t in catalogue]
        paths.append(shared_grounding_dir() / f"{safe}-{_content_key(lm, ids[order], [seqs[i] for i in order])}.npy")
        if (emb := _load_embeddings(paths[-1], (len(ids), lm.hidden_size))) is not None:
            if cache_dir is not None:  # the evaluation keeps its copy: it reads it without hashing the weights
                _save_embeddings(paths[0], emb)
            index.embeddings = torch.from_numpy(emb[np.argsort(order)]).to(lm.device)
            return index
        t0 = time.perf_counter()
        emb = last_token_embeddings(lm, seqs, batch_size, progress=progress)
        dt = time.perf_counter() - t0
        ntok = sum(map(len, seqs))
        info(f"grounding: embedded {len(ids)} item titles in {dt:.1f}s ({len(ids) / max(dt, 1e-9):.0f} items/s, "
             f"{ntok / max(dt, 1e-9):.0f} tokens/s)")
        for path in paths:
            _save_embeddings(path, emb.numpy()[order])
        index.embeddings = emb.to(lm.device)
        return index

    def distances(self, texts: Sequence[str], batch_size: int = 64,
                  anchors: Sequence[int | None] | None = None) -> Tensor:
        """L2 distance of each text's embedding to every item: (B, N) float32.

        `anchors`: per text, the catalogue item whose title it is (constrained decoding's best beam spells
        one), or None. An anchored text takes the item's stored embedding, the same token sequence through
        the same model, instead of a forward pass of its own (a tenth of a served recommendation's time).
        """
        given = anchors if anchors is not None else [None] * len(texts)
        items = np.array([-1 if a is None else a for a in given], dtype=np.int64)  # (B,); -1: embed the text
        rows, found = self._rows_of(items)  # (B,) each
        q = self.embeddings.new_empty((len(texts), self.embeddings.shape[1]))  # (B, H)
        todo = np.flatnonzero(~found).tolist()
        if todo:
            q[todo] = last_token_embeddings(self.lm, [self.text_ids(texts[b]) for b in todo], batch_size).to(q.device)
        have = np.flatnonzero(found).tolist()
        if have:
            q[have] = self.embeddings[rows[have].tolist()]
        return torch.cdist(q, self.embeddings)  # (B, N)

    def _rows_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found), both shaped like `items`: each item's row in `embeddings`, and whether the index
        holds it at all (-1 padding and unknown items do not)."""
        sorter = np.argsort(self.item_ids, kind="stable")
        at = np.searchsorted(self.item_ids, items, sorter=sorter).clip(max=len(sorter) - 1)
        rows = sorter[at]
        return rows, self.item_ids[rows] == items

    def last_distances_of(self, items: np.ndarray) -> np.ndarray:
        """(B, k) float32: the last `rank` call's distance of each row's items (a row per text); nan for an
        item the index does not hold (-1 padding)."""
        assert self.last_distances is not None, "call rank() first"
        d = self.last_distances.cpu().numpy()  # (B, N)
        cols, found = self._rows_of(items)  # (B, k)
        out = np.take_along_axis(d, cols, axis=1).astype(np.float32)
        out[~found] = np.nan
        return out

    def rank(self, texts: Sequence[str], k: int | None = None,
             first: Sequence[Sequence[int]] | None = None, anchors: Sequence[int | None] | None = None) -> np.ndarray:
        """Item ids by increasing distance: (B, N) full ranking, or the first k: (B, k).

        `first`: per text, distinct items placed ahead of the distance order, in their order
        (constrained decoding's beams, best first); the distance order then goes on without them.
        `anchors`: see `distances`.
        """
        d = self.distances(texts, anchors=anchors)
        self.last_distances = d  # (B, N) of the last call: the server reports an item's distance as its score
        n = d.shape[1]
        ahead = max((len(f) for f in first), default=0) if first is not None else 0
        depth = n if k is None else min(n, k + ahead)  # enough for k items once `first` is taken out
        if depth >= n:
            order = torch.sort(d, dim=1, stable=True).indices  # ties: catalogue order
        else:
            order = torch.topk(d, depth, dim=1, largest=False, sorted=True).indices
        out = self.item_ids[order.cpu().numpy()]
        if first is not None:
            out = beams_first(first, out, depth if k is None else min(k, n))
        if k is not None and k > n:
            out = np.concatenate([out, np.full((len(texts), k - n), -1, dtype=np.int64)], axis=1)
        return out


# ---------------------------------------------------------------------------------------------
# From hypotheses to rankings
# ---------------------------------------------------------------------------------------------


def decode_text(tokenizer: object, tokens: Sequence[int]) -> str:
    """Generated tokens -> the title text (special tokens dropped, whitespace trimmed)."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()  # type: ignore[attr-defined]


def beam_items(hyps: Sequence[Sequence[Hypothesis]]) -> list[list[int]]:
    """Per sample, the distinct catalogue items of its finished beams, best first (constrained decoding)."""
    out: list[list[int]] = []
    for hs in hyps:
        items: list[int] = []
        for h in hs:
            if h.item is not None and h.item not in items:
                items.append(h.item)
        out.append(items)
    return out


def beams_first(first: Sequence[Sequence[int]], order: np.ndarray, k: int) -> np.ndarray:
    """(B, k): each row's `first` items, then the items of its `order` row that are not among them.

    `first[b]` holds distinct items; `order[b]` needs k + len(first[b]) items (or the whole
    catalogue), so that k are left once the first ones are taken out.
    """
    out = np.empty((len(first), k), dtype=np.int64)
    for b, (head, row) in enumerate(zip(first, order)):
        head_a = np.asarray(head, dtype=np.int64)
        out[b] = np.concatenate([head_a, row[~np.isin(row, head_a)]])[:k]
    return out


def max_answer_tokens(builder: "PromptBuilder", titles: Sequence[str]) -> int:
    """Longest answer (title + EOS) in tokens: the generation budget."""
    return max((len(builder.answer_ids(t)) for t in titles), default=1)


def tokens_per_second(stats: DecodeStats) -> float:
    return stats.tokens / stats.seconds if stats.seconds > 0 else math.nan
