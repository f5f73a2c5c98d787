"""AD-DROP in the Hugging Face Trainer: `ADDropTrainerMixin`, `ADDropTrainer`, and the
`ADDropEpochCallback` that tells the mixin which epoch it is in.

    trainer = ADDropTrainer(model=model, args=args, train_dataset=ds,
                            addrop=dict(p=0.3, q=0.2, layers=(0,)),    # or an ADDrop
                            cross_tuning=CrossTuning())                 # plain, AD-DROP, ...

In an AD-DROP epoch `training_step` runs pass 1 (under the Trainer's autocast context) on the
unwrapped model, then the Trainer's own training_step (forward, loss, backward, gradient
accumulation scaling) inside the masked context: pass 2 and its backward, so a gradient
checkpointing recompute also sees the masks. Other epochs are the Trainer's plain step.
"""
from __future__ import annotations

import math

from transformers import Trainer, TrainerCallback

from .schedule import CrossTuning
from .step import ADDrop

__all__ = ["ADDropTrainerMixin", "ADDropTrainer", "ADDropEpochCallback"]


class ADDropEpochCallback(TrainerCallback):
    """Keeps the integer epoch of the training loop (state.epoch is fractional)."""

    def __init__(self):
        self.epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the epoch index at an epoch's start, plus a fraction after a resume
        self.epoch = math.floor((state.epoch or 0.0) + 1e-6)


class ADDropTrainerMixin:
    """Put before the Trainer class: `class MyTrainer(ADDropTrainerMixin, Trainer)`.

    addrop: an ADDrop built on the trainer's model, or a dict of ADDrop keyword arguments.
    cross_tuning: a CrossTuning (default: the official alternation, AD-DROP in odd epochs)."""

    def __init__(self, *args, addrop=None, cross_tuning=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_addrop(addrop, cross_tuning)

    def setup_addrop(self, addrop, cross_tuning=None) -> None:
        """Configure AD-DROP on the trainer's model (what __init__ does with its keywords)."""
        if addrop is None:
            raise ValueError("addrop must be an ADDrop or a dict of ADDrop keyword arguments")
        if isinstance(addrop, dict):
            addrop = ADDrop(self.model, **addrop)
        if not isinstance(addrop, ADDrop):
            raise TypeError(f"addrop must be an ADDrop or a dict, got {type(addrop).__name__}")
        if cross_tuning is None:
            cross_tuning = CrossTuning()
        if not isinstance(cross_tuning, CrossTuning):
            raise TypeError(f"cross_tuning must be a CrossTuning, got "
                            f"{type(cross_tuning).__name__}")
        self.addrop = addrop
        self.cross_tuning = cross_tuning
        self._addrop_global_step = None
        if not isinstance(getattr(self, "addrop_epochs", None), ADDropEpochCallback):
            self.addrop_epochs = ADDropEpochCallback()
            self.add_callback(self.addrop_epochs)

    def addrop_active(self) -> bool:
        return self.cross_tuning.is_addrop_epoch(self.addrop_epochs.epoch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.addrop_active():
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        accelerator = getattr(self, "accelerator", None)
        inner = accelerator.unwrap_model(model) if accelerator is not None else model
        step = getattr(getattr(self, "state", None), "global_step", None)
        if step is not None and step != self._addrop_global_step:
            # the mask counter restarts at each optimizer step from the step number (times the
            # accumulation steps), so a run resumed from a checkpoint draws the masks of the
            # uninterrupted run
            self._addrop_global_step = step
            self.addrop.step_count = step * self.args.gradient_accumulation_steps
        with self.compute_loss_context_manager():
            masks = self.addrop.compute_masks(inner, inputs)
        with self.addrop.masked(masks):
            return super().training_step(model, inputs, num_items_in_batch)


class ADDropTrainer(ADDropTrainerMixin, Trainer):
    """transformers.Trainer with AD-DROP steps per its CrossTuning schedule."""
