"""Annotation labels and their statistics, from per-candidate answer log-probabilities.

Input per training sample (produced by the annotate stage):
  logp_empty  scalar    log P(y | z_t)       -- the answer's log-probability with an empty slot
  logp_cand   [M]       log P(y | z_t, z_m)  -- with memory element m in the slot
(each the sum of the answer tokens' log-probabilities, in nats).

Two label types, both a distribution S' over the sample's M elements:
  "prob_diff"    the paper's: delta_m = P(y|z_t,z_m) - P(y|z_t), S' = softmax(delta).
                 P is ~exp(-25), so delta is ~1e-11 and S' is uniform to ~1e-11. That is faithful
                 to the paper and is kept as is; it is computed in float64 (in float32 it would be
                 exactly uniform), and a retriever trained on it learns next to nothing.
  "loglik_gain"  g_m = logp_cand_m - logp_empty, S' = softmax(g / temperature).

Every retrieval method is reported by the share of the oracle headroom it captures
(`headroom_share`): (gain of the chosen element - mean gain) / (max gain - mean gain), where the
mean gain is what a random element gets in expectation. 1 = the best element, 0 = random.

All functions accept a single sample (logp_empty scalar, logp_cand [M]) or a padded batch
(logp_empty [B], logp_cand [B, M] with an optional bool mask [B, M], True = real element).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from automr.errors import UserError

LabelType = Literal["prob_diff", "loglik_gain"]
LABEL_TYPES: tuple[str, ...] = ("prob_diff", "loglik_gain")


def _prep(logp_empty, logp_cand, mask):
    le = np.asarray(logp_empty, dtype=np.float64)
    lc = np.asarray(logp_cand, dtype=np.float64)
    if lc.ndim == 0:
        raise UserError("logp_cand must have a last axis over memory elements, found a scalar")
    if le.shape != lc.shape[:-1]:
        raise UserError(f"logp_empty shape {le.shape} does not match logp_cand shape {lc.shape} (expected {lc.shape[:-1]})")
    m = np.ones(lc.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != lc.shape:
        raise UserError(f"mask shape {m.shape} does not match logp_cand shape {lc.shape}")
    if not m.any(axis=-1).all():
        raise UserError("every sample needs at least one memory element (a mask row is all False)")
    return le, lc, m


def _masked_softmax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """softmax over the last axis, in float64, with masked entries getting probability 0."""
    x = np.where(mask, x, -np.inf)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.where(mask, np.exp(x), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


def gains(logp_empty, logp_cand, mask=None) -> np.ndarray:
    """Log-likelihood gain g_m = log P(y|z_t,z_m) - log P(y|z_t) in nats ([..., M], 0 where masked)."""
    le, lc, m = _prep(logp_empty, logp_cand, mask)
    return np.where(m, lc - le[..., None], 0.0)


def prob_diff(logp_empty, logp_cand, mask=None) -> np.ndarray:
    """The paper's delta_m = P(y|z_t,z_m) - P(y|z_t), float64 ([..., M], 0 where masked).

    Computed as P(y|z_t) * expm1(g_m), which keeps full relative precision where the two
    probabilities nearly cancel; where exp(logp_empty) would underflow or the gain is huge it
    falls back to the direct difference.
    """
    le, lc, m = _prep(logp_empty, logp_cand, mask)
    g = lc - le[..., None]
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        stable = np.exp(le)[..., None] * np.expm1(np.minimum(g, 700.0))
        direct = np.exp(lc) - np.exp(le)[..., None]
    d = np.where(g < 700.0, stable, direct)
    return np.where(m, d, 0.0)


def prob_diff_labels(logp_empty, logp_cand, mask=None) -> np.ndarray:
    """S' = softmax(delta): the paper's labels (float64, nearly uniform at real scales)."""
    _, _, m = _prep(logp_empty, logp_cand, mask)
    return _masked_softmax(prob_diff(logp_empty, logp_cand, m), m)


def gain_labels(logp_empty, logp_cand, temperature: float = 1.0, mask=None) -> np.ndarray:
    """S' = softmax(g / temperature) with g the log-likelihood gain (float64)."""
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, found {temperature}")
    _, _, m = _prep(logp_empty, logp_cand, mask)
    return _masked_softmax(gains(logp_empty, logp_cand, m) / temperature, m)


def make_labels(label_type: LabelType, logp_empty, logp_cand, temperature: float = 1.0, mask=None) -> np.ndarray:
    """Labels of either type (temperature is used by "loglik_gain" only)."""
    if label_type == "prob_diff":
        return prob_diff_labels(logp_empty, logp_cand, mask)
    if label_type == "loglik_gain":
        return gain_labels(logp_empty, logp_cand, temperature, mask)
    raise UserError(f"unknown label_type {label_type!r}; expected one of {', '.join(LABEL_TYPES)}")


