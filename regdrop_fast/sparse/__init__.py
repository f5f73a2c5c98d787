"""Sparse & robust subnetworks (REFERENCE.md, Sparse & robust; arXiv 2210.05211).

  prepare / masked_modules / merge        masks on the paper's matrix set (targets.py)
  fix_masks                               trained score masks -> fixed (weights held at 0)
  masked_linear / MaskedLinear            y = x·(W ⊙ M)ᵀ + b, M from packed bits or scores > φ
  MaskTrainer, cubic_sparsity             mask training: scores, φ resets, gradual sparsity
  MaskScoreAdamW                          the scores' AdamW fused with mask training's passes
  IterativeMagnitudePruner                IMP with rewinding (train with MaskedAdamW)
  poe_loss, reweight_loss, conf_reg_loss  debiasing losses; overlap features, bias model
  load_mnli/hans/qqp/paws/fever           OOD evaluation data; sparsity_report
"""
from .debias import (BiasModel, claim_features, conf_reg_loss, overlap_features, poe_loss,
                     reweight_loss, train_bias_model)
from .imp import IterativeMagnitudePruner, magnitude_masks
from .mask_training import MaskScoreAdamW, MaskTrainer, cubic_sparsity, kth_threshold
from .masked_linear import MaskedLinear, masked_linear
from .ood import (Example, accuracy, hans_accuracy, load_fever, load_hans, load_mnli, load_paws,
                  load_qqp, mnli_to_hans)
from .prepare import fix_masks, masked_modules, merge, prepare, score_parameters
from .report import sparsity_report
from .targets import DEFAULT_TARGETS, GROUPS, resolve_targets

__all__ = [
    "prepare", "masked_modules", "merge", "score_parameters", "fix_masks", "masked_linear", "MaskedLinear",
    "MaskTrainer", "MaskScoreAdamW", "cubic_sparsity", "kth_threshold", "IterativeMagnitudePruner",
    "magnitude_masks", "poe_loss", "reweight_loss", "conf_reg_loss", "overlap_features",
    "claim_features", "BiasModel", "train_bias_model", "Example", "load_mnli", "load_hans",
    "load_qqp", "load_paws", "load_fever", "mnli_to_hans", "accuracy", "hans_accuracy",
    "sparsity_report", "GROUPS", "DEFAULT_TARGETS", "resolve_targets",
]
