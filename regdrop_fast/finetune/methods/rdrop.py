"""R-Drop adapter: the duplicated-batch two-pass forward of `regdrop_fast.rdrop` with its fused
CE + symmetric-KL loss; k-step (`--rdrop-every`) and m-pass (`--rdrop-passes`) variants. With
`--debias` the per-pass CE is replaced by the debiasing loss and the fused loss gives the KL
term alone."""
from __future__ import annotations

from ..errors import FinetuneError
from .base import Method


class RDrop(Method):
    name = "rdrop"
    package = "regdrop_fast.rdrop"
    roles = {"forward": "two dropout passes of one duplicated batch"}

    def require(self) -> None:
        super().require()
        c = self.config
        if c.rdrop_alpha < 0:
            raise FinetuneError(f"--rdrop-alpha must be >= 0, got {c.rdrop_alpha}")
        if c.rdrop_passes < 2:
            raise FinetuneError(f"--rdrop-passes must be >= 2, got {c.rdrop_passes}")

    def training_step(self, job, batch):
        c = self.config
        if job.global_step % c.rdrop_every:  # k-step variant: a plain step in between
            logits = job.forward(batch)
            loss = job.loss_fn(logits, batch)
        elif c.debias is None:
            out = self.module.rdrop_forward(job.forward_model, batch, alpha=c.rdrop_alpha,
                                            passes=c.rdrop_passes, mode="duplicate")
            loss, logits = out.loss, out.logits[0]
        else:
            from ..batches import model_inputs
            from regdrop_fast.rdrop.forward import duplicate_batch
            inputs = duplicate_batch(model_inputs(batch), c.rdrop_passes)
            passes = job.forward_model(**inputs).logits.chunk(c.rdrop_passes, dim=0)
            loss = sum(job.loss_fn(z, batch) for z in passes) + self.module.multi_rdrop_loss(
                passes, batch["labels"], c.rdrop_alpha, ce=False)
            logits = passes[0]
        loss.backward()
        return loss.detach(), logits

    def describe(self) -> str:
        c = self.config
        return f"rdrop(alpha={c.rdrop_alpha}, passes={c.rdrop_passes}, every={c.rdrop_every})"
