"""AD-DROP as a transformers attention implementation: `enable(model, ...)`, `disable(model)`.

Importing regdrop_fast.addrop registers one attention function (AttentionInterface) and its mask
builder (AttentionMaskInterface) under the name "regdrop_addrop" (when transformers is
installed), so `from_pretrained(..., attn_implementation="regdrop_addrop")` works; `enable`
registers again (idempotent) and switches the model to it. Both are needed: with only the
function registered, transformers finds no mask builder for the name and hands the attention
attention_mask=None, so padding would be silently attended.

The mask builder returns what `sdpa_mask` returns (bool, True = attend; None when no
attention_mask is given), except that a plain bidirectional key-padding mask stays a broadcast
view bool [B,1,1,Lk] instead of a materialized [B,1,Lq,Lk], and a plain causal + padding mask is
remembered as such, so that a chosen layer reads it as is_causal + key padding [B,Lk] (the
kernels' form) and any other structure on a causal layer is refused, never approximated. The
attention function then runs in one of three modes, per model:

  plain   every layer: transformers' SDPA attention (what the unpatched model computes)
  record  pass 1 of an AD-DROP step. Chosen layers compute O = A_drop·V as a [B,H,Lq,D] tensor
          and keep it with V (detached) and the key padding, so that dO = ∂target/∂O comes
          from `torch.autograd.grad(target, outputs)` alone (no parameter gradients) and
          B = dO·Vᵀ is never formed. When differentiable, the forward runs without autograd
          up to the lowest chosen layer, whose O becomes the leaf that autograd starts from: no
          graph (and no backward) below it. Kinds that need the map itself ("attention",
          "integrated_gradients") materialize A [B,H,Lq,Lk] for the chosen layers in this pass
          only. An output scale α per layer serves integrated gradients.
  masked  pass 2. Chosen layer i attends through `masked_attention` with keep mask i.

Philox streams (DESIGN.md): the keep mask of layer i draws stream i, the attention-probability
dropout of the masked pass stream DROPOUT_STREAM + i, random candidates ("random" kind)
stream RANDOM_STREAM + i; all at the step counter of the AD-DROP step.

Supported (SUPPORTED): encoders (BERT, RoBERTa, ELECTRA, DistilBERT, ...) and decoder-only
models (Llama, Qwen2, Mistral, GPT-2, ...: causal, grouped-query K/V, rotary) whose attention
calls `ALL_ATTENTION_FUNCTIONS.get_interface` (`_supports_attention_backend`), with
self-attention modules at one of LAYER_PATHS × ATTENTION_PATHS; and any nn.Module built from
`regdrop_fast.addrop.SelfAttention`. On causal layers a row's AD-DROP candidates are taken over
the keys it may attend (its causal, non-pad prefix): our extension of the paper, which covers
encoders. Masks other than key padding (+ causal) on a causal layer, sliding windows and
encoder-decoder models are refused with the reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .._checks import UINT64_MAX, check_int, check_prob
from .attention import masked_attention

__all__ = ["enable", "disable", "get_state", "attention_modules", "ADDropAttention",
           "IMPLEMENTATION_NAME", "ATTRIBUTIONS", "DROPS", "DROPOUT_STREAM", "RANDOM_STREAM",
           "SUPPORTED"]

IMPLEMENTATION_NAME = "regdrop_addrop"
ATTRIBUTIONS = ("gradient", "integrated_gradients", "attention", "random")
DROPS = ("high", "low")
DROPOUT_STREAM = 1 << 20
RANDOM_STREAM = 2 << 20
# where the layer list and, inside a layer, the self-attention module live
LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h")
ATTENTION_PATHS = ("attention.self", "self_attn", "attn", "attention")
SUPPORTED = ("encoders: BERT, RoBERTa, ELECTRA, DistilBERT (and models of the same layout: "
             "XLM-RoBERTa, CamemBERT, ...); decoder-only models: Llama, Qwen2, Mistral "
             "(sliding_window=None), GPT-2 and others of the same layout (causal, grouped-query, "
             "rotary); that is, transformers models whose self-attention calls AttentionInterface "
             "(class attribute _supports_attention_backend = True) with layers at one of "
             f"{LAYER_PATHS} and self-attention at one of {ATTENTION_PATHS}; or any nn.Module "
             "built from regdrop_fast.addrop.SelfAttention")
_STATE_ATTR = "_regdrop_addrop"
_LAYER_ATTR = "_regdrop_addrop_layer"
# causal + key padding masks built by _mask_builder, alive while a forward holds them
_CAUSAL_PADDING: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


@dataclass
class LayerRecord:
    """What pass 1 keeps for one chosen layer."""

    out: torch.Tensor  # O [B,H,Lq,D], in the graph (scaled by α under integrated gradients)
    value: torch.Tensor  # V [B,Hkv,Lk,D], detached (Hkv divides H: grouped-query attention)
    key_padding: Optional[torch.Tensor]  # bool [B,Lk], True = real key; None = no padding
    probs: Optional[torch.Tensor] = None  # A_drop [B,H,Lq,Lk] detached, materializing kinds only
    scale: float = 1.0  # α the output was scaled by
    causal: bool = False  # whether the layer's rows see their causal prefix only


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
    differentiable: bool = False
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
                  layers: Optional[Sequence[int]] = None, differentiable: bool = False):
        """Pass 1: the chosen layers (or `layers`, a subset) keep O, V, the key padding and,
        when `materialize`, A in `records`; `output_scale` {layer: α} scales their O.

        differentiable: run the forward under torch.no_grad(); the lowest recording layer
        turns autograd on, its O being a leaf, so the graph starts there."""
        self.records = {}
        with self._mode("record"):
            self.materialize = materialize
            self.differentiable = differentiable
            self.output_scale = dict(output_scale or {})
            self.active = tuple(sorted(self.layers if layers is None else layers))
            try:
                with torch.no_grad() if differentiable else contextlib.nullcontext():
                    yield self.records
            finally:
                # the caller keeps the yielded dict; the state drops its graph references
                self.records = {}
                self.materialize = False
                self.differentiable = False
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

    def attend(self, layer, query, key, value, key_padding, attn_mask, causal: bool, scaling,
               dropout):
        """Attention output [B,Lq,H,D] of a chosen layer in the record or masked mode.

        query [B,H,Lq,D]; key, value [B,Hkv,Lk,D] with Hkv dividing H; key_padding bool [B,Lk]
        (True = real) or None; attn_mask: key_padding, a 4-D bool mask (non-causal) or None;
        causal: rows see their causal prefix (bottom-right aligned)."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if self.mode == "masked":
            out = masked_attention(query, key, value, keep=self.masks[layer], attn_mask=attn_mask,
                                   scale=scaling, dropout_p=dropout, seed=self.seed,
                                   step=self.step, stream=DROPOUT_STREAM + layer,
                                   backend=self.backend, is_causal=causal)
            return out.transpose(1, 2).contiguous(), None
        first = self.differentiable and layer == self.active[0]
        with torch.no_grad() if first else contextlib.nullcontext():
            probs = None
            if self.materialize:
                probs = _eager_probs(query, _repeat_kv(query, key), attn_mask, causal, scaling)
                probs = F.dropout(probs, p=dropout, training=dropout > 0.0)
                out = torch.matmul(probs.to(value.dtype), _repeat_kv(query, value))
                probs = probs.detach()
            else:
                mask = _dense_mask(attn_mask, causal, query.shape[2], key.shape[2])
                if mask is not None:
                    # as transformers' SDPA path: CUDA's fused kernels take GQA without a mask
                    key, value = _repeat_kv(query, key), _repeat_kv(query, value)
                out = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                    is_causal=causal and mask is None,
                    enable_gqa=query.shape[1] != key.shape[1])
            alpha = self.output_scale.get(layer, 1.0)
            if alpha != 1.0:
                out = out * alpha
        if first:
            # everything above this layer is recorded; nothing below it is
            out.requires_grad_(True)
            torch.set_grad_enabled(True)
        self.records[layer] = LayerRecord(out, value.detach(), key_padding, probs, alpha, causal)
        return out.transpose(1, 2).contiguous(), None


