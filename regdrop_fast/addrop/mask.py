"""AD-DROP keep mask: `keep_mask(attr, p, q, ...)` -> PackedMask [B,H,Lq,Lk] (1 = keep).

Per (batch b, head h, query row i), over the row's allowed keys: the real keys of sample b, and
with is_causal=True only keys j <= i + Lk − Lq (bottom-right aligned, as flash-attn); n = their
number. The rule is the official code's (TaoYang225/AD-DROP, generate_mask_high/_low):
  drop="high": threshold = value at ascending index ((1 − p)·n).long() of the row's allowed
               attributions, candidates = attribution >= threshold (ties included)
  drop="low":  threshold = value at ascending index (p·n).long(), candidates = attribution
               strictly below it (ties kept): floor(p·n) candidates without ties
  keep = allowed AND (NOT candidate OR word >= floor(q·2^32))
where (x·n).long() is torch's float32 product of a Python float and an int64 length (both
rounded to float32, the product rounded, truncated): e.g. p=0.9, n=10 gives index 1, not the
float64 floor 0. Candidates are dropped with probability q.

Causal rows are our extension (the paper covers encoders): the top-p fraction of the keys the
row may attend to. Keys that are not allowed are never kept; rows without an allowed key keep
nothing. Padded query rows are not treated specially (as in the official code).

Philox contract (../shared/DESIGN.md): word = philox_words(seed, index, step, stream) with the
element's global flat index in [B,H,Lq,Lk], index = b·H·Lq·Lk + h·Lq·Lk + i·Lk + j. The caller
picks the stream (regdrop_fast.addrop passes the layer index) and the step (the training step).

`keep_mask_layers(attr, p, q, ..., streams=...)` computes the masks of several layers in one
kernel launch from inputs stacked on a leading layer axis; layer l's mask is bit for bit
keep_mask(attr[l], ..., stream=streams[l]) (streams are the Philox streams, one per layer).

`random_keep_mask_layers(shape, p, q, streams, candidate_streams, ...)` is the official RD kind
(no attribution) for n layers in one launch: an allowed key is a candidate iff its word of the
layer's candidate stream is below floor(p·2^32), dropped iff also its word of the layer's
stream is below floor(q·2^32), at the same element index.

`attr` is a [B,H,Lq,Lk] attribution tensor (any kind: gradient, integrated gradients, the
attention map, random scores) or a (dO, v) pair, dO [B,H,Lq,D] and v [B,Hkv,Lk,D] (Hkv dividing
H: grouped-query attention, head h uses kv head h // (H // Hkv)): then B = dO·Vᵀ is computed tile
by tile inside the Triton kernel and never stored. Masks of the triton and reference backends
are bit-identical whenever both see the same fp32 attributions (always for an attribution
tensor; for a (dO, v) pair the kernel's dot may round B differently from torch's matmul, which
can only swap near-equal scores at the threshold).
"""
from __future__ import annotations

import functools
import struct
from typing import Optional, Sequence

import torch

from .. import backends, rng
from .._checks import UINT32_MAX, UINT64_MAX, check_int, check_prob, check_tensor, keep_threshold
from ..masks import PackedMask, pack_mask
from ..reference import addrop as _ref
from ..reference import masks as _ref_masks
from ..reference.masked_attention import flat_indices

