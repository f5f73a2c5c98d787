"""Fake (meta) implementations of the raw extension ops torch.ops.regdrop_fast.*, so that
torch.compile traces them and they run on meta tensors (meta-device model init).

The extension imports this module when it loads (csrc/bindings.cpp), and its op schemas name it
with set_python_module. Each fake checks what the C++ checks check without reading data (dtypes,
ranks, sizes, offsets, list lengths, the integer key words) and raises the same exception types
(TypeError/ValueError naming the argument), then returns outputs of the C++ op's shape and dtype.
"""
from __future__ import annotations

import torch

__all__ = []

_U32 = 2**32
_I64_MAX = 2**63 - 1
_LIB = "regdrop_fast::"


def _u32(op: str, name: str, value: int) -> None:
    if not 0 <= value < _U32:
        raise ValueError(f"{op}: {name} must be in [0, 2^32), got {value}")


def _key(op: str, seed_lo, seed_hi, step, stream) -> None:
    for name, value in (("seed_lo", seed_lo), ("seed_hi", seed_hi), ("step", step),
                        ("stream", stream)):
        _u32(op, name, value)


def _num_words(n):
    return (n + 31) // 32


@torch.library.register_fake(_LIB + "pack_mask")
def _pack_mask(mask):
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask: mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"pack_mask: mask must be 2-d [rows, n], got shape {tuple(mask.shape)}")
    return mask.new_empty((mask.shape[0], _num_words(mask.shape[1])), dtype=torch.int32)


@torch.library.register_fake(_LIB + "unpack_mask")
def _unpack_mask(words, n):
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_mask: words must be an int32 tensor, got {words.dtype}")
    if words.dim() != 2:
        raise ValueError("unpack_mask: words must be 2-d [rows, ceil(n/32)], got shape "
                         f"{tuple(words.shape)}")
    if n < 0:
        raise ValueError(f"unpack_mask: n must be >= 0, got {n}")
    if words.shape[1] != _num_words(n):
        raise ValueError(f"unpack_mask: words must have {_num_words(n)} columns for n = {n}, got "
                         f"shape {tuple(words.shape)}")
    return words.new_empty((words.shape[0], n), dtype=torch.bool)


@torch.library.register_fake(_LIB + "mask_popcount")
def _mask_popcount(words):
    if words.dtype != torch.int32:
        raise TypeError(f"mask_popcount: words must be an int32 tensor, got {words.dtype}")
    return words.new_empty((), dtype=torch.int64)


@torch.library.register_fake(_LIB + "philox_words")
def _philox_words(index, seed_lo, seed_hi, step, stream):
    if index.dtype != torch.int64:
        raise TypeError(f"philox_words: index must be an int64 tensor, got {index.dtype}")
    _key("philox_words", seed_lo, seed_hi, step, stream)
    return index.new_empty(index.shape)


