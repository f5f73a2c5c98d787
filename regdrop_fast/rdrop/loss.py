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

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import backends
from ..reference.rdrop import (check_rdrop_inputs, check_rdrop_values, label_out_of_range,
                               rdrop_regression_terms_reference, rdrop_row_terms_reference)

def resolve_backend(backend: Optional[str], device, dtype, task: str, op: str = "rdrop_loss",
                    arg: str = "logits1") -> str:
    """Backend running R-Drop here: the dispatch table's choice for `op` (float64 is the
    reference's), except that regression (O(N) elementwise, no kernel) runs on the reference."""
    name = backends.resolve(op, backend, device, dtype, arg=arg)
    return "reference" if task == "regression" else name


def _lead_shape(shape) -> Tuple[int, ...]:
    return tuple(shape[:-1]) if len(shape) > 1 else tuple(shape)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_scales(labels: Optional[Tensor], ignore_index: int, n_rows: int, device,
                    reduction: str, kl_reduction: str) -> Tuple[Tensor, Tensor]:
    """(fp32 [2]: the gradient weights of the CE and KL terms of a counted row, fp32 []:
    1 / max(#counted rows, 1)), computed on the device (no host sync). A row counts unless
    its label is ignore_index; "mean" divides a term by the count, a summed term keeps 1."""
    if labels is None:
        inv = torch.full((), 1.0 / n_rows, dtype=torch.float32, device=device)
    else:
        inv = (labels != ignore_index).sum().clamp_min(1).to(torch.float32).reciprocal()
    if reduction != "mean":
        return torch.ones(2, dtype=torch.float32, device=device), inv
    if kl_reduction == "sum":
        return torch.stack([inv, torch.ones_like(inv)]), inv
    return inv.repeat(2), inv


def combine_terms(sums: Tensor, scale: Tensor, cons_weight: float) -> Tensor:
    """The reduced loss from the summed (CE, KL) terms [2] and their weights [2]."""
    scale = scale.to(sums.dtype)
    return sums[0] * scale[0] + cons_weight * sums[1] * scale[1]


def _cons_weight(alpha: float, task: str) -> float:
    """Weight of the consistency term: alpha/2 on KL12 + KL21, alpha on |p1 - p2|^2."""
    return alpha if task == "regression" else 0.5 * alpha


def mean_parts(sums: Tensor, inv: Tensor, task: str) -> Tensor:
    """[2]: the mean per-pass CE (CE1 + CE2) / 2 and the mean consistency term ((KL12 + KL21)
    / 2, or |p1 - p2|^2 for regression) over the counted rows."""
    cons = 1.0 if task == "regression" else 0.5
    return torch.stack([sums[0] * 0.5, sums[1] * cons]) * inv.to(sums.dtype)


def _triton_call(logits1, logits2, labels, alpha, ignore_index, reduction, kl_reduction, ce,
                 need_grad, need_parts):
    """(loss, parts [2] or None, g1, g2) from the kernel: one launch, the reduction included;
    the gradients shaped like the logits. Views and copies only where the layout needs them
    (each costs host time on every call)."""
    z1, z2, flat = logits1, logits2, labels
    lead = logits1.dim() != 2
    if lead:  # [B, T, V] -> [N, V]
        n_cols = logits1.shape[-1]
        z1 = z1.reshape(-1, n_cols)
        z2 = z2.reshape(-1, n_cols)
        if flat is not None:
            flat = flat.reshape(-1)
    if z1.stride(-1) != 1:
        z1 = z1.contiguous()
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    if flat is not None and flat.stride(0) != 1:
        flat = flat.contiguous()
    mean = reduction == "mean"
    loss, acc, rows, g1, g2 = backends.triton_kernels("rdrop").launch_forward(
        z1, z2, flat, alpha, ignore_index, ce, need_grad, mean_ce=mean,
        mean_kl=mean and kl_reduction == "mean", row_loss=reduction == "none")
    if rows is not None:
        loss = rows.view(_lead_shape(logits1.shape)) if lead else rows
    if lead and need_grad:
        g1 = g1.view(logits1.shape)
        g2 = g2.view(logits2.shape)
    return loss, (acc[:2] if need_parts else None), g1, g2


