"""Fused-linear R-Drop: the R-Drop loss of `hidden_i @ weight.T + bias` without materializing
the [N, V] logits.

Rows are processed in chunks of C: the chunk's two logits [C, V] are computed by a GEMM in the
hidden dtype, the R-Drop kernel overwrites them with their gradients (in place), and the chunk's
contributions to d/dhidden (g @ W), d/dweight (g.T @ h, accumulated in fp32 for 16-bit inputs)
and d/dbias are taken at once. Extra memory: 2 * C * V logits/gradients + the weight/bias
gradients; C defaults to about N * H / V rows (Liger's fused-linear-CE sizing), so the chunk
logits take about as much memory as the hidden states. The backward only scales the saved
gradients by grad_output, which is why only "mean" and "sum" reductions exist here (a per-row
grad_output cannot be applied to the accumulated weight gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.rdrop import check_rdrop_inputs, check_rdrop_values
from .loss import (_loss_dtype, combine_terms, gradient_scales, reference_terms,
                   resolve_backend)


def _check_linear_args(hidden1, hidden2, weight, bias, labels, chunk_size):
    for name, t in (("hidden1", hidden1), ("hidden2", hidden2), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden1.shape != hidden2.shape:
        raise ValueError(f"hidden2 must have the shape of hidden1 {tuple(hidden1.shape)}, got "
                         f"{tuple(hidden2.shape)}")
    if hidden1.dim() < 2 or hidden1.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden1 must have shape [..., H] with H = weight.shape[1] = "
                         f"{weight.shape[1]}, got {tuple(hidden1.shape)}")
    for name, t in (("hidden2", hidden2), ("weight", weight)):
        if t.dtype != hidden1.dtype:
            raise TypeError(f"{name} must have the dtype of hidden1 ({hidden1.dtype}), "
                            f"got {t.dtype}")
        if t.device != hidden1.device:
            raise ValueError(f"{name} must be on the device of hidden1 ({hidden1.device}), got "
                             f"{t.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden1.dtype or bias.device != hidden1.device:
            raise TypeError(f"bias must be a {hidden1.dtype} tensor on {hidden1.device}, got "
                            f"{bias.dtype} on {bias.device}")
    if hidden1.numel() == 0:
        raise ValueError(f"hidden1 must not be empty (empty batch), got {tuple(hidden1.shape)}")
    if labels is not None and isinstance(labels, torch.Tensor) and \
            tuple(labels.shape) != tuple(hidden1.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden1.shape[:-1])}, got "
                         f"{tuple(labels.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def default_chunk_size(n_rows: int, hidden: int, n_classes: int) -> int:
    """About N * H / V rows, a power of two: chunk logits as large as the hidden states."""
    ratio = -(-n_classes // hidden)
    rows = -(-n_rows // ratio)
    return min(n_rows, 1 << (rows - 1).bit_length())


class _FusedLinearRDrop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden1, hidden2, weight, bias, labels, alpha, ignore_index, reduction,
                kl_reduction, ce, backend, check_finite, chunk_size):
        lead = hidden1.shape[:-1]
        n_hidden = hidden1.shape[-1]
        h1 = hidden1.reshape(-1, n_hidden)
        h2 = hidden2.reshape(-1, n_hidden)
        flat = None if labels is None else labels.reshape(-1).contiguous()
        n_rows, n_classes = h1.shape[0], weight.shape[0]
        device = h1.device
        scale, _ = gradient_scales(flat, ignore_index, n_rows, device, reduction, kl_reduction)
        chunk = chunk_size or default_chunk_size(n_rows, n_hidden, n_classes)
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]
        need_grad = need_h or need_w or need_b
        half = weight.dtype in (torch.float16, torch.bfloat16)
        acc_dtype = torch.float32 if half else weight.dtype
        grad_h1 = torch.empty_like(h1) if need_h else None
        grad_h2 = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_w else None
        grad_b = torch.zeros(n_classes, dtype=acc_dtype, device=device) if need_b else None
        sums = torch.zeros(2, dtype=_loss_dtype(weight.dtype), device=device)
        if backend == "triton":
            from ..triton_kernels import rdrop as kernels
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            c1, c2 = h1[start:stop], h2[start:stop]
            y = None if flat is None else flat[start:stop]
            z1 = F.linear(c1, weight, bias)
            z2 = F.linear(c2, weight, bias)
            if check_finite:
                check_rdrop_values(z1, z2, None, ignore_index, "classification")
            if backend == "triton":
                # the kernel counts the whole batch's labels for its "mean" weights
                _, acc, _, g1, g2 = kernels.launch_forward(
                    z1, z2, y, alpha, ignore_index, ce, need_grad, mean_ce=reduction == "mean",
                    mean_kl=reduction == "mean" and kl_reduction == "mean", count_labels=flat,
                    n_count=n_rows, g1=z1, g2=z2)
                sums += acc[2:4]  # the chunk's CE and KL sums
            else:
                terms, g1, g2 = reference_terms(z1, z2, y, alpha, ignore_index, ce,
                                                "classification", scale, need_grad)
                sums += terms.sum(1)
            if need_h:
                torch.mm(g1, weight, out=grad_h1[start:stop])
                torch.mm(g2, weight, out=grad_h2[start:stop])
            if need_w:
                if acc_dtype == weight.dtype:
                    grad_w.addmm_(g1.t(), c1).addmm_(g2.t(), c2)
                else:  # 16-bit GEMM per chunk (fp32 accumulate inside), summed in fp32
                    grad_w += torch.mm(g1.t(), c1)
                    grad_w += torch.mm(g2.t(), c2)
            if need_b:
                grad_b += g1.sum(0, dtype=acc_dtype) + g2.sum(0, dtype=acc_dtype)
        loss = combine_terms(sums, scale, 0.5 * alpha)
        ctx.save_for_backward(
            None if grad_h1 is None else grad_h1.view(*lead, n_hidden),
            None if grad_h2 is None else grad_h2.view(*lead, n_hidden),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return grads + (None,) * 9


def fused_linear_rdrop_loss(hidden1: Tensor, hidden2: Tensor, weight: Tensor,
                            bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                            alpha: float = 1.0, ignore_index: int = -100,
                            backend: Optional[str] = None, *, reduction: str = "mean",
                            ce: bool = True, kl_reduction: str = "mean",
                            check_labels: bool = False,
                            check_finite: Optional[bool] = None,
                            chunk_size: Optional[int] = None) -> Tensor:
    """R-Drop loss of logits_i = hidden_i @ weight.T + bias, chunked over rows.

    hidden1, hidden2: [N, H] or [B, T, H]; weight [V, H]; bias [V] or None; labels int64 [N] /
    [B, T] or None. Same loss, ignore_index, kl_reduction and check semantics as `rdrop_loss`
    (reduction "mean" or "sum" only). Gradients flow to hidden1, hidden2, weight and bias;
    they are computed in the forward, chunk by chunk. chunk_size: rows per chunk (default
    about N * H / V).
    """
    _check_linear_args(hidden1, hidden2, weight, bias, labels, chunk_size)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for fused_linear_rdrop_loss, got "
                         f"{reduction!r} (use rdrop_loss on materialized logits for 'none')")
    lead = tuple(hidden1.shape[:-1])
    probe = hidden1.new_empty(()).expand(*lead, weight.shape[0])
    check_rdrop_inputs(probe, probe, labels, alpha, reduction, "classification", ignore_index,
                       kl_reduction)
    name = resolve_backend(backend, hidden1.device, hidden1.dtype, "classification",
                           op="fused_linear_rdrop_loss", arg="hidden1")
    finite = (name == "reference") if check_finite is None else bool(check_finite)
    if labels is not None:
        check_rdrop_values(probe, probe, labels, ignore_index, "classification",
                           labels_in_range=check_labels, finite=False)
    return _FusedLinearRDrop.apply(hidden1, hidden2, weight, bias, labels, float(alpha),
                                   int(ignore_index), reduction, kl_reduction, bool(ce), name,
                                   finite, chunk_size)