@torch.library.register_fake(_LIB + "philox_keep_")
def _philox_keep(out, offset, seed_lo, seed_hi, step, stream, threshold):
    if out.dtype != torch.bool:
        raise TypeError(f"philox_keep_: out must be a bool tensor, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("philox_keep_: out must be contiguous")
    if not 0 <= offset <= _I64_MAX - 3 - out.numel():
        raise ValueError(f"philox_keep_: offset must be in [0, 2^63 - 4 - out.numel()] (numel "
                         f"{out.numel()}), got {offset}")
    if not 0 <= threshold <= _U32:
        raise ValueError(f"philox_keep_: threshold must be in [0, 2^32], got {threshold}")
    _key("philox_keep_", seed_lo, seed_hi, step, stream)


_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake(_LIB + "masked_adamw_")
def _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, steps, index_offsets,
                  streams, step_sizes, bc2_sqrts, beta1, beta2, eps, lr_wd, seed_lo, seed_hi,
                  reserve_p, action, paper):
    op = "masked_adamw_"
    n = len(params)
    for name, values in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("masks", masks), ("mask_kinds", mask_kinds), ("steps", steps),
                         ("index_offsets", index_offsets), ("streams", streams),
                         ("step_sizes", step_sizes), ("bc2_sqrts", bc2_sqrts)):
        if len(values) != n:
            raise ValueError(f"{op}: {name} must have {n} entries (one per param), got "
                             f"{len(values)}")
    if not 0 <= action <= 2:
        raise ValueError(f"{op}: action must be 0..2, got {action}")
    _u32(op, "seed_lo", seed_lo)
    _u32(op, "seed_hi", seed_hi)
    if not 0.0 < reserve_p <= 1.0:
        raise ValueError(f"{op}: reserve_p must be in (0, 1], got {reserve_p}")
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"{op}: params must be float32, bfloat16 or float16, got {dtype}")

    def check(name, i, t, want, numel):
        if t.dtype != want:
            raise TypeError(f"{op}: {name}[{i}] must have dtype {want}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name}[{i}] must be on {device} (the device of params[0]), "
                             f"got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] must be contiguous")
        if numel is not None and t.numel() != numel:
            raise ValueError(f"{op}: {name}[{i}] must have {numel} elements (the param's numel), "
                             f"got {t.numel()}")

    for i in range(n):
        check("params", i, params[i], dtype, None)
        numel = params[i].numel()
        check("grads", i, grads[i], dtype, numel)
        check("exp_avgs", i, exp_avgs[i], torch.float32, numel)
        check("exp_avg_sqs", i, exp_avg_sqs[i], torch.float32, numel)
        if not 0 <= mask_kinds[i] <= 2:
            raise ValueError(f"{op}: mask_kinds[{i}] must be 0 (none), 1 (philox) or 2 (bits), "
                             f"got {mask_kinds[i]}")
        _u32(op, f"steps[{i}]", steps[i])
        _u32(op, f"streams[{i}]", streams[i])
        offset = index_offsets[i]
        if not 0 <= offset <= _I64_MAX - numel:
            raise ValueError(f"{op}: index_offsets[{i}] must be in [0, 2^63 - numel] (numel "
                             f"{numel}), got {offset}")
        if mask_kinds[i] == 2:
            check("masks", i, masks[i], torch.int32, None)
            needed = _num_words(offset + numel)
            if masks[i].numel() < needed:
                raise ValueError(f"{op}: masks[{i}] must hold bits index_offsets[i] .. "
                                 f"index_offsets[i] + numel, i.e. >= {needed} int32 words, got "
                                 f"{masks[i].numel()}")


@torch.library.register_fake(_LIB + "masked_adamw_capturable_")
def _masked_adamw_capturable(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, steps,
                             index_offsets, streams, lr, beta1, beta2, eps, weight_decay, seed_lo,
                             seed_hi, reserve_p, action, paper):
    op = "masked_adamw_capturable_"
    n = len(params)
    if len(steps) != n:
        raise ValueError(f"{op}: steps must have {n} entries (one per param), got {len(steps)}")
    # the plain form's checks, with placeholders for its host step scalars
    _masked_adamw(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, [0] * n,
                  index_offsets, streams, [1.0] * n, [1.0] * n, beta1, beta2, eps, 0.0, seed_lo,
                  seed_hi, reserve_p, action, paper)
    if lr.numel() != 1:
        raise ValueError(f"{op}: lr must be a one-element tensor")
    if lr.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: lr must be float32 or float64, got {lr.dtype}")
    if n == 0:
        return
    device = params[0].device
    if lr.device != device:
        raise ValueError(f"{op}: lr must be on {device} (the device of params[0]), got "
                         f"{lr.device}")
    for i, step in enumerate(steps):
        if step.numel() != 1:
            raise ValueError(f"{op}: steps[{i}] must be a one-element tensor")
        if step.dtype != torch.float32:
            raise TypeError(f"{op}: steps[{i}] must be float32 (as torch.optim.AdamW keeps it), "
                            f"got {step.dtype}")
        if step.device != device:
            raise ValueError(f"{op}: steps[{i}] must be on {device} (the device of params[0]), "
                             f"got {step.device}")
