"""The method registry: where a method plugs into fine-tuning, once, for the CLI and the API.

Each entry names the Trainer mixin that implements the method (it lives with the method:
`regdrop_fast.rdrop.trainer`, `addrop.trainer`, `childtuning.trainer`, `sparse.trainer`), the
roles it takes (two methods may not both replace the training forward pass, own the optimizer
or mask the weights), how FinetuneConfig fields become the mixin's keyword arguments, the checks
of those fields, and its one-line description. `parse_methods` validates a --method value;
`compose` returns the mixins and keyword arguments that `hf_trainer.make_trainer` builds the
Trainer from. A new method = a mixin beside its kernels + one entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import FinetuneError


class MethodUnavailable(FinetuneError):
    """The method's package cannot be imported here."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FinetuneError(message)


@dataclass(frozen=True)
class Method:
    name: str
    mixin: Optional[str] = None  # "module:Class" of the Trainer mixin; None: plain fine-tuning
    roles: dict = field(default_factory=dict)  # role -> why (in composition errors)
    kwargs: Callable = lambda c: {}  # FinetuneConfig -> the mixin's keyword arguments
    check: Callable = lambda c: None  # raises FinetuneError for out-of-range settings
    describe: Callable = None  # FinetuneConfig -> one line for summaries

    def load(self):
        """The mixin class (imports its package; MethodUnavailable when that fails)."""
        module_name, _, class_name = self.mixin.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except Exception as exc:  # any import-time failure makes the method unavailable
            raise MethodUnavailable(f"method {self.name} is not available: "
                                    f"{type(exc).__name__}: {exc}") from None


def _rdrop_check(c) -> None:
    _check(c.rdrop_alpha >= 0, f"--rdrop-alpha must be >= 0, got {c.rdrop_alpha}")
    _check(c.rdrop_passes >= 2, f"--rdrop-passes must be >= 2, got {c.rdrop_passes}")
    _check(c.rdrop_kl_reduction in ("mean", "sum"),
           f"--rdrop-kl-reduction must be mean or sum, got {c.rdrop_kl_reduction!r}")


def _addrop_kwargs(c) -> dict:
    from regdrop_fast.addrop import CrossTuning
    return {"addrop": dict(p=c.addrop_p, q=c.addrop_q, layers=tuple(c.addrop_layers),
                           attribution=c.addrop_attribution, seed=c.seed),
            "cross_tuning": CrossTuning() if c.addrop_cross_tuning
            else CrossTuning(period=1, addrop_phase=0)}


def _childtuning(mode: str) -> Method:
    name = f"childtuning-{mode.lower()}"
    return Method(
        name, "regdrop_fast.childtuning.trainer:ChildTuningTrainerMixin",
        {"optimizer": "ChildTuningAdamW masks the gradients inside its step"},
        lambda c: {"childtuning": dict(mode=mode, reserve_p=c.reserve_p, drop=c.childtuning_drop,
                                       semantics=c.childtuning_semantics,
                                       fisher_batches=c.fisher_batches)},
        lambda c: _check(0 < c.reserve_p <= 1, f"--reserve-p must be in (0, 1], got {c.reserve_p}"),
        lambda c: (f"{name}(reserve_p={c.reserve_p}, drop={c.childtuning_drop}, "
                   f"semantics={c.childtuning_semantics})"))


def _imp_check(c) -> None:
    _check(0 < c.sparsity < 1, f"--sparsity must be in (0, 1) for imp, got {c.sparsity}")
    _check(0 < c.imp_rate <= 1, f"--imp-rate must be in (0, 1], got {c.imp_rate}")


