"""Iterative magnitude pruning with rewinding (REFERENCE.md, Sparse & robust).

Iteration k = 0, 1, ... prunes the fraction px = 1/(1/rate - k) of the surviving weights,
round(px·remaining) of them per matrix (scope="local") or over all target matrices ("global"),
smallest |W| first, exactly as the official trainer_imp.py (`prune.l1_unstructured(amount=
1/(10 - k))`): with rate 0.1 that is ~10% of the original weights per iteration, 5/7/9
iterations for 50/70/90%, with compounding rounding (102, 204, 306, 409, 511 of 1024). An
iteration that would pass `sparsity` prunes to int(n·sparsity) instead. Then it rewinds every parameter except
the classifier's to the rewind point (the pre-trained weights, or a step saved with
`save_rewind_point`) and zeroes the pruned weights. Masks are kept packed in the model's
MaskedLinear layers, whose pruned weights are held at exactly 0 so that their forward and
backward are plain F.linear (no masking op); train between prunes with a fresh `regdrop_fast.MaskedAdamW(params,
masks)` (the paper recreates the optimizer per prune), which keeps pruned weights exactly 0.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .._checks import check_prob
from ..masks import PackedMask
from .mask_training import num_pruned, prune_smallest
from .prepare import masked_modules, prepare
from .targets import DEFAULT_TARGETS, group_of

__all__ = ["magnitude_masks", "IterativeMagnitudePruner", "IMP_TARGETS"]

# official trainer_imp.py prunes the encoder matrices and the pooler, never the classifier
IMP_TARGETS = tuple(t for t in DEFAULT_TARGETS if t != "classifier")


def _pruned_counts(keeps: dict, sparsity, amount, scope: str):
    """How many weights each matrix ("local") or all of them ("global", key None) prune."""
    groups = keeps if scope == "local" else {None: torch.cat([k.reshape(-1) for k in
                                                              keeps.values()])}
    counts = {}
    for name, keep in groups.items():
        n = keep.numel()
        if amount is not None:
            remaining = int(keep.sum())
            # torch.nn.utils.prune.l1_unstructured(amount=px) on the surviving weights: Python's
            # round (half to even) of px·remaining, added to those already pruned
            counts[name] = (n - remaining) + round(amount * remaining)
        else:
            counts[name] = max(num_pruned(sparsity, n), n - int(keep.sum()))
    return counts


@torch.no_grad()
def magnitude_masks(modules: dict, sparsity: Optional[float] = None, scope: str = "local", *,
                    amount: Optional[float] = None) -> dict:
    """{name: bool keep mask} pruning by |W| (L1 magnitude), per matrix or globally.

    Give exactly one of `sparsity` (the fraction of each matrix's, or all, weights pruned
    afterwards: int(n·s), the official maskers' count) and `amount` (prune round(amount·r) more
    of the r surviving weights, as torch.nn.utils.prune and the official IMP do). Weights already
    pruned in a module's mask stay pruned and rank below every surviving weight, so masks only
    grow sparser. Exact counts: ties in |W| are broken by index, not by a threshold."""
    if (sparsity is None) == (amount is None):
        raise ValueError("give exactly one of sparsity and amount")
    if sparsity is not None:
        sparsity = check_prob("sparsity", sparsity, low_open=False, high_open=True)
    else:
        amount = check_prob("amount", amount, low_open=False, high_open=False)
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    magnitudes, keeps = {}, {}
    for name, module in modules.items():
        mag = module.weight.detach().abs().float()
        if torch.isnan(mag).any():
            raise ValueError(f"weight of {name} contains NaN")
        keeps[name] = module.keep_mask()
        magnitudes[name] = torch.where(keeps[name], mag, -1.0)
    counts = _pruned_counts(keeps, sparsity, amount, scope)
    if scope == "local":
        return {name: prune_smallest(mag, counts[name]) for name, mag in magnitudes.items()}
    flat = torch.cat([m.reshape(-1) for m in magnitudes.values()])
    keep = prune_smallest(flat, counts[None])
    pieces = keep.split([m.numel() for m in magnitudes.values()])
    return {name: piece.view(mag.shape) for (name, mag), piece in zip(magnitudes.items(), pieces)}


class IterativeMagnitudePruner:
    """IMP state: the schedule, the packed masks and the rewind point.

    sparsity: final sparsity in [0, 1); rate: fraction of the original weights pruned per
    iteration; targets: default the official IMP set (Q, K, V, attention output, FFN in/out,
    pooler: not the classifier); rewind: "pretrained" (snapshot now, at construction) or None (no rewinding;
    `save_rewind_point()` later sets one, e.g. at an early training step)."""

    def __init__(self, model: nn.Module, sparsity: float, *, rate: float = 0.1,
                 scope: str = "local", targets: Optional[Iterable[str]] = None,
                 rewind: Optional[str] = "pretrained", backend: Optional[str] = None):
        self.final = check_prob("sparsity", sparsity, low_open=False, high_open=True)
        self.rate = check_prob("rate", rate, low_open=True, high_open=False)
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
        if rewind not in ("pretrained", None):
            raise ValueError(f"rewind must be 'pretrained' or None, got {rewind!r}")
        self.model, self.scope = model, scope
        if targets is None:
            targets = IMP_TARGETS
        prepare(model, targets, kind="packed", backend=backend, freeze=False)
        self.modules = {n: m for n, m in masked_modules(model).items() if m.kind == "packed"}
        for module in self.modules.values():
            module.zero_pruned()  # forward = plain F.linear; MaskedAdamW keeps the zeros
        self.iteration = 0
        self.num_iterations = math.ceil(self.final / self.rate - 1e-9)
        self._rewind_state = None
        if rewind == "pretrained":
            self.save_rewind_point()

    def _rewound_parameters(self) -> dict:
        # the classifier keeps its trained weights (the paper does not rewind it)
        return {name: p for name, p in self.model.named_parameters()
                if group_of(name.rpartition(".")[0]) != "classifier"}

    @torch.no_grad()
    def save_rewind_point(self) -> None:
        """Remember the current weights (all but the classifier's) as the rewind target."""
        self._rewind_state = {n: p.detach().clone() for n, p in self._rewound_parameters().items()}

    def sparsity_at(self, iteration: int) -> float:
        return min(self.final, self.rate * iteration)

    @torch.no_grad()
    def prune(self) -> float:
        """One IMP iteration: prune to the next sparsity, rewind, zero the pruned weights.
        Returns the new sparsity. Rebuild the optimizer afterwards."""
        if self.iteration >= self.num_iterations:
            raise ValueError(f"all {self.num_iterations} iterations are done (sparsity "
                             f"{self.final})")
        k = self.iteration
        self.iteration += 1
        if self.rate * self.iteration > self.final + 1e-9:
            keep = magnitude_masks(self.modules, self.final, self.scope)
        else:
            keep = magnitude_masks(self.modules, scope=self.scope,
                                   amount=1.0 / (1.0 / self.rate - k))
        sparsity = self.sparsity_at(self.iteration)
        if self._rewind_state is not None:
            params = self._rewound_parameters()
            for name, value in self._rewind_state.items():
                params[name].copy_(value)
        for name, module in self.modules.items():
            module.set_mask(keep[name])
        self.apply_masks()
        return sparsity

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights in place."""
        for module in self.modules.values():
            module.zero_pruned()

    def masks(self) -> dict:
        """{weight Parameter: PackedMask} for the masked optimizer."""
        return {m.weight: PackedMask(m.mask_words, m.weight.shape) for m in self.modules.values()}

    def done(self) -> bool:
        return self.iteration >= self.num_iterations
