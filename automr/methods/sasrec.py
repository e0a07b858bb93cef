"""SASRec (Kang & McAuley, ICDM 2018) behind the Recommender interface.

Model: item embedding (scaled by sqrt(d)) + learned absolute positions, `blocks` pre-norm
causal self-attention blocks (query layer-normed, keys/values not, as in the authors' code),
point-wise feed-forward, layer norm, dropout; the score of item i after position t is the dot
product of the position's output with item i's embedding (shared input/output embeddings).
Training: binary cross-entropy on every position of a sequence, the next item as the positive
and one uniformly sampled negative; Adam (beta2 = 0.98). Early stopping on validation NDCG@10
(full ranking, the whole valid split), ties broken by Recall@10.

Why NDCG@10 over the whole split (issue 9 A9): Recall@1 on a small validation set is one or two
hits, so the epoch it picks is chance (games: best epoch 2 from a single hit in 857 samples while
NDCG@10 was still rising; another set: Recall@1 flat for 41 epochs). NDCG@10 counts every target
in the top 10 and weighs it by rank. One validation pass over ml-1m's 4,832 validation samples
takes 4.8 s on one thread of a loaded 2-core machine, against 16-45 s for a training epoch there,
so `n_valid` defaults to all of them; set it to cap the pass on larger sets. Every validation
logs and records the criterion with the hits it rests on (history in sasrec.json).

Negatives (decision): the authors draw negatives outside the user's sequence, which suits their
evaluation (100 sampled candidates, none from the history). Here every catalogue item is ranked
and history items stay unless the evaluator's exclude_history removes them (for every method alike;
on data with repeats it must not), so a model that never saw a history
item as a negative ranks the user's own recent items on top. `negatives: any` (default) draws
any item but the positive. Measured: on a cyclic toy (60 items, 40 epochs) the top-1 item was
the last input item for 106 of 200 users with "unseen", and recall@1 rose from 0.30 to 0.74
with "any"; on a temporal-split proxy of ML-1m after 15 epochs, test Recall@10 was 0.012
("unseen") against 0.041 ("any").

Training sequences come from the training samples only. A user's samples overlap (each one's
history is the previous one's plus one item), so instead of one sequence per sample -- which
would count the same prefix many times -- each user gives non-overlapping windows: the latest
training sample's memory + recent + target (last max_len + 1 items), then the latest sample
whose target precedes that window, and so on (`train_windows: all`); `train_windows: last`
keeps only the first, i.e. each user's longest training sample.

At inference a sample's memory + recent (the last max_len items) is the input and every
catalogue item is scored. Weights (safetensors), options and the item index are saved in the
method's work folder; a later fit with the same data, options and seed loads them instead of
training again (`reuse`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from rich.console import Console
from torch import nn

from automr.args import DeviceOnlyArgs, LogArgs
from automr.config import build_config
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.eval.metrics import rank_summary, ranking_criterion, target_ranks
from automr.utils.progress import rate_progress
from automr.utils.seeding import select_subset
from automr.methods.base import Recommender, refuse_method_exclusion
from automr.utils.early_stopping import Criterion, EarlyStopping, warn_if_thin
from automr.utils.io import read_json, write_json
from automr.utils.logging import get_console


class SasrecOptions(DeviceOnlyArgs, LogArgs):
    """SASRec settings (method_options: {sasrec: {...}} in the evaluate config)."""

    max_len: int = Field(50, ge=1, description="sequence length the model reads (the most recent items)")
    hidden: int = Field(64, ge=1, description="embedding and hidden size")
    blocks: int = Field(2, ge=1, description="self-attention blocks")
    heads: int = Field(1, ge=1, description="attention heads (must divide hidden)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    l2_emb: float = Field(0.0, ge=0.0, description="L2 penalty on the item embeddings of each batch")
    batch_size: int = Field(128, ge=1, description="sequences per training batch")
    epochs: int = Field(200, ge=1, description="maximum passes over the training sequences")
    patience: int = Field(10, ge=1, description="stop after this many validations without improvement")
    eval_every: int = Field(1, ge=1, description="validate every this many epochs")
    valid_metric: Literal["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"] = Field(
        "ndcg@10", description="validation metric for early stopping (recall@1 on a small set is a few hits: noise)"
    )
    n_valid: int = Field(0, ge=0, description="validation samples used for early stopping (0 = all; else a seeded subset)")
    train_windows: Literal["all", "last"] = Field("all", description="non-overlapping windows per user, or only the latest")
    negatives: Literal["unseen", "any"] = Field(
        "any", description="negative sampler: anything but the positive (default), or items outside the sequence (authors')"
    )
    exclude_history: bool = Field(False, description="moved to `automr evaluate --exclude-history` (only false is accepted)")
    threads: int = Field(
        1, ge=0, description="CPU threads for torch while fitting/ranking (0 = torch's default); see _torch_threads"
    )
    reuse: bool = Field(True, description="load saved weights from the work folder when data, options and seed match")

    _moved = field_validator("exclude_history")(refuse_method_exclusion)


# ---------------------------------------------------------------------------------------------
# Model


class SASRecBlock(nn.Module):
    """Causal self-attention + point-wise feed-forward, pre-norm, as in the authors' code."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        # x: (B, L, d); causal: (L, L) bool, True = may not attend
        q = self.attn_norm(x)
        a, _ = self.attn(q, x, x, attn_mask=causal, need_weights=False)
        x = q + a
        y = self.ffn_norm(x)
        return y + self.ffn(y)


