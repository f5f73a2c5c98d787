"""Masked linear: y = x · (W ⊙ M)ᵀ + b, M from a PackedMask or from scores > threshold.

`masked_linear` validates and dispatches (reference: F.linear(x, W * M, b); triton: the fused
GEMM of triton_kernels/masked_linear.py, which never materializes W ⊙ M). `MaskedLinear` is the
nn.Linear that `prepare` puts in place of a target layer: it shares the original weight and
bias Parameters (no copy) and adds either trainable `mask_scores` + a `mask_threshold` buffer,
or a `mask_words` buffer of packed bits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .. import backends
from .._checks import check_tensor
from ..masks import PackedMask, num_words
from ..reference import masked_linear as _ref
from ..reference import masks as _ref_masks

__all__ = ["masked_linear", "MaskedLinear", "MaskedLinearFunction"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class MaskedLinearFunction(torch.autograd.Function):
    """Triton forward/backward. Saves x, W and the mask source (bits or scores + φ); the mask is
    rebuilt inside every GEMM tile, so nothing the size of W is stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, scores, words, phi):
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        from ..triton_kernels import masked_linear as _tk
        y = _tk.masked_linear_forward(x2d, weight, bias, words, scores, phi)
        ctx.save_for_backward(x2d, weight, scores, words, phi)
        ctx.lead = lead
        ctx.has_bias = bias is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        from ..triton_kernels import masked_linear as _tk
        x2d, weight, scores, words, phi = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        dx = dw = db = dscore = None
        if need_x:
            dx = _tk.masked_linear_backward_input(dy2d, weight, words, scores, phi)
            dx = dx.view(*ctx.lead, weight.shape[1])
        if need_w or need_s:
            dscore, dw = _tk.masked_linear_backward_weight(dy2d, x2d, weight, words, scores, phi,
                                                           want_dscore=need_s, want_dw=need_w)
        if need_b and ctx.has_bias:
            db = dy2d.float().sum(0).to(dy.dtype)
        return dx, dw, db, dscore, None, None


