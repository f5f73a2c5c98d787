"""R-Drop (NeurIPS 2021): consistency between two dropout passes.

`rdrop_loss` / `RDropLoss`: CE of both passes + symmetric KL, fused (loss and both gradients in
one kernel call). `fused_linear_rdrop_loss`: the same from hidden states and the classifier
weight, chunked so the [N, V] logits never exist whole. `rdrop_forward`: the two-pass forward
(duplicated batch or two calls, every k steps, m passes; causal LMs scored on next-token
targets). `RDropTrainerMixin` / `RDropTrainer`: Hugging Face Trainer integration.
"""
from .forward import RDropOutput, is_causal_lm, multi_rdrop_loss, rdrop_forward
from .fused_linear import fused_linear_rdrop_loss
from .loss import RDropLoss, RDropParts, rdrop_loss

__all__ = ["rdrop_loss", "RDropLoss", "RDropParts", "fused_linear_rdrop_loss", "rdrop_forward",
           "RDropOutput", "multi_rdrop_loss", "is_causal_lm", "RDropTrainerMixin", "RDropTrainer"]


def __getattr__(name):
    # the Trainer integration imports transformers: only on first use
    if name in ("RDropTrainerMixin", "RDropTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'regdrop_fast.rdrop' has no attribute {name!r}")
