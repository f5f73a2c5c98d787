"""Put masks on a model's target Linear layers, in place, without copying weights.

`prepare` swaps each target nn.Linear for a `MaskedLinear` that holds the very same weight and
bias Parameters (so optimizers, tied references and state_dict keys of the weights are
unchanged) plus its mask; `masked_modules` finds them again; `fix_masks` turns trained score
masks into fixed packed ones (pruned weights held at 0, plain F.linear); `merge` writes W ⊙ M
into the weights and puts plain nn.Linear layers back (for export).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .masked_linear import MaskedLinear
from .targets import resolve_targets

__all__ = ["prepare", "masked_modules", "merge", "score_parameters", "fix_masks"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prepare(model: nn.Module, targets: Optional[Iterable[str]] = None, kind: str = "packed",
            backend: Optional[str] = None, freeze: Optional[bool] = None) -> dict:
    """Attach masks to the target layers of `model` (in place); returns {name: MaskedLinear}.

    targets: group names of `regdrop_fast.sparse.targets.GROUPS` or globs over Linear names
    (None: Q, K, V, attention output, FFN in/out, pooler, classifier). kind: "packed" (bit
    masks, all kept; IMP, fixed subnetworks) or "scores" (trainable scores, all kept until a
    `MaskTrainer` initializes them). freeze: set requires_grad=False on every parameter of the
    model except the scores (default: True for "scores", as the paper trains masks on frozen
    pre-trained weights; False for "packed"). A model prepared before is re-prepared only if
    its layers are plain Linear; layers already masked with the same kind are returned as is.
    """
    if kind not in ("packed", "scores"):
        raise ValueError(f"kind must be 'packed' or 'scores', got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = {}
    for name in resolve_targets(model, targets):
        module = model.get_submodule(name)
        if isinstance(module, MaskedLinear):
            if module.kind != kind:
                raise ValueError(f"{name} already has a {module.kind!r} mask, asked for {kind!r}")
            module.backend = backend
        else:
            module = MaskedLinear.from_linear(module, kind, backend=backend)
            _set_module(model, name, module)
        out[name] = module
    if freeze if freeze is not None else kind == "scores":
        for param in model.parameters():
            param.requires_grad_(False)
        for module in out.values():
            if module.kind == "scores":
                module.mask_scores.requires_grad_(True)
    return out


def masked_modules(model: nn.Module) -> dict:
    """{name: MaskedLinear} of a prepared model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}


def score_parameters(model: nn.Module) -> list:
    """The trainable mask scores of a model prepared with kind="scores" (for the optimizer)."""
    return [m.mask_scores for m in masked_modules(model).values() if m.kind == "scores"]


@torch.no_grad()
def merge(model: nn.Module) -> dict:
    """Write W ⊙ M into each masked weight and restore plain nn.Linear layers (in place).

    Returns {name: nn.Linear}; the Parameters are the same objects as before."""
    out = {}
    for name, module in masked_modules(model).items():
        module.weight.mul_(module.keep_mask().to(module.weight.dtype))
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = module.in_features, module.out_features
        linear.weight, linear.bias = module.weight, module.bias
        _set_module(model, name, linear)
        out[name] = linear
    return out


@torch.no_grad()
def fix_masks(model: nn.Module) -> dict:
    """Freeze the current mask of every "scores" layer into a fixed "packed" one (in place).

    The pruned weights are set to exactly 0 and held there (`MaskedLinear.zero_pruned`), so
    the layer runs plain F.linear: fine-tune the subnetwork with
    `regdrop_fast.MaskedAdamW(params, fix_masks(model))`. The scores and thresholds are
    dropped (the state_dict has `mask_words` instead); requires_grad is left as it is.
    Returns {weight Parameter: PackedMask}."""
    out = {}
    for name, module in masked_modules(model).items():
        if module.kind != "scores":
            continue
        keep = module.keep_mask()
        fixed = MaskedLinear.from_linear(module, "packed", backend=module.backend)
        fixed.set_mask(keep)
        fixed.zero_pruned()
        _set_module(model, name, fixed)
        out[fixed.weight] = fixed.packed_mask()
    return out
