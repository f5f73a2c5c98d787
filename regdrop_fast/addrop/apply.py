"""AD-DROP in one call, on a model or on a transformers Trainer: `apply_addrop(target, ...)`.

    step = addrop.apply_addrop(model, p=0.3, q=0.2, layers=(0,))   # an ADDrop: step.step(...)
    addrop.apply_addrop(trainer, p=0.3, q=0.2, cross_tuning=CrossTuning(period=1,
                        addrop_phase=0))                             # trainer.train() runs it

A Trainer instance gets ADDropTrainerMixin mixed into its class (its training_step then runs
AD-DROP steps in the epochs of `cross_tuning`; default: the official alternation), the way
ADDropTrainer would have been built; applying again reconfigures it.
"""
from __future__ import annotations

import functools
import sys

from .step import ADDrop

__all__ = ["apply_addrop"]


def _trainer_class():
    # a Trainer instance implies transformers.trainer is imported; no import cost otherwise
    module = sys.modules.get("transformers.trainer")
    return None if module is None else module.Trainer


@functools.lru_cache(maxsize=None)
def _with_mixin(cls):
    from .trainer import ADDropTrainerMixin
    return type(f"ADDrop{cls.__name__}", (ADDropTrainerMixin, cls), {"__module__": cls.__module__})


def apply_addrop(target, cross_tuning=None, **addrop_kwargs):
    """Enable AD-DROP on `target` and return what runs it.

    target: a supported model (transformers encoder or decoder-only model, or an nn.Module
    built from SelfAttention; see integration.SUPPORTED) -> an ADDrop on it; or a
    transformers Trainer -> the same trainer, training with AD-DROP per `cross_tuning`.
    addrop_kwargs: ADDrop's keywords (p, q, layers, attribution, drop, task, seed, backend,
    ig_steps)."""
    trainer_cls = _trainer_class()
    if trainer_cls is not None and isinstance(target, trainer_cls):
        from .trainer import ADDropTrainerMixin
        if not isinstance(target, ADDropTrainerMixin):
            target.__class__ = _with_mixin(type(target))
        target.setup_addrop(ADDrop(target.model, **addrop_kwargs), cross_tuning)
        return target
    if cross_tuning is not None:
        raise ValueError("cross_tuning applies to a Trainer; with a model, run "
                         "cross_tuning.train_step(step, model, batch, epoch)")
    return ADDrop(target, **addrop_kwargs)
