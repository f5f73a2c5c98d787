"""Mask-training adapter (sparse & robust subnetworks): `regdrop_fast.sparse.MaskTrainer` puts
trainable scores on the paper's matrices (weights frozen), AdamW trains the scores (weight decay
0, official), and the thresholds φ are reset to the target sparsity every epoch (Δt = the
evaluation interval). The scores live in the model's state dict; packed keep masks are saved
beside them in the checkpoint."""
from __future__ import annotations

import torch

from ..errors import FinetuneError
from .base import Method


class MaskTrain(Method):
    name = "mask-train"
    package = "regdrop_fast.sparse"
    roles = {"optimizer": "trains mask scores with AdamW, the weights stay frozen",
             "weights": "masks the weight matrices by trained scores"}

    def require(self) -> None:
        super().require()
        if not 0 <= self.config.sparsity < 1:
            raise FinetuneError(f"--sparsity must be in [0, 1), got {self.config.sparsity}")

    def prepare_model(self, job) -> None:
        c = self.config
        self.trainer = self.module.MaskTrainer(job.model, c.sparsity, init=c.mask_init,
                                               interval=max(1, job.steps_per_epoch))

    def trainable_parameters(self, job):
        scores = {id(p) for p in self.trainer.parameters()}
        return [(n, p) for n, p in job.model.named_parameters() if id(p) in scores]

    def make_optimizer(self, job, param_groups):
        params = [p for group in param_groups for p in group["params"]]
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)

    def after_optimizer_step(self, job) -> None:
        self.trainer.step()

    def state_dict(self) -> dict:
        from ...masks import pack_mask
        masks = {name: pack_mask(m.keep_mask()) for name, m in self.trainer.modules.items()}
        return {"t": self.trainer.t, "masks": masks}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.t = int(state.get("t", 0))

    def describe(self) -> str:
        return f"mask-train(sparsity={self.config.sparsity}, init={self.config.mask_init})"
