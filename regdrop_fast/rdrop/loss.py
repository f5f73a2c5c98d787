"""R-Drop loss: the `regdrop_fast::rdrop_loss` custom op (autograd + fake impl), `rdrop_loss`,
and the `RDropLoss` module.

The op computes the loss and both gradients in its forward (Liger's pattern, one read of each
logits tensor); its backward only scales the saved gradients by grad_output. Registered through
torch.library.custom_op with a fake implementation, so torch.compile traces `rdrop_loss` as one
node without graph breaks, and the data-dependent checks (labels in range, finite logits) run
inside the op where they cannot break the graph.

Backward on the triton backend, eager: the saved gradients are scaled in place by a kernel that
skips tiles whose grad_output is exactly 1, so `loss.backward()` moves no [N, V] bytes and the
gradients become the logits' .grad without a copy; a second backward through the same graph is
refused. Under a compiler trace (torch.compile's AOT backward) the scaling is the out-of-place
product `g * grad_output`, which the compiler fuses.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backends
from ..reference.rdrop import (check_rdrop_inputs, check_rdrop_values, label_out_of_range,
                               rdrop_loss_reference)

IMPLEMENTED = ("reference", "triton")


def resolve_backend(backend: Optional[str], device, dtype, task: str) -> str:
    """Backend running R-Drop here. Regression (O(N) elementwise) and float64 logits run on the
    reference; naming "triton" for float64 raises TypeError (the kernel computes in fp32)."""
    name = backends.resolve("rdrop_loss", backend, device, implemented=IMPLEMENTED)
    if task == "regression":
        return "reference"
    if dtype == torch.float64:
        if name == "triton":
            requested = backend if backend is not None else "$REGDROP_FAST_BACKEND"
            raise TypeError(f"logits1 is float64, which only the reference backend computes "
                            f"(backend {requested!r} names triton, which accumulates in fp32)")
        return "reference"
    return name


def _lead_shape(shape) -> Tuple[int, ...]:
    return tuple(shape[:-1]) if len(shape) > 1 else tuple(shape)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_scale(labels: Optional[Tensor], ignore_index: int, n_rows: int, device) -> Tensor:
    """fp32 [1]: 1 / max(#non-ignored rows, 1), computed on the device (no host sync)."""
    if labels is None:
        return torch.full((1,), 1.0 / n_rows, dtype=torch.float32, device=device)
    count = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    return count.reciprocal().reshape(1)


def _triton_forward(logits1, logits2, labels, alpha, ignore_index, reduction, ce, need_grad):
    from ..triton_kernels import rdrop as kernels

    n_cols = logits1.shape[-1]
    z1 = logits1.reshape(-1, n_cols)
    z2 = logits2.reshape(-1, n_cols)
    z1 = z1 if z1.stride(-1) == 1 else z1.contiguous()
    z2 = z2 if z2.stride(-1) == 1 else z2.contiguous()
    flat = None if labels is None else labels.reshape(-1).contiguous()
    if reduction == "mean":
        scale = _mean_scale(flat, ignore_index, z1.shape[0], z1.device)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=z1.device)
    rows, g1, g2 = kernels.rdrop_forward(z1, z2, flat, alpha, ignore_index, ce, scale, need_grad)
    if reduction == "none":
        loss = rows.reshape(_lead_shape(logits1.shape))
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() * scale[0]
    if not need_grad:
        empty = logits1.new_empty(0)
        return loss, empty, empty.clone()
    return loss, g1.view(logits1.shape), g2.view(logits2.shape)


