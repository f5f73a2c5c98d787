"""Iterative magnitude pruning with rewinding (REFERENCE.md, Sparse & robust).

Each `prune()` raises the sparsity by `rate` of the original weights (10% per iteration:
5/7/9 iterations for 50/70/90%), removing the smallest-|W| surviving weights per matrix
(scope="local") or over all target matrices ("global"), then rewinds every parameter except
the classifier's to the rewind point (the pre-trained weights, or a step saved with
`save_rewind_point`) and zeroes the pruned weights. Masks are kept packed in the model's
MaskedLinear layers; train between prunes with a fresh `regdrop_fast.MaskedAdamW(params,
masks)` (the paper recreates the optimizer per prune), which keeps pruned weights exactly 0.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .._checks import check_prob
from ..masks import PackedMask
from .mask_training import prune_smallest
from .prepare import masked_modules, prepare
from .targets import group_of

__all__ = ["magnitude_masks", "IterativeMagnitudePruner"]


@torch.no_grad()
def magnitude_masks(modules: dict, sparsity: float, scope: str = "local") -> dict:
    """{name: bool keep mask} pruning round(sparsity·n) weights by |W| (L1 magnitude).

    Weights already pruned in a module's mask rank below every surviving weight, so masks only
    grow sparser. Exact counts: ties are broken by index, not by a threshold."""
    sparsity = check_prob("sparsity", sparsity, low_open=False, high_open=True)
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    magnitudes = {}
    for name, module in modules.items():
        mag = module.weight.detach().abs().float()
        if torch.isnan(mag).any():
            raise ValueError(f"weight of {name} contains NaN")
        magnitudes[name] = torch.where(module.keep_mask(), mag, -1.0)
    if scope == "local":
        return {name: prune_smallest(mag, int(sparsity * mag.numel() + 0.5))
                for name, mag in magnitudes.items()}
    flat = torch.cat([m.reshape(-1) for m in magnitudes.values()])
    keep = prune_smallest(flat, int(sparsity * flat.numel() + 0.5))
    out, offset = {}, 0
    for name, mag in magnitudes.items():
        out[name] = keep[offset:offset + mag.numel()].view(mag.shape)
        offset += mag.numel()
    return out


class IterativeMagnitudePruner:
    """IMP state: the schedule, the packed masks and the rewind point.

    sparsity: final sparsity in [0, 1); rate: fraction of the original weights pruned per
    iteration; rewind: "pretrained" (snapshot now, at construction) or None (no rewinding;
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
        prepare(model, targets, kind="packed", backend=backend, freeze=False)
        self.modules = {n: m for n, m in masked_modules(model).items() if m.kind == "packed"}
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
        self.iteration += 1
        sparsity = self.sparsity_at(self.iteration)
        keep = magnitude_masks(self.modules, sparsity, self.scope)
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
            module.weight.mul_(module.keep_mask().to(module.weight.dtype))

    def masks(self) -> dict:
        """{weight Parameter: PackedMask} for the masked optimizer."""
        return {m.weight: PackedMask(m.mask_words, m.weight.shape) for m in self.modules.values()}

    def done(self) -> bool:
        return self.iteration >= self.num_iterations
