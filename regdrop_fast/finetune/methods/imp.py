"""IMP adapter: `regdrop_fast.sparse.IterativeMagnitudePruner` prunes `--imp-rate` of the
original weights per iteration (local L1 magnitude) until `--sparsity`, evenly spaced over the
run, rewinding to the pre-trained weights after each prune (official); training uses
`regdrop_fast.MaskedAdamW` so pruned weights stay exactly 0, recreated after every prune as the
paper does. Masks stay packed in the model (and so in the checkpoint)."""
from __future__ import annotations

import importlib

from ..errors import FinetuneError
from .base import Method, MethodUnavailable


class IMP(Method):
    name = "imp"
    package = "regdrop_fast.sparse"
    roles = {"optimizer": "MaskedAdamW keeps the pruned weights at exactly 0",
             "weights": "prunes the weight matrices by magnitude"}

    def require(self) -> None:
        super().require()
        try:
            self.childtuning = importlib.import_module("regdrop_fast.childtuning")
        except Exception as exc:
            raise MethodUnavailable(f"method imp is not available: {type(exc).__name__}: {exc}") \
                from None
        c = self.config
        if not 0 < c.sparsity < 1:
            raise FinetuneError(f"--sparsity must be in (0, 1) for imp, got {c.sparsity}")
        if not 0 < c.imp_rate <= 1:
            raise FinetuneError(f"--imp-rate must be in (0, 1], got {c.imp_rate}")

    def prepare_model(self, job) -> None:
        c = self.config
        self.pruner = self.module.IterativeMagnitudePruner(job.model, c.sparsity, rate=c.imp_rate)
        # prune at interval, 2·interval, ...; the last segment trains at the final sparsity
        self.interval = max(1, job.total_steps // (self.pruner.num_iterations + 1))

    def make_optimizer(self, job, param_groups):
        masks = self.pruner.masks()
        return self.childtuning.MaskedAdamW(param_groups, masks, lr=self.config.lr)

    def after_optimizer_step(self, job) -> None:
        if job.global_step % self.interval == 0 and not self.pruner.done():
            self.pruner.prune()
            job.rebuild_optimizer()

    def state_dict(self) -> dict:
        return {"iteration": self.pruner.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.iteration = int(state.get("iteration", 0))

    def describe(self) -> str:
        return f"imp(sparsity={self.config.sparsity}, rate={self.config.imp_rate})"