REGISTRY = {m.name: m for m in (
    Method("none", describe=lambda c: "none"),
    Method("rdrop", "regdrop_fast.rdrop.trainer:RDropTrainerMixin",
           {"forward": "two dropout passes of one duplicated batch"},
           lambda c: dict(rdrop_alpha=c.rdrop_alpha, rdrop_passes=c.rdrop_passes,
                          rdrop_every=c.rdrop_every, rdrop_kl_reduction=c.rdrop_kl_reduction),
           _rdrop_check,
           lambda c: (f"rdrop(alpha={c.rdrop_alpha}, kl_reduction={c.rdrop_kl_reduction}, "
                      f"passes={c.rdrop_passes}, every={c.rdrop_every})")),
    Method("addrop", "regdrop_fast.addrop.trainer:ADDropTrainerMixin",
           {"forward": "an attribution pass, then a pass with attention positions dropped"},
           _addrop_kwargs, describe=lambda c: (
               f"addrop(p={c.addrop_p}, q={c.addrop_q}, layers={list(c.addrop_layers)}, "
               f"attribution={c.addrop_attribution}, cross_tuning={c.addrop_cross_tuning})")),
    _childtuning("F"),
    _childtuning("D"),
    Method("mask-train", "regdrop_fast.sparse.trainer:MaskTrainingTrainerMixin",
           {"optimizer": "trains mask scores with AdamW, the weights stay frozen",
            "weights": "masks the weight matrices by trained scores"},
           lambda c: {"mask_training": dict(sparsity=c.sparsity, init=c.mask_init)},
           lambda c: _check(0 <= c.sparsity < 1, f"--sparsity must be in [0, 1), got "
                                                 f"{c.sparsity}"),
           lambda c: f"mask-train(sparsity={c.sparsity}, init={c.mask_init})"),
    Method("imp", "regdrop_fast.sparse.trainer:IMPTrainerMixin",
           {"optimizer": "MaskedAdamW keeps the pruned weights at exactly 0",
            "weights": "prunes the weight matrices by magnitude"},
           lambda c: {"imp": dict(sparsity=c.sparsity, rate=c.imp_rate)}, _imp_check,
           lambda c: f"imp(sparsity={c.sparsity}, rate={c.imp_rate})"),
)}
METHOD_NAMES = tuple(REGISTRY)

# --debias is a loss, not a --method: it composes with any method that keeps the Trainer's loss
DEBIAS = Method("debias", "regdrop_fast.sparse.trainer:DebiasTrainerMixin",
                {"loss": "replaces the cross-entropy by a debiasing loss"},
                lambda c: {"debias": c.debias})

ROLE_TEXT = {"forward": "replace the training forward pass",
             "optimizer": "need their own optimizer",
             "weights": "put masks on the weight matrices"}


def parse_methods(spec: str) -> list:
    """Method names of a comma list, validated and composed (no package imports)."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    if not names:
        raise FinetuneError("--method is empty; choose from " + ", ".join(METHOD_NAMES))
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise FinetuneError(f"unknown method {', '.join(unknown)}; choose from "
                            f"{', '.join(METHOD_NAMES)} (comma-separated to combine)")
    if len(set(names)) != len(names):
        raise FinetuneError(f"--method {spec}: a method is listed twice")
    if "none" in names and len(names) > 1:
        raise FinetuneError(f"--method {spec}: 'none' (plain fine-tuning) cannot be combined "
                            "with other methods")
    owners: dict = {}
    for name in names:
        for role, why in REGISTRY[name].roles.items():
            if role in owners:
                other, other_why = owners[role]
                raise FinetuneError(f"--method {spec}: {other} and {name} cannot be combined: "
                                    f"both {ROLE_TEXT.get(role, role)} ({other}: {other_why}; "
                                    f"{name}: {why})")
            owners[role] = (name, why)
    return names


def unavailable(name: str) -> str:
    """'' when method `name` can run here, else why not."""
    try:
        if REGISTRY[name].mixin:
            REGISTRY[name].load()
    except MethodUnavailable as exc:
        return str(exc)
    return ""


def compose(spec: str, config) -> tuple:
    """(mixins, keyword arguments) of the Trainer running `spec` with `config`'s settings,
    after checking them; the debiasing mixin comes first so it sets its columns aside before
    any method's forward pass (with R-Drop, each pass takes the debiasing loss)."""
    names = parse_methods(spec)
    methods = [REGISTRY[n] for n in names if REGISTRY[n].mixin]
    if config.debias is not None:
        methods.insert(0, DEBIAS)
    mixins, kwargs = [], {}
    for method in methods:
        method.check(config)
        mixins.append(method.load())
        kwargs.update(method.kwargs(config))
    return mixins, kwargs


def describe(spec: str, config) -> list:
    return [REGISTRY[n].describe(config) for n in parse_methods(spec)]