def _reference_forward(logits1, logits2, labels, alpha, ignore_index, reduction, ce, task,
                       check_finite, need_grad, check_labels=True):
    """Loss from the reference; gradients from the closed form in plain torch (autograd does not
    run inside a custom op's kernel), computed in fp32 (fp64 for fp64 logits). The tests check
    this closed form against autograd of the float64 reference. Unchecked out-of-range labels
    give their rows a NaN loss and NaN gradients, as on triton."""
    loss = rdrop_loss_reference(logits1, logits2, labels, alpha, ignore_index, reduction, ce,
                                task=task, upcast=False, check_finite=check_finite,
                                check_labels=check_labels)
    if not need_grad:
        empty = logits1.new_empty(0)
        return loss, empty, empty.clone()
    compute = _loss_dtype(logits1.dtype)
    z1 = logits1.to(compute)
    z2 = logits2.to(compute)
    if task == "regression":
        g1 = 2.0 * alpha * (z1 - z2)
        g2 = -g1
        if labels is not None and ce:
            y = labels.to(compute).reshape(z1.shape)
            g1 = g1 + 2.0 * (z1 - y)
            g2 = g2 + 2.0 * (z2 - y)
        if reduction == "mean":
            rows = z1.shape[0] if z1.dim() == 1 else z1.numel() // z1.shape[-1]
            g1, g2 = g1 / rows, g2 / rows
        return loss, g1.to(logits1.dtype), g2.to(logits2.dtype)
    logp1 = torch.log_softmax(z1, dim=-1)
    logp2 = torch.log_softmax(z2, dim=-1)
    p1, p2 = logp1.exp(), logp2.exp()
    d = logp1 - logp2
    kl12 = (p1 * d).sum(-1, keepdim=True)
    kl21 = -(p2 * d).sum(-1, keepdim=True)
    g1 = 0.5 * alpha * ((p1 - p2) + p1 * (d - kl12))
    g2 = 0.5 * alpha * ((p2 - p1) - p2 * (d + kl21))
    weight = torch.ones(z1.shape[:-1] + (1,), dtype=compute, device=z1.device)
    bad = None
    if labels is not None:
        valid = (labels != ignore_index).unsqueeze(-1)
        if ce:
            bad = label_out_of_range(labels, ignore_index, z1.shape[-1]).unsqueeze(-1)
            onehot = torch.zeros_like(p1).scatter_(
                -1, torch.where(valid & ~bad, labels.unsqueeze(-1), 0).long(), 1.0)
            g1 = g1 + p1 - onehot
            g2 = g2 + p2 - onehot
        weight = weight * valid
    if reduction == "mean":
        weight = weight / weight.sum().clamp_min(1)
    if bad is not None:
        weight = torch.where(bad, float("nan"), weight)
    return loss, (g1 * weight).to(logits1.dtype), (g2 * weight).to(logits2.dtype)


@torch.library.custom_op("regdrop_fast::rdrop_loss", mutates_args=())
def rdrop_loss_op(logits1: Tensor, logits2: Tensor, labels: Optional[Tensor], alpha: float,
                  ignore_index: int, reduction: str, ce: bool, task: str, backend: str,
                  check_labels: bool, check_finite: int, need_grad: bool
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dlogits1, dloss/dlogits2); the gradients are empty without need_grad.
    backend "" = resolve (argument > env > auto); check_finite -1 = the backend's default."""
    name = resolve_backend(backend or None, logits1.device, logits1.dtype, task)
    if name == "reference":
        finite = check_finite != 0
        return _reference_forward(logits1, logits2, labels, alpha, ignore_index, reduction, ce,
                                  task, finite, need_grad, check_labels)
    check_rdrop_values(logits1, logits2, labels, ignore_index, task,
                       labels_in_range=check_labels, finite=check_finite == 1)
    return _triton_forward(logits1, logits2, labels, alpha, ignore_index, reduction, ce, need_grad)


@rdrop_loss_op.register_fake
def _rdrop_loss_fake(logits1, logits2, labels, alpha, ignore_index, reduction, ce, task, backend,
                     check_labels, check_finite, need_grad):
    shape = () if reduction != "none" else _lead_shape(logits1.shape)
    loss = logits1.new_empty(shape, dtype=_loss_dtype(logits1.dtype))
    if not need_grad:
        return loss, logits1.new_empty(0), logits1.new_empty(0)
    return loss, torch.empty_like(logits1), torch.empty_like(logits2)


def _setup_context(ctx, inputs, output):
    logits1, _, _, _, _, reduction, _, task, backend, _, _, need_grad = inputs
    _, g1, g2 = output
    ctx.save_for_backward(g1, g2)
    ctx.reduction = reduction
    ctx.in_place = need_grad and resolve_backend(
        backend or None, logits1.device, logits1.dtype, task) == "triton"
    ctx.consumed = False


def _is_plain(*tensors) -> bool:
    """Real eager tensors (not fake/functional tensors of a compiler trace)."""
    return all(type(t) is torch.Tensor for t in tensors)


