"""Mask training (REFERENCE.md, Sparse & robust): frozen pre-trained weights, trainable scores.

Keep iff score > φ. With k = int(n·s) (the official maskers' count), initialization:
  hard  per matrix, |W| > kthvalue(|W|, k) gets score 2φ, the rest 0, threshold φ (φ = 0.01)
  soft  score = |W|, φ reset as below (not an official option)
φ is reset to kthvalue(scores, k) at the current target sparsity every `interval` steps
(official Δt), or every step with `topk_every_step=True`: per matrix (scope="local"; kept
as it was when k = 0 or the kth value is the matrix's largest score, as officially) or one φ
over all target matrices (scope="global", k = int(N·s)). As in the official code, every value
tied with the kth one is pruned, so ties prune more than k. `exact_count=True` instead prunes
exactly k, ties broken by index (hard init and global init over all matrices with
scope="global"; kept scores tied with φ move up one ulp). Target sparsity follows the
cubic schedule s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_f − t0))³ (constant s_f without a
schedule). Scores get dScore = dW_eff ⊙ W (straight-through) from the masked linear.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .._checks import check_int, check_prob
from .prepare import masked_modules, prepare
from .score_adamw import MaskScoreAdamW

__all__ = ["cubic_sparsity", "kth_threshold", "num_pruned", "prune_smallest", "MaskTrainer",
           "MaskScoreAdamW"]


def _check_sparsity(name: str, value) -> float:
    return check_prob(name, value, low_open=False, high_open=True)


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Cubic gradual sparsity: `initial` until `start`, `final` from `end` on."""
    initial = _check_sparsity("initial", initial)
    final = _check_sparsity("final", final)
    if end <= start:
        raise ValueError(f"end must be > start, got start={start}, end={end}")
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def num_pruned(sparsity: float, n: int) -> int:
    """int(n·s): how many of n weights the official maskers prune at sparsity s (truncated)."""
    return min(n, int(n * sparsity))


def prune_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """bool keep mask with exactly the k smallest entries of `values` pruned; ties at the kth
    value are pruned in index order, so the count is exact where a threshold is not."""
    flat = values.reshape(-1)
    if k <= 0:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    kth = flat.kthvalue(k).values
    below, tied = flat < kth, flat == kth
    # prune the first (k - #below) tied entries: O(n), no sort
    tied_rank = torch.cumsum(tied, 0)
    prune = below | (tied & (tied_rank <= k - below.sum()))
    return (~prune).view(values.shape)


