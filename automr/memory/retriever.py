"""The AutoMR retriever: an MLP maps the query z_t to a vector scored against the memory keys.

  q = MLP(norm_q(z_t))                      [H]     2 layers: H -> hidden -> H, ReLU
  s = softmax(scale * q^T norm_k(M))        [n]     M = the sample's memory keys [n, H]
  loss = KL(S' || s)                                S' = annotation labels (automr.memory.labels)

The feature retriever (config.features "cheap", beyond the paper) adds to each score a small MLP
over the element's standardised cheap features f_m (automr/methods/feature_retriever.py computes
them) and a short projection of the query, so the weight of recency or popularity can depend on
the user:

  s_m = scale * q^T norm_k(z_m) + g([norm_f(f_m), P norm_q(z_t)])   g: F+8 -> feature_hidden -> 1

Choices the paper leaves open (defaults in RetrieverConfig, all options):
  * scale = 1/sqrt(H) by default, so the initial scores are O(1) and s starts near uniform, as
    the labels are; "none" is the paper's bare dot product (the MLP can learn any scale either way).
  * queries and keys are standardised per dimension with training-set mean and std, kept in the
    model as buffers. Subtracting the key mean alone would not change s (it shifts every score of a
    sample equally); dividing by the std matters: a few "massive activation" dimensions of LLM
    states are 100x larger than the rest and would otherwise dominate both the MLP input and q^T z_m.
  * the default early-stopping metric (no callback) is the share of the oracle headroom the argmax
    captures on validation -- it needs no LLM run and does not depend on the label type, so label
    types and temperatures can be compared on it, and it is smooth: a ratio of summed gains in
    nats, to which every validation sample contributes (not a count of hits). The pipeline can
    pass its own callback (validation NDCG@10 of the full AutoMR pipeline, with its hits).
  * every epoch logs its criterion with the samples (and hits) behind it, and the history rows
    record them (automr.utils.early_stopping.Criterion).

Typical use
  data = RetrievalData(queries, store.key_matrix, memory_rows, logp_empty, logp_cand)
  result = train_retriever(RetrieverConfig(), data, valid=val_data)
  result.retriever.save(folder);  r = Retriever.load(folder)
  idx = r.select(z_t, store.keys(rows))          # [k] indices into rows, best first
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automr.errors import UserError
from automr.memory import labels as L
from automr.memory.retriever_config import FORMAT_VERSION, RetrieverConfig, retriever_problem
from automr.memory.retriever_config import SPEC_FILE as _SPEC
from automr.memory.retriever_config import WEIGHTS_FILE as _WEIGHTS
from automr.utils.early_stopping import Criterion, EarlyStopping, warn_if_thin

FEATURE_CONTEXT = 8  # width of the query projection the feature MLP sees

__all__ = ["RetrievalData", "Retriever", "RetrieverConfig", "RetrieverMLP", "TrainResult", "evaluate_retriever", "train_retriever"]


# ---------------------------------------------------------------------- data
@dataclass
class RetrievalData:
    """Annotated samples for training or validating the retriever.

    queries      float [N, H]   z_t per sample
    key_bank     float [R, H]   keys the samples index into (e.g. MemoryStore.key_matrix, a memmap)
    memory_rows  N x int64 [n_i] rows of key_bank forming sample i's memory (n_i >= 1)
    logp_empty   float [N]      log P(y | z_t)
    logp_cand    N x float [n_i] log P(y | z_t, z_m), aligned with memory_rows

    Keeping raw log-probabilities (not labels) lets label type and temperature be config choices.
    Samples index a shared key bank because a user's samples share most of their memory.
    """

    queries: np.ndarray
    key_bank: np.ndarray
    memory_rows: list[np.ndarray]
    logp_empty: np.ndarray
    logp_cand: list[np.ndarray]
    features: list[np.ndarray] | None = None  # N x float [n_i, F], aligned with memory_rows (feature retriever)

    def __post_init__(self) -> None:
        self.queries = np.asarray(self.queries, np.float32)
        self.logp_empty = np.asarray(self.logp_empty, np.float64).reshape(-1)
        self.memory_rows = [np.asarray(r, np.int64).reshape(-1) for r in self.memory_rows]
        self.logp_cand = [np.asarray(c, np.float64).reshape(-1) for c in self.logp_cand]
        n = len(self.queries)
        problems = []
        if self.queries.ndim != 2:
            problems.append(f"queries must be [N, H], found shape {self.queries.shape}")
        elif self.key_bank.ndim != 2 or self.key_bank.shape[1] != self.queries.shape[1]:
            problems.append(f"key_bank must be [R, {self.queries.shape[1]}] like the queries, found shape {self.key_bank.shape}")
        if not (len(self.memory_rows) == len(self.logp_empty) == len(self.logp_cand) == n):
            problems.append(
                f"lengths differ: queries {n}, memory_rows {len(self.memory_rows)}, logp_empty {len(self.logp_empty)}, logp_cand {len(self.logp_cand)}"
            )
        else:
            for i, (r, c) in enumerate(zip(self.memory_rows, self.logp_cand)):
                if len(r) == 0 or len(r) != len(c):
                    problems.append(f"sample {i}: {len(r)} memory rows and {len(c)} log-probabilities (need the same number, >= 1)")
                    break
                if r.min() < 0 or r.max() >= len(self.key_bank):
                    problems.append(f"sample {i}: memory rows outside the key bank of {len(self.key_bank)} rows")
                    break
        if self.features is not None and not problems:
            self.features = [np.asarray(f, np.float32) for f in self.features]
            widths = {f.shape[1] if f.ndim == 2 else -1 for f in self.features}
            if len(self.features) != n or len(widths) > 1 or -1 in widths or any(
                    len(f) != len(r) for f, r in zip(self.features, self.memory_rows)):
                problems.append("features must be one [n_i, F] array per sample, n_i its memory size, one F for all")
        if problems:
            raise UserError("invalid retrieval data: " + "; ".join(problems))

    @property
    def n_features(self) -> int:
        return 0 if not self.features else int(self.features[0].shape[1])

    @classmethod
    def from_key_sets(cls, queries: np.ndarray, key_sets: Sequence[np.ndarray], logp_empty: Any, logp_cand: Sequence[Any]) -> RetrievalData:
        """Build from one key matrix [n_i, H] per sample (stacked into a bank)."""
        sizes = [len(k) for k in key_sets]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        bank = np.concatenate([np.asarray(k, np.float32) for k in key_sets]) if key_sets else np.zeros((0, np.shape(queries)[1]), np.float32)
        rows = [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, sizes)]
        return cls(queries, bank, rows, logp_empty, list(logp_cand))

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def hidden_size(self) -> int:
        return int(self.queries.shape[1])

    def gains(self) -> list[np.ndarray]:
        return [c - e for e, c in zip(self.logp_empty.tolist(), self.logp_cand)]

    def targets(self, label_type: str, temperature: float) -> list[np.ndarray]:
        return [L.make_labels(label_type, e, c, temperature) for e, c in zip(self.logp_empty.tolist(), self.logp_cand)]

    def subset(self, idx: Sequence[int] | np.ndarray) -> RetrievalData:
        ix = np.asarray(idx, np.int64)
        return RetrievalData(
            self.queries[ix], self.key_bank, [self.memory_rows[i] for i in ix], self.logp_empty[ix], [self.logp_cand[i] for i in ix],
            None if self.features is None else [self.features[i] for i in ix],
        )


@dataclass
class _Packed:
    """A RetrievalData packed into padded tensors for fast batching (keys local to the used rows)."""

    queries: torch.Tensor  # [N, H]
    bank: torch.Tensor  # [U, H] the used keys, float32
    rows: torch.Tensor  # [N, n_max] int64 into bank (0 at padding)
    mask: torch.Tensor  # [N, n_max] bool
    targets: torch.Tensor  # [N, n_max] float32 (0 at padding)
    gains: torch.Tensor  # [N, n_max] float64 (0 at padding)
    lengths: torch.Tensor  # [N]
    feats: torch.Tensor | None = None  # [N, n_max, F] float32 (0 at padding); None for the paper's retriever


def _pack(data: RetrievalData, label_type: str, temperature: float) -> _Packed:
    """Gather the keys the samples use into RAM (U x H x 4 bytes) and pad everything to n_max."""
    allrows = np.concatenate(data.memory_rows)
    used = np.unique(allrows)
    bank = torch.from_numpy(np.ascontiguousarray(np.asarray(data.key_bank[used]), dtype=np.float32))
    n, m = len(data), max(len(r) for r in data.memory_rows)
    rows = np.zeros((n, m), np.int64)
    mask = np.zeros((n, m), bool)
    tgt = np.zeros((n, m), np.float32)
    gns = np.zeros((n, m), np.float64)
    fts = np.zeros((n, m, data.n_features), np.float32) if data.features else None
    for i, (r, t, g) in enumerate(zip(data.memory_rows, data.targets(label_type, temperature), data.gains())):
        k = len(r)
        rows[i, :k] = np.searchsorted(used, r)
        mask[i, :k] = True
        tgt[i, :k] = t
        gns[i, :k] = g
        if fts is not None:
            fts[i, :k] = data.features[i]  # type: ignore[index]
    return _Packed(
        torch.from_numpy(np.ascontiguousarray(data.queries)),
        bank,
        torch.from_numpy(rows),
        torch.from_numpy(mask),
        torch.from_numpy(tgt),
        torch.from_numpy(gns),
        torch.from_numpy(mask.sum(1)),
        None if fts is None else torch.from_numpy(fts),
    )


# ---------------------------------------------------------------------- model
class RetrieverMLP(nn.Module):
    """MLP query tower plus the normalisation statistics (buffers, so they save with the weights)."""

    def __init__(self, hidden_size: int, hidden: int = 256, dropout: float = 0.0, score_scale: str = "inv_sqrt_h",
                 n_features: int = 0, feature_hidden: int = 32) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden_size))
        self.scale = 1.0 / math.sqrt(hidden_size) if score_scale == "inv_sqrt_h" else 1.0
        self.register_buffer("q_mean", torch.zeros(hidden_size))
        self.register_buffer("q_std", torch.ones(hidden_size))
        self.register_buffer("k_mean", torch.zeros(hidden_size))
        self.register_buffer("k_std", torch.ones(hidden_size))
        if n_features:
            self.context = nn.Linear(hidden_size, FEATURE_CONTEXT)
            self.feature_net = nn.Sequential(nn.Linear(n_features + FEATURE_CONTEXT, feature_hidden), nn.ReLU(),
                                             nn.Linear(feature_hidden, 1))
            self.register_buffer("f_mean", torch.zeros(n_features))
            self.register_buffer("f_std", torch.ones(n_features))

    def set_normalization(self, queries: torch.Tensor, keys: torch.Tensor, feats: torch.Tensor | None = None) -> None:
        """Standardise with these statistics (dimensions with ~zero spread are left unscaled)."""

        def std(x: torch.Tensor) -> torch.Tensor:
            s = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
            return torch.where(s > 1e-6, s, torch.ones_like(s))

        self.q_mean.copy_(queries.mean(0))
        self.q_std.copy_(std(queries))
        self.k_mean.copy_(keys.mean(0))
        self.k_std.copy_(std(keys))
        if self.n_features and feats is not None and len(feats):  # feats [R, F]: every real element's
            self.f_mean.copy_(feats.mean(0))
            self.f_std.copy_(std(feats))

    def query(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, H] -> q [B, H]."""
        return self.net((z - self.q_mean) / self.q_std)

    def logits(self, z: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None,
               feats: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, H], keys [B, n, H], mask [B, n] (True = real), feats [B, n, F] -> scores [B, n], -inf at padding."""
        q = self.query(z)  # [B, H]
        k = (keys - self.k_mean) / self.k_std  # [B, n, H]
        s = torch.einsum("bh,bnh->bn", q, k) * self.scale
        if self.n_features:
            if feats is None or feats.shape[-1] != self.n_features:
                raise UserError(f"this retriever scores {self.n_features} features per element; "
                                f"got {None if feats is None else feats.shape[-1]}")
            c = self.context((z - self.q_mean) / self.q_std)  # [B, C]
            f = (feats - self.f_mean) / self.f_std  # [B, n, F]
            x = torch.cat([f, c[:, None, :].expand(-1, f.shape[1], -1)], dim=-1)  # [B, n, F + C]
            s = s + self.feature_net(x).squeeze(-1)  # [B, n]
        return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _kl(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(S' || softmax(logits)) per sample [B]; padded entries contribute nothing."""
    logp = torch.log_softmax(logits, dim=-1)
    ent = torch.xlogy(targets, targets)  # S' log S' (0 where S' = 0)
    cross = torch.where(mask, targets * logp, torch.zeros_like(logp))
    return (ent - cross).sum(-1)


