"""Which nn.Linear layers get a mask: the paper's matrix set, by module-name pattern.

Groups (BERT, RoBERTa, ELECTRA module names in transformers):
  query, key, value   encoder.layer.<i>.attention.self.{query,key,value}
  attention_output    encoder.layer.<i>.attention.output.dense
  ffn_in, ffn_out     encoder.layer.<i>.intermediate.dense, encoder.layer.<i>.output.dense
  pooler              pooler.dense (BERT; RoBERTa/ELECTRA classifiers have none)
  classifier          classifier (BERT), classifier.dense + classifier.out_proj (RoBERTa/ELECTRA)
Not embeddings, biases or LayerNorm (REFERENCE.md, Sparse & robust). A target is a group name
or a glob over Linear module names ("*.attention.self.query", "classifier*").
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Optional

import torch.nn as nn

__all__ = ["GROUPS", "DEFAULT_TARGETS", "ENCODER_LAYER", "resolve_targets", "linear_names"]

_LAYER = r"(?:^|\.)encoder\.layer\.\d+\."
GROUPS = {
    "query": _LAYER + r"attention\.self\.query$",
    "key": _LAYER + r"attention\.self\.key$",
    "value": _LAYER + r"attention\.self\.value$",
    "attention_output": _LAYER + r"attention\.output\.dense$",
    "ffn_in": _LAYER + r"intermediate\.dense$",
    "ffn_out": _LAYER + r"output\.dense$",
    "pooler": r"(?:^|\.)pooler\.dense$",
    "classifier": r"^classifier(?:\.dense|\.out_proj)?$",
}
DEFAULT_TARGETS = tuple(GROUPS)
# parameters of the encoder layers: the denominator of the paper's sparsity
ENCODER_LAYER = re.compile(_LAYER)


def linear_names(model: nn.Module) -> list:
    """Names of the model's nn.Linear modules (masked ones included), in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def group_of(name: str) -> Optional[str]:
    """The group a module name belongs to, or None."""
    for group, pattern in GROUPS.items():
        if re.search(pattern, name):
            return group
    return None


def resolve_targets(model: nn.Module, targets: Optional[Iterable[str]] = None) -> list:
    """Module names of the Linear layers selected by `targets` (None: every group).

    A group of the default set that this architecture lacks (a RoBERTa pooler) is skipped; a
    target named explicitly that matches nothing raises ValueError listing the candidates."""
    names = linear_names(model)
    explicit = targets is not None
    if targets is None:
        targets = DEFAULT_TARGETS
    elif isinstance(targets, str):
        targets = (targets,)
    chosen = []
    for target in targets:
        if not isinstance(target, str):
            raise TypeError(f"targets must be strings (group names or globs), got "
                            f"{type(target).__name__}")
        if target in GROUPS:
            hits = [n for n in names if re.search(GROUPS[target], n)]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, target)]
        if not hits and explicit:
            raise ValueError(
                f"target {target!r} matches no nn.Linear of {type(model).__name__}; candidates: "
                f"groups {sorted(GROUPS)}, or globs over these Linear names: {names}")
        chosen.extend(n for n in hits if n not in chosen)
    if not chosen:
        raise ValueError(f"no target layer found in {type(model).__name__}; Linear names: {names}")
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)
