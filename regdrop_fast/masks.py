"""Bit-packed masks: `PackedMask`, `pack_mask`, `unpack_mask`, `mask_density`.

A PackedMask holds int32 words [..., ceil(n/32)] for a bool mask of `shape` [..., n]; bit j of
word w is element 32*w + j, 1 = keep (../shared/DESIGN.md). One bit per element: 1/8 of a bool
mask, 1/32 of a float mask.

A PackedMask is immutable (a frozen dataclass, checked once at construction): kernels index its
words by its shape, so the two cannot be reassigned apart. The padding bits of a row's last
word (past n) are ignored: unpack drops them and mask_density does not count them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import backends
from ._checks import check_tensor
from .reference import masks as _ref

__all__ = ["PackedMask", "pack_mask", "unpack_mask", "mask_density", "num_words"]

num_words = _ref.num_words


@dataclass(frozen=True)
class PackedMask:
    words: torch.Tensor  # int32 [*shape[:-1], ceil(shape[-1] / 32)]
    shape: torch.Size  # logical shape of the bool mask
    _popcount: Optional[int] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        check_tensor("words", self.words, dtypes=(torch.int32,))
        if len(self.shape) == 0:
            raise ValueError("shape must have at least one dimension, got a 0-d shape")
        expected = tuple(self.shape[:-1]) + (num_words(self.shape[-1]),)
        if tuple(self.words.shape) != expected:
            raise ValueError(f"words must have shape {expected} for a mask of shape "
                             f"{tuple(self.shape)}, got {tuple(self.words.shape)}")

    @classmethod
    def _unchecked(cls, words: torch.Tensor, shape: torch.Size) -> "PackedMask":
        """A PackedMask of int32 words an op has just produced for `shape`: the constructor's
        checks skipped (microseconds per mask on a training step's host path)."""
        mask = object.__new__(cls)
        object.__setattr__(mask, "words", words)
        object.__setattr__(mask, "shape", shape)
        object.__setattr__(mask, "_popcount", None)
        return mask

    @property
    def device(self) -> torch.device:
        return self.words.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def density(self) -> float:
        """Fraction of kept (1) elements."""
        return mask_density(self)

    def unpack(self, backend: Optional[str] = None) -> torch.Tensor:
        return unpack_mask(self, backend=backend)

    def to(self, device) -> "PackedMask":
        return PackedMask(self.words.to(device), self.shape, self._popcount)

    def clone(self) -> "PackedMask":
        return PackedMask(self.words.clone(), self.shape, self._popcount)

    def nbytes(self) -> int:
        return self.words.numel() * self.words.element_size()


def _rows(shape) -> int:
    rows = 1
    for size in shape[:-1]:
        rows *= int(size)
    return rows


def pack_mask(mask: torch.Tensor, backend: Optional[str] = None) -> PackedMask:
    """Pack a bool tensor (at least 1-d, any strides) along its last dimension."""
    check_tensor("mask", mask, dtypes=(torch.bool,))
    if mask.dim() == 0:
        raise ValueError("mask must have at least one dimension, got a 0-d tensor")
    shape = mask.shape
    n = shape[-1]
    name = backends.resolve("pack_mask", backend, mask.device)
    if name == "reference":
        words = _ref.pack_bits(mask)
    else:
        flat = mask.contiguous().view(_rows(shape), n)
        if name == "triton":
            from .triton_kernels import masks as _tk
            words2d = _tk.pack_bits(flat)
        else:
            backends.extension()
            words2d = torch.ops.regdrop_fast.pack_mask(flat)
        words = words2d.view(*shape[:-1], num_words(n))
    return PackedMask(words, shape)


def unpack_mask(packed: PackedMask, backend: Optional[str] = None) -> torch.Tensor:
    """The bool tensor of `packed.shape`."""
    if not isinstance(packed, PackedMask):
        raise TypeError(f"packed must be a PackedMask, got {type(packed).__name__}")
    shape = packed.shape
    n = shape[-1]
    name = backends.resolve("unpack_mask", backend, packed.device)
    if name == "reference":
        return _ref.unpack_bits(packed.words, n)
    words2d = packed.words.contiguous().view(_rows(shape), num_words(n))
    if name == "triton":
        from .triton_kernels import masks as _tk
        flat = _tk.unpack_bits(words2d, n)
    else:
        backends.extension()
        flat = torch.ops.regdrop_fast.unpack_mask(words2d, n)
    return flat.view(shape)


def _valid_words(packed: PackedMask) -> torch.Tensor:
    """The words with the padding bits of each row's last word cleared."""
    tail = packed.shape[-1] % 32
    if tail == 0:
        return packed.words
    words = packed.words.clone()
    words[..., -1] &= (1 << tail) - 1
    return words


def mask_density(packed: PackedMask, backend: Optional[str] = None) -> float:
    """Fraction of kept elements: popcount of the mask's bits / numel (0.0 for an empty mask);
    padding bits past the last element of a row do not count."""
    if not isinstance(packed, PackedMask):
        raise TypeError(f"packed must be a PackedMask, got {type(packed).__name__}")
    if packed.numel() == 0:
        return 0.0
    if packed._popcount is None:
        name = backends.resolve("mask_popcount", backend, packed.device,
                                implemented=("reference", "cpu", "cuda"))
        words = _valid_words(packed)
        if name == "reference":
            count = _ref.popcount(words)
        else:
            backends.extension()
            count = int(torch.ops.regdrop_fast.mask_popcount(words.contiguous()))
        object.__setattr__(packed, "_popcount", count)  # a cache: the words do not change
    return packed._popcount / packed.numel()
