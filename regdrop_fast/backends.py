"""Backend dispatch: which implementation runs an op for the tensors at hand.

Backends (../shared/DESIGN.md, "Layers"):
  reference  pure PyTorch, always available, the ground truth
  triton     Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set
             before triton was imported (the interpreter: correctness, not speed)
  cuda       the csrc CUDA kernels of regdrop_fast._C, CUDA tensors
  cpu        the csrc C++ kernels of regdrop_fast._C, CPU tensors

Choice per call: the `backend=` argument, else the REGDROP_FAST_BACKEND environment variable,
else "auto". A backend named explicitly that cannot run raises BackendUnavailableError with the
reason; "auto" picks the fastest one that can run and logs its fallback once per (op, reason).

OPS is the one dispatch table: per op, the backends that implement it, the "auto" order per
device type and the dtypes each backend computes. A new op adds its row here and calls
`resolve(op, backend, device, dtype, arg=...)` once per call.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from . import _extension

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "OPS",
    "OpInfo",
    "BackendUnavailableError",
    "available",
    "resolve",
    "unavailable_reason",
    "extension",
    "triton_kernels",
]

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "REGDROP_FAST_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# what the fp32-accumulating kernels take; float64 is the reference's alone
_KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class OpInfo:
    """One row of the dispatch table.

    implemented: the backends that have the op.
    auto: device type -> the order "auto" tries (only implemented backends are tried).
    dtypes: backend -> the input dtypes it computes; a backend not named takes every dtype the
        op's own checks accept. "auto" skips a backend that cannot take the dtype; naming it
        raises TypeError.
    """
    implemented: Tuple[str, ...] = BACKENDS
    auto: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(_AUTO_ORDER))
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = field(default_factory=dict)


_TRITON_ONLY_FLOATS = {"triton": _KERNEL_FLOATS}
OPS: Dict[str, OpInfo] = {
    "philox_words": OpInfo(),
    "bernoulli_keep": OpInfo(),
    "pack_mask": OpInfo(),
    "unpack_mask": OpInfo(),
    "mask_popcount": OpInfo(implemented=("reference", "cpu", "cuda")),
    "addrop_keep_mask": OpInfo(implemented=("reference", "triton")),
    # "cpu": the extension's C++ Philox and packing, composed (mask.py)
    "addrop_random_mask": OpInfo(implemented=("reference", "triton", "cpu")),
    "masked_attention": OpInfo(implemented=("reference", "triton")),
    "masked_linear": OpInfo(implemented=("reference", "triton")),
    # MaskScoreAdamW's step: "reference" is torch's AdamW on dScore, "triton" the fused kernel
    "mask_score_adamw": OpInfo(implemented=("reference", "triton")),
    "rdrop_loss": OpInfo(implemented=("reference", "triton"), dtypes=_TRITON_ONLY_FLOATS),
    "fused_linear_rdrop_loss": OpInfo(implemented=("reference", "triton"),
                                      dtypes=_TRITON_ONLY_FLOATS),
    # the CUDA multi-tensor kernel first: the Triton step measured 4-9x slower on an H200
    "masked_adamw": OpInfo(auto={"cuda": ("cuda", "triton", "reference"),
                                 "cpu": ("cpu", "reference")}),
}
_UNLISTED = OpInfo()
_log = logging.getLogger("regdrop_fast")
_logged_fallbacks: set = set()

BUILD_HINT = _extension.BUILD_HINT


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"triton cannot be imported ({exc!r}); pip install 'triton>=3.4'"
    return None


@functools.lru_cache(maxsize=None)
def _extension_and_error():
    # the installed regdrop_fast._C, else torch's JIT build of csrc (cached), else the reason
    return _extension.load()


def extension():
    """The compiled extension module, or raise BackendUnavailableError saying how to build it."""
    module, error = _extension_and_error()
    if module is None:
        raise BackendUnavailableError(error)
    return module


@functools.lru_cache(maxsize=None)
def triton_kernels(name: str):
    """The kernel module regdrop_fast.triton_kernels.<name>, imported on first use (it imports
    triton, which is optional); cached, so an op's hot path pays a lookup, not an import."""
    return importlib.import_module(f"{__package__}.triton_kernels.{name}")


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None if `name` can run tensors on `device` (any device if None), else the reason."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    if device is None:
        dev_type = None
    else:
        dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if name == "reference":
        return None
    if name == "triton":
        return _triton_reason(dev_type, interpreter_enabled(), _triton_import_error())
    return _extension_reason(name, dev_type, _extension_and_error())


