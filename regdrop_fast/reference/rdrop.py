"""R-Drop loss in plain PyTorch (reference, the ground truth of every R-Drop kernel).

Classification, per row r of logits z1, z2 [N, V] with label y (../shared/REFERENCE.md, R-Drop):
    loss_r = ce * (CE(z1, y) + CE(z2, y)) + alpha/2 * (KL(P1||P2) + KL(P2||P1)),  P = softmax(z)
rows whose label is `ignore_index` contribute 0; reduction "mean" divides the sum by the number
of non-ignored rows (at least 1, so all-ignored batches give 0, never NaN). Without labels every
row counts and there is no CE term. KL is F.kl_div on log_softmax, as in the official code,
with gradients through both sides. kl_reduction "sum" (with reduction "mean") divides only the
CE terms by that count and sums the KL term over the rows: the official HF BERT GLUE script,
CE1_mean + CE2_mean + alpha/2 * sum_r (KL12 + KL21).

Regression (task="regression", or V=1 with floating labels), per row with predictions p1, p2:
    loss_r = ce * (|p1 - y|^2 + |p2 - y|^2) + alpha * |p1 - p2|^2    (summed over the last dim)

`check_rdrop_inputs` is the argument contract every backend shares: it raises ValueError or
TypeError naming the argument. `check_rdrop_values` holds the data-dependent checks (labels in
range, finite logits) that need a host sync.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
KL_REDUCTIONS = ("mean", "sum")
TASKS = ("classification", "regression")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOGIT_DTYPE_SET = frozenset(LOGIT_DTYPES)  # one hash lookup per check, not four comparisons


def check_rdrop_inputs(logits1, logits2, labels, alpha, reduction, task, ignore_index=-100,
                       kl_reduction="mean"):
    """Validate shapes, dtypes and scalars; return the resolved task name. (Runs on every call
    of every backend: the common types take the cheap test first.)"""
    for name, t in (("logits1", logits1), ("logits2", logits2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _LOGIT_DTYPE_SET:
            raise TypeError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), "
                            f"got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension [..., V], got a 0-d tensor")
    if logits1.shape != logits2.shape:
        raise ValueError(f"logits2 must have the shape of logits1 {tuple(logits1.shape)}, "
                         f"got {tuple(logits2.shape)}")
    if logits1.dtype != logits2.dtype:
        raise TypeError(f"logits2 must have the dtype of logits1 ({logits1.dtype}), "
                        f"got {logits2.dtype}")
    if logits1.device != logits2.device:
        raise ValueError(f"logits2 must be on the device of logits1 ({logits1.device}), "
                         f"got {logits2.device}")
    if logits1.numel() == 0:
        raise ValueError(f"logits1 must not be empty (empty batch), "
                         f"got shape {tuple(logits1.shape)}")
    if type(alpha) is not float and (isinstance(alpha, bool)
                                     or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not alpha >= 0 or alpha == math.inf:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    n_classes = logits1.shape[-1]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.device != logits1.device:
            raise ValueError(f"labels must be on the device of logits1 ({logits1.device}), "
                             f"got {labels.device}")
    if task is None:
        integer_labels = labels is not None and not labels.is_floating_point()
        if n_classes == 1 and integer_labels:
            raise ValueError("logits1 has V=1 class with integer labels: classification needs "
                             "V >= 2; for a regression head pass float labels or task='regression'")
        task = "regression" if n_classes == 1 else "classification"
    if task == "classification":
        if n_classes < 2:
            raise ValueError(f"logits1 must have V >= 2 classes in classification mode, got "
                             f"V={n_classes} (use task='regression' for a 1-output head)")
        if logits1.dim() < 2:
            raise ValueError(f"logits1 must have shape [N, V] or [B, T, V] in classification mode, "
                             f"got {tuple(logits1.shape)}")
        if labels is not None:
            if labels.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"labels must be an int64 (or int32) tensor of class indices, "
                                f"got {labels.dtype}")
            if labels.shape != logits1.shape[:-1]:
                raise ValueError(f"labels must have shape {tuple(logits1.shape[:-1])} (logits1 "
                                 f"without its class dimension), got {tuple(labels.shape)}")
    else:
        if labels is not None:
            if not labels.is_floating_point():
                raise TypeError(f"labels must be a floating tensor for regression, "
                                f"got {labels.dtype}")
            allowed = {tuple(logits1.shape)}
            if n_classes == 1:
                allowed.add(tuple(logits1.shape[:-1]))
            if tuple(labels.shape) not in allowed:
                raise ValueError(f"labels must have shape {tuple(logits1.shape)} (or without the "
                                 f"trailing 1) for regression, got {tuple(labels.shape)}")
    return task


def check_rdrop_values(logits1, logits2, labels, ignore_index, task, *, labels_in_range=True,
                       finite=True):
    """Data-dependent checks (each one host sync): labels in [0, V) or ignore_index, finite
    logits. Raise ValueError naming the argument."""
    if labels_in_range and labels is not None and task == "classification":
        n_classes = logits1.shape[-1]
        bad = label_out_of_range(labels, ignore_index, n_classes)
        if bool(bad.any()):
            value = int(labels[bad].flatten()[0])
            raise ValueError(f"labels must be in [0, {n_classes}) or ignore_index={ignore_index}, "
                             f"got {value}")
    if finite:
        for name, t in (("logits1", logits1), ("logits2", logits2)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains inf or NaN values; R-Drop's softmax/KL is "
                                 f"undefined for non-finite logits")
        if labels is not None and task == "regression" and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels contains inf or NaN values")


def label_out_of_range(labels, ignore_index, n_classes):
    """bool, like labels: a label that is neither ignore_index nor in [0, n_classes)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= n_classes))


