"""ChildTuning in the Hugging Face Trainer: `ChildTuningTrainerMixin` makes the Trainer's
optimizer a `ChildTuningAdamW` over its usual weight-decay groups.

    class MyTrainer(ChildTuningTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                        childtuning=dict(mode="D", reserve_p=0.3, fisher_batches=None))

Mode F draws its gradient mask inside each optimizer step (Philox: seed, step, parameter
stream), so every process draws the same mask. Mode D computes the Fisher mask just before the
optimizer is built, over the training set in order (the Trainer's dataset and collator) in
GLOBAL batches of `per_device_train_batch_size * world_size` rows, `fisher_batches` of them or
all: every process computes the same mask as a 1-process run with the same global batch, and
rank 0's copy is broadcast. On `train(resume_from_checkpoint=...)` the
masks come back with the optimizer state (ChildTuningAdamW's state dict carries them), so the
Fisher pass is not rerun on the resumed weights. The seed defaults to `args.seed`.
"""
from __future__ import annotations

import inspect

import torch

from .fisher import fisher_mask
from .optimizer import ChildTuningAdamW

__all__ = ["ChildTuningTrainerMixin"]


class ChildTuningTrainerMixin:
    """Put before the Trainer class. childtuning: ChildTuningAdamW keyword arguments (mode,
    reserve_p, drop, semantics, seed, ...) plus `fisher_batches` for mode D."""

    def __init__(self, *args, childtuning=None, **kwargs):
        super().__init__(*args, **kwargs)
        if childtuning is not None and not isinstance(childtuning, dict):
            raise TypeError(f"childtuning must be a dict of ChildTuningAdamW keyword arguments, "
                            f"got {type(childtuning).__name__}")
        options = dict(childtuning or {})
        self.childtuning_fisher_batches = options.pop("fisher_batches", None)
        options.setdefault("mode", "F")
        options.setdefault("seed", self.args.seed)
        self.childtuning = options
        self._childtuning_resuming = False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._childtuning_resuming = bool(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            options = dict(self.childtuning, lr=self.args.learning_rate)
            if options["mode"] == "D":
                trainable = [p for p in self.model.parameters() if p.requires_grad]
                # resuming: placeholders, replaced by the checkpoint's masks when the Trainer
                # loads the optimizer state right after building it
                options["masks"] = (dict.fromkeys(trainable) if self._childtuning_resuming
                                    else self.childtuning_fisher_masks())
            # the Trainer builds its weight-decay groups and calls ChildTuningAdamW on them
            self.optimizer_cls_and_kwargs = (ChildTuningAdamW, options)
        return super().create_optimizer(model)

    def childtuning_fisher_masks(self) -> dict:
        """{parameter: PackedMask | None} of the Fisher pass over the training set."""
        model = self.model
        accepted = set(inspect.signature(model.forward).parameters)
        dataset, collator = self.train_dataset, self.data_collator
        # the columns the model does not take go, as in the Trainer's own dataloaders
        if hasattr(dataset, "column_names"):  # a datasets.Dataset
            dataset = self._remove_unused_columns(dataset, description="Fisher")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Fisher")
        # the global batch, in the same order on every rank: the mask does not depend on how
        # many processes share the data
        batch = self.args.per_device_train_batch_size * self.args.world_size
        loader = torch.utils.data.DataLoader(dataset, shuffle=False, collate_fn=collator,
                                             batch_size=batch)
        masks = fisher_mask(model, _ModelInputs(loader, accepted, self.args.device),
                            self.childtuning.get("reserve_p", 0.3),
                            max_batches=self.childtuning_fisher_batches)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for mask in masks.values():  # one mask set for every process
                if mask is not None:
                    dist.broadcast(mask.words, src=0)
        return masks


class _ModelInputs:
    """The loader's batches on `device`, only the keys the model's forward takes (the loader's
    length stays known: the Fisher sum is divided by it per batch, as the official code does)."""

    def __init__(self, loader, keys: set, device):
        self.loader, self.keys, self.device = loader, keys, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.to(self.device) for k, v in dict(batch).items() if k in self.keys}
