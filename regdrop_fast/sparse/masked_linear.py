"""Masked linear: y = x · (W ⊙ M)ᵀ + b, M from a PackedMask or from scores > threshold.

`masked_linear` validates and dispatches:
  default (backend=None)  W ⊙ M written once in the compute dtype, then torch's GEMMs (cuBLAS
                          on a GPU) for y, dx and G = dyᵀx; the straight-through dScore = G ⊙ W
                          and dW = G ⊙ M in one elementwise pass (Triton on CUDA,
                          triton_kernels/mask_training.py). Saves x and W ⊙ M only.
  "reference"             F.linear(x, W * M, b) under autograd (the ground truth)
  "triton"                the fused masked GEMM of triton_kernels/masked_linear.py, which never
                          materializes W ⊙ M; kept by name until a GPU comparison (issue 18)
`MaskedLinear` is the nn.Linear that `prepare` puts in place of a target layer: it shares the
original weight and bias Parameters (no copy) and adds either trainable `mask_scores` + a
`mask_threshold` buffer, or a `mask_words` buffer of packed bits. A packed layer whose pruned
weights are held at 0 (`zero_pruned`, as IMP does; train it with MaskedAdamW) runs plain
F.linear: no masking op at all. A scores layer trained by MaskScoreAdamW (sparse/score_adamw.py)
keeps its W' between steps, rewritten by the optimizer's fused step where φ stays, and may hand
G to the optimizer instead of computing dScore (`defer_score_grad`).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from .._checks import check_tensor
from ..masks import PackedMask, num_words, unpack_mask
from ..reference import masked_linear as _ref
from ..reference import masks as _ref_masks

__all__ = ["masked_linear", "MaskedLinear", "MaskedLinearFunction", "MaterializedMaskedLinear"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton_elementwise(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_runs_cuda()


@functools.lru_cache(maxsize=None)
def _triton_runs_cuda() -> bool:
    # for CUDA tensors the answer depends only on whether triton imports: fixed per process
    return backends.unavailable_reason("triton", torch.device("cuda")) is None


_NO_CONTEXT = contextlib.nullcontext()


def _autocast_off(device_type: str):
    """A context with autocast off for `device_type`: torch.autocast(enabled=False) only when
    autocast is on (entering one costs microseconds per call), else a no-op context."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def _keep(weight, words, scores, phi) -> torch.Tensor:
    if scores is not None:
        return scores.float() > phi
    return unpack_mask(PackedMask(words, weight.shape))


def materialize(weight, words, scores, phi, dtype) -> torch.Tensor:
    """W ⊙ M in `dtype` (contiguous): one Triton pass on CUDA, torch ops elsewhere."""
    if _use_triton_elementwise(weight.device):
        kernels = backends.triton_kernels("mask_training")
        return kernels.materialize(weight, words, scores, phi, dtype)
    return torch.where(_keep(weight, words, scores, phi), weight.to(dtype), 0)


def ste_grads(g, weight, words, scores, phi, want_dscore, want_dw, score_dtype):
    """(dScore = G ⊙ W, dW = G ⊙ M), each None unless wanted: one Triton pass on CUDA."""
    if _use_triton_elementwise(g.device):
        kernels = backends.triton_kernels("mask_training")
        return kernels.ste_grads(g, weight, words, scores, phi, want_dscore, want_dw,
                                 score_dtype)
    dscore = (g.float() * weight.float()).to(score_dtype) if want_dscore else None
    dw = (torch.where(_keep(weight, words, scores, phi), g.to(weight.dtype), 0)
          if want_dw else None)
    return dscore, dw