__all__ = ["keep_mask", "keep_mask_layers", "random_keep_mask_layers"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_dO_v(dO, v, ndim: int = 4):
    """dO [B,H,Lq,D] and v [B,Hkv,Lk,D] with Hkv dividing H (each with a leading layer axis of
    the same size when ndim is 5): one float dtype and device."""
    check_tensor("dO", dO, dtypes=_FLOATS, ndim=ndim)
    check_tensor("v", v, dtypes=_FLOATS, ndim=ndim)
    if v.device != dO.device:
        raise ValueError(f"v must be on dO's device {dO.device}, got {v.device}")
    if v.dtype != dO.dtype:
        raise TypeError(f"dO and v must have the same dtype, got {dO.dtype} and {v.dtype}")
    do_shape, v_shape = dO.shape, v.shape
    if v_shape[:-3] != do_shape[:-3] or v_shape[-1] != do_shape[-1]:
        lead = "n," if ndim == 5 else ""
        raise ValueError(f"v must be [{lead}B,Hkv,Lk,D] matching dO [{lead}B,H,Lq,D] = "
                         f"{tuple(do_shape)}, got {tuple(v_shape)}")
    if v_shape[-3] == 0 or do_shape[-3] % v_shape[-3]:
        raise ValueError(f"v's heads (Hkv = {v_shape[-3]}) must divide dO's heads "
                         f"(H = {do_shape[-3]}) for grouped-query attention")


def _f32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python float that multiplies a float32 tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _fraction(p: float, drop: str) -> float:
    """The float32 factor of the official threshold index ((1 − p)·n or p·n)."""
    return _f32((1.0 - p) if drop == "high" else p)


def _check_settings(p, q, seed, step, drop, is_causal):
    """The validated (p, q, seed, step) shared by both entry points."""
    if type(p) is not float or not 0.0 < p < 1.0:  # in-range floats, the per-call case, pass
        p = check_prob("p", p, low_open=True, high_open=True)
    if type(q) is not float or not 0.0 <= q <= 1.0:
        q = check_prob("q", q, low_open=False, high_open=False)
    seed = check_int("seed", seed, 0, UINT64_MAX)
    step = check_int("step", step, 0, UINT32_MAX)
    if drop != "high" and drop != "low":
        raise ValueError(f"drop must be 'high' or 'low', got {drop!r}")
    if is_causal is not True and is_causal is not False:
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    return p, q, seed, step


def _check_inputs(attr, key_padding_mask, ndim: int):
    """(shape [(n,)B,H,Lq,Lk], attribution tensor or None, dO, v) after validation; ndim 5:
    inputs stacked over layers, whose key padding mask may be [B,Lk] or [n,B,Lk]."""
    if isinstance(attr, (tuple, list)):
        if len(attr) != 2:
            raise ValueError(f"attr as a pair must be (dO, v), got {len(attr)} items")
        dO, v = attr
        _check_dO_v(dO, v, ndim)
        if dO.shape[-1] == 0:
            raise ValueError(f"dO must have a non-empty head dim, got shape {tuple(dO.shape)}")
        scores, shape, device = None, (*dO.shape[:-1], v.shape[-2]), dO.device
    else:
        check_tensor("attr", attr, dtypes=_FLOATS, ndim=ndim)
        scores, dO, v, shape, device = attr, None, None, tuple(attr.shape), attr.device
    if min(shape) == 0:
        raise ValueError(f"attr must describe a non-empty [{'n,' if ndim == 5 else ''}B,H,Lq,Lk] "
                         f"map (no empty layer, batch or length), got shape {shape}")
    if key_padding_mask is not None:
        _check_padding(key_padding_mask, shape[-4], shape[-1], shape[0] if ndim == 5 else None,
                       device)
    return shape, scores, dO, v


def _check_padding(key_padding_mask, batch: int, lk: int, n_layers: Optional[int], device):
    """key_padding_mask bool [B,Lk] on `device`, or [n,B,Lk] when n_layers is given."""
    check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,),
                 ndim=2 if n_layers is None else (2, 3))
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")
    want = (batch, lk) if key_padding_mask.dim() == 2 else (n_layers, batch, lk)
    if tuple(key_padding_mask.shape) != want:
        form = "[B, Lk]" if len(want) == 2 else "[n, B, Lk]"
        raise ValueError(f"key_padding_mask must have shape {form} = {want}, got "
                         f"{tuple(key_padding_mask.shape)}")


def _triton_words(scores, dO, v, key_padding_mask, p, q, seed, step, stream, drop, is_causal):
    """The kernel's int32 words for validated inputs (stream: an int or a device table)."""
    src = scores if dO is None else dO
    if src.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"the triton backend takes float32/float16/bfloat16 attributions, got "
                        f"{src.dtype} (use backend='reference' for float64)")
    if dO is not None:
        src = dO if dO.stride(-1) == 1 else dO.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    kernels = backends.triton_kernels("addrop_mask")
    return kernels.keep_mask_bits(src, v, key_padding_mask, _fraction(p, drop), keep_threshold(q),
                                  seed, step, stream, drop == "low", is_causal)


