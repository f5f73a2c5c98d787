"""AD-DROP (arXiv 2210.05883): attribution-driven dropout of self-attention positions.

Kernels: `attribution(dO, v)` (B = dO·Vᵀ), `keep_mask(attr, p, q, ...)` (bit-packed keep mask
[B,H,Lq,Lk]; `keep_mask_layers` for several layers in one launch; `random_keep_mask_layers`
for the official random variant), `masked_attention(q, k, v, keep, ...)` (flash-style attention
reading the bits).
Training: `apply_addrop(model_or_trainer, ...)` (one call), `enable(model, ...)` /
`disable(model)` (transformers attention implementation "regdrop_addrop", registered on import
when transformers is installed), `ADDrop(model, ...).step(model, batch)` (pass 1, masks, pass 2
+ backward), `CrossTuning` (AD-DROP in odd epochs), `SelfAttention` (drop-in multi-head
self-attention for models outside transformers), `ADDropTrainer` / `ADDropTrainerMixin` /
`ADDropEpochCallback` (HF Trainer; imported on first use because transformers' Trainer is slow
to import).
"""
import importlib

from .apply import apply_addrop
from .attention import masked_attention
from .attribution import attribution
from .integration import disable, enable
from .mask import keep_mask, keep_mask_layers, random_keep_mask_layers
from .module import SelfAttention
from .schedule import CrossTuning
from .step import ADDrop, StepOutput

_TRAINER_NAMES = ("ADDropTrainerMixin", "ADDropTrainer", "ADDropEpochCallback")

__all__ = ["attribution", "keep_mask", "keep_mask_layers", "random_keep_mask_layers",
           "masked_attention", "enable", "disable", "ADDrop", "StepOutput", "CrossTuning",
           "SelfAttention", "apply_addrop", *_TRAINER_NAMES]


def __getattr__(name):
    if name in _TRAINER_NAMES:
        value = getattr(importlib.import_module(".trainer", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
