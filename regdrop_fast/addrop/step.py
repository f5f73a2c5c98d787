"""One AD-DROP training step: `ADDrop(model, ...).step(model, batch, loss_fn)`.

Pass 1 (train mode, as the official code) runs the model with the chosen layers recording
(integration.py) and builds a target from its logits:
  classification  sum over the batch of the pseudo-label logit, pseudo label = argmax
  regression      −MSE(prediction, gold labels)           (the official "mask from −grad")
  token           −CE(token logits, per-token argmax) over non-pad tokens, mean; on a causal
                  LM over the positions its next-token loss counts (labels[t+1] != −100)
dO = ∂target/∂O per chosen layer comes from `torch.autograd.grad(target, outputs)` alone: no
parameter gradient is formed or accumulated, and the forward records autograd only from the
lowest chosen layer's attention output up, so nothing below it is back-propagated. Then keep
mask i = keep_mask((dO_i, V_i), ...) with stream i (causal rows: over their causal prefix) and
step = this object's step counter (recorded in `last_step` for reproducibility); the masks of
all chosen layers come from one `keep_mask_layers` launch over the stacked dO and V (one per
group of layers with different shapes or causality, which the supported models do not have).
Pass 2 runs the model with layer i masked by keep mask i; only its loss is back-propagated.

Attribution kinds:
  gradient             B = dO·Vᵀ = ∂target/∂A_drop (default; never materialized)
  integrated_gradients per chosen layer, m = ig_steps forwards in eval mode with that layer's
                       attention output scaled by α = k/m (k = 1..m), pseudo labels recomputed
                       at each α; attribution = A ⊙ mean_k(∂target_k/∂A), where ∂target/∂A at
                       α is α·dO_α·Vᵀ (the official IGA hook scales the output after the map).
                       Materializes A and the attribution [B,H,L,L] per layer: small sizes.
  attention            A_drop itself (pass 1 without backward; materializes A [B,H,L,L]).
  random               the official RD mask: a real key is a candidate with probability p and a
                       candidate is dropped with probability q, both Philox draws (candidates:
                       stream RANDOM_STREAM + i, drops: stream i); the masks of all chosen
                       layers come from one `random_keep_mask_layers` launch (per group, as
                       above), drawn from the records' shapes, padding and causality alone.
                       Pass 1 still runs the whole forward (no grad): the records' padding and
                       causality are what the model's own mask handling gives each layer, and
                       stopping the forward early would skip the post-forward hooks of wrappers
                       such as FSDP2 and shift the dropout draws of pass 2.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .._checks import check_int
from ..masks import PackedMask
from .attribution import attribution as _attribution
from .integration import RANDOM_STREAM, enable, get_state
from .mask import keep_mask_layers, random_keep_mask_layers

__all__ = ["ADDrop", "StepOutput", "TASKS"]

TASKS = ("classification", "regression", "token")
IGNORE_INDEX = -100  # label of positions a transformers loss skips
_STEP_MODULUS = 2**32


@dataclass
class StepOutput:
    loss: torch.Tensor  # pass 2's loss (detached once back-propagated by `step`)
    logits: torch.Tensor  # pass 2's logits, detached
    masks: Dict[int, PackedMask]  # keep mask per chosen layer, [B,H,Lq,Lk] bits


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs["logits"]
    return logits


def _model_inputs(batch) -> dict:
    """The batch without labels, so that pass 1 does not compute the model's own loss."""
    # Mapping, not dict: DataCollatorWithPadding hands over a BatchEncoding
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of model inputs, got {type(batch).__name__}")
    return {name: value for name, value in batch.items() if name != "labels"}