def keep_mask(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
              seed: int = 0, step: int = 0, stream: int = 0, backend: Optional[str] = None,
              drop: str = "high", is_causal: bool = False) -> PackedMask:
    """AD-DROP keep mask as a PackedMask of shape [B,H,Lq,Lk] (see the module docstring).

    p in (0, 1): fraction of real keys that are drop candidates; q in [0, 1]: probability a
    candidate is dropped; key_padding_mask: bool [B,Lk], True = real token (HF attention_mask);
    seed in [0, 2^64), step and stream in [0, 2^32); drop: "high" (default) or "low";
    is_causal: threshold each row over its causal prefix (bottom-right aligned when Lq != Lk).
    """
    p, q, seed, step = _check_settings(p, q, seed, step, drop, is_causal)
    stream = check_int("stream", stream, 0, UINT32_MAX)
    shape, scores, dO, v = _check_inputs(attr, key_padding_mask, 4)
    device = (scores if dO is None else dO).device
    if backends.resolve("addrop_keep_mask", backend, device) == "reference":
        dense = _ref.keep_mask(attr if dO is None else (dO, v), p, q, key_padding_mask, seed,
                               step, stream, drop, is_causal)
        words = _ref_masks.pack_bits(dense)
    else:
        words = _triton_words(scores, dO, v, key_padding_mask, p, q, seed, step, stream, drop,
                              is_causal)
    return PackedMask._unchecked(words, torch.Size(shape))


def _check_streams(name: str, streams, n_layers: Optional[int]) -> tuple:
    """streams as a tuple of n_layers ints in [0, 2^32) (any non-zero count when None)."""
    if isinstance(streams, torch.Tensor) or not isinstance(streams, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(streams).__name__}")
    if n_layers is None and len(streams) == 0:
        raise ValueError(f"{name} must name at least one layer's stream")
    if n_layers is not None and len(streams) != n_layers:
        raise ValueError(f"{name} must name one stream per layer ({n_layers}), got "
                         f"{len(streams)}")
    streams = tuple(streams)
    if not all(type(s) is int and 0 <= s <= UINT32_MAX for s in streams):
        streams = tuple(check_int(f"{name}[{i}]", s, 0, UINT32_MAX)
                        for i, s in enumerate(streams))
    return streams


@functools.lru_cache(maxsize=64)
def _stream_table(streams: tuple, device: torch.device) -> torch.Tensor:
    """int64 [n] device copy of the layers' streams, made once per (streams, device): a training
    run reuses its layers' table instead of copying it to the device every step. Never written."""
    return torch.tensor(streams, dtype=torch.int64, device=device)


def keep_mask_layers(attr, p: float, q: float, key_padding_mask: Optional[torch.Tensor] = None,
                     seed: int = 0, step: int = 0, streams: Optional[Sequence[int]] = None,
                     backend: Optional[str] = None, drop: str = "high",
                     is_causal: bool = False) -> tuple:
    """Keep masks of n layers from one kernel launch: a tuple of n PackedMask [B,H,Lq,Lk].

    attr: attributions stacked over the layers [n,B,H,Lq,Lk], or a (dO, v) pair stacked the
    same way, dO [n,B,H,Lq,D] and v [n,B,Hkv,Lk,D]; key_padding_mask: bool [B,Lk] shared by
    every layer, [n,B,Lk] per layer, or None; streams: the layers' Philox streams (default 0..
    n − 1), each in [0, 2^32). Mask l equals keep_mask(attr[l] (or (dO[l], v[l])), p, q,
    key_padding_mask (or key_padding_mask[l]), seed, step, streams[l], ...) bit for bit; the
    other arguments are keep_mask's. The masks are views of one [n,B,H,Lq,W] word tensor.
    """
    p, q, seed, step = _check_settings(p, q, seed, step, drop, is_causal)
    shape, scores, dO, v = _check_inputs(attr, key_padding_mask, 5)
    n_layers, layer_shape = shape[0], shape[1:]
    streams = (tuple(range(n_layers)) if streams is None
               else _check_streams("streams", streams, n_layers))
    device = (scores if dO is None else dO).device
    if backends.resolve("addrop_keep_mask", backend, device) == "reference":
        shared = key_padding_mask is None or key_padding_mask.dim() == 2
        words = torch.stack([_ref_masks.pack_bits(_ref.keep_mask(
            scores[i] if dO is None else (dO[i], v[i]), p, q,
            key_padding_mask if shared else key_padding_mask[i], seed, step, stream, drop,
            is_causal)) for i, stream in enumerate(streams)])
    else:
        words = _triton_words(scores, dO, v, key_padding_mask, p, q, seed, step,
                              _stream_table(streams, device), drop, is_causal)
    layer_shape = torch.Size(layer_shape)
    return tuple(PackedMask._unchecked(layer_words, layer_shape)
                 for layer_words in words.unbind(0))


def _check_shape(shape) -> tuple:
    """shape (B, H, Lq, Lk) as a tuple of 4 positive ints."""
    if isinstance(shape, torch.Tensor) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence (B, H, Lq, Lk), got {type(shape).__name__}")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, H, Lq, Lk), got {len(shape)} sizes")
    return tuple(check_int(f"shape[{i}]", size, 1, UINT64_MAX) for i, size in enumerate(shape))


