"""R-Drop adapter: the duplicated-batch two-pass forward of `regdrop_fast.rdrop` with its fused
CE + symmetric-KL loss; k-step (`--rdrop-every`) and m-pass (`--rdrop-passes`) variants. With
`--debias` the per-pass CE is replaced by the debiasing loss and the fused loss gives the KL
term alone. Each step reports its CE (the mean single-pass loss, comparable with a run without
R-Drop) and KL (on the CE scale) for the metrics."""
from __future__ import annotations

from ..errors import FinetuneError
from .base import Method


class RDrop(Method):
    name = "rdrop"
    package = "regdrop_fast.rdrop"
    roles = {"forward": "two dropout passes of one duplicated batch"}

    def __init__(self, config):
        super().__init__(config)
        self.parts = {}  # the last step's loss parts

    def require(self) -> None:
        super().require()
        c = self.config
        if c.rdrop_alpha < 0:
            raise FinetuneError(f"--rdrop-alpha must be >= 0, got {c.rdrop_alpha}")
        if c.rdrop_passes < 2:
            raise FinetuneError(f"--rdrop-passes must be >= 2, got {c.rdrop_passes}")
        if c.rdrop_kl_reduction not in ("mean", "sum"):
            raise FinetuneError("--rdrop-kl-reduction must be mean or sum, got "
                                f"{c.rdrop_kl_reduction!r}")

    def training_step(self, job, batch):
        c = self.config
        if job.global_step % c.rdrop_every:  # k-step variant: a plain step in between
            logits = job.forward(batch)
            loss = job.loss_fn(logits, batch)
            self.parts = {"ce": loss.item()}
        elif c.debias is None:
            out = self.module.rdrop_forward(job.forward_model, batch, alpha=c.rdrop_alpha,
                                            passes=c.rdrop_passes, mode="duplicate",
                                            kl_reduction=c.rdrop_kl_reduction)
            loss, logits = out.loss, out.logits[0]
            self.parts = {"ce": out.ce.item(), "kl": out.kl.item()}
        else:
            from ..batches import model_inputs
            from regdrop_fast.rdrop.forward import duplicate_batch, multi_rdrop_loss_parts
            inputs = duplicate_batch(model_inputs(batch), c.rdrop_passes)
            passes = job.forward_model(**inputs).logits.chunk(c.rdrop_passes, dim=0)
            debiased = sum(job.loss_fn(z, batch) for z in passes)
            consistency, _, kl = multi_rdrop_loss_parts(passes, batch["labels"], c.rdrop_alpha,
                                                        ce=False,
                                                        kl_reduction=c.rdrop_kl_reduction)
            loss = debiased + consistency
            logits = passes[0]
            self.parts = {"ce": debiased.item() / c.rdrop_passes, "kl": kl.item()}
        loss.backward()
        return loss.detach(), logits

    def step_metrics(self) -> dict:
        return self.parts

    def describe(self) -> str:
        c = self.config
        return (f"rdrop(alpha={c.rdrop_alpha}, kl_reduction={c.rdrop_kl_reduction}, "
                f"passes={c.rdrop_passes}, every={c.rdrop_every})")