def reference_terms(logits1, logits2, labels, alpha, ignore_index, ce, task, scale, need_grad):
    """The reference backend: terms [2, N] (per-row CE terms, unweighted consistency terms) from
    the reference, and both gradients from the closed form in plain torch (autograd does not
    run inside a custom op's kernel), weighted per counted row by scale = (w_ce, w_kl); fp32
    (fp64 for fp64 logits). The tests check this closed form against autograd of the float64
    reference. Out-of-range labels give their rows NaN terms and NaN gradients, as on triton."""
    compute = _loss_dtype(logits1.dtype)
    w = scale.to(compute)
    if task == "regression":
        z1, z2 = logits1.to(compute), logits2.to(compute)
        y = None if labels is None else labels.to(compute).reshape(z1.shape)
        err, cons = rdrop_regression_terms_reference(z1, z2, y, ce)
        terms = torch.stack([err.reshape(-1), cons.reshape(-1)])
        if not need_grad:
            return terms, None, None
        g1 = (2.0 * alpha) * w[1] * (z1 - z2)
        g2 = -g1
        if y is not None and ce:
            g1 = g1 + 2.0 * w[0] * (z1 - y)
            g2 = g2 + 2.0 * w[0] * (z2 - y)
        return terms, g1.to(logits1.dtype), g2.to(logits2.dtype)
    n_cols = logits1.shape[-1]
    z1 = logits1.reshape(-1, n_cols).to(compute)
    z2 = logits2.reshape(-1, n_cols).to(compute)
    flat = None if labels is None else labels.reshape(-1)
    ce_row, kl_row, valid = rdrop_row_terms_reference(z1, z2, flat, ignore_index, ce)
    terms = torch.stack([ce_row, kl_row])
    if not need_grad:
        return terms, None, None
    logp1 = torch.log_softmax(z1, dim=-1)
    logp2 = torch.log_softmax(z2, dim=-1)
    p1, p2 = logp1.exp(), logp2.exp()
    d = logp1 - logp2
    kl12 = (p1 * d).sum(-1, keepdim=True)
    kl21 = -(p2 * d).sum(-1, keepdim=True)
    counted = valid.unsqueeze(-1).to(compute)
    w_kl = (0.5 * alpha) * w[1] * counted
    g1 = w_kl * ((p1 - p2) + p1 * (d - kl12))
    g2 = w_kl * ((p2 - p1) - p2 * (d + kl21))
    if flat is not None and ce:
        bad = label_out_of_range(flat, ignore_index, n_cols).unsqueeze(-1)
        onehot = torch.zeros_like(p1).scatter_(
            -1, torch.where(valid.unsqueeze(-1) & ~bad, flat.unsqueeze(-1), 0).long(), 1.0)
        w_ce = torch.where(bad, float("nan"), w[0] * counted)
        g1 = g1 + w_ce * (p1 - onehot)
        g2 = g2 + w_ce * (p2 - onehot)
    return terms, g1.view(logits1.shape).to(logits1.dtype), g2.view(logits2.shape).to(logits2.dtype)


