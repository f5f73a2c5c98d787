"""Debiasing losses and the bias-only model (REFERENCE.md, Sparse & robust).

With logits z [B, C], labels y [B] (ignore_index rows excluded) and a bias model's
probabilities p_b [B, C] (log-probabilities b = log p_b):
  poe_loss       mean CE(log_softmax(z) + b, y)                      product of experts
  reweight_loss  Σ w·CE(z, y) / Σ w,  w = 1 − p_b[y]                 example reweighting
  conf_reg_loss  mean(−Σ_c S_c log softmax(z)_c),  S ∝ p_t^(1 − p_b[y])  confidence
                 regularization with a teacher's probabilities p_t
All reduce in fp32; a batch whose rows are all ignored (or all weighted 0) gives 0, not NaN.
A label outside [0, C) that is not ignore_index raises ValueError on the CPU; on a GPU (where
checking would cost a host sync every step) it makes the loss NaN.

The bias-only model is a logistic regression (torch, full-batch L-BFGS) on lexical-overlap
features of (premise, hypothesis): all hypothesis words in the premise, hypothesis a contiguous
subsequence of the premise, fraction of hypothesis words in the premise, and the mean / min
over hypothesis words of their best similarity to a premise word (cosine of word vectors when
an embedding is given, else character-trigram Jaccard). FEVER uses claim-only features.
"""
from __future__ import annotations

import re
import zlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_int, check_tensor

