"""MaskScoreAdamW's fused step over every score matrix in one launch (issue 18).

Per element, as torch.optim.AdamW on fp32 scores s with fp32 moments m, v (in place): the
gradient is dScore (fp32), or with STE G ⊙ W from G = dW' (the compute dtype) and the frozen W,
rounded as ste_grads rounds dScore; then m and v, and s ← s·decay − step_size·m/(√v/√bc2 + ε);
with WRITE_MASKED also W' = W ⊙ (s_new > φ) in the compute dtype for the next forward. Reads
s, m, v (12 B) and dScore (4 B) or G and W (2 + 4 B for bf16 G, fp32 W); writes s, m, v (12 B)
and W' (2 B in bf16).

Matrix list: `MatrixTable` holds, on the device, an int64 row per matrix (addresses of s, m, v,
W and φ, the element offset of its W' in one flat W' buffer, numel, first program) and the
matrix of each program. Those are facts about where tensors live, not about their values, so
the table is built once per list of storages and reused every step (`MatrixTable.key`). What
changes every step goes in a small second table copied per launch: each matrix's gradient
address (a new tensor every backward) and its step size and √bc2 (its own step count) as fp32.
The addresses become typed pointers in the kernel. One launch per list replaces one per matrix
(72 for BERT-base): a Python launch costs tens of microseconds, the step of a small matrix less.

ALIGNED (every address 16-byte aligned, every numel a multiple of 16, as the caching allocator
and BERT's shapes give): the kernel tells the compiler so, which it cannot infer from a loaded
address and which vectorized (16-byte) loads and stores need.
"""
import array
from functools import reduce
from operator import or_
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .utils import cdiv

BLOCK = 1024  # elements per program
# int64 columns of the static table, one row per matrix: addresses of s, m, v, W, φ; the
# element offset of its W' in the flat buffer; numel; its first program
COLS = 8
OUT_ALIGN = 256  # elements: each W' starts 512-byte aligned in bf16, as an allocation would

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
           torch.float64: tl.float64}


@triton.jit
def score_adamw_multi_kernel(
    table_ptr,  # int64 [matrices, COLS]: see COLS
    program_ptr,  # int32 [programs]: the matrix of each program
    step_ptr,  # int64 [matrices] gradient addresses, then fp32 step sizes and √bc2s
    out_ptr,  # the flat W' buffer in the compute dtype (written when WRITE_MASKED)
    n_matrices,
    decay,  # 1 - lr * weight_decay
    beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
    GRAD_DTYPE: tl.constexpr,  # fp32 dScore, or G's compute dtype when STE
    W_DTYPE: tl.constexpr,  # the frozen weight's dtype (read when STE or WRITE_MASKED)
    STE: tl.constexpr,  # the gradient is G ⊙ W (straight-through), computed here
    WRITE_MASKED: tl.constexpr,  # re-threshold the new scores with φ and write W'
    ALIGNED: tl.constexpr,  # 16-byte aligned addresses, numels multiples of 16
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(program_ptr + pid).to(tl.int64)
    row = table_ptr + i * COLS
    s_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 3).to(tl.pointer_type(W_DTYPE))
    grad_ptr = tl.load(step_ptr + i).to(tl.pointer_type(GRAD_DTYPE))
    n = tl.load(row + 6)
    start = (pid - tl.load(row + 7)) * BLOCK
    if ALIGNED:
        s_ptr = tl.multiple_of(s_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        n = tl.multiple_of(n, 16)
    scalars = (step_ptr + n_matrices).to(tl.pointer_type(tl.float32), bitcast=True) + i
    step_size = tl.load(scalars)
    bc2_sqrt = tl.load(scalars + n_matrices)
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n
    s = tl.load(s_ptr + offs, mask=valid, other=0.0)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0)
    if STE or WRITE_MASKED:
        w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    if STE:
        # rounded as ste_grads_kernel rounds dScore: fp32 G times fp32 W
        g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32) * w.to(tl.float32)
    else:
        g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m1 = beta1 * m + one_minus_beta1 * g
    v1 = beta2 * v + one_minus_beta2 * g * g
    s1 = s * decay - step_size * (m1 / (tl.sqrt(v1) / bc2_sqrt + eps))
    tl.store(s_ptr + offs, s1, mask=valid)
    tl.store(m_ptr + offs, m1, mask=valid)
    tl.store(v_ptr + offs, v1, mask=valid)
    if WRITE_MASKED:
        phi = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
        out = out_ptr + tl.load(row + 5)
        if ALIGNED:
            out = tl.multiple_of(out, 16)
        w_new = tl.where(s1 > phi, w, tl.zeros_like(w)).to(out_ptr.dtype.element_ty)
        tl.store(out + offs, w_new, mask=valid)