def _forward(logits1, logits2, labels, alpha, ignore_index, reduction, kl_reduction, ce, task,
             backend, check_labels, check_finite, need_grad, need_parts):
    """(backend name, loss, g1, g2, parts): the body of `rdrop_loss_op`, with None for the
    gradients without need_grad and for parts without need_parts."""
    name = resolve_backend(backend or None, logits1.device, logits1.dtype, task)
    finite = check_finite == 1 or (check_finite == -1 and name == "reference")
    if check_labels or finite:
        check_rdrop_values(logits1, logits2, labels, ignore_index, task,
                           labels_in_range=check_labels, finite=finite)
    if name == "triton":
        loss, parts, g1, g2 = _triton_call(logits1, logits2, labels, alpha, ignore_index,
                                           reduction, kl_reduction, ce, need_grad, need_parts)
    else:
        regression = task == "regression"
        n_rows = logits1.numel() // logits1.shape[-1] if logits1.dim() > 1 else logits1.shape[0]
        scale, inv = gradient_scales(None if regression else labels, ignore_index, n_rows,
                                     logits1.device, reduction, kl_reduction)
        terms, g1, g2 = reference_terms(logits1, logits2, labels, alpha, ignore_index, ce, task,
                                        scale, need_grad)
        weight = _cons_weight(alpha, task)
        if reduction == "none":
            loss = (terms[0] + weight * terms[1]).reshape(_lead_shape(logits1.shape))
            sums = terms.sum(1) if need_parts else None
        else:
            sums = terms.sum(1)
            loss = combine_terms(sums, scale, weight)
        parts = mean_parts(sums, inv, task) if need_parts else None
    return name, loss, g1, g2, parts


@torch.library.custom_op("regdrop_fast::rdrop_loss", mutates_args=())
def rdrop_loss_op(logits1: Tensor, logits2: Tensor, labels: Optional[Tensor], alpha: float,
                  ignore_index: int, reduction: str, kl_reduction: str, ce: bool, task: str,
                  backend: str, check_labels: bool, check_finite: int, need_grad: bool,
                  need_parts: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dloss/dlogits1, dloss/dlogits2, parts); the gradients are empty without
    need_grad, parts ([2], see `mean_parts`) without need_parts. backend "" = resolve
    (argument > env > auto); check_finite -1 = the backend's default."""
    _, loss, g1, g2, parts = _forward(logits1, logits2, labels, alpha, ignore_index, reduction,
                                      kl_reduction, ce, task, backend, check_labels,
                                      check_finite, need_grad, need_parts)
    if parts is None:
        parts = loss.new_empty(0)
    if g1 is None:
        empty = logits1.new_empty(0)
        return loss, empty, empty.clone(), parts
    return loss, g1, g2, parts


@rdrop_loss_op.register_fake
def _rdrop_loss_fake(logits1, logits2, labels, alpha, ignore_index, reduction, kl_reduction, ce,
                     task, backend, check_labels, check_finite, need_grad, need_parts):
    shape = () if reduction != "none" else _lead_shape(logits1.shape)
    dtype = _loss_dtype(logits1.dtype)
    loss = logits1.new_empty(shape, dtype=dtype)
    parts = logits1.new_empty(2 if need_parts else 0, dtype=dtype)
    if not need_grad:
        return loss, logits1.new_empty(0), logits1.new_empty(0), parts
    return loss, torch.empty_like(logits1), torch.empty_like(logits2), parts


def _setup_context(ctx, inputs, output):
    logits1, task, backend, need_grad = inputs[0], inputs[8], inputs[9], inputs[12]
    _, g1, g2, _ = output
    ctx.save_for_backward(g1, g2)
    ctx.reduction = inputs[5]
    ctx.in_place = need_grad and resolve_backend(
        backend or None, logits1.device, logits1.dtype, task) == "triton"
    ctx.consumed = False


_NON_LOGIT_GRADS = (None,) * 12  # rdrop_loss_op's inputs after the two logits


def _backward(ctx, grad_loss, _grad_g1, _grad_g2, _grad_parts):
    return _input_grads(ctx, grad_loss) + _NON_LOGIT_GRADS


_BACKWARD_TWICE = ("rdrop_loss: backward ran twice through the same graph; its saved gradients "
                   "are scaled in place by the first backward. Recompute the loss instead of "
                   "using retain_graph=True")


def _input_grads(ctx, grad_loss):
    """(dL/dlogits1, dL/dlogits2): the saved (g1, g2) scaled by grad_loss."""
    # real eager tensors only (not the fake/functional tensors of a compiler trace)
    if ctx.in_place and type(grad_loss) is Tensor:
        if ctx.consumed:
            raise RuntimeError(_BACKWARD_TWICE)
        ctx.consumed = True
        g1, g2 = ctx.saved_tensors
        if type(g1) is Tensor and type(g2) is Tensor:
            return _scale_in_place(g1, g2, grad_loss)
    return _scaled(*ctx.saved_tensors, grad_loss, ctx.reduction)


