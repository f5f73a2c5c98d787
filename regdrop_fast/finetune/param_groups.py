"""Weight-decay parameter groups by transformers' Trainer rule (no decay on biases and
normalization weights), shared by the CLI's job and make_trainer's optimizers."""
from __future__ import annotations


def decay_groups(model, named: list, weight_decay: float) -> list:
    """Optimizer groups over `named` (name, parameter) pairs of `model`, empty groups dropped."""
    from transformers import Trainer

    # the Trainer's own rule (by layer type and name pattern); it reads nothing from the instance
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = []
    for decayed, value in ((True, weight_decay), (False, 0.0)):
        pairs = [(n, p) for n, p in named if (n in decay) == decayed]
        groups.append({"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs],
                       "weight_decay": value})
    return [g for g in groups if g["params"]]