class SASRec(nn.Module):
    """Item index 0 is padding; real items are 1..n_items. Sequences are left-padded."""

    def __init__(self, n_items: int, max_len: int, hidden: int, blocks: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, dropout) for _ in range(blocks))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)
        causal = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)
        # Xavier-normal for every matrix, as in the widely used PyTorch port (pmixer/SASRec.pytorch):
        # torch's N(0, 1) embedding init times sqrt(d) would start with huge logits.
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        # seq: (B, L) item indices -> (B, L, d) one state per position
        L = seq.shape[1]
        x = self.item_emb(seq) * math.sqrt(self.hidden)
        x = x + self.pos_emb(torch.arange(L, device=seq.device))[None]
        x = self.emb_dropout(x)
        keep = (seq != 0).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        x = x * keep
        causal = self.causal[:L, :L]
        for block in self.blocks:
            x = block(x, causal) * keep
        return self.last_norm(x)

    def score_last(self, seq: torch.Tensor) -> torch.Tensor:
        # seq: (B, L) -> (B, n_items + 1) scores of every item after the last position; index 0 = -inf
        h = self.forward(seq)[:, -1]  # (B, d)
        scores = h @ self.item_emb.weight.T
        scores[:, 0] = float("-inf")
        return scores


# ---------------------------------------------------------------------------------------------
# Data


def _left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """(n, length) int64, each sequence's last `length` items right-aligned, 0 before them."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s) :] = s
    return out


def training_windows(train: pl.DataFrame, max_len: int, mode: str) -> list[tuple[list[int], int]]:
    """Non-overlapping item-id windows (<= max_len + 1 items) per user, from training samples.

    Returns (window item ids, user id) pairs. See the module docstring for the rule.
    """
    df = (
        train.with_row_index("_row")
        .select(
            "user_id",
            "target_time",
            "_row",
            pl.concat_list("memory_items", "recent_items", "target_item").alias("seq"),
            pl.concat_list("memory_times", "recent_times", "target_time").alias("times"),
        )
        .sort(["user_id", "target_time", "_row"])
    )
    out: list[tuple[list[int], int]] = []
    for (user,), group in df.group_by(["user_id"], maintain_order=True):
        seqs = group["seq"].to_list()
        times = group["times"].to_list()
        targets = group["target_time"].to_list()
        i = len(seqs) - 1
        while i >= 0:
            window = seqs[i][-(max_len + 1) :]
            wtimes = times[i][-(max_len + 1) :]
            if len(window) >= 2:
                out.append((window, int(user)))
            if mode == "last":
                break
            start = wtimes[1] if len(wtimes) >= 2 else targets[i]  # time of the first supervised item
            j = i - 1
            while j >= 0 and targets[j] >= start:
                j -= 1
            i = j
    return out


def data_fingerprint(data: PreparedData) -> str:
    """Hash of the files a fit reads (items, train, valid), to know when saved weights are stale."""
    h = hashlib.sha256()
    for p in (data.root / "items.parquet", data.root / "samples" / "train.parquet", data.root / "samples" / "valid.parquet"):
        h.update(p.read_bytes())
    return h.hexdigest()


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore the process setting (0 = leave it).

    Why 1 by default: SASRec's matrices are small (d = 64), so extra threads barely help, and
    on a shared machine OpenMP threads that spin-wait for busy cores make it far slower
    (measured here under load: 24 ms per batch with 1 thread, 580 ms with 2).
    """
    if n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(name: str) -> torch.device:
    """The torch device for option `device` (auto, cpu, cuda, cuda:N), as the LLM stages resolve it."""
    from automr.llm.loading import resolve_device

    return resolve_device(name)


