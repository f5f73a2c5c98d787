"""The methods on the Hugging Face `Trainer`, composed like `--method`; the one way to train
(`regdrop-fast finetune` builds its Trainer here too).

    from regdrop_fast.finetune.hf_trainer import make_trainer
    trainer = make_trainer("rdrop,childtuning-f", FinetuneConfig(rdrop_alpha=0.5, reserve_p=0.3),
                           model=model, args=TrainingArguments(...), train_dataset=ds,
                           data_collator=collator)
    trainer.train()                      # or trainer.train(resume_from_checkpoint=...)

The class is the Trainer (or `trainer_class`) with the methods' own mixins in front, taken from
the registry in `methods.py`: R-Drop's loss, AD-DROP's two passes, the ChildTuning-F/-D
optimizer (the Fisher mask of -D over the training set just before the optimizer), mask
training's score optimizer and threshold schedule, IMP's MaskedAdamW and prune/rewind schedule,
and with `config.debias` the debiasing loss (rows carry "bias_probs", and "teacher_probs" for
conf-reg; pass TrainingArguments(remove_unused_columns=False)). Learning rate, weight decay,
seed and schedule come from the TrainingArguments; the method settings from `config`.
"""
from __future__ import annotations

from dataclasses import replace

from transformers import Trainer

from .config import FinetuneConfig
from .methods import compose

__all__ = ["make_trainer", "trainer_class"]


class _PlainDictInputs:
    """Hands the method mixins a plain dict: DataCollatorWithPadding yields a BatchEncoding
    (a UserDict), which AD-DROP's pass 1 does not accept."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, dict(inputs), num_items_in_batch)


def trainer_class(method: str, config: FinetuneConfig, outer: tuple = (), base=Trainer) -> tuple:
    """(class, keyword arguments) of the Trainer running `method`; `outer` mixins go first."""
    mixins, kwargs = compose(method, config)
    cls = type("RegDropTrainer", (*outer, _PlainDictInputs, *mixins, base), {})
    return cls, kwargs


def make_trainer(method: str = "none", config: FinetuneConfig = None, *, base=Trainer,
                 **trainer_kwargs):
    """A transformers Trainer running `method` (a --method value) with `config`'s method
    hyper-parameters; `base`: the Trainer subclass to build on."""
    config = replace(config or FinetuneConfig(), method=method)
    cls, kwargs = trainer_class(method, config, base=base)
    return cls(**trainer_kwargs, **kwargs)