def kth_threshold(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """fp32 [1] threshold φ with int(n·sparsity) of `values` at or below it (the kth smallest;
    -inf when nothing is pruned), so `values > φ` keeps the rest when values are distinct."""
    flat = values.detach().reshape(-1).float()
    k = num_pruned(sparsity, flat.numel())
    if k == 0:
        return torch.full((1,), float("-inf"), device=flat.device)
    return flat.kthvalue(k).values.reshape(1)


class MaskTrainer:
    """Initializes the scores of a model and keeps φ on the sparsity schedule.

    Call `step()` once per optimizer step (after `optimizer.step()`). The scores to optimize
    are `parameters()` (AdamW, weight decay 0, the fine-tuning lr in the paper); `optimizer(lr)`
    gives that AdamW fused with the elementwise passes of mask training (MaskScoreAdamW).

    sparsity: final target s_f in [0, 1). initial_sparsity: s_i of the cubic schedule (default
    s_f: no schedule), also the sparsity of the initialization. start/end: t0/t_f of the
    schedule (end required when s_i != s_f). interval: Δt between φ resets (steps).
    scope: "local" (φ per matrix) or "global" (one φ over all target matrices).
    """

    def __init__(self, model: nn.Module, sparsity: float, *,
                 targets: Optional[Iterable[str]] = None,
                 initial_sparsity: Optional[float] = None, init: str = "hard", phi: float = 0.01,
                 scope: str = "local", interval: int = 1, topk_every_step: bool = False,
                 start: int = 0, end: Optional[int] = None, backend: Optional[str] = None,
                 freeze: bool = True, exact_count: bool = False):
        self.final = _check_sparsity("sparsity", sparsity)
        self.initial = (self.final if initial_sparsity is None
                        else _check_sparsity("initial_sparsity", initial_sparsity))
        if init not in ("hard", "soft"):
            raise ValueError(f"init must be 'hard' or 'soft', got {init!r}")
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
        if not phi > 0:
            raise ValueError(f"phi must be > 0, got {phi}")
        self.interval = check_int("interval", interval, 1, 2**62)
        self.start = check_int("start", start, 0, 2**62)
        if self.initial != self.final and end is None:
            raise ValueError("end (t_f of the cubic schedule) is required when initial_sparsity "
                             "differs from sparsity")
        self.end = None if end is None else check_int("end", end, self.start + 1, 2**62)
        self.scope, self.topk_every_step = scope, topk_every_step
        self.exact_count = bool(exact_count)
        prepare(model, targets, kind="scores", backend=backend, freeze=freeze)
        self.modules = {n: m for n, m in masked_modules(model).items() if m.kind == "scores"}
        self.t = 0
        self._initialize(init, float(phi))

    def parameters(self) -> list:
        return [m.mask_scores for m in self.modules.values()]

    def sparsity_at(self, step: int) -> float:
        if self.end is None:
            return self.final
        return cubic_sparsity(step, self.initial, self.final, self.start, self.end)

    @torch.no_grad()
    def _initialize(self, init: str, phi: float) -> None:
        magnitudes = {n: m.weight.detach().abs().float() for n, m in self.modules.items()}
        for name, mag in magnitudes.items():
            if torch.isnan(mag).any():
                raise ValueError(f"weight of {name} contains NaN")
        if init == "soft":
            for name, module in self.modules.items():
                module.mask_scores.copy_(magnitudes[name])
            self.reset_thresholds(self.initial)
            return
        if self.exact_count:
            keeps = self._smallest(magnitudes, self.initial)
        else:  # official controlled_init "magnitude": per matrix, ties with the kth pruned
            keeps = {}
            for name, mag in magnitudes.items():
                k = num_pruned(self.initial, mag.numel())
                keeps[name] = (mag > mag.reshape(-1).kthvalue(k).values if k > 0
                               else torch.ones_like(mag, dtype=torch.bool))
        for name, keep in keeps.items():
            self.modules[name].mask_scores.copy_(torch.where(keep, 2.0 * phi, 0.0))
            self.modules[name].mask_threshold.fill_(phi)

    def _smallest(self, values: dict, sparsity: float) -> dict:
        """{name: keep} pruning exactly int(n·s) smallest values per matrix or globally."""
        if self.scope == "local":
            return {name: prune_smallest(v, num_pruned(sparsity, v.numel()))
                    for name, v in values.items()}
        flat = torch.cat([v.reshape(-1) for v in values.values()])
        keep = prune_smallest(flat, num_pruned(sparsity, flat.numel()))
        pieces = keep.split([v.numel() for v in values.values()])
        return {name: piece.view(v.shape) for (name, v), piece in zip(values.items(), pieces)}

    @torch.no_grad()
    def reset_thresholds(self, sparsity: Optional[float] = None) -> float:
        """Set φ to the kth value of the scores at `sparsity` (default: the schedule's now),
        k = int(n·s), by the official rule (see the module docstring). With exact_count, scores
        tied with φ that the index order keeps move up one ulp (torch.nextafter), so
        `score > φ` prunes exactly k weights even where scores tie."""
        sparsity = self.sparsity_at(self.t) if sparsity is None else _check_sparsity(
            "sparsity", sparsity)
        scores = {n: m.mask_scores.detach() for n, m in self.modules.items()}
        has_nan = torch.stack([torch.isnan(s).any() for s in scores.values()])
        if has_nan.any():  # the reset's one host sync
            name = list(scores)[int(has_nan.nonzero()[0])]
            raise ValueError(f"mask scores of {name} contain NaN")
        if not self.exact_count:
            self._official_reset(scores, sparsity)
            return sparsity
        keeps = self._smallest({n: s.float() for n, s in scores.items()}, sparsity)
        if self.scope == "global":
            flat = torch.cat([s.float().reshape(-1) for s in scores.values()])
            phis = dict.fromkeys(scores, kth_threshold(flat, sparsity))
        else:
            phis = {n: kth_threshold(s, sparsity) for n, s in scores.items()}
        for name, module in self.modules.items():
            phi, keep, s = phis[name], keeps[name], module.mask_scores
            bump = keep & (s.float() <= phi)
            s.copy_(torch.where(bump, torch.nextafter(phi, phi.new_tensor(float("inf"))), s))
            module.mask_threshold.copy_(phi)
        return sparsity

    def _official_reset(self, scores: dict, sparsity: float) -> None:
        """mask_trainer.py reset_threshold: φ = kthvalue at k = int(n·s); a local φ stays when
        k = 0 or the kth value is not below the largest score; a global φ stays when k = 0
        (officially an error)."""
        if self.scope == "global":
            flat = torch.cat([s.float().reshape(-1) for s in scores.values()])
            k = num_pruned(sparsity, flat.numel())
            if k > 0:
                phi = flat.kthvalue(k).values
                for module in self.modules.values():
                    module.mask_threshold.fill_(phi)
            return
        # matrices of one size share k: one kthvalue over their stacked rows (a GPU's kthvalue
        # runs one block per row, so a matrix alone fills one SM), φ kept on the device
        by_size = {}
        for name, s in scores.items():
            by_size.setdefault(s.numel(), []).append(name)
        for numel, names in by_size.items():
            k = num_pruned(sparsity, numel)
            if k == 0:
                continue
            rows = torch.stack([scores[n].float().reshape(-1) for n in names])
            kth = rows.kthvalue(k, dim=1).values
            moved = kth < rows.amax(dim=1)
            for i, name in enumerate(names):
                phi = self.modules[name].mask_threshold
                phi.copy_(torch.where(moved[i], kth[i], phi[0]))

    def resets_at(self, t: int) -> bool:
        """Whether `step()` resets φ when it advances to step t (Δt grid or top-k)."""
        return self.topk_every_step or (t - self.start) % self.interval == 0

    def step(self) -> bool:
        """Advance one step; reset φ if this step is on the Δt grid (or always with top-k).
        Returns whether φ was reset."""
        self.t += 1
        if self.resets_at(self.t):
            self.reset_thresholds()
            return True
        return False

    def optimizer(self, lr: float, **kwargs) -> MaskScoreAdamW:
        """The scores' AdamW, fused with the mask-training elementwise passes where Triton
        runs (MaskScoreAdamW; kwargs: betas, eps, weight_decay, fused, defer_ste_grad)."""
        return MaskScoreAdamW(self, lr, **kwargs)

    def sparsity(self) -> dict:
        """{name: fraction of pruned weights} under the current thresholds."""
        return {n: 1.0 - m.keep_mask().float().mean().item() for n, m in self.modules.items()}