class MaterializedMaskedLinear(torch.autograd.Function):
    """The default path. Forward: W' = W ⊙ M once in the compute dtype, y = F.linear(x, W', b).
    Saves x and W' (in the compute dtype: what a dense layer under autocast saves, x and its
    16-bit weight copy) and references to W and the mask source, no other weight-sized tensor.
    Backward: dx = dy·W', G = dyᵀ·x (torch GEMMs), then dScore = G ⊙ W and dW = G ⊙ M.
    With `layer` (a scores MaskedLinear), W' comes from the layer's cache when still valid
    (written by MaskScoreAdamW's fused step) and, if the layer defers its score gradient, G is
    handed to the layer for the optimizer instead of dScore being computed."""

    @staticmethod
    def forward(ctx, x, weight, bias, scores, words, phi, compute_dtype, layer=None):
        need_x, need_w, _, need_s = ctx.needs_input_grad[:4]
        w_eff = None if layer is None else layer._cached_masked_weight(compute_dtype)
        if w_eff is None:
            w_eff = materialize(weight, words, scores, phi, compute_dtype)
            if layer is not None:
                layer._store_masked_weight(w_eff)
        xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
        bc = bias if bias is None or bias.dtype == compute_dtype else bias.to(compute_dtype)
        # under autocast, compute_dtype is autocast's own (read just now by _masked_linear), so
        # its casts of these operands are no-ops: no context to turn it off (microseconds)
        y = F.linear(xc, w_eff, bc)
        # weight, scores, words, phi: the caller's tensors, saved without a copy
        ctx.save_for_backward(xc if (need_w or need_s) else None, w_eff if need_x else None,
                              weight, scores, words, phi)
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype,
                      None if scores is None else scores.dtype)
        ctx.compute_dtype = compute_dtype
        ctx.layer = layer
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, w_eff, weight, scores, words, phi = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        x_dtype, b_dtype, s_dtype = ctx.dtypes
        n, k = weight.shape
        if dy.dtype != ctx.compute_dtype:
            dy = dy.to(ctx.compute_dtype)
        dx = dw = db = dscore = None
        defer = need_s and ctx.layer is not None and ctx.layer.defer_score_grad
        with _autocast_off(dy.device.type):
            if need_x:
                dx = (dy @ w_eff).to(x_dtype)
            if need_w or need_s:
                # a 2-d x is already the GEMM's layout: no reshape (a host cost per call)
                dy2d, x2d = (dy, xc) if dy.dim() == 2 else (dy.reshape(-1, n), xc.reshape(-1, k))
                g = dy2d.t() @ x2d
                if defer:
                    ctx.layer._add_score_grad(g)
                dscore, dw = ste_grads(g, weight, words, scores, phi, need_s and not defer,
                                       need_w, s_dtype)
            if need_b:
                db = dy.reshape(-1, n).float().sum(0).to(b_dtype)
        return dx, dw, db, dscore, None, None, None, None


class MaskedLinearFunction(torch.autograd.Function):
    """Triton forward/backward (backend="triton"). Saves x, W and the mask source (bits or scores + φ); the mask is
    rebuilt inside every GEMM tile, so nothing the size of W is stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, scores, words, phi):
        # a 2-d x is the kernels' layout already: no reshape or view (each a host cost per call)
        lead = None if x.dim() == 2 else x.shape[:-1]
        x2d = x if lead is None else x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        tk = backends.triton_kernels("masked_linear")
        y = tk.masked_linear_forward(x2d, weight, bias, words, scores, phi)
        ctx.save_for_backward(x2d, weight, scores, words, phi)
        ctx.lead = lead
        ctx.has_bias = bias is not None
        return y if lead is None else y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        tk = backends.triton_kernels("masked_linear")
        x2d, weight, scores, words, phi = ctx.saved_tensors
        lead = ctx.lead
        dy2d = dy if lead is None else dy.reshape(-1, dy.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        dx = dw = db = dscore = None
        if need_x:
            dx = tk.masked_linear_backward_input(dy2d, weight, words, scores, phi)
            if lead is not None:
                dx = dx.view(*lead, weight.shape[1])
        if need_w or need_s:
            dscore, dw = tk.masked_linear_backward_weight(dy2d, x2d, weight, words, scores, phi,
                                                          want_dscore=need_s, want_dw=need_w)
        if need_b and ctx.has_bias:
            db = dy2d.float().sum(0).to(dy.dtype)
        return dx, dw, db, dscore, None, None


def _threshold_tensor(threshold, device, check_finite: bool) -> torch.Tensor:
    """fp32 [1] φ on `device`. NaN raises (it would prune every weight); ±inf is a valid φ
    (-inf keeps every weight, +inf none). A tensor φ on a GPU is checked only with
    check_finite (one host sync), one on the CPU always."""
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a scalar, got shape {tuple(threshold.shape)}")
        if threshold.is_floating_point() and threshold.device == device:
            # an fp32 [1] tensor without grad (a layer's buffer) is φ itself: detach, reshape
            # and float would each return a view of it, at a host cost per call
            phi = (threshold if threshold.dtype == torch.float32 and threshold.dim() == 1
                   and not threshold.requires_grad else threshold.detach().reshape(1).float())
            if (check_finite or phi.is_cpu) and bool(torch.isnan(phi)):
                raise ValueError("threshold must not be NaN")
            return phi
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
    check_finite: raise on NaN scores or a NaN threshold tensor (one host sync); training loops
    that check their scores when they reset φ pass False.
    backend: None or "auto" (default: W ⊙ M once + torch GEMMs, see the module docstring),
    "reference" or "triton" (the fused masked GEMM); REGDROP_FAST_BACKEND applies when None.
    Under torch.autocast x may differ from weight's dtype and the output has the autocast dtype.
    """
    return _masked_linear(x, weight, mask, bias, threshold, backend, check_finite, None)


