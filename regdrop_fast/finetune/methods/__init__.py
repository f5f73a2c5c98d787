"""Method adapters of the fine-tuning job, one file each, and their composition.

`build_methods("rdrop,childtuning-f", config)` returns the adapters in a fixed order; it refuses
unknown names and combinations where two methods take the same role, saying which and why.
"""
from __future__ import annotations

import importlib

from ..errors import FinetuneError
from .base import Method, MethodUnavailable

# method name -> (adapter module, class)
REGISTRY = {
    "none": (".base", "Method"),
    "rdrop": (".rdrop", "RDrop"),
    "addrop": (".addrop", "ADDrop"),
    "childtuning-f": (".childtuning", "ChildTuningF"),
    "childtuning-d": (".childtuning", "ChildTuningD"),
    "mask-train": (".mask_train", "MaskTrain"),
    "imp": (".imp", "IMP"),
}
METHOD_NAMES = tuple(REGISTRY)

__all__ = ["REGISTRY", "METHOD_NAMES", "Method", "MethodUnavailable", "build_methods",
           "method_class", "parse_methods"]


def method_class(name: str):
    module_name, class_name = REGISTRY[name]
    return getattr(importlib.import_module(module_name, __name__), class_name)


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
        for role, why in method_class(name).roles.items():
            if role in owners:
                other, other_why = owners[role]
                raise FinetuneError(f"--method {spec}: {other} and {name} cannot be combined: "
                                    f"both {role_text(role)} ({other}: {other_why}; "
                                    f"{name}: {why})")
            owners[role] = (name, why)
    return names


def role_text(role: str) -> str:
    return {"forward": "replace the training forward pass",
            "optimizer": "need their own optimizer",
            "weights": "put masks on the weight matrices"}.get(role, f"take the role {role!r}")


def build_methods(spec: str, config, require: bool = True) -> list:
    """Adapters for a --method value; `require` imports each method package now."""
    methods = [method_class(name)(config) for name in parse_methods(spec)]
    if require:
        for method in methods:
            method.require()
    return methods
