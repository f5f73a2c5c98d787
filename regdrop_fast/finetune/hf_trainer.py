"""The job's methods through the Hugging Face `Trainer`, composed like `--method`.

    from regdrop_fast.finetune.hf_trainer import make_trainer
    trainer = make_trainer("rdrop,childtuning-f", FinetuneConfig(rdrop_alpha=0.5, reserve_p=0.3),
                           model=model, args=TrainingArguments(...), train_dataset=ds,
                           data_collator=collator)
    trainer.train()

The trainer class is built from the method packages' own pieces: `RDropTrainerMixin` (R-Drop
loss in `compute_loss`), `ADDropTrainerMixin` (pass 1 and the masked pass 2 around the
Trainer's step, cross-tuning per epoch), and `MethodsOptimizerMixin` here: the optimizer of
ChildTuning-F/-D (`ChildTuningAdamW`; the Fisher mask of -D computed over the Trainer's
training dataloader just before the optimizer is built) or of mask training (AdamW over the
scores), plus a callback advancing mask training's threshold schedule after every step.
The composition rules and errors are those of `--method`. Not supported here: `imp` (it
rebuilds the optimizer mid-run, which the Trainer's accelerator-wrapped optimizer does not
allow; use `regdrop-fast finetune --method imp`) and `--debias` (needs per-example bias scores
the Trainer does not route).
"""
from __future__ import annotations

from dataclasses import replace

from transformers import Trainer, TrainerCallback

from .config import FinetuneConfig
from .errors import FinetuneError
from .methods import parse_methods
from .param_groups import decay_groups

__all__ = ["make_trainer", "MethodsOptimizerMixin"]


class _MaskScheduleCallback(TrainerCallback):
    def __init__(self, mask_trainer):
        self.mask_trainer = mask_trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.mask_trainer.step()


class _PlainDictInputs:
    """Hands the method mixins a plain dict: DataCollatorWithPadding yields a BatchEncoding
    (a UserDict), which AD-DROP's pass 1 does not accept."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, dict(inputs), num_items_in_batch)


class MethodsOptimizerMixin:
    """create_optimizer for ChildTuning-F/-D and mask training (see the module docstring)."""
    method_config: FinetuneConfig
    method_names: tuple = ()
    mask_trainer = None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        names = self.method_names
        model = self.model
        c = self.method_config
        if "mask-train" in names:
            from torch.optim import AdamW
            self.optimizer = AdamW(self.mask_trainer.parameters(), lr=self.args.learning_rate,
                                   weight_decay=0.0)
            return self.optimizer
        mode = "F" if "childtuning-f" in names else "D" if "childtuning-d" in names else None
        if mode is None:
            return super().create_optimizer()
        from regdrop_fast.childtuning import ChildTuningAdamW, fisher_mask
        masks = None
        if mode == "D":
            device = self.args.device
            loader = ({k: v.to(device) for k, v in batch.items()}
                      for batch in self.get_train_dataloader())
            masks = fisher_mask(model, loader, c.reserve_p, max_batches=c.fisher_batches)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = ChildTuningAdamW(
            decay_groups(model, named, self.args.weight_decay), lr=self.args.learning_rate,
            mode=mode,
            reserve_p=c.reserve_p, drop=c.childtuning_drop, semantics=c.childtuning_semantics,
            seed=self.args.seed, masks=masks)
        return self.optimizer


def make_trainer(method: str = "none", config: FinetuneConfig = None, **trainer_kwargs):
    """A transformers Trainer running `method` (a --method value) with `config`'s method
    hyper-parameters; the learning rate, weight decay and seed come from the TrainingArguments."""
    names = tuple(parse_methods(method))
    config = replace(config or FinetuneConfig(), method=method)
    if "imp" in names:
        raise FinetuneError("imp is not available through the Trainer (it rebuilds the "
                            "optimizer after each prune); use `regdrop-fast finetune --method imp`")
    if config.debias:
        raise FinetuneError("--debias is not available through the Trainer (per-example bias "
                            "scores); use `regdrop-fast finetune --debias ...`")
    bases, extra = [], {}
    if "rdrop" in names:
        from regdrop_fast.rdrop import RDropTrainerMixin
        bases.append(RDropTrainerMixin)
        extra.update(rdrop_alpha=config.rdrop_alpha, rdrop_passes=config.rdrop_passes,
                     rdrop_every=config.rdrop_every,
                     rdrop_kl_reduction=config.rdrop_kl_reduction)
    if "addrop" in names:
        from regdrop_fast.addrop import ADDropTrainerMixin, CrossTuning
        bases.append(ADDropTrainerMixin)
        extra.update(addrop=dict(p=config.addrop_p, q=config.addrop_q,
                                 layers=tuple(config.addrop_layers),
                                 attribution=config.addrop_attribution, seed=config.seed),
                     cross_tuning=CrossTuning() if config.addrop_cross_tuning
                     else CrossTuning(period=1, addrop_phase=0))
    mask_trainer = None
    if "mask-train" in names:
        from regdrop_fast.sparse import MaskTrainer
        mask_trainer = MaskTrainer(trainer_kwargs["model"], config.sparsity, init=config.mask_init)
    cls = type("RegDropTrainer", (_PlainDictInputs, *bases, MethodsOptimizerMixin, Trainer),
               {"method_config": config, "method_names": names, "mask_trainer": mask_trainer})
    trainer = cls(**trainer_kwargs, **extra)
    if mask_trainer is not None:
        trainer.add_callback(_MaskScheduleCallback(mask_trainer))
    return trainer
