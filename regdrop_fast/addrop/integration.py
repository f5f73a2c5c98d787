"""AD-DROP as a transformers attention implementation: `enable(model, ...)`, `disable(model)`.

`enable` registers one attention function (AttentionInterface) and its mask builder
(AttentionMaskInterface) under the name "regdrop_addrop" and switches the model to it. Both are
needed: with only the function registered, transformers finds no mask builder for the name and
hands the attention attention_mask=None, so padding would be silently attended.

The mask builder returns what `sdpa_mask` returns, except that a plain key-padding mask stays a
broadcast view bool [B,1,1,Lk] (True = attend) instead of a materialized [B,1,Lq,Lk]; None when
nothing is padded. The attention function then runs in one of three modes, per model:

  plain   every layer: transformers' SDPA attention (what the unpatched model computes)
  record  pass 1 of an AD-DROP step. Chosen layers compute O = A_drop·V as a [B,H,Lq,D] tensor
          of the autograd graph and keep it with V (detached) and the key padding, so that
          dO = ∂target/∂O comes from `torch.autograd.grad(target, outputs)` alone (no parameter
          gradients) and B = dO·Vᵀ is never formed. Kinds that need the map itself
          ("attention", "integrated_gradients") materialize A [B,H,Lq,Lk] for the chosen
          layers in this pass only. An output scale α per layer serves integrated gradients.
  masked  pass 2. Chosen layer i attends through `masked_attention` with keep mask i.

Philox streams (DESIGN.md): the keep mask of layer i draws stream i, the attention-probability
dropout of the masked pass stream DROPOUT_STREAM + i, random candidates ("random" kind)
stream RANDOM_STREAM + i; all at the step counter of the AD-DROP step.

Supported: BERT, RoBERTa, ELECTRA and other encoders that call
`ALL_ATTENTION_FUNCTIONS.get_interface` (`_supports_attention_backend`), with self-attention
modules at one of LAYER_PATHS × ATTENTION_PATHS. Decoders and causal attention are refused: the
AD-DROP threshold is defined over a sample's real keys, not a causal prefix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import UINT64_MAX, check_int, check_prob
from .attention import masked_attention

__all__ = ["enable", "disable", "get_state", "ADDropAttention", "IMPLEMENTATION_NAME",
           "ATTRIBUTIONS", "DROPS", "DROPOUT_STREAM", "RANDOM_STREAM", "SUPPORTED"]

IMPLEMENTATION_NAME = "regdrop_addrop"
ATTRIBUTIONS = ("gradient", "integrated_gradients", "attention", "random")
DROPS = ("high", "low")
DROPOUT_STREAM = 1 << 20
RANDOM_STREAM = 2 << 20
# where the layer list and, inside a layer, the self-attention module live
LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")
ATTENTION_PATHS = ("attention.self", "self_attn", "attn", "attention")
SUPPORTED = ("BERT, RoBERTa, ELECTRA, DistilBERT (and encoders of the same layout: XLM-RoBERTa, "
             "CamemBERT, ...), or any non-causal encoder whose attention calls transformers' "
             "AttentionInterface (class attribute _supports_attention_backend = True) with "
             f"layers at one of {LAYER_PATHS} and self-attention at one of {ATTENTION_PATHS}")
_STATE_ATTR = "_regdrop_addrop"
_LAYER_ATTR = "_regdrop_addrop_layer"


@dataclass
class LayerRecord:
    """What pass 1 keeps for one chosen layer."""

    out: torch.Tensor  # O [B,H,Lq,D], in the graph (scaled by α under integrated gradients)
    value: torch.Tensor  # V [B,H,Lk,D], detached
    key_padding: Optional[torch.Tensor]  # bool [B,Lk], True = real key; None = no padding
    probs: Optional[torch.Tensor] = None  # A_drop [B,H,Lq,Lk] detached, materializing kinds only
    scale: float = 1.0  # α the output was scaled by


@dataclass
class ADDropAttention:
    """Per-model AD-DROP attention state, created by `enable` and stored on the model."""

    modules: list  # self-attention module of each layer, in order
    layers: tuple  # chosen layer indices
    p: float
    q: float
    attribution: str
    drop: str
    seed: int
    backend: Optional[str]
    previous_implementation: Optional[str]
    mode: str = "plain"
    materialize: bool = False
    output_scale: Dict[int, float] = field(default_factory=dict)
    records: Dict[int, LayerRecord] = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    step: int = 0
    active: tuple = ()

    def __post_init__(self):
        self.active = self.layers

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    @contextlib.contextmanager
    def recording(self, materialize: bool = False, output_scale: Optional[dict] = None,
                  layers: Optional[Sequence[int]] = None):
        """Pass 1: the chosen layers (or `layers`, a subset) keep O, V, the key padding and,
        when `materialize`, A in `records`; `output_scale` {layer: α} scales their O."""
        self.records = {}
        with self._mode("record"):
            self.materialize = materialize
            self.output_scale = dict(output_scale or {})
            self.active = tuple(self.layers if layers is None else layers)
            try:
                yield self.records
            finally:
                # the caller keeps the yielded dict; the state drops its graph references
                self.records = {}
                self.materialize = False
                self.output_scale = {}
                self.active = self.layers

    def intercepts(self, layer) -> bool:
        """Whether `layer` leaves plain attention in the current mode."""
        if self.mode == "record":
            return layer in self.active
        return self.mode == "masked" and layer in self.layers

    @contextlib.contextmanager
    def masking(self, masks: dict, step: int):
        """Pass 2: layer i attends through keep mask masks[i] (a PackedMask [B,H,Lq,Lk])."""
        missing = [layer for layer in self.layers if layer not in masks]
        if missing:
            raise ValueError(f"masks must hold a keep mask for every chosen layer {self.layers}, "
                             f"missing {missing}")
        self.masks, self.step = dict(masks), step
        with self._mode("masked"):
            try:
                yield
            finally:
                self.masks = {}

    @contextlib.contextmanager
    def _mode(self, mode: str):
        if self.mode != "plain":
            raise RuntimeError(f"AD-DROP attention is already in mode {self.mode!r}; passes "
                               "cannot nest")
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "plain"

    def attend(self, layer, module, query, key, value, attention_mask, scaling, dropout):
        """Attention output [B,Lq,H,D] of a chosen layer in the record or masked mode."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        key, value = _repeat_kv(query, key), _repeat_kv(query, value)
        key_padding, attn_mask = _split_mask(attention_mask)
        if self.mode == "masked":
            out = masked_attention(query, key, value, keep=self.masks[layer], attn_mask=attn_mask,
                                   scale=scaling, dropout_p=dropout, seed=self.seed,
                                   step=self.step, stream=DROPOUT_STREAM + layer,
                                   backend=self.backend)
            return out.transpose(1, 2).contiguous(), None
        probs = None
        if self.materialize:
            probs = _eager_probs(query, key, attn_mask, scaling)
            probs = F.dropout(probs, p=dropout, training=dropout > 0.0)
            out = torch.matmul(probs.to(value.dtype), value)
            probs = probs.detach()
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=_sdpa_mask(attn_mask), dropout_p=dropout,
                scale=scaling)
        alpha = self.output_scale.get(layer, 1.0)
        if alpha != 1.0:
            out = out * alpha
        self.records[layer] = LayerRecord(out, value.detach(), key_padding, probs, alpha)
        return out.transpose(1, 2).contiguous(), None


