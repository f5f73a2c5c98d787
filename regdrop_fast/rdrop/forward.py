"""The two-pass forward of R-Drop around any model that returns logits.

mode "duplicate": one forward on the batch repeated m times along dim 0 ([x; x]); dropout draws
differ per row, so the copies are m independent dropout passes (the official code's way, one
larger GEMM per layer). mode "twice": m separate forwards (less peak activation memory).
`every=k` (the paper's k-step variant) applies R-Drop on steps with step % k == 0 and a plain
single-pass loss on the others. `passes=m` (m-time variant) uses
    sum_i CE_i + alpha / (m (m-1)) * sum_{i != j} KL(P_i || P_j),
which for m = 2 is exactly `rdrop_loss`.

Causal language models (detected from the model's config, see `is_causal_lm`) predict the next
token: position t is scored against labels[t + 1], exactly as their own loss does
(transformers' ForCausalLMLoss: labels shifted left, the last position and ignore_index
excluded); every other model is scored position by position.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.rdrop import KL_REDUCTIONS, check_rdrop_inputs
from .loss import rdrop_loss

MODES = ("duplicate", "twice")


@dataclass
class RDropOutput:
    loss: Tensor  # the training loss
    logits: List[Tensor]  # one tensor per pass (a single one on a step R-Drop skipped)
    outputs: Any  # the model's output: of the duplicated batch, or of the first pass
    applied: bool  # False on steps skipped by every=k
    # The loss's parts on the CE scale (detached fp32 means over the counted rows/tokens):
    # ce = the mean single-pass CE (squared error for regression), comparable with a run
    # without R-Drop; kl = the mean symmetric KL (KL_ij + KL_ji) / 2 over the pairs of passes
    # (|p1 - p2|^2 for regression), None on a skipped step. With reduction="mean" and
    # kl_reduction="mean": loss = passes * ce + alpha * kl.
    ce: Optional[Tensor] = None
    kl: Optional[Tensor] = None


def _check_positive_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def duplicate_batch(batch: Mapping[str, Any], copies: int) -> dict:
    """Every tensor whose first dimension is the batch size, repeated `copies` times along it."""
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        raise ValueError("batch must contain at least one tensor with a batch dimension")
    size = tensors[0].shape[0]
    return {k: (torch.cat([v] * copies, dim=0)
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v)
            for k, v in batch.items()}


def model_logits(output) -> Tensor:
    """The logits of a model output: `.logits`, a dict's "logits", a tuple's first item, or
    the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output has no logits tensor (got {type(output).__name__})")
    return logits


def single_pass_loss(logits: Tensor, labels: Optional[Tensor], ignore_index: int = -100,
                     task: Optional[str] = None, reduction: str = "mean") -> Tensor:
    """Plain CE (classification) or squared error (regression) of one pass, normalized like
    `rdrop_loss` (over non-ignored rows; an all-ignored batch gives 0)."""
    if labels is None:
        raise ValueError("labels are required for the single-pass loss of a skipped step")
    task = check_rdrop_inputs(logits, logits, labels, 0.0, reduction, task, ignore_index)
    if task == "regression":
        row = (logits.float() - labels.float().reshape(logits.shape)).square()
        row = row.sum(-1) if logits.dim() > 1 else row
        total, count = row.sum(), row.numel()
    else:
        flat = labels.reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                                ignore_index=ignore_index, reduction="sum")
        count = (flat != ignore_index).sum().clamp_min(1)
    return total / count if reduction == "mean" else total