def _backward(ctx, grad_loss, _grad_g1, _grad_g2):
    if ctx.in_place and _is_plain(grad_loss):
        if ctx.consumed:
            raise RuntimeError("rdrop_loss: backward ran twice through the same graph; its saved "
                               "gradients are scaled in place by the first backward. Recompute "
                               "the loss instead of using retain_graph=True")
        ctx.consumed = True
        g1, g2 = ctx.saved_tensors
        if _is_plain(g1, g2):
            from ..triton_kernels import rdrop as kernels

            n_cols = g1.shape[-1]
            kernels.rdrop_scale_grads_(g1.view(-1, n_cols), g2.view(-1, n_cols),
                                       grad_loss.to(torch.float32).contiguous())
            return (g1, g2) + (None,) * 10
    g1, g2 = ctx.saved_tensors
    if ctx.reduction == "none":
        go = grad_loss.reshape(*grad_loss.shape, *([1] * (g1.dim() - grad_loss.dim())))
        return ((g1 * go).to(g1.dtype), (g2 * go).to(g2.dtype)) + (None,) * 10
    return (g1 * grad_loss.to(g1.dtype), g2 * grad_loss.to(g2.dtype)) + (None,) * 10


rdrop_loss_op.register_autograd(_backward, setup_context=_setup_context)


def rdrop_loss(logits1: Tensor, logits2: Tensor, labels: Optional[Tensor] = None,
               alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
               ce: bool = True, backend: Optional[str] = None, *, task: Optional[str] = None,
               check_labels: bool = False, check_finite: Optional[bool] = None) -> Tensor:
    """R-Drop loss of two forward passes, with gradients to both.

    Per row: ce * (CE(z1, y) + CE(z2, y)) + alpha/2 * (KL(P1||P2) + KL(P2||P1)).
    logits1, logits2: [N, V] or [B, T, V] (fp32/bf16/fp16; fp64 on the reference backend).
    labels: int64 [N] / [B, T], or None (KL term alone over all rows). Rows labelled
    `ignore_index` count for nothing; "mean" divides by the non-ignored row count (an
    all-ignored batch gives 0 and zero gradients). `ce=False` keeps the KL term only (labels
    then only mark ignored rows). Regression heads (task="regression", or V=1 with float
    labels): ce * (|p1-y|^2 + |p2-y|^2) + alpha * |p1-p2|^2 per row.
    The loss is float32 (float64 for float64 logits).

    check_labels: raise ValueError for labels outside [0, V) other than ignore_index. Off by
    default: the check costs a host sync on every call (no CUDA-graph capture), and unchecked,
    such a row gets a NaN loss and NaN gradients on every backend (never a finite wrong value;
    the label is never used as an address), so the error still shows at once.
    check_finite: raise ValueError for +-inf/NaN logits. Default: always on the reference
    backend; off on triton, where the check would read both logits once more and sync, and a
    row with non-finite logits gets a NaN loss and NaN gradients instead.
    backend: "reference" | "triton" | None (REGDROP_FAST_BACKEND, then auto).
    """
    task = check_rdrop_inputs(logits1, logits2, labels, alpha, reduction, task, ignore_index)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    need_grad = torch.is_grad_enabled() and (logits1.requires_grad or logits2.requires_grad)
    finite = -1 if check_finite is None else int(bool(check_finite))
    loss, _, _ = rdrop_loss_op(logits1, logits2, labels, float(alpha), int(ignore_index),
                               reduction, bool(ce), task, backend or "", bool(check_labels),
                               finite, need_grad)
    return loss


class RDropLoss(nn.Module):
    """Module form of `rdrop_loss`: forward(logits1, logits2, labels=None)."""

    def __init__(self, alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 ce: bool = True, backend: Optional[str] = None, task: Optional[str] = None,
                 check_labels: bool = False, check_finite: Optional[bool] = None):
        super().__init__()
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.ce = ce
        self.backend = backend
        self.task = task
        self.check_labels = check_labels
        self.check_finite = check_finite

    def forward(self, logits1: Tensor, logits2: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return rdrop_loss(logits1, logits2, labels, self.alpha, self.ignore_index, self.reduction,
                          self.ce, self.backend, task=self.task, check_labels=self.check_labels,
                          check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, ce={self.ce}")
