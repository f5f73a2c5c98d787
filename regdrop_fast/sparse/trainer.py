"""Sparse & robust subnetworks in the Hugging Face Trainer: mask training, iterative magnitude
pruning (IMP) and the debiasing losses, each a mixin to put before the Trainer class.

    class MyTrainer(MaskTrainingTrainerMixin, Trainer): ...
    MyTrainer(..., mask_training=dict(sparsity=0.5, init="hard"))    # MaskTrainer keywords
    MyTrainer(..., imp=dict(sparsity=0.5, rate=0.1))                  # IMPTrainerMixin
    MyTrainer(..., debias="poe")         # DebiasTrainerMixin; rows carry "bias_probs"

Mask training: scores on the paper's matrices (weights frozen), trained by AdamW (weight
decay 0, official; `MaskTrainer.optimizer`, fused with the mask passes on CUDA); the thresholds are reset on the schedule every Δt steps, Δt = one epoch of
optimizer steps by default (`interval="epoch"`, the official evaluation interval).
IMP: `MaskedAdamW` keeps pruned weights at exactly 0; the run is split evenly into
`num_iterations + 1` segments, and after each of the first `num_iterations` the pruner prunes
and rewinds (IterativeMagnitudePruner), then the optimizer's masks are replaced and its Adam
state cleared in place, which is what the paper's fresh optimizer per prune amounts to.
Both restore their schedule position from the Trainer's global step when resuming; their masks
are model buffers and optimizer state, so they come back with the checkpoint.
Debiasing: `compute_loss` uses the per-example bias-model probabilities the batch carries as
"bias_probs" ([B, C]; conf-reg also "teacher_probs"); build the Trainer with
`remove_unused_columns=False` so the columns reach it. Evaluation uses the plain loss. With
R-Drop's mixin in the class, each R-Drop pass takes the debiasing loss (`rdrop_pass_loss`).
"""
from __future__ import annotations

import math

from transformers import TrainerCallback

from ..masks import PackedMask, pack_mask
from .debias import conf_reg_loss, poe_loss, reweight_loss
from .imp import IterativeMagnitudePruner
from .mask_training import MaskTrainer

__all__ = ["MaskTrainingTrainerMixin", "IMPTrainerMixin", "DebiasTrainerMixin", "DEBIAS_LOSSES",
           "DEBIAS_COLUMNS"]

DEBIAS_LOSSES = ("poe", "reweight", "conf-reg")
DEBIAS_COLUMNS = ("bias_probs", "teacher_probs")


def _steps_per_epoch(args, train_dataloader) -> int:
    return max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))


class _MaskSchedule(TrainerCallback):
    def __init__(self, mask_trainer, per_epoch: bool):
        self.mask_trainer, self.per_epoch = mask_trainer, per_epoch

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.per_epoch:
            self.mask_trainer.interval = _steps_per_epoch(args, train_dataloader)
        self.mask_trainer.t = state.global_step  # one schedule step per optimizer step

    def on_step_end(self, args, state, control, **kwargs):
        self.mask_trainer.step()


class MaskTrainingTrainerMixin:
    """mask_training: MaskTrainer keyword arguments; `interval="epoch"` (default) sets Δt to
    the optimizer steps of one epoch when training starts."""

    def __init__(self, *args, mask_training=None, **kwargs):
        super().__init__(*args, **kwargs)
        options = dict(mask_training or {})
        interval = options.pop("interval", "epoch")
        per_epoch = interval == "epoch"
        self.mask_trainer = MaskTrainer(self.model, interval=1 if per_epoch else interval,
                                        **options)
        self.add_callback(_MaskSchedule(self.mask_trainer, per_epoch))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # AdamW on the scores (weight decay 0, official), fused with mask training's
            # elementwise passes where Triton runs
            self.optimizer = self.mask_trainer.optimizer(self.args.learning_rate,
                                                         weight_decay=0.0)
        return self.optimizer

    def packed_masks(self) -> dict:
        """{module name: PackedMask} of the current keep masks."""
        return {name: pack_mask(m.keep_mask()) for name, m in self.mask_trainer.modules.items()}


class _PruneSchedule(TrainerCallback):
    def __init__(self, pruner):
        self.pruner = pruner
        self.interval = None

    def on_train_begin(self, args, state, control, **kwargs):
        # prune at interval, 2·interval, ...; the last segment trains at the final sparsity
        self.interval = max(1, state.max_steps // (self.pruner.num_iterations + 1))
        self.pruner.iteration = min(self.pruner.num_iterations,
                                    state.global_step // self.interval)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step % self.interval or self.pruner.done():
            return
        self.pruner.prune()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        inner.reset_masks(self.pruner.masks())


class IMPTrainerMixin:
    """imp: IterativeMagnitudePruner keyword arguments (sparsity, rate, scope, targets,
    rewind); the pruner is `self.imp_pruner`."""

    def __init__(self, *args, imp=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.imp_pruner = IterativeMagnitudePruner(self.model, **dict(imp or {}))
        self.add_callback(_PruneSchedule(self.imp_pruner))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from ..childtuning import MaskedAdamW
            self.optimizer_cls_and_kwargs = (MaskedAdamW, {"masks": self.imp_pruner.masks(),
                                                           "lr": self.args.learning_rate})
        return super().create_optimizer(model)

    def packed_masks(self) -> dict:
        """{module name: PackedMask} of the current pruning masks."""
        return {name: PackedMask(m.mask_words, m.weight.shape)
                for name, m in self.imp_pruner.modules.items()}


class DebiasTrainerMixin:
    """debias: "poe" (product of experts), "reweight" (example reweighting) or "conf-reg"
    (confidence regularization, needs "teacher_probs")."""

    def __init__(self, *args, debias=None, **kwargs):
        super().__init__(*args, **kwargs)
        if debias not in DEBIAS_LOSSES:
            raise ValueError(f"debias must be one of {DEBIAS_LOSSES}, got {debias!r}")
        if self.args.remove_unused_columns:
            raise ValueError("debias needs TrainingArguments(remove_unused_columns=False): the "
                             "batch's bias_probs column must reach compute_loss")
        self.debias = debias
        self._debias_columns = {}
        if hasattr(self, "rdrop_pass_loss"):  # R-Drop composed: its passes take this loss
            self.rdrop_pass_loss = self.debias_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # set aside before any forward pass (AD-DROP's attribution pass included)
        inputs = dict(inputs)
        self._debias_columns = {k: inputs.pop(k) for k in DEBIAS_COLUMNS if k in inputs}
        if "bias_probs" not in self._debias_columns:
            raise ValueError("debias: the training batch has no 'bias_probs' column")
        if self.debias == "conf-reg" and "teacher_probs" not in self._debias_columns:
            raise ValueError("debias='conf-reg': the training batch has no 'teacher_probs' "
                             "column")
        return super().training_step(model, inputs, num_items_in_batch)

    def debias_loss(self, logits, labels):
        """The debiasing loss of the current training batch's rows."""
        bias = self._debias_columns["bias_probs"].to(logits.device)
        if self.debias == "poe":
            return poe_loss(logits, labels, bias.clamp_min(1e-12).log())
        if self.debias == "reweight":
            return reweight_loss(logits, labels, bias)
        teacher = self._debias_columns["teacher_probs"].to(logits.device)
        return conf_reg_loss(logits, labels, teacher, bias)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or getattr(self, "rdrop_pass_loss", None) is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.debias_loss(outputs["logits"] if isinstance(outputs, dict) else outputs[0],
                                labels)
        return (loss, outputs) if return_outputs else loss