def _threshold_tensor(threshold, device) -> torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a scalar, got shape {tuple(threshold.shape)}")
        if threshold.is_floating_point() and threshold.device == device:
            return threshold.detach().reshape(1).float()
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number or a 1-element tensor, got "
                        f"{type(threshold).__name__}")
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    # a fill kernel, not a copy from host memory: no wait for the GPU on every call
    return torch.full((1,), float(threshold), dtype=torch.float32, device=device)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask, bias: Optional[torch.Tensor] = None,
                  threshold=None, backend: Optional[str] = None,
                  check_finite: bool = True) -> torch.Tensor:
    """y = x · (weight ⊙ M)ᵀ + bias.

    mask: a `PackedMask` of weight's shape (M fixed; dW = dW_eff ⊙ M when weight trains), or a
    float scores tensor of weight's shape with `threshold` (float or 1-element tensor): M =
    scores > threshold, compared in fp32, gradient to scores by the straight-through estimator
    dScore = dW_eff ⊙ W. A row whose weights are all pruned outputs its bias.
    check_finite: raise on NaN scores (one host sync); training loops that check their scores
    when they reset φ pass False. backend: "reference" | "triton" | None (dispatch)."""
    check_tensor("x", x, dtypes=_FLOATS)
    check_tensor("weight", weight, dtypes=_FLOATS, ndim=2, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have last dimension in_features={weight.shape[1]}, got shape "
                         f"{tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype,), ndim=1, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    words = scores = phi = None
    if isinstance(mask, PackedMask):
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on {x.device}, got {mask.device}")
        if threshold is not None:
            raise ValueError("threshold is only used with a scores mask, not a PackedMask")
        words = mask.words
    elif isinstance(mask, torch.Tensor):
        check_tensor("mask (scores)", mask, dtypes=_FLOATS, device=x.device)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask (scores) must have the weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")
        if threshold is None:
            raise ValueError("threshold is required with a scores mask (keep iff score > "
                             "threshold)")
        if check_finite and bool(torch.isnan(mask).any()):
            raise ValueError("mask (scores) contains NaN")
        scores = mask
        phi = _threshold_tensor(threshold, x.device)
    else:
        raise TypeError(f"mask must be a PackedMask or a scores tensor, got {type(mask).__name__}")
    name = backends.resolve("masked_linear", backend, x.device,
                            implemented=("reference", "triton"))
    if name == "reference":
        return _ref.masked_linear(x, weight, bias=bias, words=words, scores=scores, threshold=phi)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if words is not None and words.stride(-1) != 1:
        words = words.contiguous()
    if scores is not None and scores.stride(-1) != 1:
        scores = scores.contiguous()
    return MaskedLinearFunction.apply(x, weight, bias, scores, words, phi)


class MaskedLinear(nn.Linear):
    """An nn.Linear whose weight is used as weight ⊙ M, M never materialized.

    Built by `from_linear`, which takes the original layer's weight and bias Parameters as
    they are (same objects, same state_dict keys) and adds the mask:
      "scores": Parameter `mask_scores` (fp32, weight's shape) and buffer `mask_threshold`
                (fp32 [1]); keep iff score > threshold; scores train by the STE.
      "packed": buffer `mask_words` (int32 [out, ceil(in/32)]), 1 = keep.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("build a MaskedLinear with MaskedLinear.from_linear(linear, kind)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str, backend: Optional[str] = None):
        if kind not in ("scores", "packed"):
            raise ValueError(f"kind must be 'scores' or 'packed', got {kind!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kind = kind
        self.backend = backend
        device = linear.weight.device
        if kind == "scores":
            self.mask_scores = nn.Parameter(
                torch.ones(linear.weight.shape, dtype=torch.float32, device=device))
            self.register_buffer("mask_threshold",
                                 torch.zeros(1, dtype=torch.float32, device=device))
        else:
            self.register_buffer("mask_words", torch.full(
                (self.out_features, num_words(self.in_features)), -1, dtype=torch.int32,
                device=device))
            self._clear_tail_bits()
        return self

    def _clear_tail_bits(self):
        tail = self.in_features % 32
        if tail:
            self.mask_words[:, -1] &= (1 << tail) - 1

    def packed_mask(self) -> PackedMask:
        """The current mask as packed bits (computed from the scores in "scores" mode)."""
        if self.kind == "packed":
            return PackedMask(self.mask_words, self.weight.shape)
        from ..masks import pack_mask
        return pack_mask(self.keep_mask(), backend="reference")

    def keep_mask(self) -> torch.Tensor:
        """bool [out, in], True = kept."""
        if self.kind == "packed":
            return _ref_masks.unpack_bits(self.mask_words, self.in_features)
        return self.mask_scores.detach().float() > self.mask_threshold

    def set_mask(self, keep: torch.Tensor) -> None:
        """Set the packed mask from a bool tensor of the weight's shape ("packed" mode)."""
        if self.kind != "packed":
            raise ValueError("set_mask needs a 'packed' MaskedLinear; scores masks follow "
                             "their threshold")
        check_tensor("keep", keep, dtypes=(torch.bool,))
        if tuple(keep.shape) != tuple(self.weight.shape):
            raise ValueError(f"keep must have the weight's shape {tuple(self.weight.shape)}, got "
                             f"{tuple(keep.shape)}")
        self.mask_words.copy_(_ref_masks.pack_bits(keep.to(self.mask_words.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scores":
            return masked_linear(x, self.weight, self.mask_scores, self.bias,
                                 threshold=self.mask_threshold, backend=self.backend,
                                 check_finite=False)
        return masked_linear(x, self.weight, PackedMask(self.mask_words, self.weight.shape),
                             self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask={self.kind}"
