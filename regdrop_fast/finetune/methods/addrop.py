"""AD-DROP adapter: `regdrop_fast.addrop` on the model's self-attention, pass 1 (attribution and
bit masks) on the unwrapped model so no gradient reduction is involved, pass 2 (masked) forward
and backward through the DDP wrapper; cross-tuning by epoch. The Philox step of the masks is the
global optimizer step, so masks are reproducible and a resumed run draws the same ones."""
from __future__ import annotations

from ..batches import model_inputs
from .base import Method


class ADDrop(Method):
    name = "addrop"
    package = "regdrop_fast.addrop"
    roles = {"forward": "an attribution pass, then a pass with attention positions dropped"}

    def prepare_model(self, job) -> None:
        c = self.config
        try:
            self.addrop = self.module.ADDrop(job.model, p=c.addrop_p, q=c.addrop_q,
                                             layers=tuple(c.addrop_layers),
                                             attribution=c.addrop_attribution, seed=c.seed)
        except ValueError as exc:
            from ..errors import FinetuneError
            raise FinetuneError(f"--method addrop: {exc}") from None
        self.schedule = (self.module.CrossTuning() if c.addrop_cross_tuning
                         else self.module.CrossTuning(period=1, addrop_phase=0))

    def training_step(self, job, batch):
        if not self.schedule.is_addrop_epoch(job.epoch):
            logits = job.forward(batch)
            loss = job.loss_fn(logits, batch)
        else:
            masks = self.addrop.compute_masks(job.model, model_inputs(batch),
                                              step=job.global_step % 2**32)
            with self.addrop.masked(masks, job.global_step % 2**32):
                logits = job.forward(batch)
                loss = job.loss_fn(logits, batch)
                loss.backward()
            return loss.detach(), logits.detach()
        loss.backward()
        return loss.detach(), logits

    def describe(self) -> str:
        c = self.config
        return (f"addrop(p={c.addrop_p}, q={c.addrop_q}, layers={list(c.addrop_layers)}, "
                f"attribution={c.addrop_attribution}, cross_tuning={c.addrop_cross_tuning})")
