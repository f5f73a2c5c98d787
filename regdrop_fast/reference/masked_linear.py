"""Masked linear layer in pure PyTorch (reference): y = x · (W ⊙ M)ᵀ + b.

M comes either from a bit-packed mask (../shared/DESIGN.md, "Mask formats": 1 = keep) or from
trainable scores, M = (scores > threshold). With scores, the binarization is a straight-through
estimator (REFERENCE.md, Sparse & robust): its backward is the identity, so
dScore = dW_eff ⊙ W where dW_eff = dyᵀ·x is the gradient of the effective weight W ⊙ M.
When W itself trains, autograd gives the masked gradient dW = dW_eff ⊙ M.

This materializes W ⊙ M (the unfused baseline of `torch.nn.utils.prune` and movement pruning);
`upcast=True` computes in float64 for the ground truth of the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import masks as _masks


class _BinarizeSTE(torch.autograd.Function):
    """(scores > threshold) in the scores' dtype; backward passes the gradient through."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores.float() > threshold.float()).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def scores_mask(scores: torch.Tensor, threshold) -> torch.Tensor:
    """M = (scores > threshold) with the straight-through gradient to `scores` (fp32 compare)."""
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device)
    return _BinarizeSTE.apply(scores, threshold)


def packed_to_dense(words: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 words [N, ceil(K/32)] -> 0/1 tensor [N, K] of `dtype`."""
    return _masks.unpack_bits(words, n).to(dtype)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  words: Optional[torch.Tensor] = None, scores: Optional[torch.Tensor] = None,
                  threshold=None, upcast: bool = False) -> torch.Tensor:
    """F.linear(x, weight * M, bias) with M from `words` (packed bits) or `scores > threshold`.

    Exactly one of `words` and `scores` is given. Differentiable in x, weight, bias and scores."""
    if (words is None) == (scores is None):
        raise ValueError("give exactly one of words (packed mask) and scores")
    dtype = x.dtype
    if upcast:
        x, weight = x.double(), weight.double()
        bias = None if bias is None else bias.double()
    if words is not None:
        mask = packed_to_dense(words, weight.shape[-1], weight.dtype)
    else:
        mask = scores_mask(scores, threshold).to(weight.dtype)
    y = F.linear(x, weight * mask, bias)
    return y if upcast else y.to(dtype)


def score_adamw_step(scores, exp_avg, exp_avg_sq, grad, *, step: int, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float = 0.0,
                     weight: Optional[torch.Tensor] = None, upcast: bool = True):
    """One torch.optim.AdamW step of mask-training scores, returned as new tensors
    (scores, exp_avg, exp_avg_sq); the reference of MaskScoreAdamW's fused step.

    grad: dScore, or with `weight` given G = dW' (the gradient of W ⊙ M), the gradient then being
    the straight-through G ⊙ W. step: the step count after this step's increment.
    p ← p·(1 − lr·wd) − lr/bc1 · m/(√v/√bc2 + eps) with m, v updated first, bc = 1 − βᵗ."""
    dtype = torch.float64 if upcast else torch.float32
    s, m, v, g = (t.to(dtype) for t in (scores, exp_avg, exp_avg_sq, grad))
    if weight is not None:
        g = g * weight.to(dtype)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    s = s * (1.0 - lr * weight_decay) - (lr / bc1) * (m / (v.sqrt() / bc2 ** 0.5 + eps))
    return s, m, v
