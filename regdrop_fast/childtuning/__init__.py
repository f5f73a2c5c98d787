"""ChildTuning (Xu et al., EMNLP 2021) and sparse-mask AdamW with one fused masked step.

`ChildTuningAdamW` (modes F / D / None), `MaskedAdamW` (pruned weights kept at exactly 0) and
`fisher_mask` (the ChildTuning-D mask from Fisher information). Semantics of the official code:
../shared/REFERENCE.md; kernels: csrc/masked_adamw.*, triton_kernels/masked_adamw.py.
"""
from .fisher import fisher_mask
from .masked_step import masked_adamw_step
from .optimizer import ChildTuningAdamW, MaskedAdamW

__all__ = ["ChildTuningAdamW", "MaskedAdamW", "fisher_mask", "masked_adamw_step"]