__all__ = ["poe_loss", "reweight_loss", "conf_reg_loss", "overlap_features",
           "claim_features", "BiasModel", "train_bias_model", "OVERLAP_FEATURES"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OVERLAP_FEATURES = ("all_in_premise", "contiguous", "overlap_fraction", "mean_max_similarity",
                    "min_max_similarity")


def _check_batch(logits, labels, name, other):
    check_tensor("logits", logits, dtypes=_FLOATS, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1,
                 device=logits.device)
    check_tensor(name, other, dtypes=_FLOATS, ndim=2, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if other.shape != logits.shape:
        raise ValueError(f"{name} must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(other.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits must have at least one row (empty batch)")


def _valid_and_safe_labels(labels, ignore_index, num_classes):
    """(valid rows, labels safe to index with, rows whose label is out of range).

    Out-of-range labels (not ignore_index) raise on the CPU. On a GPU the check would cost a
    host sync per call, so those rows are indexed at class 0 (no device-side assert) and the
    loss comes out NaN instead."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if labels.device.type == "cpu" and bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {num_classes}) or ignore_index={ignore_index}, "
                         f"got {first}")
    return valid, torch.where(valid & ~bad, labels, 0).long(), bad


def _poison(loss, bad):
    # NaN if any row had an out-of-range label (GPU; the CPU raised already)
    return torch.where(bad.any(), torch.full_like(loss, float("nan")), loss)


def poe_loss(logits: torch.Tensor, labels: torch.Tensor, bias_log_probs: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
    """Product of experts: mean over kept rows of CE(log_softmax(logits) + bias_log_probs, y)."""
    _check_batch(logits, labels, "bias_log_probs", bias_log_probs)
    combined = F.log_softmax(logits.float(), dim=-1) + bias_log_probs.float()
    valid, safe, bad = _valid_and_safe_labels(labels, ignore_index, logits.shape[1])
    ce = F.cross_entropy(combined, safe, reduction="none")
    return _poison(torch.where(valid, ce, 0.0).sum() / valid.sum().clamp_min(1), bad)


def reweight_loss(logits: torch.Tensor, labels: torch.Tensor, bias_probs: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Example reweighting: Σ w·CE / Σ w with w = 1 − bias_probs[y] (0 on ignored rows)."""
    _check_batch(logits, labels, "bias_probs", bias_probs)
    valid, safe, bad = _valid_and_safe_labels(labels, ignore_index, logits.shape[1])
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    w = torch.where(valid, 1.0 - bias_probs.float().gather(1, safe[:, None]).squeeze(1), 0.0)
    weighted = torch.where(w != 0, w * ce, 0.0)
    return _poison(weighted.sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny), bad)


def conf_reg_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor,
                  bias_probs: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Confidence regularization: mean(−Σ_c S_c log softmax(logits)_c) with the teacher's
    probabilities scaled as S_c = p_t,c^(1−β) / Σ_k p_t,k^(1−β), β = bias_probs[y]."""
    _check_batch(logits, labels, "teacher_probs", teacher_probs)
    _check_batch(logits, labels, "bias_probs", bias_probs)
    valid, safe, bad = _valid_and_safe_labels(labels, ignore_index, logits.shape[1])
    beta = bias_probs.float().gather(1, safe[:, None])
    scaled = teacher_probs.float().pow(1.0 - beta)
    scaled = scaled / scaled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    per_row = -(scaled * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _poison(torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp_min(1), bad)


_WORD = re.compile(r"[\w']+")


def _words(text: str) -> list:
    return _WORD.findall(text.lower())


def _trigrams(word: str) -> set:
    padded = f"#{word}#"
    return {padded[i:i + 3] for i in range(max(1, len(padded) - 2))}


def _jaccard(a: str, b: str) -> float:
    ta, tb = _trigrams(a), _trigrams(b)
    return len(ta & tb) / len(ta | tb)


def _is_contiguous(hyp: list, prem: list) -> bool:
    n = len(hyp)
    return n > 0 and any(prem[i:i + n] == hyp for i in range(len(prem) - n + 1))


def overlap_features(premises: Sequence[str], hypotheses: Sequence[str],
                     embed: Optional[Callable[[str], Optional[torch.Tensor]]] = None
                     ) -> torch.Tensor:
    """float32 [N, 5] lexical-overlap features (OVERLAP_FEATURES order).

    embed: word -> vector (or None for an unknown word) for the similarity statistics;
    without it, character-trigram Jaccard similarity. An empty hypothesis gives zeros."""
    if len(premises) != len(hypotheses):
        raise ValueError(f"premises and hypotheses must have the same length, got "
                         f"{len(premises)} and {len(hypotheses)}")
    rows = []
    for premise, hypothesis in zip(premises, hypotheses):
        prem, hyp = _words(premise), _words(hypothesis)
        if not hyp:
            rows.append([0.0] * len(OVERLAP_FEATURES))
            continue
        prem_set = set(prem)
        in_premise = [w in prem_set for w in hyp]
        best = [max((_similarity(h, p, embed) for p in prem), default=0.0) for h in hyp]
        rows.append([float(all(in_premise)), float(_is_contiguous(hyp, prem)),
                     sum(in_premise) / len(hyp), sum(best) / len(best), min(best)])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(OVERLAP_FEATURES))


def _similarity(a: str, b: str, embed) -> float:
    if a == b:
        return 1.0
    if embed is None:
        return _jaccard(a, b)
    va, vb = embed(a), embed(b)
    if va is None or vb is None:
        return 0.0
    return float(F.cosine_similarity(va.float().reshape(1, -1), vb.float().reshape(1, -1)))


def claim_features(claims: Sequence[str], dim: int = 4096) -> torch.Tensor:
    """float32 [N, dim] claim-only features for FEVER: hashed unigram + bigram counts (crc32,
    so the buckets are the same in every process)."""
    dim = check_int("dim", dim, 1, 2**24)
    out = torch.zeros(len(claims), dim, dtype=torch.float32)
    for i, claim in enumerate(claims):
        words = _words(claim)
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        for gram in grams:
            out[i, zlib.crc32(gram.encode()) % dim] += 1.0
    return out


class BiasModel(torch.nn.Module):
    """Logistic regression on bias features; `log_probs`/`probs` feed the debiasing losses."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    @torch.no_grad()
    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self(features.float()), dim=-1)

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.log_probs(features).exp()


def train_bias_model(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     weight_decay: float = 1e-3, max_iter: int = 200) -> BiasModel:
    """Fit a BiasModel by full-batch L-BFGS on mean CE + weight_decay·||W||²/2."""
    check_tensor("features", features, dtypes=_FLOATS, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1,
                 device=features.device)
    if features.shape[0] == 0 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"features and labels must have the same nonzero number of rows, got "
                         f"{features.shape[0]} and {labels.shape[0]}")
    num_classes = check_int("num_classes", num_classes, 2, 2**20)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    model = BiasModel(features.shape[1], num_classes).to(features.device)
    x, y = features.float(), labels.long()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        penalty = 0.5 * weight_decay * model.linear.weight.square().sum()
        loss = F.cross_entropy(model(x), y) + penalty
        loss.backward()
        return loss

    opt.step(closure)
    return model