# ---------------------------------------------------------------------------------------------
# Recommender


class SASRecRecommender(Recommender):
    name = "sasrec"

    def __init__(self, options: SasrecOptions, seed: int = 0, console: Console | None = None) -> None:
        if options.hidden % options.heads:
            raise UserError(f"sasrec: hidden ({options.hidden}) must be divisible by heads ({options.heads})")
        self.options = options
        self.seed = seed
        self.console = console or get_console()
        self.device = _device(options.device)
        self.model: SASRec | None = None
        self.item_ids: np.ndarray | None = None  # (n_items,) index i+1 -> item id
        self.index_of: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []  # per-validation log
        self.best: dict[str, Any] | None = None  # the best validation's epoch and criterion

    # -- mapping ------------------------------------------------------------------------------
    def _set_items(self, item_ids: np.ndarray) -> None:
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.index_of = {int(i): k + 1 for k, i in enumerate(self.item_ids)}

    def _encode(self, items: list[int]) -> np.ndarray:
        """Item ids -> indices; items outside the catalogue are dropped."""
        idx = self.index_of
        return np.asarray([idx[i] for i in items if i in idx], dtype=np.int64)

    def _inputs(self, samples: pl.DataFrame) -> np.ndarray:
        """(n, max_len) left-padded indices of each sample's memory + recent."""
        hist = samples.select(pl.concat_list("memory_items", "recent_items").alias("h"))["h"].to_list()
        return _left_pad([self._encode(h) for h in hist], self.options.max_len)

    # -- fit ----------------------------------------------------------------------------------
    def _fingerprint(self, data: PreparedData) -> dict[str, Any]:
        opts = self.options.model_dump(exclude={"device", "reuse", "exclude_history", "threads", "progress"})
        return {"data": data_fingerprint(data), "options": opts, "seed": self.seed}

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self._set_items(data.items["item_id"].to_numpy())
        o = self.options
        torch.manual_seed(self.seed)  # initial weights, then dropout, depend on the seed only
        self.model = SASRec(len(self.item_ids), o.max_len, o.hidden, o.blocks, o.heads, o.dropout).to(self.device)
        fp = self._fingerprint(data)
        meta_path, weights_path = work_dir / "sasrec.json", work_dir / "model.safetensors"
        if o.reuse and meta_path.is_file() and weights_path.is_file():
            meta = read_json(meta_path)
            if meta.get("fingerprint") == json.loads(json.dumps(fp)):
                from safetensors.torch import load_file

                self.model.load_state_dict(load_file(weights_path, device=str(self.device)))
                self.model.eval()
                self.console.print(f"sasrec: loaded weights from {weights_path} (same data, options and seed)")
                return
        meta_path.unlink(missing_ok=True)  # saved weights are valid only once the new meta is written
        with _torch_threads(o.threads):
            self._train(data)
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(weights_path))
        np.save(work_dir / "item_ids.npy", self.item_ids)
        write_json(
            meta_path,
            {"fingerprint": fp, "options": self.options.model_dump(), "n_items": len(self.item_ids), "history": self.history,
             "best": self.best},
        )

    def _train(self, data: PreparedData) -> None:
        """Train on the training windows, validating every `eval_every` epochs; keep the best epoch's weights."""
        o = self.options
        gen = torch.Generator().manual_seed(self.seed)  # negatives and batch order
        model = self.model
        assert model is not None and self.item_ids is not None
        seqs, n_train = self._training_sequences(data)  # (S, L+1)
        n_seq, n_pos = seqs.shape[0], int((seqs[:, 1:] != 0).sum())
        valid = self._validation_samples(data)
        opt = torch.optim.Adam(model.parameters(), lr=o.lr, betas=(0.9, 0.98))
        self.console.print(
            f"sasrec: {n_seq} training windows ({n_pos} supervised positions) from {n_train} training samples, "
            f"{len(self.item_ids)} items, {valid.height} validation samples, device {self.device}"
        )
        stopper = EarlyStopping(o.patience, "max")
        best_state, best = None, None
        for epoch in range(1, o.epochs + 1):
            loss, secs = self._train_epoch(opt, seqs, gen, epoch)
            line = f"sasrec epoch {epoch}: loss {loss:.4f}, {n_seq / secs:,.0f} seq/s ({n_pos / secs:,.0f} positions/s)"
            if valid.height == 0 or (epoch % o.eval_every and epoch != o.epochs):
                self.console.print(line)  # no validation set (train every epoch), or not a validation epoch
                continue
            metrics = self.validate(valid)
            crit, score = self.criterion(metrics)
            self.history.append({"epoch": epoch, "loss": loss, **metrics, **crit.record(), "seq_per_s": n_seq / secs})
            self.console.print(f"{line}, {crit.describe()}", markup=False)
            if stopper.update(score, epoch):
                best_state, best = {k: v.detach().clone() for k, v in model.state_dict().items()}, crit
            elif stopper.should_stop:
                self.console.print(f"sasrec: early stop at epoch {epoch}; best {o.valid_metric} {stopper.best[0]:.4f} "  # type: ignore[index]
                                   f"at epoch {stopper.best_epoch}", markup=False)
                break
        if best_state is not None and best is not None:
            model.load_state_dict(best_state)
            self.best = {"epoch": stopper.best_epoch, **best.record()}
            deeper = "" if o.valid_metric == "ndcg@10" else " or stop on ndcg@10 (valid_metric)"
            warn_if_thin("sasrec", best, stopper.best_epoch, f"Validate on more samples (n_valid: 0 = the whole split){deeper}.")
        model.eval()

    def criterion(self, metrics: dict[str, float]) -> tuple[Criterion, tuple[float, float]]:
        """The early-stopping criterion of one validation, and the (valid_metric, tie-breaker) pair compared.

        The tie-breaker (Recall@10, or NDCG@10 when that is not the criterion) only decides between
        epochs whose criterion is exactly equal, as a hit-based one often is (0 in the first epochs).
        """
        o = self.options
        tie = "recall@10" if o.valid_metric == "ndcg@10" else "ndcg@10"
        crit = replace(ranking_criterion(o.valid_metric, metrics), note=f"{tie} {metrics[tie]:.4f}")
        return crit, (metrics[o.valid_metric], metrics[tie])

    def _training_sequences(self, data: PreparedData) -> tuple[torch.Tensor, int]:
        """The training windows as left-padded item indices (S, max_len + 1), and the number of training samples."""
        train = data.split("train")
        windows = training_windows(train, self.options.max_len, self.options.train_windows)
        if not windows:
            raise UserError(
                f"sasrec: no training sequences of >= 2 items in {data.root}/samples/train.parquet; "
                "the train split must have samples with some history"
            )
        return torch.from_numpy(_left_pad([self._encode(w) for w, _ in windows], self.options.max_len + 1)), train.height

    def _validation_samples(self, data: PreparedData) -> pl.DataFrame:
        """The validation samples early stopping uses: all, or a seeded subset of n_valid."""
        valid = data.split("valid")
        if self.options.n_valid and valid.height > self.options.n_valid:
            valid = valid[select_subset(valid.height, self.options.n_valid, self.seed).tolist()]
        return valid

    def _train_epoch(self, opt: torch.optim.Optimizer, seqs: torch.Tensor, gen: torch.Generator, epoch: int) -> tuple[float, float]:
        """One pass over the windows in a random order; returns (mean loss per window, seconds)."""
        o, model = self.options, self.model
        assert model is not None and self.item_ids is not None
        inputs, positives = seqs[:, :-1], seqs[:, 1:]  # (S, L) each
        n_seq = inputs.shape[0]
        model.train()
        perm = torch.randperm(n_seq, generator=gen)
        total, t0 = 0.0, time.perf_counter()
        with rate_progress("seq", console=self.console, transient=True, disable=not o.progress) as progress:
            task = progress.add_task(f"sasrec epoch {epoch}", total=n_seq)
            for start in range(0, n_seq, o.batch_size):
                idx = perm[start : start + o.batch_size]
                neg = self._negatives(seqs[idx], gen, len(self.item_ids), o.negatives)  # (B, L)
                loss = self._loss(inputs[idx].to(self.device), positives[idx].to(self.device), neg.to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().item() * idx.shape[0]
                progress.advance(task, idx.shape[0])
        return total / n_seq, time.perf_counter() - t0

    def _loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """BCE of the positive against one sampled negative at every real position (+ optional L2 on their embeddings)."""
        model = self.model
        assert model is not None
        h = model(seq)  # (B, L, d)
        pos_logit = (h * model.item_emb(pos)).sum(-1)
        neg_logit = (h * model.item_emb(neg)).sum(-1)
        mask = pos != 0
        loss = F.binary_cross_entropy_with_logits(pos_logit[mask], torch.ones_like(pos_logit[mask]))
        loss = loss + F.binary_cross_entropy_with_logits(neg_logit[mask], torch.zeros_like(neg_logit[mask]))
        if self.options.l2_emb:
            loss = loss + self.options.l2_emb * model.item_emb(torch.cat([pos, neg], 1)).pow(2).sum() / mask.sum()
        return loss

    @staticmethod
    def _negatives(
        window: torch.Tensor, gen: torch.Generator, n_items: int, mode: str, tries: int = 10
    ) -> torch.Tensor:
        """One uniform negative per position. window: (B, L+1) -> (B, L).

        mode "unseen": redrawn while it lies anywhere in the window (the authors' sampler);
        "any": redrawn only while it equals that position's positive.
        """
        B, L = window.shape[0], window.shape[1] - 1
        neg = torch.randint(1, n_items + 1, (B, L), generator=gen)
        for _ in range(tries):
            if mode == "unseen":
                clash = (neg[:, :, None] == window[:, None, :]).any(-1)  # (B, L)
            else:
                clash = neg == window[:, 1:]
            if not clash.any() or n_items <= window.shape[1]:
                break
            neg[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), generator=gen)
        return neg

    @torch.no_grad()
    def validate(self, samples: pl.DataFrame, batch_size: int = 512) -> dict[str, float]:
        """Full ranking on `samples` (used for early stopping): mean metrics, hits@K and the sample count."""
        recs = np.concatenate(
            [self.recommend(samples.slice(s, batch_size), 10) for s in range(0, samples.height, batch_size)]
        )
        return rank_summary(target_ranks(recs, samples["target_item"].to_numpy()))

    # -- recommend ----------------------------------------------------------------------------
    @torch.no_grad()
    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        if self.model is None or self.item_ids is None:
            raise RuntimeError("SASRecRecommender.recommend called before fit")
        with _torch_threads(self.options.threads):
            return self._recommend(samples, k)

    def _recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        assert self.model is not None and self.item_ids is not None
        was_training = self.model.training
        self.model.eval()
        seq = torch.from_numpy(self._inputs(samples)).to(self.device)  # (n, L)
        scores = self.model.score_last(seq)  # (n, n_items + 1); padding index 0 is -inf
        kk = min(k, len(self.item_ids))
        top = scores.topk(kk, dim=1).indices.cpu().numpy()  # (n, kk); indices >= 1
        out = np.full((samples.height, k), -1, dtype=np.int64)
        out[:, :kk] = self.item_ids[top - 1]
        if was_training:
            self.model.train()
        return out


def make(options: dict[str, Any], seed: int) -> SASRecRecommender:
    """Factory for the METHODS registry."""
    return SASRecRecommender(build_config(SasrecOptions, options, source="sasrec options"), seed)
