"""One fused masked AdamW step over a list of tensors, dispatched to a backend.

Backends: reference (regdrop_fast/reference/masked_adamw.py), cpu (csrc/masked_adamw.cpp,
OpenMP), cuda (csrc/masked_adamw_cuda.cu) and triton (triton_kernels/masked_adamw.py), both
multi-tensor: one launch per dtype bucket (the CUDA launcher splits very long lists into
launches whose tensor list fits the kernel arguments). "auto" follows
backends.OPS["masked_adamw"]: on CUDA tensors the CUDA kernel, then Triton (measured 4-9x slower
on an H200, so only where the extension lacks CUDA kernels), then the reference.

capturable=True (torch.optim.AdamW's semantics): `steps` are 0-d float32 step tensors and `lr`
may be a 0-d tensor, all on the parameters' device. The reference computes the bias corrections
and the Philox step word from them with torch ops; the CUDA and Triton kernels read them through
pointers (op masked_adamw_capturable_): no host read, so the step can be captured in a CUDA
graph. The CPU C++ op reads the two scalars on the host (a CPU tensor has no device to
synchronize with).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backends
from .._checks import keep_threshold, split_seed
from ..reference import masked_adamw as _ref

OP = "masked_adamw"
IMPLEMENTED = ("reference", "triton", "cpu", "cuda")
ACTION_CODES = {name: code for code, name in enumerate(_ref.ACTIONS)}


def masked_adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                      masks: Sequence[Optional[torch.Tensor]], mask_kinds: Sequence[int],
                      steps: Sequence[int], index_offsets: Sequence[int], streams: Sequence[int],
                      lr, beta1: float, beta2: float, eps: float, weight_decay: float,
                      seed: int, reserve_p: float, action: str, semantics: str,
                      backend: Optional[str] = None, capturable: bool = False) -> None:
    """In-place step of `params`, `exp_avgs`, `exp_avg_sqs` (the arguments of
    reference.masked_adamw.masked_adamw_step). All tensors contiguous, on one device, params
    and grads of one dtype; the optimizer checks its inputs before calling this."""
    if not params:
        return
    device = params[0].device
    name = backends.resolve(OP, backend, device, implemented=IMPLEMENTED)
    if capturable and name != "reference":
        if not isinstance(lr, torch.Tensor):
            lr = torch.full((), lr, dtype=torch.float64, device=device)
        elif lr.dtype not in (torch.float32, torch.float64):
            lr = lr.to(torch.float64)  # the kernels read float32 or float64
    if name == "reference":
        _ref.masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, masks=masks,
                               mask_kinds=mask_kinds, steps=steps, index_offsets=index_offsets,
                               streams=streams, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, seed=seed, reserve_p=reserve_p,
                               action=action, semantics=semantics, upcast=False)
        return
    launch = None
    if capturable:  # the kernels compute the step's scalars from the tensors
        launch = (lr, beta1, beta2, weight_decay)
        step_sizes = bc2_sqrts = None
        lr_wd = 0.0
    else:
        by_step = {t: _ref.step_scalars(semantics, lr, beta1, beta2, t) for t in set(steps)}
        scalars = [by_step[t] for t in steps]  # the parameters of a group share one step count
        step_sizes = [s[0] for s in scalars]
        bc2_sqrts = [s[1] for s in scalars]
        lr_wd = lr * weight_decay
    paper = semantics == "paper"
    code = ACTION_CODES[action]
    if name == "triton":
        from ..triton_kernels import masked_adamw as _tk
        _tk.masked_adamw_step(params, grads, exp_avgs, exp_avg_sqs, masks=masks,
                              mask_kinds=mask_kinds, steps=steps, index_offsets=index_offsets,
                              streams=streams, step_sizes=step_sizes, bc2_sqrts=bc2_sqrts,
                              beta1=beta1, beta2=beta2, eps=eps, lr_wd=lr_wd, seed=seed,
                              threshold=keep_threshold(reserve_p), inv_p=1.0 / reserve_p,
                              action=code, paper=paper, capturable=launch)
        return
    backends.extension()
    empty = params[0].new_empty(0, dtype=torch.int32)
    words = [m if m is not None else empty for m in masks]
    seed_lo, seed_hi = split_seed(seed)
    if capturable:
        torch.ops.regdrop_fast.masked_adamw_capturable_(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), words,
            list(mask_kinds), list(steps), list(index_offsets), list(streams), lr, beta1, beta2,
            eps, weight_decay, seed_lo, seed_hi, reserve_p, code, paper)
        return
    torch.ops.regdrop_fast.masked_adamw_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), words, list(mask_kinds),
        list(steps), list(index_offsets), list(streams), step_sizes, bc2_sqrts, beta1, beta2,
        eps, lr_wd, seed_lo, seed_hi, reserve_p, code, paper)
