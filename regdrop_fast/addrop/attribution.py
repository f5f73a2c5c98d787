"""AD-DROP gradient attribution B = ∂target/∂A = dO·Vᵀ, dense [B,H,Lq,Lk].

With O = A·V (A the attention map after attention-probability dropout, as in the official
code), dO = ∂target/∂O gives ∂target/∂A = dO·Vᵀ exactly, so the attribution needs dO and V
only, never the map nor autograd through it. This dense form is for checks, small models and
the attribution kinds that post-process B; the training path passes the (dO, v) pair to
`keep_mask`, whose kernel computes B tile by tile and never stores it.
"""
from __future__ import annotations

import torch

from ..reference import addrop as _ref
from .mask import _check_dO_v

__all__ = ["attribution"]


def attribution(dO: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """B = dO·Vᵀ: dO [B,H,Lq,D], v [B,Hkv,Lk,D] (Hkv dividing H: query head h reads kv head
    h // (H // Hkv)) -> [B,H,Lq,Lk], fp32 (fp64 for fp64 inputs)."""
    _check_dO_v(dO, v)
    return _ref.attribution(dO, v)