def _reduce(ce_row, cons_row, valid, reduction, kl_reduction="mean"):
    """Per-row CE terms and weighted consistency terms -> the loss. "mean" divides by the
    counted rows (at least 1); kl_reduction "sum" leaves the consistency term summed."""
    if reduction == "none":
        return ce_row + cons_row
    count = valid.sum().clamp_min(1).to(ce_row.dtype)
    if reduction == "sum":
        return ce_row.sum() + cons_row.sum()
    if kl_reduction == "sum":
        return ce_row.sum() / count + cons_row.sum()
    return (ce_row.sum() + cons_row.sum()) / count


def rdrop_row_terms_reference(logits1, logits2, labels=None, ignore_index=-100, ce=True):
    """(CE1 + CE2 [N], KL(P1||P2) + KL(P2||P1) [N], valid [N] bool) for 2-D classification
    logits, 0 on ignored rows; math in their dtype."""
    logp1 = F.log_softmax(logits1, dim=-1)
    logp2 = F.log_softmax(logits2, dim=-1)
    # F.kl_div(input=log q, target=p) = sum p (log p - log q): the official pair of calls
    kl_21 = F.kl_div(logp1, logp2, reduction="none", log_target=True).sum(-1)
    kl_12 = F.kl_div(logp2, logp1, reduction="none", log_target=True).sum(-1)
    kl = kl_12 + kl_21
    ce_row = torch.zeros_like(kl)
    if labels is None:
        return ce_row, kl, torch.ones_like(kl, dtype=torch.bool)
    valid = labels != ignore_index
    if ce:
        bad = label_out_of_range(labels, ignore_index, logits1.shape[-1])
        safe = torch.where(valid & ~bad, labels, torch.zeros_like(labels)).long()
        ce1 = -logp1.gather(-1, safe[:, None])[:, 0]
        ce2 = -logp2.gather(-1, safe[:, None])[:, 0]
        # an unchecked out-of-range label has no CE: NaN, never a finite wrong value
        ce_row = torch.where(bad, torch.full_like(kl, float("nan")), ce1 + ce2)
    zero = torch.zeros_like(kl)
    return torch.where(valid, ce_row, zero), torch.where(valid, kl, zero), valid


def rdrop_loss_reference(logits1, logits2, labels=None, alpha=1.0, ignore_index=-100,
                         reduction="mean", ce=True, task=None, upcast=True, check_finite=True,
                         check_labels=True, kl_reduction="mean"):
    """R-Drop loss; `upcast` computes in float64 (else in fp32, or the input's dtype if wider).

    reduction "none" returns the per-row losses with the leading shape of the logits.
    kl_reduction "sum" (with reduction "mean"): CE terms averaged, KL term summed over the rows.
    check_labels=False: an out-of-range label gives its row a NaN loss instead of raising."""
    task = check_rdrop_inputs(logits1, logits2, labels, alpha, reduction, task, ignore_index,
                              kl_reduction)
    check_rdrop_values(logits1, logits2, labels, ignore_index, task,
                       labels_in_range=check_labels, finite=check_finite)
    compute = torch.float64 if upcast else torch.promote_types(logits1.dtype, torch.float32)
    if task == "regression":
        return rdrop_regression_reference(logits1.to(compute), logits2.to(compute),
                                          None if labels is None else labels.to(compute),
                                          alpha, reduction, ce, kl_reduction)
    lead = logits1.shape[:-1]
    z1 = logits1.reshape(-1, logits1.shape[-1]).to(compute)
    z2 = logits2.reshape(-1, logits2.shape[-1]).to(compute)
    flat = None if labels is None else labels.reshape(-1)
    ce_row, kl_row, valid = rdrop_row_terms_reference(z1, z2, flat, ignore_index, ce)
    out = _reduce(ce_row, 0.5 * alpha * kl_row, valid, reduction, kl_reduction)
    return out.reshape(lead) if reduction == "none" else out


