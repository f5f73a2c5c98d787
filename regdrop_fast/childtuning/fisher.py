"""The ChildTuning-D mask: keep the parameters with the largest Fisher information.

As the official code: the model in train mode, one pass over the data with the gold-label
loss; per batch each selected parameter's gradient is clipped to norm `max_grad_norm`
separately and F += grad^2 / number of batches. Threshold = the (1 - reserve_p) percentile
of F (np.percentile's linear rule) over all selected parameters together (scope="global") or
per tensor; keep = F >= threshold (ties kept). The threshold is found on the device with one
torch.kthvalue over the concatenated values: nothing but the threshold and one all-finite flag
goes to the host; a NaN or infinite score raises ValueError naming its parameter.
By default the selected parameters are those whose name contains "layer" (the encoder layers
with their LayerNorms); embeddings, pooler and classifier are always updated.
"""
from __future__ import annotations

from collections.abc import Mapping

import math
from typing import Callable, Optional

import torch

from .._checks import check_int, check_prob
from ..masks import PackedMask, pack_mask

__all__ = ["fisher_mask", "default_fisher_params", "percentile_rank"]

SCOPES = ("global", "per_tensor")


def default_fisher_params(name: str) -> bool:
    """The official selection: parameters whose name contains 'layer'."""
    return "layer" in name


def percentile_rank(n: int, reserve_p: float) -> int:
    """1-based rank k such that keep = F >= kthvalue(F, k) equals the mask
    F >= np.percentile(F, (1 - reserve_p) * 100) (linear interpolation; ties kept)."""
    position = ((1.0 - reserve_p) * 100.0 / 100.0) * (n - 1)
    below = math.floor(position)
    return (below if position == below else below + 1) + 1


def _select(model: torch.nn.Module, params) -> list:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        params = default_fisher_params
    if callable(params):
        return [(n, p) for n, p in named if params(n)]
    wanted = list(params)
    ids = {id(p) for p in wanted if isinstance(p, torch.Tensor)}
    names = {p for p in wanted if isinstance(p, str)}
    known = {n for n, _ in named}
    missing = names - known
    if missing:
        raise ValueError(f"params names {sorted(missing)} are not trainable parameters of the "
                         f"model")
    chosen = [(n, p) for n, p in named if n in names or id(p) in ids]
    if len(chosen) != len(wanted):
        raise ValueError("params must be trainable parameters of the model (or their names)")
    return chosen


def _default_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):  # dict or a collator's BatchEncoding
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out:
        loss = out[0]
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("the model output carries no scalar loss (give the batch its labels, "
                         "or pass loss_fn(model, batch) -> scalar)")
    return loss


@torch.no_grad()
def _accumulate(selected, max_grad_norm):
    for _, p in selected:
        if p.grad is None:
            continue
        grad = p.grad
        if max_grad_norm is not None:
            norm = torch.linalg.vector_norm(grad.float())
            grad = grad.float() * torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        yield p, grad.float().square()


def fisher_mask(model: torch.nn.Module, dataloader, reserve_p: float,
                loss_fn: Optional[Callable] = None, params=None, scope: str = "global",
                max_batches: Optional[int] = None, max_grad_norm: Optional[float] = 1.0) -> dict:
    """ChildTuning-D masks from the Fisher information of `model` on `dataloader`.

    Args:
        model: the model to fine-tune (its gradients are zeroed; its train/eval mode is
            restored afterwards).
        dataloader: an iterable of batches; a dict batch is called as model(**batch), a
            tuple/list as model(*batch).
        reserve_p: fraction of the selected parameters to keep, in (0, 1].
        loss_fn: loss_fn(model, batch) -> scalar loss; default: the model output's `loss`.
        params: which parameters get a mask: a predicate on the name (default: 'layer' in
            name), or an iterable of names or parameters.
        scope: "global" (one threshold over all selected parameters, the paper) or
            "per_tensor".
        max_batches: stop after this many batches.
        max_grad_norm: per-parameter gradient clipping before squaring (the official code
            clips each parameter at args.max_grad_norm = 1.0); None disables it.

    Returns:
        {parameter: PackedMask or None} for every trainable parameter of `model` in
        named_parameters() order; None = not selected, always updated. Pass it to
        ChildTuningAdamW(mode="D", masks=...).
    """
    reserve_p = check_prob("reserve_p", reserve_p, low_open=True, high_open=False)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, 1, 2**62)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
    loss_fn = _default_loss if loss_fn is None else loss_fn
    selected = _select(model, params)
    if not selected:
        raise ValueError("no parameter selected for the Fisher mask (the default selects "
                         "names containing 'layer'; pass params=)")
    fisher = {p: torch.zeros_like(p, dtype=torch.float32) for _, p in selected}
    # the official code adds grad^2 / len(dataloader) per batch: same rounding when the length
    # is known, else the sum is divided by the batch count at the end
    try:
        known = len(dataloader)
    except TypeError:
        known = None
    if known is not None and max_batches is not None:
        known = min(known, max_batches)
    was_training = model.training
    model.train()
    batches = 0
    try:
        for batch in dataloader:
            if max_batches is not None and batches >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                loss.backward()
            for p, sq in _accumulate(selected, max_grad_norm):
                fisher[p].add_(sq / known if known else sq)
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if batches == 0:
        raise ValueError("dataloader yielded no batch")
    if not known:
        for f in fisher.values():
            f.div_(batches)
    _check_finite(selected, fisher)
    masks = {p: None for p in model.parameters() if p.requires_grad}
    if scope == "global":
        flat = torch.cat([fisher[p].reshape(-1) for _, p in selected])
        k = percentile_rank(flat.numel(), reserve_p)
        threshold = torch.kthvalue(flat, k).values
        del flat
        for _, p in selected:
            masks[p] = _pack(fisher[p] >= threshold.to(fisher[p].device))
    else:
        for _, p in selected:
            values = fisher[p].reshape(-1)
            threshold = torch.kthvalue(values, percentile_rank(values.numel(), reserve_p)).values
            masks[p] = _pack(fisher[p] >= threshold)
    return masks


def _check_finite(selected, fisher) -> None:
    """A NaN or inf score would rank above or below everything (a NaN compares false, so its
    mask keeps nothing): raise, naming the first such parameter. One host sync for all."""
    device = fisher[selected[0][1]].device
    finite = torch.stack([torch.isfinite(fisher[p]).all().to(device) for _, p in selected])
    if bool(finite.all()):
        return
    name = selected[finite.tolist().index(False)][0]
    raise ValueError(f"fisher_mask: the Fisher score of parameter {name!r} is NaN or infinite "
                     "(a NaN or inf weight, loss or gradient?); no mask computed from it would "
                     "be meaningful")


def _pack(keep: torch.Tensor) -> PackedMask:
    return pack_mask(keep.reshape(1) if keep.dim() == 0 else keep)