def _scale_in_place(g1, g2, grad_loss):
    """g1, g2 *= grad_loss by the triton kernel, which skips tiles whose grad_loss is 1."""
    kernels = backends.triton_kernels("rdrop")
    # grad_loss has the loss's dtype (fp32) and any layout: the kernel takes it as is
    if g1.dim() == 2:
        kernels.rdrop_scale_grads_(g1, g2, grad_loss)
    else:
        n_cols = g1.shape[-1]
        kernels.rdrop_scale_grads_(g1.view(-1, n_cols), g2.view(-1, n_cols), grad_loss)
    return g1, g2


def _scaled(g1, g2, grad_loss, reduction):
    """g1 * grad_loss, g2 * grad_loss, out of place (per row for reduction "none")."""
    if reduction == "none":
        go = grad_loss.reshape(*grad_loss.shape, *([1] * (g1.dim() - grad_loss.dim())))
        return (g1 * go).to(g1.dtype), (g2 * go).to(g2.dtype)
    return g1 * grad_loss.to(g1.dtype), g2 * grad_loss.to(g2.dtype)


rdrop_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerRDrop(torch.autograd.Function):
    """`rdrop_loss_op` with gradients on an eager call: the same forward and backward without
    the custom op's dispatcher round trip (tens of microseconds of host time a call)."""

    @staticmethod
    def forward(ctx, logits1, logits2, args):
        # the logits twice: as inputs autograd tracks, and in `args` (rdrop_loss_op's inputs),
        # which autograd does not inspect (each argument of apply costs host time)
        name, loss, g1, g2, parts = _forward(*args)
        ctx.reduction = args[5]
        if name == "triton":
            # scaled in place by the one backward allowed, which drops them (`ctx.grads = ()`
            # marks it done): kept on ctx, cheaper than save_for_backward
            ctx.grads = (g1, g2)
        else:
            ctx.grads = None
            ctx.save_for_backward(g1, g2)
        if parts is None:
            return loss
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, *_grad_parts):
        grads = ctx.grads
        if grads is None:
            return _scaled(*ctx.saved_tensors, grad_loss, ctx.reduction) + (None,)
        if not grads:
            raise RuntimeError(_BACKWARD_TWICE)
        ctx.grads = ()
        if type(grad_loss) is not Tensor:  # e.g. a tensor subclass: out of place
            return _scaled(*grads, grad_loss, ctx.reduction) + (None,)
        return _scale_in_place(*grads, grad_loss) + (None,)


def _plain_eager(logits1: Tensor, logits2: Tensor, labels: Optional[Tensor]) -> bool:
    """True when the call sees plain tensors and no compiler, tracer, tensor mode or functorch
    transform: the custom op then has nothing to dispatch, so its body runs directly. Meta
    tensors keep the op (its fake implementation runs for them)."""
    return (type(logits1) is Tensor and type(logits2) is Tensor
            and (labels is None or type(labels) is Tensor) and not logits1.is_meta
            and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active())


class RDropParts(NamedTuple):
    """`rdrop_loss(..., return_parts=True)`: the loss and its two parts on the CE scale (both
    detached fp32 means over the counted rows, whatever the reductions): `ce` = (CE1 + CE2) / 2,
    comparable with the loss of a run without R-Drop; `kl` = (KL12 + KL21) / 2 (|p1 - p2|^2 for
    regression), so that loss = 2 * ce + alpha * kl for reduction="mean"."""

    loss: Tensor
    ce: Tensor
    kl: Tensor


