"""Cross-tuning (AD-DROP paper, §3.3): AD-DROP steps in some epochs, plain fine-tuning in the
others. The official default alternates: plain in even epochs (epoch 0 first), AD-DROP in odd
ones, i.e. `CrossTuning(period=2, addrop_phase=1)`. `period=1, addrop_phase=0` applies AD-DROP
every epoch; `start_epoch` delays it; `rule(epoch) -> bool` replaces the arithmetic.
"""
from __future__ import annotations

from typing import Callable, Optional

from .._checks import check_int

__all__ = ["CrossTuning"]


class CrossTuning:
    """Which epochs run AD-DROP: epoch >= start_epoch and epoch % period == addrop_phase,
    or `rule(epoch)` when given."""

    def __init__(self, period: int = 2, addrop_phase: int = 1, start_epoch: int = 0,
                 rule: Optional[Callable[[int], bool]] = None):
        self.period = check_int("period", period, 1, 2**31)
        self.addrop_phase = check_int("addrop_phase", addrop_phase, 0, self.period - 1)
        self.start_epoch = check_int("start_epoch", start_epoch, 0, 2**62)
        if rule is not None and not callable(rule):
            raise TypeError(f"rule must be callable(epoch) -> bool, got {type(rule).__name__}")
        self.rule = rule

    def is_addrop_epoch(self, epoch: int) -> bool:
        epoch = check_int("epoch", epoch, 0, 2**62)
        if self.rule is not None:
            return bool(self.rule(epoch))
        return epoch >= self.start_epoch and epoch % self.period == self.addrop_phase

    __call__ = is_addrop_epoch

    def train_step(self, addrop, model, batch, epoch: int, loss_fn=None, backward: bool = True):
        """`addrop.step` in AD-DROP epochs, `addrop.plain_step` in the others."""
        run = addrop.step if self.is_addrop_epoch(epoch) else addrop.plain_step
        return run(model, batch, loss_fn=loss_fn, backward=backward)

    def __repr__(self) -> str:
        if self.rule is not None:
            return f"CrossTuning(rule={self.rule!r})"
        return (f"CrossTuning(period={self.period}, addrop_phase={self.addrop_phase}, "
                f"start_epoch={self.start_epoch})")