def headroom_share(
    chosen_gain: Sequence[float] | np.ndarray,
    gains: Sequence[Sequence[float] | np.ndarray],
    reduction: Literal["ratio_of_means", "mean_of_ratios"] = "ratio_of_means",
) -> float:
    """Share of the oracle headroom a retrieval method captures over a set of samples.

    chosen_gain[i]: gain (or log-probability: the share is shift-invariant per sample) of the
    element the method put in the slot for sample i; gains[i]: those of all the sample's elements.
    Per sample: (chosen - mean) / (max - mean); 1 = always the best, 0 = no better than random.

    reduction "ratio_of_means" (default) = sum(chosen - mean) / sum(max - mean): the nats a method
    gains over random divided by the nats a perfect retriever would gain. It is what DESIGN.md
    reports, and it stays stable where a sample has almost no headroom (its per-sample ratio
    would be ~0/0). "mean_of_ratios" averages per-sample ratios, skipping samples with no headroom.
    """
    c = np.asarray(chosen_gain, dtype=np.float64).reshape(-1)
    if len(c) != len(gains):
        raise UserError(f"headroom_share: {len(c)} chosen gains but {len(gains)} samples of gains")
    if len(c) == 0:
        raise UserError("headroom_share needs at least one sample")
    mean = np.array([np.mean(np.asarray(g, np.float64)) for g in gains])
    best = np.array([np.max(np.asarray(g, np.float64)) for g in gains])
    if np.any(c > best + 1e-9 * np.maximum(1.0, np.abs(best))):
        raise UserError("headroom_share: a chosen gain exceeds the best gain of its sample; pass gains of the same samples")
    num, den = c - mean, best - mean
    if reduction == "ratio_of_means":
        total = den.sum()
        return float(num.sum() / total) if total > 0 else float("nan")
    if reduction == "mean_of_ratios":
        ok = den > 0
        return float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")
    raise UserError(f"unknown reduction {reduction!r}; expected 'ratio_of_means' or 'mean_of_ratios'")


def chosen_gains(gains: Sequence[np.ndarray], chosen: Sequence[int] | np.ndarray) -> np.ndarray:
    """gains[i][chosen[i]] for every sample (helper for headroom_share from chosen indices)."""
    ch = np.asarray(chosen, np.int64).reshape(-1)
    return np.array([float(np.asarray(g)[j]) for g, j in zip(gains, ch.tolist())])


@dataclass(frozen=True)
class LabelStats:
    """Label statistics over a set of samples (nats for gains; probabilities for peakedness).

    best_gain       mean over samples of max_m g_m: the oracle's gain over the empty slot
    random_gain     mean over samples of mean_m g_m: a random element's expected gain
    headroom        best_gain - random_gain: what a perfect retriever adds over random retrieval
    max_prob_*      mean largest label probability, to compare with uniform_prob = mean 1/M
    peak_ratio_*    mean of max prob * M (1 = uniform)
    entropy_ratio_* mean of H(S') / log M (1 = uniform, 0 = one-hot); samples with M >= 2 only
    """

    n_samples: int
    mean_m: float
    mean_logp_empty: float
    best_gain: float
    random_gain: float
    headroom: float
    uniform_prob: float
    temperature: float
    max_prob_prob_diff: float
    peak_ratio_prob_diff: float
    entropy_ratio_prob_diff: float
    max_prob_loglik_gain: float
    peak_ratio_loglik_gain: float
    entropy_ratio_loglik_gain: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _peakedness(p: np.ndarray) -> tuple[float, float, float]:
    m = len(p)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0))
    return float(p.max()), float(p.max() * m), (float(ent / np.log(m)) if m >= 2 else float("nan"))


def label_statistics(
    logp_empty: Sequence[float] | np.ndarray,
    logp_cand: Sequence[Sequence[float] | np.ndarray],
    temperature: float = 1.0,
) -> LabelStats:
    """Oracle headroom and label peakedness over samples with variable M (lists, one per sample)."""
    le = np.asarray(logp_empty, np.float64).reshape(-1)
    if len(le) != len(logp_cand) or len(le) == 0:
        raise UserError(f"label_statistics needs matching non-empty inputs: {len(le)} logp_empty, {len(logp_cand)} logp_cand")
    best, rand, ms, per = [], [], [], {t: [] for t in LABEL_TYPES}
    for e, c in zip(le.tolist(), logp_cand):
        c = np.asarray(c, np.float64)
        g = gains(e, c)
        best.append(g.max())
        rand.append(g.mean())
        ms.append(len(c))
        per["prob_diff"].append(_peakedness(prob_diff_labels(e, c)))
        per["loglik_gain"].append(_peakedness(gain_labels(e, c, temperature)))

    def col(t: str, j: int) -> float:
        v = np.array([x[j] for x in per[t]])
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else float("nan")

    return LabelStats(
        n_samples=len(le),
        mean_m=float(np.mean(ms)),
        mean_logp_empty=float(le.mean()),
        best_gain=float(np.mean(best)),
        random_gain=float(np.mean(rand)),
        headroom=float(np.mean(best) - np.mean(rand)),
        uniform_prob=float(np.mean(1.0 / np.array(ms))),
        temperature=float(temperature),
        max_prob_prob_diff=col("prob_diff", 0),
        peak_ratio_prob_diff=col("prob_diff", 1),
        entropy_ratio_prob_diff=col("prob_diff", 2),
        max_prob_loglik_gain=col("loglik_gain", 0),
        peak_ratio_loglik_gain=col("loglik_gain", 1),
        entropy_ratio_loglik_gain=col("loglik_gain", 2),
    )