def _repeat_kv(query, tensor):
    """Grouped-query K/V expanded to the query heads (masked_attention takes equal heads)."""
    groups = query.shape[1] // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _split_mask(attention_mask):
    """(key padding bool [B,Lk] or None, attn_mask for masked_attention) of a built mask."""
    if attention_mask is None:
        return None, None
    if attention_mask.dtype != torch.bool:
        raise TypeError("the regdrop_addrop mask builder gives bool masks; got an attention_mask "
                        f"of dtype {attention_mask.dtype} (a 4-D mask passed by the caller?)")
    if attention_mask.shape[-2] == 1:  # a pure key-padding mask
        key_padding = attention_mask[:, 0, 0, :]
        return key_padding, key_padding
    # any structure over queries: keys some query attends count as real for the threshold
    return attention_mask.any(dim=-2).all(dim=1), attention_mask


def _sdpa_mask(attn_mask):
    """A [B,Lk] key padding as the broadcastable [B,1,1,Lk] SDPA takes; others unchanged."""
    if attn_mask is not None and attn_mask.dim() == 2:
        return attn_mask[:, None, None, :]
    return attn_mask


def _eager_probs(query, key, attn_mask, scaling):
    """softmax(scale·QKᵀ) in fp32 over the allowed keys."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    mask = _sdpa_mask(attn_mask)
    if mask is None:
        return torch.softmax(scores, dim=-1)
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
    # rows without any allowed key give zeros, as SDPA does on the plain path
    return probs * mask.any(dim=-1, keepdim=True)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kwargs):
    """The registered AttentionInterface function (see the module docstring)."""
    state = getattr(module, _STATE_ATTR, None)
    layer = getattr(module, _LAYER_ATTR, None)
    if state is None or not state.intercepts(layer):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    return state.attend(layer, module, query, key, value, attention_mask, scaling, dropout)


def _mask_builder(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, local_size=None, allow_is_causal_skip=True,
                  allow_is_bidirectional_skip=False, use_vmap=False, device="cpu", **kwargs):
    """The registered AttentionMaskInterface builder: sdpa_mask, with a plain padding mask kept
    as a bool [B,1,1,Lk] view (no [B,1,Lq,Lk] tensor)."""
    from transformers.masking_utils import (bidirectional_mask_function, prepare_padding_mask,
                                            sdpa_mask)
    plain_padding = (mask_function is bidirectional_mask_function and not use_vmap
                     and local_size is None and q_offset == 0 and kv_offset == 0)
    if not plain_padding:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                         mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                         allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                         use_vmap=use_vmap, device=device, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None or (allow_is_bidirectional_skip and bool(padding.all())):
        return None
    return padding.to(device=device, dtype=torch.bool)[:, None, None, :].expand(batch_size, 1, 1,
                                                                               kv_length)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION_NAME, _attention_function)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, _mask_builder)


def _get_path(root, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _unsupported(model, why: str) -> ValueError:
    return ValueError(f"regdrop_fast.addrop.enable: {type(model).__name__} is not supported "
                      f"({why}). Supported: {SUPPORTED}")


def attention_modules(model) -> list:
    """The self-attention module of each encoder layer of `model`, in order (or a ValueError
    naming what is supported)."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise _unsupported(model, "its attention does not go through AttentionInterface")
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model, "it is a decoder or encoder-decoder; AD-DROP masks bidirectional "
                                  "encoder self-attention")
    base = model.base_model
    for layer_path in LAYER_PATHS:
        layer_list = _get_path(base, layer_path)
        if not isinstance(layer_list, torch.nn.ModuleList) or len(layer_list) == 0:
            continue
        for attn_path in ATTENTION_PATHS:
            found = [_get_path(layer, attn_path) for layer in layer_list]
            if all(isinstance(mod, torch.nn.Module) for mod in found):
                if any(getattr(mod, "is_causal", False) for mod in found):
                    raise _unsupported(model, "its self-attention is causal")
                return found
    raise _unsupported(model, "no encoder layer list with self-attention modules was found")