# The verdicts depend only on their arguments (the import results are cached, so clearing
# those caches gives a new verdict) and on whether CUDA is present: one lookup per call
# instead of the checks (an op calls unavailable_reason once per call, on its host path).
@functools.lru_cache(maxsize=None)
def _triton_reason(dev_type: Optional[str], interpreter: bool,
                   import_error: Optional[str]) -> Optional[str]:
    if import_error:
        return import_error
    if dev_type == "cpu" and not interpreter:
        return ("triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported")
    if dev_type is None and not (interpreter or torch.cuda.is_available()):
        return "no CUDA device and TRITON_INTERPRET is not 1"
    if dev_type not in (None, "cpu", "cuda"):
        return f"triton backend does not run {dev_type} tensors"
    return None


@functools.lru_cache(maxsize=None)
def _extension_reason(name: str, dev_type: Optional[str],
                      extension_and_error: tuple) -> Optional[str]:
    module, err = extension_and_error
    if module is None:
        return err
    if name == "cpu":
        if dev_type not in (None, "cpu"):
            return f"the cpu backend runs CPU tensors, got {dev_type} tensors"
        return None
    # name == "cuda"
    if not module.compiled_with_cuda():
        return ("regdrop_fast._C was built without CUDA kernels (needs a CUDA build of torch and "
                "nvcc at build time); rebuild on a CUDA machine: " + BUILD_HINT)
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if dev_type not in (None, "cuda"):
        return f"the cuda backend runs CUDA tensors, got {dev_type} tensors"
    return None


def available(device: Optional[torch.device] = None) -> list:
    """Names of the backends that can run now (for tensors on `device`, if given)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve(op: str, backend: Optional[str], device: torch.device,
            dtype: Optional[torch.dtype] = None, *, arg: str = "input",
            implemented: Optional[Sequence[str]] = None) -> str:
    """The backend that runs `op` on tensors of `device` (and `dtype`, when given).

    The op's row of OPS says what it implements, its auto order and dtype limits; `implemented`
    narrows that for one call. Precedence: `backend` argument, then the REGDROP_FAST_BACKEND
    environment variable, then auto. `arg` names the caller's tensor in dtype errors.
    """
    info = OPS.get(op, _UNLISTED)
    have = (info.implemented if implemented is None
            else tuple(name for name in info.implemented if name in implemented))
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if requested != "auto":  # the common case skips the normalization (a per-call cost)
        requested = requested.strip().lower()
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(
                f"backend must be one of {BACKENDS} or 'auto', got {requested!r}"
                + ("" if backend is not None else f" (from ${ENV_VAR})"))
        if requested not in have:
            raise BackendUnavailableError(
                f"{op} has no {requested!r} backend; it implements {have}")
        if dtype is not None and dtype not in info.dtypes.get(requested, (dtype,)):
            source = "the backend argument" if backend is not None else f"${ENV_VAR}"
            raise TypeError(
                f"{op}: {arg} is {dtype}, which the {requested!r} backend (named by {source}) "
                f"does not compute; it takes {[str(d) for d in info.dtypes[requested]]}"
                + ("" if "reference" not in have else "; the reference backend takes it"))
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {reason}")
        return requested
    order = info.auto.get(device.type, ("reference",))
    skipped = []
    for name in order:
        if name not in have:
            continue
        if dtype is not None and dtype not in info.dtypes.get(name, (dtype,)):
            continue  # by design (e.g. float64 on the reference), not worth a log line
        reason = None if name == "reference" else unavailable_reason(name, device)
        if reason is None:
            if skipped:
                _log_fallback_once(op, name, skipped)
            return name
        skipped.append((name, reason))
    raise BackendUnavailableError(f"{op}: no backend can run {device.type} tensors: {skipped}")


def _log_fallback_once(op: str, chosen: str, skipped: Iterable) -> None:
    key = (op, chosen, tuple(skipped))
    if key in _logged_fallbacks:
        return
    _logged_fallbacks.add(key)
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    _log.warning("regdrop_fast: %s runs on the %r backend (%s)", op, chosen, why)
