"""Hugging Face Trainer integration: R-Drop as a `compute_loss` override.

    class MyTrainer(RDropTrainerMixin, Trainer): ...   # or use RDropTrainer directly
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, rdrop_alpha=0.5)

Works with any model whose output carries logits: sequence classification ([B, V] logits,
[B] labels), token classification ([B, T, V], -100 on padding/sub-words), regression heads
(num_labels = 1 / problem_type "regression", float labels) and causal language models (next-
token targets, shifted as their own loss does; detected from the config, see
`forward.is_causal_lm`). Training steps run `rdrop_forward`; evaluation (model.eval()) runs the
Trainer's ordinary single-pass loss. When the Trainer passes `num_items_in_batch` and treats
the loss as normalized by it (gradient accumulation over token counts), the R-Drop loss is
summed and divided by that count, like the model's own loss.

Logging: every training log that carries "loss" also gets "rdrop_ce" (the mean single-pass CE,
comparable with the loss of a run without R-Drop) and "rdrop_kl" (the mean symmetric KL
(KL12 + KL21) / 2, without alpha), averaged over the steps since the last log (and over the
processes of a distributed run); so loss = passes * rdrop_ce + alpha * rdrop_kl with the
default reductions. The last training step's parts stay in `loss_parts` ({"ce", "kl"}: 0-d
tensors) for callers that log every step exactly (the `regdrop-fast finetune` job).
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from .forward import (duplicate_batch, is_causal_lm, model_logits, multi_rdrop_loss_parts,
                      rdrop_forward)


class RDropTrainerMixin:
    """Mix in before `transformers.Trainer`. Keyword options (also class attributes):
    rdrop_alpha (KL weight), rdrop_passes (m), rdrop_mode ("duplicate" | "twice"),
    rdrop_every (k), rdrop_kl_reduction ("mean": the fairseq criteria; "sum" with alpha 0.5:
    the official HF BERT GLUE script), rdrop_causal_lm (None: detect), rdrop_backend.

    rdrop_pass_loss: None, or loss(logits, labels) of one pass of a sequence-classification
    batch used in place of its cross-entropy (the debiasing losses of
    `sparse.trainer.DebiasTrainerMixin` set it): the loss is then the passes' losses plus
    alpha times the symmetric KL, reported as ce = their mean and kl."""

    rdrop_alpha: float = 1.0
    rdrop_passes: int = 2
    rdrop_mode: str = "duplicate"
    rdrop_every: int = 1
    rdrop_kl_reduction: str = "mean"
    rdrop_causal_lm: Optional[bool] = None
    rdrop_backend: Optional[str] = None
    rdrop_pass_loss = None

    def __init__(self, *args, rdrop_alpha: Optional[float] = None,
                 rdrop_passes: Optional[int] = None, rdrop_mode: Optional[str] = None,
                 rdrop_every: Optional[int] = None, rdrop_kl_reduction: Optional[str] = None,
                 rdrop_causal_lm: Optional[bool] = None, rdrop_backend: Optional[str] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in (("rdrop_alpha", rdrop_alpha), ("rdrop_passes", rdrop_passes),
                            ("rdrop_mode", rdrop_mode), ("rdrop_every", rdrop_every),
                            ("rdrop_kl_reduction", rdrop_kl_reduction),
                            ("rdrop_causal_lm", rdrop_causal_lm),
                            ("rdrop_backend", rdrop_backend)):
            if value is not None:
                setattr(self, name, value)
        self._rdrop_parts = {"rdrop_ce": [], "rdrop_kl": []}

    def _rdrop_task(self, model) -> Optional[str]:
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        problem = getattr(config, "problem_type", None)
        if problem == "multi_label_classification":
            raise ValueError("RDropTrainerMixin supports single-label classification and "
                             "regression, got problem_type='multi_label_classification'")
        if problem == "regression" or getattr(config, "num_labels", None) == 1:
            return "regression"
        return None

    def _rdrop_causal_lm(self, model) -> bool:
        if self.rdrop_causal_lm is not None:
            return self.rdrop_causal_lm
        return is_causal_lm(self.accelerator.unwrap_model(model))

    def _loss_normalized_by_items(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = bool(getattr(self, "model_accepts_loss_kwargs", False))
        return scaled and num_items_in_batch is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.rdrop_pass_loss is not None:
            return self._rdrop_with_pass_loss(model, inputs, return_outputs)
        by_items = self._loss_normalized_by_items(num_items_in_batch)
        factor = 1
        if by_items and getattr(self.args, "average_tokens_across_devices", False):
            # num_items_in_batch counts every rank's items (the Trainer does the same)
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            factor = self.accelerator.num_processes // tp_size
        alpha = self.rdrop_alpha
        if by_items and self.rdrop_kl_reduction == "sum":
            # the KL term stays summed while the loss is divided by the item count below
            # (one host read of the count, only in this combination)
            alpha = alpha * float(num_items_in_batch) / factor
        out = rdrop_forward(model, inputs, alpha=alpha, passes=self.rdrop_passes,
                            mode=self.rdrop_mode,
                            every=self.rdrop_every, step=self.state.global_step,
                            task=self._rdrop_task(model), reduction="sum" if by_items else "mean",
                            kl_reduction=self.rdrop_kl_reduction,
                            causal_lm=self._rdrop_causal_lm(model), backend=self.rdrop_backend)
        self._rdrop_parts["rdrop_ce"].append(out.ce)
        self.loss_parts = {"ce": out.ce}
        if out.kl is not None:
            self._rdrop_parts["rdrop_kl"].append(out.kl)
            self.loss_parts["kl"] = out.kl
        loss = out.loss
        if by_items:
            loss = loss / num_items_in_batch * factor
        return (loss, out.outputs) if return_outputs else loss

    def _rdrop_with_pass_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if self.state.global_step % self.rdrop_every:  # k-step variant: a plain step
            outputs = model(**inputs)
            loss = ce = self.rdrop_pass_loss(model_logits(outputs), labels)
            kl = None
        else:
            outputs = model(**duplicate_batch(inputs, self.rdrop_passes))
            passes = model_logits(outputs).chunk(self.rdrop_passes, dim=0)
            task = sum(self.rdrop_pass_loss(z, labels) for z in passes)
            consistency, _, kl = multi_rdrop_loss_parts(
                passes, labels, self.rdrop_alpha, ce=False,
                kl_reduction=self.rdrop_kl_reduction, backend=self.rdrop_backend)
            loss, ce = task + consistency, task.detach() / self.rdrop_passes
        self.loss_parts = {"ce": ce.detach()}
        self._rdrop_parts["rdrop_ce"].append(ce.detach())
        if kl is not None:
            self.loss_parts["kl"] = kl.detach()
            self._rdrop_parts["rdrop_kl"].append(kl.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self._rdrop_log_parts())
        return super().log(logs, *args, **kwargs)

    def _rdrop_log_parts(self) -> dict:
        """The CE/KL means since the last log (one host sync, at log time only)."""
        parts = {}
        for name, values in self._rdrop_parts.items():
            if values:
                mean = torch.stack([v.float() for v in values]).mean()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(mean)
                    mean = mean / torch.distributed.get_world_size()
                parts[name] = mean.item()
            values.clear()
        return parts


class RDropTrainer(RDropTrainerMixin, Trainer):
    """`transformers.Trainer` training with R-Drop (see RDropTrainerMixin)."""
