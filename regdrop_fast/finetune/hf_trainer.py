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

import json
from dataclasses import replace
from pathlib import Path

from transformers import Trainer

from .config import FinetuneConfig
from .errors import FinetuneError
from .methods import compose, parse_methods

__all__ = ["check_backend", "make_trainer", "trainer_class"]

# methods that rank whole weight/score tensors (top-k thresholds)
_WHOLE_TENSORS = ("mask-train", "imp")
# methods whose own optimizer keys per (unflattened) parameter
_OWN_OPTIMIZER = ("childtuning-f", "childtuning-d", "mask-train", "imp")


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


def _deepspeed_config(args) -> dict:
    """The DeepSpeed config of `args` (a dict), or None without DeepSpeed."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    value = getattr(args, "deepspeed", None)
    if not value:
        return None
    return value if isinstance(value, dict) else json.loads(Path(value).read_text())


def check_backend(method: str, args) -> None:
    """Raise FinetuneError when `method` cannot run under the FSDP or DeepSpeed setup of the
    TrainingArguments `args` (it would crash mid-training or silently train something else)."""
    names = parse_methods(method)
    if getattr(args, "fsdp", None):
        for name in names:
            if name in _WHOLE_TENSORS:
                raise FinetuneError(f"{name} is not available with FSDP: it ranks whole "
                                    "weight/score tensors (top-k thresholds), which FSDP shards "
                                    "across processes; use DDP")
    ds = _deepspeed_config(args)
    if ds is None:
        return
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    for name in names:
        if name not in _OWN_OPTIMIZER:
            continue
        instead = "DDP or FSDP" if name.startswith("childtuning") else "DDP"
        if "optimizer" in ds:
            why = ("the DeepSpeed config has an \"optimizer\" section, so DeepSpeed's optimizer "
                   f"would silently replace {name}'s own")
        elif stage >= 1:
            why = (f"DeepSpeed ZeRO stage {stage} flattens the parameters that {name}'s own "
                   "optimizer keys one by one")
        else:
            continue
        raise FinetuneError(f"{name} is not available with this DeepSpeed config: {why}; use "
                            f"{instead}, or a DeepSpeed config with stage 0 and no "
                            "\"optimizer\" section")


def make_trainer(method: str = "none", config: FinetuneConfig = None, *, base=Trainer,
                 **trainer_kwargs):
    """A transformers Trainer running `method` (a --method value) with `config`'s method
    hyper-parameters; `base`: the Trainer subclass to build on. Raises FinetuneError for a
    method the FSDP/DeepSpeed setup of `args` cannot run (`check_backend`)."""
    config = replace(config or FinetuneConfig(), method=method)
    if trainer_kwargs.get("args") is not None:
        check_backend(method, trainer_kwargs["args"])
    cls, kwargs = trainer_class(method, config, base=base)
    return cls(**trainer_kwargs, **kwargs)