def _repeat_kv(query, tensor):
    """Grouped-query K/V expanded to the query heads (head h reads kv head h // groups)."""
    groups = query.shape[1] // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _causal(lq: int, lk: int, device) -> torch.Tensor:
    """bool [Lq,Lk]: key j visible from query row i iff j <= i + Lk − Lq (bottom-right)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def _layer_mask(attention_mask, module_causal: bool, layer):
    """(causal, key padding bool [B,Lk] or None, attn_mask for `attend`) of the mask a layer
    received, read as transformers' SDPA path reads it: no mask means the module's own
    causality; a padding view [B,1,1,Lk] is bidirectional; a causal + padding mask of our
    builder is causal with its last row as the key padding; any other 4-D mask is taken as
    given on a non-causal layer and refused on a causal one."""
    if attention_mask is None:
        return module_causal, None, None
    if attention_mask.dtype != torch.bool:
        raise TypeError("the regdrop_addrop mask builder gives bool masks; got an attention_mask "
                        f"of dtype {attention_mask.dtype} (a 4-D mask passed by the caller?)")
    if attention_mask.shape[-2] == 1:  # a pure key-padding mask
        key_padding = attention_mask[:, 0, 0, :]
        return False, key_padding, key_padding
    if _CAUSAL_PADDING.get(id(attention_mask)) is attention_mask:
        # query row Lq-1 = Lk-1 sees every real key
        key_padding = attention_mask[:, 0, -1, :].contiguous()
        return True, key_padding, key_padding
    if module_causal:
        raise ValueError(
            f"AD-DROP on causal layer {layer} takes the causal mask with key padding only (a "
            "2-D attention_mask); this forward built a [B,1,Lq,Lk] mask with more structure "
            "(packed sequences, a sliding or chunked window, a cache offset, or a 4-D "
            "attention_mask passed by the caller) that the keep mask cannot express")
    # any structure over queries: keys some query attends count as real for the threshold
    return False, attention_mask.any(dim=-2).all(dim=1), attention_mask


def _dense_mask(attn_mask, causal: bool, lq: int, lk: int):
    """The mask SDPA takes: key padding as [B,1,1,Lk], with the causal structure when `causal`
    ([B,1,Lq,Lk]); None for a causal layer without padding (SDPA's is_causal then)."""
    if attn_mask is None or attn_mask.dim() != 2:
        return attn_mask
    mask = attn_mask[:, None, None, :]
    return mask & _causal(lq, lk, attn_mask.device) if causal else mask


def _eager_probs(query, key, attn_mask, causal, scaling):
    """softmax(scale·QKᵀ) in fp32 over the allowed keys."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    mask = _dense_mask(attn_mask, causal, query.shape[2], key.shape[2])
    if mask is None and causal:
        mask = _causal(query.shape[2], key.shape[2], query.device)
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
    # causality as transformers' SDPA path decides it: the call's flag, else the module's
    is_causal = kwargs.get("is_causal")
    module_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    causal, key_padding, attn_mask = _layer_mask(attention_mask, module_causal, layer)
    return state.attend(layer, query, key, value, key_padding, attn_mask, causal, scaling,
                        dropout)


def _mask_builder(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, local_size=None, allow_is_causal_skip=True,
                  allow_is_bidirectional_skip=False, use_vmap=False, device="cpu", **kwargs):
    """The registered AttentionMaskInterface builder: sdpa_mask, except that a plain
    bidirectional padding mask stays a bool [B,1,1,Lk] view (no [B,1,Lq,Lk] tensor) and a plain
    causal one (no offsets, Lq = Lk) is remembered as such (`_layer_mask`); no host sync to
    skip an all-real mask."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask, sdpa_mask)
    # q_offset is a tensor under a static cache: anything but the int 0 is not plain
    plain = (not use_vmap and local_size is None and isinstance(q_offset, int) and q_offset == 0
             and isinstance(kv_offset, int) and kv_offset == 0)
    plain = plain and (mask_function is bidirectional_mask_function
                       or (mask_function is causal_mask_function and q_length == kv_length))
    if not plain:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                         mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                         allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                         use_vmap=use_vmap, device=device, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None  # SDPA's is_causal on causal layers
    padding = padding.to(device=device, dtype=torch.bool)[:, None, None, :]
    if mask_function is bidirectional_mask_function:
        return padding.expand(batch_size, 1, 1, kv_length)
    # one [B,1,L,L] mask per forward, as sdpa_mask's, shared by the plain layers
    mask = padding & _causal(q_length, kv_length, device)
    _CAUSAL_PADDING[id(mask)] = mask
    return mask


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


def _has_transformers() -> bool:
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken or deliberately hidden installation
        return False


def _is_hf_model(model) -> bool:
    if not _has_transformers():
        return False
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel)


