"""AD-DROP gradient attribution B = ∂target/∂A = dO·Vᵀ, dense [B,H,Lq,Lk].

With O = A·V (A the attention map after attention-probability dropout, as in the official
code), dO = ∂target/∂O gives ∂target/∂A = dO·Vᵀ exactly, so the attribution needs dO and V
only, never the map nor autograd through it. This dense form is for checks, small models and
the attribution kinds that post-process B; the training path passes the (dO, v) pair to
`keep_mask`, whose kernel computes B tile by tile and never stores it.
"""
from __future__ import annotations

import torch

from .._checks import check_tensor
from ..reference import addrop as _ref

__all__ = ["attribution"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dO_v(dO, v) -> None:
    """dO [B,H,Lq,D] and v [B,H,Lk,D]: float tensors of one dtype and device, matching B, H, D."""
    check_tensor("dO", dO, dtypes=_FLOATS, ndim=4)
    check_tensor("v", v, dtypes=_FLOATS, ndim=4, device=dO.device)
    if v.dtype != dO.dtype:
        raise TypeError(f"dO and v must have the same dtype, got {dO.dtype} and {v.dtype}")
    if v.shape[:2] != dO.shape[:2] or v.shape[3] != dO.shape[3]:
        raise ValueError(f"v must be [B,H,Lk,D] matching dO [B,H,Lq,D] = {tuple(dO.shape)}, "
                         f"got {tuple(v.shape)}")


def attribution(dO: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """B = dO·Vᵀ: dO [B,H,Lq,D], v [B,H,Lk,D] -> [B,H,Lq,Lk], fp32 (fp64 for fp64 inputs)."""
    check_dO_v(dO, v)
    return _ref.attribution(dO, v)