def rdrop_regression_terms_reference(pred1, pred2, labels=None, ce=True):
    """(|p1-y|^2 + |p2-y|^2 [N] (0 without labels or ce), |p1-p2|^2 [N]) per row."""
    cons = (pred1 - pred2).square()
    err = torch.zeros_like(cons)
    if labels is not None and ce:
        target = labels.reshape(pred1.shape)
        err = (pred1 - target).square() + (pred2 - target).square()
    if pred1.dim() > 1:
        cons, err = cons.sum(-1), err.sum(-1)
    return err, cons


def rdrop_regression_reference(pred1, pred2, labels=None, alpha=1.0, reduction="mean", ce=True,
                               kl_reduction="mean"):
    """Regression R-Drop: alpha*|p1-p2|^2 (+ ce * MSE of each pass to labels), per row."""
    err, cons = rdrop_regression_terms_reference(pred1, pred2, labels, ce)
    valid = torch.ones_like(err, dtype=torch.bool)
    return _reduce(err, alpha * cons, valid, reduction, kl_reduction)


def multi_rdrop_loss_reference(logits: Sequence[torch.Tensor], labels=None, alpha=1.0,
                               ignore_index=-100, ce=True, kl_reduction="mean"):
    """m-pass R-Drop (paper's m-time variant), mean over non-ignored rows:
    sum_i CE_i + alpha / (m (m-1)) * sum_{i != j} KL(P_i || P_j) (the KL term summed over the
    rows instead with kl_reduction "sum")."""
    m = len(logits)
    if m < 2:
        raise ValueError(f"logits must hold at least 2 passes, got {m}")
    z = [t.reshape(-1, t.shape[-1]).double() for t in logits]
    logp = [F.log_softmax(t, dim=-1) for t in z]
    kl = torch.zeros(z[0].shape[0], dtype=torch.float64, device=z[0].device)
    for i in range(m):
        for j in range(m):
            if i != j:
                kl = kl + alpha / (m * (m - 1)) * F.kl_div(
                    logp[j], logp[i], reduction="none", log_target=True).sum(-1)
    ce_row = torch.zeros_like(kl)
    valid = torch.ones_like(kl, dtype=torch.bool)
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if ce:
            safe = torch.where(valid, flat, torch.zeros_like(flat))[:, None]
            for lp in logp:
                ce_row = ce_row - lp.gather(-1, safe)[:, 0]
        ce_row = torch.where(valid, ce_row, torch.zeros_like(ce_row))
        kl = torch.where(valid, kl, torch.zeros_like(kl))
    return _reduce(ce_row, kl, valid, "mean", kl_reduction)


def fused_linear_rdrop_loss_reference(hidden1, hidden2, weight, bias=None, labels=None,
                                      alpha=1.0, ignore_index=-100, reduction="mean", ce=True,
                                      upcast=True, kl_reduction="mean"):
    """Reference for the fused-linear form: logits_i = hidden_i @ weight.T + bias, then R-Drop."""
    dtype = torch.float64 if upcast else hidden1.dtype
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    z1 = F.linear(hidden1.to(dtype), w, b)
    z2 = F.linear(hidden2.to(dtype), w, b)
    return rdrop_loss_reference(z1, z2, labels, alpha, ignore_index, reduction, ce,
                                task="classification", upcast=upcast, kl_reduction=kl_reduction)


def rdrop_grads_reference(logits1, logits2, labels=None, alpha=1.0, ignore_index=-100,
                          reduction="mean", ce=True, grad_output: Optional[torch.Tensor] = None,
                          kl_reduction="mean"):
    """(loss, d loss/d logits1, d loss/d logits2) in float64 by autograd of the reference."""
    z1 = logits1.detach().double().requires_grad_(True)
    z2 = logits2.detach().double().requires_grad_(True)
    with torch.enable_grad():
        loss = rdrop_loss_reference(z1, z2, labels, alpha, ignore_index, reduction, ce,
                                    kl_reduction=kl_reduction)
        go = (torch.ones_like(loss) if grad_output is None
              else grad_output.to(device=loss.device, dtype=loss.dtype))
        g1, g2 = torch.autograd.grad(loss, (z1, z2), go, allow_unused=True)
    g1 = torch.zeros_like(z1) if g1 is None else g1
    g2 = torch.zeros_like(z2) if g2 is None else g2
    return loss.detach(), g1, g2