def _masked_linear(x, weight, mask, bias, threshold, backend, check_finite, layer):
    """masked_linear; `layer`: the scores MaskedLinear calling it, whose W' cache and deferred
    score gradient the default path uses (see MaterializedMaskedLinear)."""
    check_tensor("x", x, dtypes=_FLOATS)
    check_tensor("weight", weight, dtypes=_FLOATS, ndim=2, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have last dimension in_features={weight.shape[1]}, got shape "
                         f"{tuple(x.shape)}")
    # the autocast state is read only where it matters (a per-call cost)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x and weight must have the same dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype,), ndim=1, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    words = scores = phi = None
    if isinstance(mask, PackedMask):
        if mask.shape != weight.shape:  # torch.Size (a tuple) both
            raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on {x.device}, got {mask.device}")
        if threshold is not None:
            raise ValueError("threshold is only used with a scores mask, not a PackedMask")
        words = mask.words
    elif isinstance(mask, torch.Tensor):
        check_tensor("mask (scores)", mask, dtypes=_FLOATS, device=x.device)
        if mask.shape != weight.shape:
            raise ValueError(f"mask (scores) must have the weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")
        if threshold is None:
            raise ValueError("threshold is required with a scores mask (keep iff score > "
                             "threshold)")
        if check_finite and bool(torch.isnan(mask).any()):
            raise ValueError("mask (scores) contains NaN")
        scores = mask
        phi = _threshold_tensor(threshold, x.device, check_finite)
    else:
        raise TypeError(f"mask must be a PackedMask or a scores tensor, got {type(mask).__name__}")
    requested = backend if backend is not None else os.environ.get(backends.ENV_VAR, "auto")
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    # the dispatch table's row already limits masked_linear to reference and triton
    name = "auto" if requested.strip().lower() == "auto" else backends.resolve(
        "masked_linear", backend, x.device)
    if name == "reference":
        return _ref.masked_linear(x, weight, bias=bias, words=words, scores=scores, threshold=phi)
    if name == "triton" and x.dtype != weight.dtype:
        raise TypeError(f"backend 'triton' needs x and weight of the same dtype (no autocast), "
                        f"got {x.dtype} and {weight.dtype}")
    # the kernels take a row stride and assume unit column strides (a 1-d bias: unit stride)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if words is not None and words.stride(-1) != 1:
        words = words.contiguous()
    if scores is not None and scores.stride(-1) != 1:
        scores = scores.contiguous()
    if name == "triton":
        return MaskedLinearFunction.apply(x, weight, bias, scores, words, phi)
    device_type = x.device.type
    compute = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
               else x.dtype)
    return MaterializedMaskedLinear.apply(x, weight, bias, scores, words, phi, compute, layer)


class _ScoreState:
    """What a scores MaskedLinear keeps between steps for MaskScoreAdamW: W' and the key it was
    made under, the deferred G. A plain object: setting a Module attribute costs microseconds,
    paid per matrix and step."""
    __slots__ = ("masked", "key", "g")

    def __init__(self):
        self.masked = self.key = self.g = None