def rdrop_loss(logits1: Tensor, logits2: Tensor, labels: Optional[Tensor] = None,
               alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
               ce: bool = True, backend: Optional[str] = None, *, task: Optional[str] = None,
               kl_reduction: str = "mean", check_labels: bool = False,
               check_finite: Optional[bool] = None, return_parts: bool = False):
    """R-Drop loss of two forward passes, with gradients to both.

    Per row: ce * (CE(z1, y) + CE(z2, y)) + alpha/2 * (KL(P1||P2) + KL(P2||P1)).
    logits1, logits2: [N, V] or [B, T, V] (fp32/bf16/fp16; fp64 on the reference backend).
    labels: int64 [N] / [B, T], or None (KL term alone over all rows). Rows labelled
    `ignore_index` count for nothing; "mean" divides by the non-ignored row count (an
    all-ignored batch gives 0 and zero gradients). `ce=False` keeps the KL term only (labels
    then only mark ignored rows). Regression heads (task="regression", or V=1 with float
    labels): ce * (|p1-y|^2 + |p2-y|^2) + alpha * |p1-p2|^2 per row.
    The loss is float32 (float64 for float64 logits).

    kl_reduction (with reduction="mean"; "sum" and "none" are the same either way):
      "mean" (default) divides the KL term by the row count like the CE terms: the official
        fairseq criteria (NMT, summarization, LM, RoBERTa GLUE), up to their alpha.
      "sum" sums the KL term over the rows, the CE terms stay means: the official HF BERT
        GLUE script, CE1_mean + CE2_mean + alpha/2 * sum(KL12 + KL21) with alpha = 0.5
        (its regression heads use "mean" with alpha = 1).
    check_labels: raise ValueError for labels outside [0, V) other than ignore_index. Off by
    default: the check costs a host sync on every call (no CUDA-graph capture), and unchecked,
    such a row gets a NaN loss and NaN gradients on every backend (never a finite wrong value;
    the label is never used as an address), so the error still shows at once.
    check_finite: raise ValueError for +-inf/NaN logits. Default: always on the reference
    backend; off on triton, where the check would read both logits once more and sync, and a
    row with non-finite logits gets a NaN loss and NaN gradients instead.
    return_parts: return `RDropParts(loss, ce, kl)` instead of the loss alone.
    backend: "reference" | "triton" | None (REGDROP_FAST_BACKEND, then auto).
    """
    task = check_rdrop_inputs(logits1, logits2, labels, alpha, reduction, task, ignore_index,
                              kl_reduction)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    need_grad = torch.is_grad_enabled() and (logits1.requires_grad or logits2.requires_grad)
    finite = -1 if check_finite is None else int(bool(check_finite))
    args = (logits1, logits2, labels, float(alpha), int(ignore_index), reduction, kl_reduction,
            bool(ce), task, backend or "", bool(check_labels), finite, need_grad,
            bool(return_parts))
    if not _plain_eager(logits1, logits2, labels):
        loss, _, _, parts = rdrop_loss_op(*args)
    elif need_grad:
        out = _EagerRDrop.apply(logits1, logits2, args)
        loss, parts = out if return_parts else (out, None)
    else:
        _, loss, _, _, parts = _forward(*args)
    if not return_parts:
        return loss
    parts = parts.detach()
    return RDropParts(loss, parts[0], parts[1])


class RDropLoss(nn.Module):
    """Module form of `rdrop_loss`: forward(logits1, logits2, labels=None)."""

    def __init__(self, alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 ce: bool = True, backend: Optional[str] = None, task: Optional[str] = None,
                 kl_reduction: str = "mean", check_labels: bool = False,
                 check_finite: Optional[bool] = None):
        super().__init__()
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.kl_reduction = kl_reduction
        self.ce = ce
        self.backend = backend
        self.task = task
        self.check_labels = check_labels
        self.check_finite = check_finite

    def forward(self, logits1: Tensor, logits2: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return rdrop_loss(logits1, logits2, labels, self.alpha, self.ignore_index, self.reduction,
                          self.ce, self.backend, task=self.task, kl_reduction=self.kl_reduction,
                          check_labels=self.check_labels, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, kl_reduction={self.kl_reduction!r}, ce={self.ce}")
