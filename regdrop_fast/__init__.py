"""regdrop_fast: fused kernels for regularized fine-tuning of pretrained language models.

Methods: AD-DROP (`regdrop_fast.addrop`), R-Drop (`rdrop_loss`), ChildTuning
(`ChildTuningAdamW`, `fisher_mask`), sparse & robust subnetworks (`regdrop_fast.sparse`).
Shared contracts: `regdrop_fast.rng` (Philox), `regdrop_fast.masks` (bit-packed masks),
`regdrop_fast.backends` (dispatch).
"""
import importlib

from . import backends, masks, rng
from .masks import PackedMask, mask_density, pack_mask, unpack_mask
from .rng import philox_words

__version__ = "0.1.0"

# Public names of the method packages, imported on first use so `import regdrop_fast` stays
# light (no transformers, no triton) and a method's import error stays local to it.
_LAZY = {
    "rdrop_loss": "regdrop_fast.rdrop",
    "fused_linear_rdrop_loss": "regdrop_fast.rdrop",
    "RDropLoss": "regdrop_fast.rdrop",
    "rdrop_forward": "regdrop_fast.rdrop",
    "ChildTuningAdamW": "regdrop_fast.childtuning",
    "MaskedAdamW": "regdrop_fast.childtuning",
    "fisher_mask": "regdrop_fast.childtuning",
    "addrop": "regdrop_fast.addrop",
    "sparse": "regdrop_fast.sparse",
    "rdrop": "regdrop_fast.rdrop",
    "childtuning": "regdrop_fast.childtuning",
}

__all__ = ["backends", "masks", "rng", "PackedMask", "pack_mask", "unpack_mask", "mask_density",
           "philox_words", *_LAZY]


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'regdrop_fast' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