def multi_rdrop_loss_parts(logits: Sequence[Tensor], labels: Optional[Tensor] = None,
                           alpha: float = 1.0, ignore_index: int = -100,
                           reduction: str = "mean", ce: bool = True, task: Optional[str] = None,
                           backend: Optional[str] = None,
                           kl_reduction: str = "mean") -> Tuple[Tensor, Tensor, Tensor]:
    """`multi_rdrop_loss` and its parts on the CE scale: (loss, ce, kl), see RDropOutput."""
    m = len(logits)
    if m < 2:
        raise ValueError(f"logits must hold at least 2 passes, got {m}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if m == 2:
        return tuple(rdrop_loss(logits[0], logits[1], labels, alpha, ignore_index, reduction, ce,
                                backend, task=task, kl_reduction=kl_reduction,
                                return_parts=True))
    pair_alpha = 2.0 * alpha / (m * (m - 1))
    pairs = [rdrop_loss(logits[i], logits[j], labels, pair_alpha, ignore_index, reduction, False,
                        backend, task=task, kl_reduction=kl_reduction, return_parts=True)
             for i in range(m) for j in range(i + 1, m)]
    loss = sum(p.loss for p in pairs)
    kl = torch.stack([p.kl for p in pairs]).mean()
    ce_part = torch.zeros_like(kl)
    if ce and labels is not None:
        singles = [single_pass_loss(z, labels, ignore_index, task, reduction) for z in logits]
        loss = loss + sum(singles)
        means = singles if reduction == "mean" else [
            single_pass_loss(z.detach(), labels, ignore_index, task) for z in logits]
        ce_part = torch.stack([c.detach().float() for c in means]).mean()
    return loss, ce_part, kl


def multi_rdrop_loss(logits: Sequence[Tensor], labels: Optional[Tensor] = None,
                     alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                     ce: bool = True, task: Optional[str] = None,
                     backend: Optional[str] = None, kl_reduction: str = "mean") -> Tensor:
    """m-pass R-Drop: sum_i CE_i + alpha/(m(m-1)) * sum_{i != j} KL(P_i||P_j) ("mean" over
    non-ignored rows, or "sum"; kl_reduction as in `rdrop_loss`). m = 2 calls the fused
    `rdrop_loss` once; larger m sums its KL term over the m(m-1)/2 pairs and adds the m
    single-pass CE terms."""
    return multi_rdrop_loss_parts(logits, labels, alpha, ignore_index, reduction, ce, task,
                                  backend, kl_reduction)[0]


def _causal_lm_class_names(model_type) -> frozenset:
    """The causal-LM class names transformers maps `model_type` to (empty without transformers
    or for a type it does not list)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return frozenset()
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ())
    return frozenset([names] if isinstance(names, str) else names)


def _unwrap(model):
    """The model under DDP/accelerate-style `.module` wrappers."""
    while getattr(model, "config", None) is None and isinstance(
            getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_causal_lm(model) -> bool:
    """Whether `model` is a next-token language model whose own loss shifts the labels, from
    its config: not an encoder-decoder (those shift inside the model), and either
    `config.is_decoder` or a class (or base class) that transformers' causal-LM mapping lists
    for `config.model_type` (LlamaForCausalLM for "llama"; not LlamaForSequenceClassification
    nor BertForMaskedLM)."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    names = _causal_lm_class_names(getattr(config, "model_type", None))
    return any(cls.__name__ in names for cls in type(model).__mro__)


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token targets [B, T]: labels[:, 1:] with ignore_index at the last position, so
    logits[:, t] is scored against labels[:, t + 1] (the logits need no copy)."""
    if labels.dim() < 2:
        raise ValueError(f"labels of a causal language model must have shape [B, T], got "
                         f"{tuple(labels.shape)}")
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def rdrop_forward(model, batch: Mapping[str, Any], *, alpha: float = 1.0, passes: int = 2,
                  mode: str = "duplicate", every: int = 1, step: Optional[int] = None,
                  labels_key: str = "labels", ignore_index: int = -100,
                  task: Optional[str] = None, reduction: str = "mean",
                  kl_reduction: str = "mean", causal_lm: Optional[bool] = None,
                  backend: Optional[str] = None) -> RDropOutput:
    """Run `model(**batch)` for R-Drop and return its loss (and the logits of every pass).

    batch: keyword inputs of the model; `batch[labels_key]` holds the labels and is not passed
    to the model (so it computes no loss of its own). passes: m >= 2 dropout passes. every/step:
    R-Drop on steps where step % every == 0 (always when step is None), a plain single-pass
    loss otherwise. kl_reduction: as in `rdrop_loss` ("mean": the fairseq criteria; "sum" with
    alpha=0.5: the official HF BERT GLUE script). causal_lm: score position t against label
    t + 1 as a causal LM's own loss does; None detects it (`is_causal_lm`). The model should be
    in train mode (dropout on), or the passes coincide. The output carries the loss's CE and KL
    parts (`.ce`, `.kl`) for logging.
    """
    passes = _check_positive_int("passes", passes, 2)
    every = _check_positive_int("every", every, 1)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs, got {type(batch).__name__}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    if causal_lm is not None and not isinstance(causal_lm, bool):
        raise TypeError(f"causal_lm must be a bool or None, got {type(causal_lm).__name__}")
    inputs = dict(batch)
    labels = inputs.pop(labels_key, None)
    if causal_lm is None:
        causal_lm = is_causal_lm(model)
    if causal_lm and labels is not None:
        labels = shift_labels(labels, ignore_index)
    applied = step is None or step % every == 0
    copies = passes if applied else 1
    if mode == "duplicate" and copies > 1:
        outputs = model(**duplicate_batch(inputs, copies))
        logits = list(model_logits(outputs).chunk(copies, dim=0))
    else:
        runs = [model(**inputs) for _ in range(copies)]
        outputs = runs[0]
        logits = [model_logits(o) for o in runs]
    if applied:
        loss, ce, kl = multi_rdrop_loss_parts(logits, labels, alpha, ignore_index, reduction,
                                              task=task, backend=backend,
                                              kl_reduction=kl_reduction)
    else:
        loss = single_pass_loss(logits[0], labels, ignore_index, task, reduction)
        ce = loss.detach().float() if reduction == "mean" else single_pass_loss(
            logits[0].detach(), labels, ignore_index, task).float()
        kl = None
    return RDropOutput(loss=loss, logits=logits, outputs=outputs, applied=applied, ce=ce, kl=kl)