def _check_layers(layers, num_layers: int) -> tuple:
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        layers = tuple(layers)
    except TypeError:
        raise TypeError(f"layers must be an int or a sequence of ints, got "
                        f"{type(layers).__name__}") from None
    if not layers:
        raise ValueError("layers must name at least one layer, got an empty sequence")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must hold ints, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"layers must be in [0, {num_layers - 1}] (the model has {num_layers} "
                             f"attention layers), got {layer}")
    return tuple(sorted(set(layers)))


def check_config(p, q, attribution, drop) -> tuple:
    """Validated (p, q, attribution, drop): p in (0, 1), q in [0, 1]."""
    p = check_prob("p", p, low_open=True, high_open=True)
    q = check_prob("q", q, low_open=False, high_open=False)
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS}, got {drop!r}")
    return p, q, attribution, drop


def get_state(model) -> ADDropAttention:
    """The AD-DROP state `enable` put on `model` (or on a wrapper's `.module`)."""
    for candidate in (model, getattr(model, "module", None)):
        state = getattr(candidate, _STATE_ATTR, None) if candidate is not None else None
        if isinstance(state, ADDropAttention):
            return state
    raise ValueError(f"AD-DROP is not enabled on this {type(model).__name__}; call "
                     "regdrop_fast.addrop.enable(model, ...) first")


def enable(model, layers: Sequence[int] = (0,), p: float = 0.3, q: float = 0.2,
           attribution: str = "gradient", drop: str = "high", seed: int = 0,
           backend: Optional[str] = None) -> ADDropAttention:
    """Switch `model` to the AD-DROP attention implementation and return its state.

    layers: indices of the self-attention layers to mask (official default: layer 0).
    p: fraction of each row's real keys that are drop candidates, in (0, 1).
    q: probability of dropping a candidate, in [0, 1].
    attribution: "gradient" | "integrated_gradients" | "attention" | "random".
    drop: "high" (drop the highest attributions, the default) or "low".
    seed / backend: Philox seed and kernel backend of the keep masks and masked attention.
    Outside AD-DROP passes the model computes plain SDPA attention, padding respected.
    Enabling again reconfigures; `disable` restores the previous implementation."""
    p, q, attribution, drop = check_config(p, q, attribution, drop)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    modules = attention_modules(model)
    layers = _check_layers(layers, len(modules))
    previous = getattr(model, _STATE_ATTR, None)
    previous_impl = (previous.previous_implementation if isinstance(previous, ADDropAttention)
                     else model.config._attn_implementation)
    _register()
    state = ADDropAttention(modules=modules, layers=layers, p=p, q=q, attribution=attribution,
                            drop=drop, seed=seed, backend=backend,
                            previous_implementation=previous_impl)
    for index, module in enumerate(modules):
        module.__dict__[_STATE_ATTR] = state
        module.__dict__[_LAYER_ATTR] = index
    model.__dict__[_STATE_ATTR] = state
    model.set_attn_implementation(IMPLEMENTATION_NAME)
    return state


def disable(model) -> None:
    """Undo `enable`: the previous attention implementation, no AD-DROP state."""
    state = get_state(model)
    owner = model if getattr(model, _STATE_ATTR, None) is state else model.module
    for module in state.modules:
        module.__dict__.pop(_STATE_ATTR, None)
        module.__dict__.pop(_LAYER_ATTR, None)
    owner.__dict__.pop(_STATE_ATTR, None)
    owner.set_attn_implementation(state.previous_implementation or "sdpa")