def attention_modules(model) -> list:
    """The self-attention module of each layer of `model`, in order (or a ValueError giving
    the reason and naming what is supported)."""
    if not _is_hf_model(model):
        from .module import SelfAttention
        found = ([mod for mod in model.modules() if isinstance(mod, SelfAttention)]
                 if isinstance(model, torch.nn.Module) else [])
        if not found:
            raise TypeError(f"model must be a transformers PreTrainedModel or an nn.Module built "
                            f"from regdrop_fast.addrop.SelfAttention, got {type(model).__name__}")
        return found
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model, "it is an encoder-decoder model; AD-DROP here masks the "
                                  "self-attention of an encoder or of a decoder-only model")
    if getattr(config, "add_cross_attention", False):
        raise _unsupported(model, "its layers cross-attend to encoder states "
                                  "(config.add_cross_attention); only self-attention is masked")
    if not getattr(model, "_supports_attention_backend", False):
        raise _unsupported(model, "its attention does not call transformers' AttentionInterface "
                                  "(_supports_attention_backend is not set), so the "
                                  f"{IMPLEMENTATION_NAME!r} implementation would never run")
    base = model.base_model
    for layer_path in LAYER_PATHS:
        layer_list = _get_path(base, layer_path)
        if not isinstance(layer_list, torch.nn.ModuleList) or len(layer_list) == 0:
            continue
        for attn_path in ATTENTION_PATHS:
            found = [_get_path(layer, attn_path) for layer in layer_list]
            if all(isinstance(mod, torch.nn.Module) for mod in found):
                return found
    raise _unsupported(model, f"no layer list with self-attention modules at "
                              f"{type(base).__name__}.{{{', '.join(LAYER_PATHS)}}}"
                              f"[i].{{{', '.join(ATTENTION_PATHS)}}}")


