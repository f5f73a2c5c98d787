"""The inputs of `--debias`: per-example probabilities of a bias-only model (and of a teacher for
conf-reg), carried in the training rows as "bias_probs" / "teacher_probs" for the debiasing loss
of `regdrop_fast.sparse.trainer.DebiasTrainerMixin`.

Bias-model scores come from `--bias-model`: either a file of per-example class probabilities of
a bias-only model, one row per training example in file order (JSON lines with a "probs" list in
label order, or CSV/TSV/JSONL with one probability column per label name), or the word `overlap`
/ `claim` to fit the package's bias-only logistic regression on lexical-overlap (premise,
hypothesis) / claim-only features of the training set. `--debias conf-reg` also needs a
teacher's probabilities in the same file format (`--teacher-probs`).
"""
from __future__ import annotations

import importlib
import json
import os

import torch

from .errors import FinetuneError
from .methods import MethodUnavailable

DEBIAS = ("poe", "reweight", "conf-reg")
BIAS_FEATURES = ("overlap", "claim")


def _sparse():
    try:
        return importlib.import_module("regdrop_fast.sparse")
    except Exception as exc:
        raise MethodUnavailable(f"method debias is not available: {type(exc).__name__}: {exc}") \
            from None


def _read_probs(path: str, labels: list, n: int, flag: str) -> torch.Tensor:
    from .data import _read_rows
    if not os.path.isfile(path):
        raise FinetuneError(f"{flag} {path} does not exist")
    try:
        columns, rows = _read_rows(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FinetuneError(f"cannot read {flag} {path}: {exc}") from None
    if "probs" in columns:
        values = [r["probs"] if isinstance(r["probs"], list) else json.loads(r["probs"])
                  for r in rows]
    elif all(label in columns for label in labels):
        values = [[float(r[label]) for label in labels] for r in rows]
    else:
        raise FinetuneError(f"{flag} {path}: expected a 'probs' column or one column per label "
                            f"({', '.join(labels)}); available columns: {', '.join(columns)}")
    if len(values) < n:
        raise FinetuneError(f"{flag} {path} has {len(values)} rows, fewer than the {n} training "
                            "examples")
    probs = torch.tensor([list(map(float, v)) for v in values[:n]], dtype=torch.float32)
    if probs.shape[1] != len(labels) or not torch.isfinite(probs).all() or (probs < 0).any():
        raise FinetuneError(f"{flag} {path}: each row needs {len(labels)} finite non-negative "
                            "probabilities")
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)


def _fit_bias_model(kind: str, texts: list, labels: list, classes: int) -> torch.Tensor:
    sparse = _sparse()
    if kind == "overlap":
        if len(texts[0]) < 2:
            raise FinetuneError("--bias-model overlap needs two text columns (premise, hypothesis); "
                                "pass --text-cols PREMISE HYPOTHESIS")
        features = sparse.overlap_features([t[0] for t in texts], [" ".join(t[1:]) for t in texts])
    else:
        features = sparse.claim_features([t[-1] for t in texts])
    model = sparse.train_bias_model(features, torch.tensor(labels), classes)
    return model.probs(features)


def check(config) -> None:
    """The --debias flags go together."""
    if config.debias is None:
        if config.bias_model or config.teacher_probs:
            raise FinetuneError("--bias-model/--teacher-probs are only used with --debias")
        return
    if config.debias not in DEBIAS:
        raise FinetuneError(f"--debias {config.debias}: choose from {', '.join(DEBIAS)}")
    if not config.bias_model:
        raise FinetuneError(f"--debias {config.debias} needs --bias-model FILE (or "
                            f"{'/'.join(BIAS_FEATURES)})")
    if config.debias == "conf-reg" and not config.teacher_probs:
        raise FinetuneError("--debias conf-reg needs --teacher-probs FILE (a teacher's class "
                            "probabilities per training example)")


def columns(config, texts: list, labels: list, names: list) -> dict:
    """{"bias_probs": [N, C], "teacher_probs": [N, C] (conf-reg)} for the training rows, or {}."""
    if config.debias is None:
        return {}
    n = len(labels)
    if config.bias_model in BIAS_FEATURES:
        bias = _fit_bias_model(config.bias_model, texts, labels, len(names))
    else:
        bias = _read_probs(config.bias_model, names, n, "--bias-model")
    out = {"bias_probs": bias}
    if config.debias == "conf-reg":
        out["teacher_probs"] = _read_probs(config.teacher_probs, names, n, "--teacher-probs")
    return out
