"""ChildTuning adapters: `regdrop_fast.ChildTuningAdamW` as the optimizer. F draws its gradient
mask inside the optimizer step from Philox (seed, step, parameter stream, element index), so
every process draws the same mask; D computes the Fisher mask once before training (one pass
over the training set, official) on rank 0 and broadcasts it. The masks and the optimizer's
seed/step travel in the optimizer state, so --resume is exact."""
from __future__ import annotations

from .. import distributed as D
from ..errors import FinetuneError
from .base import Method


class _ChildTuning(Method):
    package = "regdrop_fast.childtuning"
    mode = "F"
    roles = {"optimizer": "ChildTuningAdamW masks the gradients inside its step"}

    def require(self) -> None:
        super().require()
        c = self.config
        if not 0 < c.reserve_p <= 1:
            raise FinetuneError(f"--reserve-p must be in (0, 1], got {c.reserve_p}")

    def _masks(self, job):
        return None

    def make_optimizer(self, job, param_groups):
        c = self.config
        kwargs = dict(lr=c.lr, weight_decay=c.weight_decay, mode=self.mode, reserve_p=c.reserve_p,
                      drop=c.childtuning_drop, semantics=c.childtuning_semantics, seed=c.seed)
        masks = self._masks(job)
        if masks is not None:
            kwargs["masks"] = masks
        try:
            return self.module.ChildTuningAdamW(param_groups, **kwargs)
        except ValueError as exc:
            raise FinetuneError(f"--method {self.name}: {exc}") from None

    def describe(self) -> str:
        c = self.config
        return (f"{self.name}(reserve_p={c.reserve_p}, drop={c.childtuning_drop}, "
                f"semantics={c.childtuning_semantics})")


class ChildTuningF(_ChildTuning):
    name = "childtuning-f"
    mode = "F"


class ChildTuningD(_ChildTuning):
    name = "childtuning-d"
    mode = "D"

    def before_training(self, job) -> None:
        masks = None
        if job.info.is_main:
            loader = job.train_loader(self.config.fisher_batches)
            by_param = self.module.fisher_mask(job.model, loader, self.config.reserve_p)
            # by name, on the CPU: parameters do not cross process boundaries
            masks = {name: by_param[p].to("cpu") for name, p in job.model.named_parameters()
                     if by_param.get(p) is not None}
        masks = D.broadcast_object(job.info, masks)
        self.fisher = {name: m.to(job.device) for name, m in masks.items()}

    def _masks(self, job):
        # every parameter gets an entry: None = always fully updated (embeddings, head)
        return {p: self.fisher.get(name) for name, p in job.model.named_parameters()
                if p.requires_grad}

    def state_dict(self) -> dict:
        return {"masks": dict(self.fisher)}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = dict(state.get("masks", {}))