def _addresses(tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
    """Their data_ptr()s; a list the kernel does not read (all None) gives zeros."""
    if tensors[0] is None:
        return (0,) * len(tensors)
    return tuple(map(torch.Tensor.data_ptr, tensors))


def table_key(scores, exp_avgs, exp_avg_sqs, weights, phis) -> tuple:
    """What a MatrixTable of these tensors depends on: their addresses and sizes, and the
    weights' dtype (a tensor replaced, or given new storage, changes it; new values do not;
    a weight of another dtype may come back at the same address). weights, phis: all
    tensors (the weights of one dtype), or all None."""
    return (_addresses(scores), _addresses(exp_avgs), _addresses(exp_avg_sqs),
            _addresses(weights), _addresses(phis), tuple(map(torch.Tensor.numel, scores)),
            None if weights[0] is None else weights[0].dtype)


class MatrixTable:
    """The static part of a launch over a list of score matrices (see the module docstring),
    on their device. scores, exp_avgs, exp_avg_sqs: contiguous fp32; weights: contiguous, one
    dtype, or all None where the kernel reads no W (neither STE nor WRITE_MASKED); phis: the
    1-element fp32 thresholds, or all None where it writes no W'. `key` is table_key of them."""

    def __init__(self, scores, exp_avgs, exp_avg_sqs, weights, phis):
        self.key = table_key(scores, exp_avgs, exp_avg_sqs, weights, phis)
        self.device = scores[0].device
        self.weight_dtype = next((w.dtype for w in weights if w is not None), torch.float32)
        self.shapes = [s.shape for s in scores]
        numels = [s.numel() for s in scores]
        self.programs = [cdiv(n, BLOCK) for n in numels]
        self.n_programs = sum(self.programs)
        # W' offsets in the flat buffer: each aligned like a separate allocation
        self.out_offsets, end = [], 0
        for n in numels:
            self.out_offsets.append(end)
            end += cdiv(n, OUT_ALIGN) * OUT_ALIGN
        self.out_numel = end
        # (size, stride, offset) of each W' view: one as_strided call makes it
        self._views = [(s, torch.empty(s, device="meta").stride(), o)
                       for s, o in zip(self.shapes, self.out_offsets)]
        first, rows = 0, []
        for j, n in enumerate(numels):
            rows.append((*(self.key[c][j] for c in range(5)), self.out_offsets[j], n, first))
            first += self.programs[j]
        counts = torch.tensor(self.programs, dtype=torch.int64)
        program_matrix = torch.repeat_interleave(torch.arange(len(numels)), counts)
        self.table = _to_device(torch.tensor(rows, dtype=torch.int64), self.device)
        self.program_matrix = _to_device(program_matrix.to(torch.int32), self.device)
        # every address and numel of the key a multiple of 16
        self.aligned = reduce(or_, (reduce(or_, column, 0) for column in self.key[:6]),
                              0) % 16 == 0

    def out_views(self, out: torch.Tensor) -> list:
        """Each matrix's W' [shape] inside the flat buffer `out` of out_numel elements."""
        return [out.as_strided(*view) for view in self._views]


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    # from pinned memory: the copy is queued behind the step's other work, no host wait
    return t.pin_memory().to(device, non_blocking=True)


def score_adamw_multi(table: MatrixTable, grads, step_sizes, bc2_sqrts, out, *, decay, beta1,
                      beta2, eps, ste):
    """One AdamW step of every matrix of `table`, in place. grads: per matrix, contiguous
    dScore (fp32), or with `ste` G = dW' (one float dtype), the gradient then G ⊙ weight.
    step_sizes, bc2_sqrts: per matrix lr / bc1 and √bc2 (rounded to fp32 here). out: None, or a
    contiguous flat buffer of table.out_numel elements in the compute dtype that receives
    weight ⊙ (new scores > phi) at table.out_offsets."""
    if table.n_programs == 0:
        return
    count = len(grads)
    grad_addresses = _addresses(grads)
    # gradient addresses, then the step scalars rounded to fp32 as a float launch argument is
    # (a C cast: round to nearest, inf past the range): one small copy per step
    scalars = array.array("f", (*step_sizes, *bc2_sqrts))
    step = torch.frombuffer(bytearray(array.array("q", grad_addresses).tobytes()
                                      + scalars.tobytes()), dtype=torch.int64)
    step = _to_device(step, table.device)
    write = out is not None
    aligned = table.aligned and (
        reduce(or_, grad_addresses, out.data_ptr() if write else 0) % 16 == 0)
    weight_dtype = table.weight_dtype if (ste or write) else torch.float32
    score_adamw_multi_kernel[(table.n_programs,)](
        table.table, table.program_matrix, step, out if write else table.table, count, decay,
        beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, GRAD_DTYPE=_DTYPES[grads[0].dtype],
        W_DTYPE=_DTYPES[weight_dtype], STE=ste, WRITE_MASKED=write, ALIGNED=aligned,
        BLOCK=BLOCK, COLS=COLS, num_warps=4)
