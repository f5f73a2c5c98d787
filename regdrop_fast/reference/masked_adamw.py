"""The masked AdamW step in pure PyTorch (reference for csrc/masked_adamw.* and
triton_kernels/masked_adamw.py; same arguments as `regdrop_fast.childtuning.masked_step`).

Per element of a tensor, with keep bit k and scale s:
  k  PHILOX: philox_words(seed, offset + i, step, stream) < floor(reserve_p * 2^32), s = 1/reserve_p
     BITS:   bit (offset + i) of the flat int32 words, s = 1
     NONE:   k = 1, s = 1
  action "grad":   g <- g * (k*s)        (the official ChildTuning order: mask g, then Adam)
  m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2
  semantics "paper" (official ChildTuningAdamW / HF AdamW):
     p1 = p - lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps);  p1 = p1 - lr*wd*p1     (decay after update)
  semantics "torch" (torch.optim.AdamW):
     p1 = p*(1 - lr*wd) - lr/bc1 * m/(sqrt(v)/sqrt(bc2)+eps)              (decay first)
  action "update": g is not masked; p <- p + (k*s)*(p1 - p)   (the whole step dropped/scaled)
  action "prune":  k=1 as above; k=0: p <- 0 exactly, m and v left untouched
with bc1 = 1-b1^t, bc2 = 1-b2^t and t the tensor's step count after this step's increment.
Capturable steps (torch.optim.AdamW's capturable=True): each step count is a 0-d float32 tensor
and lr may be a 0-d tensor, both on the parameters' device; bias corrections and the Philox step
word are computed from them with torch ops in float64, no host read.
NaN/inf gradients propagate as in torch.optim.AdamW and the official code (a NaN grad makes the
element's m, v and parameter NaN; a dropped element multiplies it by 0, which stays NaN),
except that a pruned weight stays exactly 0.

`upcast=True` computes in float64 (the ground truth of the tests), False in float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .philox import MASK32, philox4x32, philox_words

MASK_NONE, MASK_PHILOX, MASK_BITS = 0, 1, 2
ACTIONS = ("grad", "update", "prune")
SEMANTICS = ("paper", "torch")


def step_scalars(semantics: str, lr: float, beta1: float, beta2: float, step: int):
    """(step_size, bc2_sqrt) in float64, the per-tensor scalars every backend receives.

    paper: step_size = lr*sqrt(bc2)/bc1 and the denominator sqrt(v)+eps (bc2_sqrt unused, 1);
    torch: step_size = lr/bc1 and the denominator sqrt(v)/sqrt(bc2)+eps."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    if semantics == "paper":
        return lr * math.sqrt(bc2) / bc1, 1.0
    return lr / bc1, math.sqrt(bc2)


def step_scalars_tensor(semantics: str, lr, beta1: float, beta2: float, step: torch.Tensor):
    """step_scalars from a device step tensor (and lr float or tensor): 0-d float64 tensors."""
    t = step.to(torch.float64)
    lr = lr.to(device=t.device, dtype=torch.float64) if isinstance(lr, torch.Tensor) else lr
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    if semantics == "paper":
        return lr * bc2.sqrt() / bc1, torch.ones_like(t)
    return lr / bc1, bc2.sqrt()


def _philox_words_at(seed: int, index: torch.Tensor, step: torch.Tensor, stream: int):
    """philox_words with the step word read from a 0-d tensor (no host read)."""
    counter = index >> 2
    c2 = step.to(torch.int64).expand_as(index)
    w0, w1, w2, w3 = philox4x32(counter & MASK32, counter >> 32, c2,
                                torch.full_like(index, stream), seed & MASK32,
                                (seed >> 32) & MASK32)
    lane = index & 3
    return torch.where(lane == 0, w0, torch.where(lane == 1, w1, torch.where(lane == 2, w2, w3)))


def keep_bits(kind: int, numel: int, offset: int, *, seed: int, step, stream: int,
              reserve_p: float, words: Optional[torch.Tensor], device) -> torch.Tensor:
    """bool keep decisions of elements offset .. offset+numel-1 (global flat indices); `step`
    an int or a 0-d tensor."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    if kind == MASK_PHILOX:
        threshold = int(reserve_p * 4294967296.0)
        if isinstance(step, torch.Tensor):
            return _philox_words_at(seed, index, step, stream) < threshold
        return philox_words(seed, index, step, stream) < threshold
    if kind == MASK_BITS:
        word = words.to(torch.int64)[index >> 5] & 0xFFFFFFFF
        return ((word >> (index & 31)) & 1).to(torch.bool)
    return torch.ones(numel, dtype=torch.bool, device=device)


def masked_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                      masks: Sequence[Optional[torch.Tensor]], mask_kinds: Sequence[int],
                      steps: Sequence[int], index_offsets: Sequence[int],
                      streams: Sequence[int], lr, beta1: float, beta2: float, eps: float,
                      weight_decay: float, seed: int, reserve_p: float, action: str,
                      semantics: str, upcast: bool = True) -> None:
    """One step over a list of tensors, in place (params, exp_avgs, exp_avg_sqs).

    params any float dtype; grads like params; exp_avgs/exp_avg_sqs float32; masks[i] flat int32
    words (MASK_BITS) or None; steps already incremented: ints, or 0-d float32 tensors on the
    parameters' device (capturable; then lr may be a 0-d tensor too)."""
    compute = torch.float64 if upcast else torch.float32
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        kind = mask_kinds[i]
        keep = keep_bits(kind, n, index_offsets[i], seed=seed, step=steps[i], stream=streams[i],
                         reserve_p=reserve_p, words=masks[i], device=p.device)
        scale = (1.0 / reserve_p) if kind == MASK_PHILOX else 1.0
        factor = keep.to(compute) * scale
        if isinstance(steps[i], torch.Tensor):
            step_size, bc2_sqrt = step_scalars_tensor(semantics, lr, beta1, beta2, steps[i])
        else:
            step_size, bc2_sqrt = step_scalars(semantics, lr, beta1, beta2, steps[i])
        lr_f64 = (lr.to(device=p.device, dtype=torch.float64) if isinstance(lr, torch.Tensor)
                  else lr)

        p0 = p.detach().reshape(-1).to(compute)
        g = grads[i].detach().reshape(-1).to(compute)
        m = exp_avgs[i].reshape(-1).to(compute)
        v = exp_avg_sqs[i].reshape(-1).to(compute)
        if action == "grad":
            g = g * factor
        m_new = beta1 * m + (1.0 - beta1) * g
        v_new = beta2 * v + (1.0 - beta2) * g * g
        lr_wd = lr_f64 * weight_decay
        if semantics == "paper":
            p1 = p0 - step_size * m_new / (v_new.sqrt() + eps)
            p1 = p1 - lr_wd * p1
        else:
            p1 = p0 * (1.0 - lr_wd) - step_size * m_new / (v_new.sqrt() / bc2_sqrt + eps)
        if action == "update":
            p1 = p0 + factor * (p1 - p0)
        elif action == "prune":
            p1 = torch.where(keep, p1, torch.zeros_like(p1))
            m_new = torch.where(keep, m_new, m)
            v_new = torch.where(keep, v_new, v)
        p.detach().copy_(p1.view(p.shape))
        exp_avgs[i].copy_(m_new.view(exp_avgs[i].shape))
        exp_avg_sqs[i].copy_(v_new.view(exp_avg_sqs[i].shape))