class MaskedLinear(nn.Linear):
    """An nn.Linear whose weight is used as weight ⊙ M, M never materialized.

    Built by `from_linear`, which takes the original layer's weight and bias Parameters as
    they are (same objects, same state_dict keys) and adds the mask:
      "scores": Parameter `mask_scores` (fp32, weight's shape) and buffer `mask_threshold`
                (fp32 [1]); keep iff score > threshold; scores train by the STE.
      "packed": buffer `mask_words` (int32 [out, ceil(in/32)]), 1 = keep.
    A "packed" layer after `zero_pruned()` holds its pruned weights at exactly 0 in the
    Parameter itself (again after every `set_mask` and `load_state_dict`), so its forward and
    backward are plain F.linear; its optimizer must keep them at 0 (`MaskedAdamW` with
    `packed_mask()`, as IMP does) or leave the weight frozen.
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
        self.zeroed = False
        # set by MaskScoreAdamW (sparse/score_adamw.py): keep W' between steps / hand G to it
        self.cache_masked_weight = False
        self.defer_score_grad = False
        self._score_state = _ScoreState()
        self._mask_cache = None  # "packed": see _words_mask
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

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Set the pruned weights to exactly 0 and from now on run plain F.linear ("packed")."""
        if self.kind != "packed":
            raise ValueError("zero_pruned needs a 'packed' MaskedLinear")
        self.zeroed = True
        self._apply_zeros()

    @torch.no_grad()
    def _apply_zeros(self, keep: Optional[torch.Tensor] = None) -> None:
        keep = self.keep_mask() if keep is None else keep
        self.weight.masked_fill_(~keep.to(self.weight.device), 0)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.zeroed:  # the loaded mask may prune weights the loaded values do not zero
            self._apply_zeros()

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
            return unpack_mask(PackedMask(self.mask_words, self.weight.shape))
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
        if self.zeroed:
            self._apply_zeros(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scores":
            return _masked_linear(x, self.weight, self.mask_scores, self.bias,
                                  self.mask_threshold, self.backend, False, self)
        if self.zeroed:
            return F.linear(x, self.weight, self.bias)
        return _masked_linear(x, self.weight, self._words_mask(), self.bias, None, self.backend,
                              True, None)

    def _words_mask(self) -> PackedMask:
        """PackedMask(mask_words, weight.shape), built again only when the buffer object, its
        shape or dtype, or the weight's shape changed: the constructor's checks depend on
        those alone, and cost microseconds per forward. Internal to forward: a PackedMask
        handed out may cache its popcount, which set_mask's in-place copy would make stale."""
        words, shape = self.mask_words, self.weight.shape
        cached = self._mask_cache
        if (cached is None or cached[0].words is not words or cached[0].shape != shape
                or cached[1] != words.shape or cached[2] != words.dtype):
            cached = self._mask_cache = (PackedMask(words, shape), words.shape, words.dtype)
        return cached[0]

    def _masked_key(self, dtype) -> tuple:
        """What W' depends on: any in-place change of W, the scores or φ bumps a version."""
        w, s, t = self.weight, self.mask_scores, self.mask_threshold
        return (dtype, w.data_ptr(), w._version, s.data_ptr(), s._version, t.data_ptr(),
                t._version)

    def _cached_masked_weight(self, dtype) -> Optional[torch.Tensor]:
        state = self._score_state
        if state.masked is not None and state.key == self._masked_key(dtype):
            return state.masked
        state.masked = state.key = None  # stale: freed before a new W' is made
        return None

    def _store_masked_weight(self, w_eff: torch.Tensor, always: bool = False) -> None:
        """Keep W' for later forwards: always (the optimizer's W'), or from a training forward
        when caching is on (an eval forward's dtype may differ)."""
        if always or (self.cache_masked_weight and self.training):
            state = self._score_state
            state.masked, state.key = w_eff, self._masked_key(w_eff.dtype)

    def _drop_masked_weight(self) -> Optional[torch.dtype]:
        """Forget the kept W' (freed unless a graph still holds it); its dtype, or None."""
        state = self._score_state
        dtype = None if state.masked is None else state.masked.dtype
        state.masked = state.key = None
        return dtype

    def _add_score_grad(self, g: torch.Tensor) -> None:
        state = self._score_state
        # a second backward before the step (gradient accumulation) sums in fp32
        state.g = g if state.g is None else state.g.float() + g

    def take_score_grad(self) -> Optional[torch.Tensor]:
        """The deferred G = dW' of the scores (dScore = G ⊙ W), cleared; None if none."""
        state = self._score_state
        g, state.g = state.g, None
        return g

    def extra_repr(self) -> str:
        zeroed = ", pruned weights held at 0" if self.zeroed else ""
        return f"{super().extra_repr()}, mask={self.kind}{zeroed}"
