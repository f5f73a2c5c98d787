"""What a method adapter is: the hooks the training loop calls, and the roles it takes.

Each adapter lives in its own file, imports its method package lazily (`require`) and raises
`MethodUnavailable` with the import error when the package is missing, so the job and its tests
say exactly which method cannot run and why.

Roles make composition explicit: two methods may not both replace the training forward pass
("forward") or both own the optimizer ("optimizer").
"""
from __future__ import annotations

import importlib

from ..errors import FinetuneError


class MethodUnavailable(FinetuneError):
    """The method's package cannot be imported here."""


class Method:
    name = "none"
    package = None  # the regdrop_fast module the adapter needs, imported on first use
    roles: dict = {}  # role -> why this method needs it (used in composition errors)

    def __init__(self, config):
        self.config = config
        self._module = None

    @property
    def module(self):
        """The method package, imported on first use."""
        if self._module is None and self.package is not None:
            try:
                self._module = importlib.import_module(self.package)
            except Exception as exc:  # any import-time failure makes the method unavailable
                raise MethodUnavailable(f"method {self.name} is not available: "
                                        f"{type(exc).__name__}: {exc}") from None
        return self._module

    def require(self) -> None:
        """Raise MethodUnavailable now rather than in the middle of training."""
        _ = self.module

    # -- hooks, in the order the job calls them; defaults do nothing ---------------------------
    def prepare_model(self, job) -> None:
        """Change the model before it is moved/wrapped (attention implementation, masks)."""

    def trainable_parameters(self, job):
        """Named parameters the optimizer updates, or None for all of them."""
        return None

    def make_optimizer(self, job, param_groups):
        """Only for the "optimizer" role: the optimizer over `param_groups`."""
        raise NotImplementedError

    def before_training(self, job) -> None:
        """Once before the first step of a fresh run (e.g. the Fisher mask)."""

    def on_epoch_start(self, job, epoch: int) -> None:
        """Before each epoch (0-based), also when resuming into it."""

    def training_step(self, job, batch):
        """Only for the "forward" role: run the step's forward and backward passes; return
        (detached loss, logits of the first pass)."""
        raise NotImplementedError

    def step_metrics(self) -> dict:
        """Parts of the last step's loss to log (name -> float), e.g. R-Drop's ce and kl."""
        return {}

    def after_optimizer_step(self, job) -> None:
        """After each optimizer step (thresholds, pruning schedules)."""

    def state_dict(self) -> dict:
        """Tensors and plain values a resumed run needs (masks travel packed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; called after prepare_model and make_optimizer."""

    def describe(self) -> str:
        return self.name
