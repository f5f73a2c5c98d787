"""Sparsity of a model: per masked matrix, overall, and against the encoder-layer parameters.

The paper reports sparsity as pruned weights / all parameters of the encoder layers (84M for
BERT-base: Q, K, V, attention output, FFN in/out with their biases and LayerNorms), so
`encoder_sparsity` divides the pruned weights inside encoder layers by that count. Works on a
prepared model (counts its masks) and on a plain one (counts exact zeros of the target
weights, e.g. after `merge` or IMP).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch.nn as nn

from .masked_linear import MaskedLinear
from .targets import ENCODER_LAYER, resolve_targets

__all__ = ["sparsity_report"]


def sparsity_report(model: nn.Module, targets: Optional[Iterable[str]] = None) -> dict:
    """{"matrices": {name: {"numel", "pruned", "sparsity"}}, "pruned", "numel", "overall",
    "encoder_params", "encoder_pruned", "encoder_sparsity"}.

    targets: which layers to count when the model has no MaskedLinear (default: the paper's
    matrix set); a prepared model reports its masked layers."""
    masked = {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}
    if masked and targets is None:
        layers = masked
    else:
        layers = {n: model.get_submodule(n) for n in resolve_targets(model, targets)}
    matrices = {}
    for name, module in layers.items():
        if isinstance(module, MaskedLinear):
            kept = int(module.keep_mask().sum())
        else:
            kept = int((module.weight.detach() != 0).sum())
        numel = module.weight.numel()
        matrices[name] = {"numel": numel, "pruned": numel - kept,
                          "sparsity": (numel - kept) / numel if numel else 0.0}
    pruned = sum(m["pruned"] for m in matrices.values())
    numel = sum(m["numel"] for m in matrices.values())
    encoder_params = sum(p.numel() for n, p in model.named_parameters()
                         if ENCODER_LAYER.search(n) and not n.endswith("mask_scores"))
    encoder_pruned = sum(m["pruned"] for n, m in matrices.items() if ENCODER_LAYER.search(n))
    return {"matrices": matrices, "pruned": pruned, "numel": numel,
            "overall": pruned / numel if numel else 0.0,
            "encoder_params": encoder_params, "encoder_pruned": encoder_pruned,
            "encoder_sparsity": encoder_pruned / encoder_params if encoder_params else 0.0}