def _token_weights(batch, pseudo: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool [B,L]: the positions task "token" averages over. Encoders: the real tokens
    (attention_mask). Causal LMs: the positions whose next token the model's own loss counts,
    i.e. labels[t+1] != IGNORE_INDEX (HF's shift), or without labels attention_mask[t+1]; never
    the last position."""
    if not causal:
        real = batch.get("attention_mask")
        return torch.ones_like(pseudo, dtype=torch.bool) if real is None else real.bool()
    labels = batch.get("labels")
    if labels is not None:
        if tuple(labels.shape) != tuple(pseudo.shape):
            raise ValueError(f"task='token' on a causal LM needs labels [B, L] = "
                             f"{tuple(pseudo.shape)}, got {tuple(labels.shape)}")
        counted = labels[:, 1:] != IGNORE_INDEX
    else:
        real = batch.get("attention_mask")
        counted = (torch.ones_like(pseudo[:, 1:], dtype=torch.bool) if real is None
                   else real[:, 1:].bool())
    return F.pad(counted, (0, 1), value=False)


def _stack(tensors: list) -> torch.Tensor:
    """[n, ...] from n same-shape tensors; one layer is a view, not a copy."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _shared_or_stacked(paddings: list) -> Optional[torch.Tensor]:
    """The layers' key padding masks as keep_mask_layers takes them: None, the one [B,Lk] mask
    every layer reads (the same memory, as transformers' encoders pass it), else stacked
    [n,B,Lk]. Compared by address and strides: a comparison of values would sync the host."""
    first = paddings[0]
    if first is None:
        return None
    layout = (first.data_ptr(), first.stride())
    if all(p is first or (p.data_ptr(), p.stride()) == layout for p in paddings[1:]):
        return first
    return torch.stack(paddings)


class ADDrop:
    """AD-DROP (arXiv 2210.05883) on a transformers encoder or decoder-only model, or on a model
    built from `SelfAttention`; see the module docstring.

    model: a supported model (integration.SUPPORTED); `enable` is called on it.
    p in (0, 1), q in [0, 1]; layers: chosen self-attention layers; attribution: "gradient" |
    "integrated_gradients" | "attention" | "random"; drop: "high" | "low"; task:
    "classification" | "regression" | "token" (a causal LM: next-token positions); seed:
    Philox seed of every mask; backend: kernel backend (None = auto); ig_steps: m of
    integrated gradients (official: 20)."""

    def __init__(self, model, p: float = 0.3, q: float = 0.2, layers=(0,),
                 attribution: str = "gradient", drop: str = "high",
                 task: str = "classification", seed: int = 0, backend: Optional[str] = None,
                 ig_steps: int = 20):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.ig_steps = check_int("ig_steps", ig_steps, 1, 10_000)
        self.state = enable(model, layers=layers, p=p, q=q, attribution=attribution, drop=drop,
                            seed=seed, backend=backend)
        self.model = model
        self.task = task
        self.step_count = 0
        self.last_step: Optional[dict] = None

    @property
    def layers(self) -> tuple:
        return self.state.layers

    # -- targets ---------------------------------------------------------------------------
    def target(self, logits: torch.Tensor, batch: dict, causal: bool = False) -> torch.Tensor:
        """The scalar whose gradient w.r.t. the attention maps is the attribution.

        causal: the model is a causal LM, its position t predicting token t+1 (task "token")."""
        logits = logits.float()
        if self.task == "classification":
            if logits.dim() != 2:
                raise ValueError(f"task='classification' needs logits [B, C], got shape "
                                 f"{tuple(logits.shape)} (task='token' for per-token logits)")
            pseudo = logits.argmax(dim=-1, keepdim=True)
            return logits.gather(1, pseudo).sum()
        if self.task == "regression":
            labels = batch.get("labels")
            if labels is None:
                raise ValueError("task='regression' needs gold labels: batch['labels'] is missing")
            prediction = logits.reshape(labels.shape[0], -1).squeeze(-1)
            return -F.mse_loss(prediction, labels.to(prediction.dtype).reshape(prediction.shape))
        if logits.dim() != 3:
            raise ValueError(f"task='token' needs logits [B, L, C], got shape "
                             f"{tuple(logits.shape)}")
        pseudo = logits.argmax(dim=-1)
        token_loss = F.cross_entropy(logits.transpose(1, 2), pseudo, reduction="none")
        weight = _token_weights(batch, pseudo, causal).to(token_loss.dtype)
        # mean over the counted tokens; a batch without any gives 0, not NaN
        return -(token_loss * weight).sum() / weight.sum().clamp_min(1)

    # -- pass 1 ------------------------------------------------------------------------------
    def _forward_records(self, model, batch, grad: bool, **recording):
        # grad: autograd records from the lowest chosen layer's output up (integration.py)
        with (contextlib.nullcontext() if grad else torch.no_grad()), \
                self.state.recording(differentiable=grad, **recording) as records:
            outputs = model(**_model_inputs(batch))
        return _logits(outputs), dict(records)

    def _gradients(self, model, batch) -> dict:
        """{layer: (dO, record)} of the gradient kind (record: the layer's LayerRecord)."""
        logits, records = self._forward_records(model, batch, grad=True)
        target = self.target(logits, batch, causal=records[self.layers[0]].causal)
        outs = [records[layer].out for layer in self.layers]
        grads = torch.autograd.grad(target, outs, allow_unused=True)
        result = {}
        for layer, out, g in zip(self.layers, outs, grads):
            record = records[layer]
            dO = torch.zeros_like(out) if g is None else g
            result[layer] = (dO.to(record.value.dtype), record)
        return result

    def _integrated_gradients(self, model, batch) -> dict:
        """{layer: (A ⊙ mean_k ∂target_k/∂A, record)}, official IGA (eval mode)."""
        was_training = model.training
        model.eval()
        result = {}
        try:
            for layer in self.layers:
                mean_grad = None
                for k in range(1, self.ig_steps + 1):
                    alpha = k / self.ig_steps
                    logits, records = self._forward_records(
                        model, batch, grad=True, materialize=k == self.ig_steps,
                        output_scale={layer: alpha}, layers=(layer,))
                    record = records[layer]
                    target = self.target(logits, batch, causal=record.causal)
                    (g,) = torch.autograd.grad(target, record.out, allow_unused=True)
                    g = torch.zeros_like(record.out) if g is None else g
                    term = g.float() * (alpha / self.ig_steps)
                    mean_grad = term if mean_grad is None else mean_grad + term
                attr = record.probs * _attribution(mean_grad, record.value.float())
                result[layer] = (attr, record)
        finally:
            model.train(was_training)
        return result

    def attributions(self, model=None, batch=None) -> dict:
        """{layer: attribution [B,H,Lq,Lk]} of pass 1, materialized (for checks, small sizes).

        Kind "random" has none. Does not advance the step counter."""
        model = self._model(model)
        kind = self.state.attribution
        model.train()
        if kind == "gradient":
            return {layer: _attribution(dO, record.value)
                    for layer, (dO, record) in self._gradients(model, batch).items()}
        if kind == "integrated_gradients":
            return {layer: attr for layer, (attr, _) in
                    self._integrated_gradients(model, batch).items()}
        if kind == "attention":
            _, records = self._forward_records(model, batch, grad=False, materialize=True)
            return {layer: records[layer].probs for layer in self.layers}
        raise ValueError("attribution='random' draws its candidates without an attribution")

    def compute_masks(self, model=None, batch=None, step: Optional[int] = None) -> dict:
        """Pass 1 and the keep masks {layer: PackedMask [B,H,Lq,Lk]}.

        step: the Philox step (default: the internal counter, which then advances)."""
        model = self._model(model)
        if step is None:
            step = self.step_count % _STEP_MODULUS
            self.step_count += 1
        step = check_int("step", step, 0, _STEP_MODULUS - 1)
        state = self.state
        model.train()
        kind = state.attribution
        if kind == "gradient":
            masks = self._keep({layer: ((dO, record.value), record) for layer, (dO, record)
                                in self._gradients(model, batch).items()}, step)
        elif kind == "integrated_gradients":
            masks = self._keep(self._integrated_gradients(model, batch), step)
        else:
            _, records = self._forward_records(model, batch, grad=False,
                                               materialize=kind == "attention")
            if kind == "attention":
                masks = self._keep({layer: (records[layer].probs, records[layer])
                                    for layer in self.layers}, step)
            else:
                masks = self._random(records, step)
        self.last_step = {"step": step, "seed": state.seed,
                          "streams": {layer: layer for layer in self.layers}}
        return masks

    def _keep(self, attrs: dict, step: int) -> dict:
        """{layer: keep mask} from {layer: (attribution or (dO, V), record)}: one
        keep_mask_layers call (one kernel launch) per group of layers that share shapes,
        dtypes, devices (a model split over GPUs), causality and padding presence, with
        stream = layer index."""
        groups = {}
        for layer, (attr, record) in attrs.items():
            tensors = attr if isinstance(attr, tuple) else (attr,)
            key = (record.causal, record.key_padding is None,
                   *((t.shape, t.dtype, t.device) for t in tensors))
            groups.setdefault(key, []).append(layer)
        state = self.state
        masks = {}
        for layers in groups.values():
            records = [attrs[layer][1] for layer in layers]
            first = attrs[layers[0]][0]
            if isinstance(first, tuple):
                stacked = tuple(_stack([attrs[layer][0][i] for layer in layers])
                                for i in range(len(first)))
            else:
                stacked = _stack([attrs[layer][0] for layer in layers])
            masks.update(zip(layers, keep_mask_layers(
                stacked, state.p, state.q, key_padding_mask=_shared_or_stacked(
                    [record.key_padding for record in records]),
                seed=state.seed, step=step, streams=layers, backend=state.backend,
                drop=state.drop, is_causal=records[0].causal)))
        return {layer: masks[layer] for layer in attrs}

    def _random(self, records: dict, step: int) -> dict:
        """{layer: keep mask} of kind "random": one random_keep_mask_layers call (one kernel
        launch) per group of layers that share shapes, devices, causality and padding presence;
        drops from stream = layer, candidates from stream RANDOM_STREAM + layer."""
        groups = {}
        for layer in self.layers:
            record = records[layer]
            shape = (*record.out.shape[:3], record.value.shape[-2])
            key = (shape, record.value.device, record.causal, record.key_padding is None)
            groups.setdefault(key, []).append(layer)
        state = self.state
        masks = {}
        for (shape, device, causal, _), layers in groups.items():
            masks.update(zip(layers, random_keep_mask_layers(
                shape, state.p, state.q, layers, [RANDOM_STREAM + layer for layer in layers],
                key_padding_mask=_shared_or_stacked([records[layer].key_padding
                                                     for layer in layers]),
                seed=state.seed, step=step, device=device, backend=state.backend,
                is_causal=causal)))
        return {layer: masks[layer] for layer in self.layers}

    # -- passes ------------------------------------------------------------------------------
    def masked(self, masks: dict, step: Optional[int] = None):
        """Context manager: forwards inside it are pass 2 (layer i masked by masks[i])."""
        if step is None:
            step = self.last_step["step"] if self.last_step else 0
        return self.state.masking(masks, step)

    def step(self, model=None, batch=None, loss_fn: Optional[Callable] = None,
             backward: bool = True) -> StepOutput:
        """An AD-DROP step: pass 1, masks, pass 2 forward (+ backward of its loss).

        loss_fn(outputs, batch) -> scalar; default: the model's own loss (needs labels).
        backward=False returns the loss with its graph for the caller to back-propagate
        (outside the masked context: no gradient checkpointing then)."""
        model = self._model(model)
        masks = self.compute_masks(model, batch)
        with self.masked(masks):
            outputs = model(**batch)
            loss = self._loss(outputs, batch, loss_fn)
            if backward:
                loss.backward()
        return StepOutput(loss.detach() if backward else loss, _logits(outputs).detach(), masks)

    def plain_step(self, model=None, batch=None, loss_fn: Optional[Callable] = None,
                   backward: bool = True) -> StepOutput:
        """A plain fine-tuning step (cross-tuning's even epochs): one forward (+ backward)."""
        model = self._model(model)
        model.train()
        outputs = model(**batch)
        loss = self._loss(outputs, batch, loss_fn)
        if backward:
            loss.backward()
        return StepOutput(loss.detach() if backward else loss, _logits(outputs).detach(), {})

    def _model(self, model):
        model = self.model if model is None else model
        if get_state(model) is not self.state:
            raise ValueError("model is not the model this ADDrop was created for (or AD-DROP "
                             "was re-enabled on it with another configuration)")
        return model

    @staticmethod
    def _loss(outputs, batch, loss_fn):
        if loss_fn is not None:
            return loss_fn(outputs, batch)
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss: put 'labels' in the batch or pass "
                             "loss_fn(outputs, batch)")
        return loss