def _check_windows(model, modules, layers) -> None:
    """Refuse chosen layers whose attention is windowed: the keep mask and masked_attention
    express key padding (+ causal) only."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    for layer in layers:
        module = modules[layer]
        window = (module.sliding_window if hasattr(module, "sliding_window")
                  else getattr(config, "sliding_window", None))
        kind = layer_types[layer] if layer_types is not None else "full_attention"
        if window is not None or kind != "full_attention":
            what = (f"sliding-window attention (sliding_window={window})" if window is not None
                    else f"{kind!r} attention")
            raise _unsupported(model, f"layer {layer} uses {what}: "
                                      "AD-DROP masks full causal or bidirectional attention "
                                      "with key padding; set config.sliding_window = None "
                                      "(and use_sliding_window=False) when sequences fit the "
                                      "window, or choose full-attention layers")


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
    """Switch `model` (a supported transformers model, or an nn.Module built from
    `SelfAttention`) to the AD-DROP attention implementation and return its state.

    layers: indices of the self-attention layers to mask (official default: layer 0).
    p: fraction of each row's allowed keys (real keys; on causal layers those of its causal
       prefix) that are drop candidates, in (0, 1).
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
    _check_windows(model, modules, layers)
    hf_model = _is_hf_model(model)
    previous = getattr(model, _STATE_ATTR, None)
    previous_impl = (previous.previous_implementation if isinstance(previous, ADDropAttention)
                     else model.config._attn_implementation if hf_model else None)
    state = ADDropAttention(modules=modules, layers=layers, p=p, q=q, attribution=attribution,
                            drop=drop, seed=seed, backend=backend,
                            previous_implementation=previous_impl)
    for index, module in enumerate(modules):
        module.__dict__[_STATE_ATTR] = state
        module.__dict__[_LAYER_ATTR] = index
    model.__dict__[_STATE_ATTR] = state
    if hf_model:
        _register()
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
    if _is_hf_model(owner):
        owner.set_attn_implementation(state.previous_implementation or "sdpa")


# from_pretrained(..., attn_implementation="regdrop_addrop") right after the import
if _has_transformers():
    _register()