def _cpu_words(shape, p, q, key_padding_mask, seed, step, streams, candidate_streams,
               is_causal, device) -> torch.Tensor:
    """int32 words [n,B,H,Lq,W] of the random masks from the extension's C++ Philox and bit
    packing (the reference's Philox in torch ops is about 10x slower on a CPU)."""
    batch, _, lq, lk = shape
    index = flat_indices(shape, device)
    shared = key_padding_mask is None or key_padding_mask.dim() == 2
    words = []
    for i, (stream, candidate) in enumerate(zip(streams, candidate_streams)):
        allowed = _ref.allowed_keys(key_padding_mask if shared else key_padding_mask[i], batch,
                                    lq, lk, device, is_causal)
        not_candidate = rng.philox_words(seed, index, step, candidate,
                                         backend="cpu") >= keep_threshold(p)
        spared = rng.philox_words(seed, index, step, stream, backend="cpu") >= keep_threshold(q)
        words.append(pack_mask(allowed & (not_candidate | spared), backend="cpu").words)
    return torch.stack(words)


def random_keep_mask_layers(shape, p: float, q: float, streams: Sequence[int],
                            candidate_streams: Sequence[int],
                            key_padding_mask: Optional[torch.Tensor] = None, seed: int = 0,
                            step: int = 0, device=None, backend: Optional[str] = None,
                            is_causal: bool = False) -> tuple:
    """The official RD ("random") keep masks of n layers from one kernel launch: a tuple of n
    PackedMask of shape (B, H, Lq, Lk), views of one [n,B,H,Lq,W] word tensor.

    Layer l: an allowed key (real; with is_causal in the row's causal prefix, as keep_mask) is
    a candidate iff its Philox word of stream candidate_streams[l] is below floor(p·2^32), and a
    candidate is dropped iff its word of stream streams[l] is below floor(q·2^32), both at the
    element's keep_mask index (reference: regdrop_fast.reference.addrop.random_keep_mask).
    p in (0, 1), q in [0, 1]; streams, candidate_streams: one stream per layer, each in
    [0, 2^32); key_padding_mask: bool [B,Lk] shared, [n,B,Lk] per layer, or None; device: the
    masks' device when there is no key_padding_mask (default CPU)."""
    p, q, seed, step = _check_settings(p, q, seed, step, "high", is_causal)
    shape = _check_shape(shape)
    streams = _check_streams("streams", streams, None)
    n_layers = len(streams)
    candidate_streams = _check_streams("candidate_streams", candidate_streams, n_layers)
    if device is None:
        device = (key_padding_mask.device if isinstance(key_padding_mask, torch.Tensor)
                  else torch.device("cpu"))
    elif not isinstance(device, torch.device):
        if not isinstance(device, str):
            raise TypeError(f"device must be a torch.device or str, got "
                            f"{type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
    if isinstance(key_padding_mask, torch.Tensor) and device.index is None and \
            key_padding_mask.device.type == device.type:
        device = key_padding_mask.device  # "cuda" names the mask's cuda:i
    elif device.type == "cuda" and device.index is None:
        # the current cuda:i, named: the stream table is cached per device, and "cuda" would
        # find one made on whichever device was current then
        device = torch.device("cuda", torch.cuda.current_device())
    if key_padding_mask is not None:
        _check_padding(key_padding_mask, shape[0], shape[3], n_layers, device)
    name = backends.resolve("addrop_random_mask", backend, device)
    if name == "reference":
        shared = key_padding_mask is None or key_padding_mask.dim() == 2
        words = torch.stack([_ref_masks.pack_bits(_ref.random_keep_mask(
            shape, p, q, key_padding_mask if shared else key_padding_mask[i], seed, step,
            stream, candidate, is_causal, device))
            for i, (stream, candidate) in enumerate(zip(streams, candidate_streams))])
    elif name == "cpu":
        words = _cpu_words(shape, p, q, key_padding_mask, seed, step, streams,
                           candidate_streams, is_causal, device)
    else:
        if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
            key_padding_mask = key_padding_mask.contiguous()
        words = backends.triton_kernels("addrop_mask").random_mask_bits(
            shape, n_layers, key_padding_mask, keep_threshold(p), keep_threshold(q), seed, step,
            _stream_table(streams + candidate_streams, device), is_causal, device)
    layer_shape = torch.Size(shape)
    return tuple(PackedMask._unchecked(layer_words, layer_shape)
                 for layer_words in words.unbind(0))