# ---------------------------------------------------------------------- inference wrapper
class Retriever:
    """A trained retriever: scoring, top-k selection, save/load (safetensors + JSON)."""

    def __init__(self, model: RetrieverMLP, config: RetrieverConfig, info: dict[str, Any] | None = None,
                 feature_names: Sequence[str] = ()) -> None:
        self.model = model.eval()
        self.config = config
        self.info = info or {}
        self.feature_names = tuple(feature_names)  # () for the paper's retriever
        self.features: Any = None
        """What computes the features (automr.methods.feature_retriever.ElementFeatures): saved with the
        retriever, attached by that module's load_retriever; the memory package only sees arrays."""

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def kind(self) -> str:
        """'paper' (MLP(z_t)^T z_m only) or 'features' (plus the cheap element features)."""
        return "features" if self.feature_names else "paper"

    @classmethod
    def new(cls, hidden_size: int, config: RetrieverConfig, feature_names: Sequence[str] = ()) -> Retriever:
        """An untrained retriever, initialised from config.seed (without touching the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = RetrieverMLP(hidden_size, config.hidden, config.dropout, config.score_scale, len(feature_names),
                                 config.feature_hidden)
        return cls(model, config, feature_names=feature_names)

    def _check(self, h: int, what: str) -> None:
        if h != self.hidden_size:
            raise UserError(
                f"{what} have hidden size {h} but the retriever was trained on hidden size {self.hidden_size}; "
                "use the retriever trained for this model and layer."
            )

    @torch.no_grad()
    def logits_batch(self, queries: np.ndarray | torch.Tensor, keys: np.ndarray | torch.Tensor, mask: Any = None,
                     feats: Any = None) -> np.ndarray:
        """queries [B, H], keys [B, n, H], mask [B, n], feats [B, n, F] (feature retriever) -> scores before
        softmax [B, n] (-inf at padding)."""
        z = torch.as_tensor(np.asarray(queries, np.float32) if not torch.is_tensor(queries) else queries, dtype=torch.float32)
        k = torch.as_tensor(np.asarray(keys, np.float32) if not torch.is_tensor(keys) else keys, dtype=torch.float32)
        self._check(z.shape[-1], "queries")
        self._check(k.shape[-1], "keys")
        m = None if mask is None else torch.as_tensor(np.asarray(mask, bool))
        f = None if feats is None else torch.as_tensor(np.asarray(feats, np.float32))
        return self.model.eval().logits(z, k, m, f).numpy()

    def scores(self, query: Any, keys: Any, feats: Any = None) -> np.ndarray:
        """One sample: query [H], keys [n, H], feats [n, F] (feature retriever) -> S = softmax scores [n] (float32)."""
        f = None if feats is None else np.asarray(feats, np.float32)[None]
        s = self.logits_batch(np.asarray(query, np.float32)[None], np.asarray(keys, np.float32)[None], feats=f)[0]
        e = np.exp(s - s.max())
        return e / e.sum()

    def select(self, query: Any, keys: Any, k: int | None = None) -> np.ndarray:
        """One sample: indices of the top-k keys [min(k, n)], best first (k defaults to config.top_k)."""
        k = k or self.config.top_k
        keys = np.asarray(keys, np.float32)
        if len(keys) == 0:
            return np.zeros(0, np.int64)
        s = self.logits_batch(np.asarray(query, np.float32)[None], keys[None])[0]
        return np.argsort(-s, kind="stable")[:k].astype(np.int64)

    def select_batch(self, queries: Any, key_sets: Sequence[Any], k: int | None = None,
                     feature_sets: Sequence[Any] | None = None) -> np.ndarray:
        """Many samples with variable memory sizes -> int64 [B, k] indices, best first, -1 padding.

        feature_sets[i] [n_i, F]: the elements' features, required by (and only by) a feature retriever;
        callers go through automr.methods.feature_retriever.select_elements, which computes them.
        """
        k = k or self.config.top_k
        b = len(key_sets)
        out = np.full((b, k), -1, np.int64)
        m = max((len(x) for x in key_sets), default=0)
        if b == 0 or m == 0:
            return out
        if bool(self.feature_names) != (feature_sets is not None):
            raise UserError(f"a {self.kind} retriever " + ("needs the elements' features (load it with "
                            "automr.methods.feature_retriever.load_retriever)" if self.feature_names else "takes no features"))
        h = self.hidden_size
        keys = np.zeros((b, m, h), np.float32)
        mask = np.zeros((b, m), bool)
        feats = np.zeros((b, m, len(self.feature_names)), np.float32) if feature_sets is not None else None
        for i, x in enumerate(key_sets):
            if len(x):
                keys[i, : len(x)] = x
                mask[i, : len(x)] = True
                if feats is not None:
                    feats[i, : len(x)] = feature_sets[i]  # type: ignore[index]
        s = self.logits_batch(queries, keys, mask, feats)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        valid = np.take_along_axis(mask, order, axis=1)
        out[:, : order.shape[1]] = np.where(valid, order, -1)
        return out

    def save(self, folder: str | Path) -> Path:
        """Write retriever.safetensors (weights + normalisation) and retriever.json (config, info)."""
        from safetensors.torch import save_file

        from automr.config import save_config
        from automr.utils.io import atomic_file, write_json

        folder = Path(folder)
        with atomic_file(folder / _WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        spec = {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "kind": self.kind,
            "feature_names": list(self.feature_names),
            "config": self.config.model_dump(mode="json"),
            "info": self.info,
        }
        if self.feature_names:
            if self.features is None:
                raise ValueError("a feature retriever is saved with its features (attach Retriever.features)")
            self.features.save(folder)
        write_json(folder / _SPEC, spec)
        save_config(self.config, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Retriever:
        from safetensors.torch import load_file

        folder = Path(folder)
        problem = retriever_problem(folder)
        if problem:
            raise UserError(problem)
        spec = json.loads((folder / _SPEC).read_text())
        config = RetrieverConfig(**spec["config"])
        names = spec.get("feature_names", [])  # absent in folders saved before the feature retriever: the paper's
        model = RetrieverMLP(int(spec["hidden_size"]), config.hidden, config.dropout, config.score_scale, len(names),
                             config.feature_hidden)
        model.load_state_dict(load_file(str(folder / _WEIGHTS)))
        return cls(model, config, spec.get("info", {}), names)


# ---------------------------------------------------------------------- evaluation and training
@torch.no_grad()
def _evaluate_packed(model: RetrieverMLP, p: _Packed, batch_size: int = 1024) -> dict[str, float]:
    model.eval()
    kl, top1, chosen, mean, best = [], [], [], [], []
    for s in range(0, len(p.queries), batch_size):
        sl = slice(s, s + batch_size)
        n = int(p.lengths[sl].max())
        mask, tgt, g = p.mask[sl, :n], p.targets[sl, :n], p.gains[sl, :n]
        logits = model.logits(p.queries[sl], p.bank[p.rows[sl, :n]], mask, None if p.feats is None else p.feats[sl, :n])
        kl.append(_kl(logits, tgt, mask))
        pick = logits.argmax(-1)
        # the labels' argmax is the largest gain for both label types (float32 prob_diff labels tie)
        top1.append((pick == g.masked_fill(~mask, float("-inf")).argmax(-1)).double())
        chosen.append(g.gather(1, pick[:, None])[:, 0])
        mean.append(g.sum(-1) / p.lengths[sl])
        best.append(g.masked_fill(~mask, float("-inf")).max(-1).values)
    ch, mu, be, hits = torch.cat(chosen), torch.cat(mean), torch.cat(best), torch.cat(top1)
    den = float((be - mu).sum())
    return {
        "kl": float(torch.cat(kl).mean()),
        "top1": float(hits.mean()),
        "top1_hits": int(hits.sum()),
        "samples": len(hits),
        "headroom_share": float((ch - mu).sum()) / den if den > 0 else float("nan"),
        "chosen_gain": float(ch.mean()),
    }


def evaluate_retriever(retriever: Retriever, data: RetrievalData, label_type: str | None = None, temperature: float | None = None) -> dict[str, float]:
    """Validation figures of a retriever on annotated samples (labels from its config unless given).

    kl: mean KL(S' || S); top1: argmax agrees with the labels' argmax (top1_hits: in how many of
    the `samples`); headroom_share: share of the oracle headroom the argmax captures
    (automr.memory.labels.headroom_share); chosen_gain: mean gain in nats of the chosen element
    over the empty slot.
    """
    c = retriever.config
    if data.n_features != len(retriever.feature_names):
        raise UserError(f"the data carries {data.n_features} element features, the {retriever.kind} retriever "
                        f"scores {len(retriever.feature_names)}")
    p = _pack(data, label_type or c.label_type, temperature or c.temperature)
    return _evaluate_packed(retriever.model, p)


@dataclass
class TrainResult:
    """What training produced: the best retriever and the per-epoch history."""

    retriever: Retriever
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = float("nan")
    best_criterion: dict[str, Any] | None = None  # the best epoch's Criterion.record()
    stopped_early: bool = False
    samples_per_s: float = 0.0


def train_retriever(
    config: RetrieverConfig,
    train: RetrievalData,
    valid: RetrievalData | None = None,
    metric: Callable[[Retriever], float | Criterion] | None = None,
    *,
    progress: bool = True,
    features: Any = None,
) -> TrainResult:
    """Train with Adam on KL(S' || S) over padded mini-batches; early-stop on a validation metric.

    metric: callback retriever -> float or Criterion (value and the hits behind it), higher is
    better, called after every epoch (the pipeline's validation NDCG@10). Without it,
    config.select_metric on `valid` is used; without `valid` either, training runs all epochs and
    keeps the last. The best epoch's weights are restored. Every validated epoch logs its
    criterion. The global torch RNG is left untouched; the result depends only on config.seed and the data.
    features: the ElementFeatures that computed train.features (a feature retriever is trained when the
    data carry features); attached to the retriever, so callbacks and save() see it.
    """
    from automr.utils.logging import info
    from automr.utils.progress import rate_progress

    if valid is not None and valid.hidden_size != train.hidden_size:
        raise UserError(f"validation data has hidden size {valid.hidden_size}, training data {train.hidden_size}")
    ptrain = _pack(train, config.label_type, config.temperature)
    pvalid = _pack(valid, config.label_type, config.temperature) if valid is not None else None
    if valid is not None and valid.n_features != train.n_features:
        raise UserError(f"validation data carry {valid.n_features} element features, training data {train.n_features}")
    if (config.features == "cheap") != (train.n_features > 0):
        raise UserError(f"config.features is {config.features!r} but the training data carry {train.n_features} element "
                        "features; compute them with automr.methods.feature_retriever.ElementFeatures (train-retriever does)")
    names = tuple(features.names) if features is not None else tuple(f"f{i}" for i in range(train.n_features))
    if len(names) != train.n_features:
        raise UserError(f"the features name {len(names)} columns but the training data carry {train.n_features}")
    retr = Retriever.new(train.hidden_size, config, names)
    retr.features = features
    model = retr.model
    if config.normalize == "standardize":
        model.set_normalization(ptrain.queries, ptrain.bank, None if ptrain.feats is None else ptrain.feats[ptrain.mask])
    elif ptrain.feats is not None:  # features are on incomparable scales (days, counts, cosines): always standardised
        model.set_normalization(torch.zeros(1, train.hidden_size), torch.zeros(1, train.hidden_size), ptrain.feats[ptrain.mask])
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    result = TrainResult(retriever=retr)
    stopper = EarlyStopping(config.patience, "max")  # a NaN metric never counts as better
    best_state: dict[str, torch.Tensor] | None = None
    best: Criterion | None = None
    t0 = time.perf_counter()
    bar = rate_progress("epochs", transient=True, disable=not progress, fields=("info",))
    with torch.random.fork_rng(devices=[]), bar:
        torch.manual_seed(config.seed)
        task = bar.add_task("retriever", total=config.epochs, info="")
        for epoch in range(config.epochs):
            row: dict[str, Any] = {"epoch": epoch, "train_kl": _train_epoch(model, opt, ptrain, rng, config.batch_size)}
            if pvalid is not None:
                row.update({f"valid_{k}": v for k, v in _evaluate_packed(model, pvalid).items()})
            crit = _epoch_score(config, retr, metric, row)
            if crit is not None:
                row |= {"metric": crit.value, **crit.record()}
                info(f"retriever epoch {epoch}: train KL {row['train_kl']:.4f}, {crit.describe()}")
                if stopper.update(crit.value, epoch):
                    best_state, best = copy.deepcopy(model.state_dict()), crit
            result.history.append(row)
            bar.update(task, advance=1, info=f"kl {row['train_kl']:.4f}" + (f" metric {crit.value:.4f}" if crit is not None else ""))
            if crit is not None and stopper.should_stop:
                result.stopped_early = True
                break
    if best is not None:
        result.best_criterion = {"epoch": stopper.best_epoch, **best.record()}
        warn_if_thin("retriever", best, stopper.best_epoch, "Validate on more samples, or on a criterion every sample "
                     "contributes to (select_metric headroom_share; with --recall-samples, --recall-metric ndcg@10 and a larger --recall-n).")
    _finish(result, stopper, best_state, time.perf_counter() - t0, len(train), valid, metric, progress)
    return result


def _train_epoch(model: RetrieverMLP, opt: torch.optim.Optimizer, p: _Packed, rng: np.random.Generator, batch_size: int) -> float:
    """One pass over the packed training samples in a random order; returns the mean KL."""
    model.train()
    n = len(p.queries)
    perm = torch.from_numpy(rng.permutation(n))
    total = 0.0
    for s in range(0, n, batch_size):
        b = perm[s : s + batch_size]
        m = int(p.lengths[b].max())
        mask = p.mask[b, :m]
        logits = model.logits(p.queries[b], p.bank[p.rows[b, :m]], mask, None if p.feats is None else p.feats[b, :m])  # [B, m]
        loss = _kl(logits, p.targets[b, :m], mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(b)
    return total / n


def _epoch_score(
    config: RetrieverConfig, retr: Retriever, metric: Callable[[Retriever], float | Criterion] | None, row: dict[str, Any]
) -> Criterion | None:
    """This epoch's early-stopping criterion (value higher is better): the callback's, else the built-in metric's, else None.

    `row` holds valid_* figures only when there is validation data. Only top1 is a count of hits;
    headroom_share and neg_kl are means every sample contributes to, logged with the top-1 count
    for context.
    """
    if metric is not None:
        retr.model.eval()
        got = metric(retr)
        return got if isinstance(got, Criterion) else Criterion("callback", float(got))
    if "valid_kl" not in row:
        return None
    n, hits, name = int(row["valid_samples"]), int(row["valid_top1_hits"]), config.select_metric
    if name == "top1":
        return Criterion(name, row["valid_top1"], n, hits, "argmax = labels' best")
    value = -row["valid_kl"] if name == "neg_kl" else row["valid_headroom_share"]
    return Criterion(name, value, n, note=f"argmax = labels' best in {hits:,}")


def _finish(
    result: TrainResult, stopper: EarlyStopping, best_state: dict[str, torch.Tensor] | None, elapsed: float,
    n_train: int, valid: RetrievalData | None, metric: Callable[[Retriever], float | Criterion] | None, progress: bool,
) -> None:
    """Restore the best epoch's weights and record what training did (result fields and retriever.info)."""
    from automr.utils.logging import info

    model = result.retriever.model
    if best_state is not None:
        model.load_state_dict(best_state)
        result.best_epoch, result.best_metric = stopper.best_epoch, float(stopper.best)  # type: ignore[arg-type]
    else:
        result.best_epoch = len(result.history) - 1
    model.eval()
    seen = n_train * len(result.history)
    result.samples_per_s = seen / elapsed if elapsed > 0 else float("inf")
    cfg = result.retriever.config
    result.retriever.info = {
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "epochs_run": len(result.history),
        "n_train": n_train,
        "n_valid": len(valid) if valid is not None else 0,
        "metric": "callback" if metric is not None else (cfg.select_metric if valid is not None else None),
        "best_criterion": result.best_criterion,
    }
    if progress:
        info(
            f"retriever: {len(result.history)} epochs, best {result.best_epoch} (metric {result.best_metric:.4f}), "
            f"{result.samples_per_s:,.0f} samples/s"
        )
