"""R-Drop loss in Triton: CE of both passes + symmetric KL, loss and both gradients in one call.

Per row r (V classes, label y, P_i = softmax(z_i), D = z1 - z2, a = alpha / 2):
    E1 = E_P1[D],  E2 = E_P2[-D]                      (then KL12 + KL21 = E1 + E2)
    CE_r = ce * (lse1 - z1[y] + lse2 - z2[y]),  KL_r = E1 + E2,  loss_r = CE_r + a * KL_r
    dL/dz1 = w_ce * ce * (P1 - onehot(y)) + w_kl * a * ((P1 - P2) + P1 * (D - E1))
    dL/dz2 = w_ce * ce * (P2 - onehot(y)) + w_kl * a * ((P2 - P1) + P2 * (-D - E2))
(the REFERENCE.md form P1 * (logP1 - logP2 - KL12) with the lse terms cancelled: D - E1 needs no
lse, so logits of 1e4 lose no digits to cancellation against lse). The per-row gradient weights
w_ce, w_kl are 1/n_valid for a "mean" term (MEAN_CE, MEAN_KL), 1 for a summed one, on rows that
count, and 0 on rows labelled ignore_index. n_valid (at least 1) is counted by every program
from the labels (`count_labels`: the whole batch, also when the call covers a chunk of it), so
no host-side reduction precedes the launch.

One launch per call, no host sync: each program adds up its rows' CE and KL terms, stores them
in `partial`, and counts itself done with an atomic; the last program sums the partials in a
fixed order (deterministic), writes the loss and out = (mean (CE1 + CE2) / 2, mean (KL12 +
KL21) / 2, CE sum, KL sum) and re-arms the counter, so a training step with this call can be
captured in a CUDA graph.

rdrop_fwd_kernel, a program per tile of BLOCK_N rows, or a persistent grid of fewer programs
looping over the tiles when rows are re-read (see `_programs`). Pass 1 runs online over
V blocks: running max m, s = sum exp(z - m) and t = sum exp(z - m) * D for both logits (fp32;
exponentials as exp2((z - m) * log2 e), the logarithm of lse as log2(s) * ln 2).
Pass 2 (NEED_GRAD) walks the row again and writes both gradients in the gradient dtype; when V
fits one block (ONE_BLOCK) it reuses the registers of pass 1, otherwise it re-reads the row
(mostly from L2 on a GPU). Bytes: 2 reads + 2 writes per element of [N, V] in the logits' dtype
(+ a re-read of both when V > one block), the labels once per program for the count (from L2),
4 B/row of fp32 row losses for reduction "none", nothing [N, V] in fp32. The gradient buffers
may alias the logits (the fused-linear form overwrites its chunk of logits).

rdrop_scale_grads_kernel, grid (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): the backward. Multiplies the
saved gradients in place by grad_output (a scalar, or one value per row); a tile whose
grad_output is exactly 1 (the usual `loss.backward()`) is skipped on the device, so the common
backward moves no [N, V] bytes and needs no host sync.

Non-finite logits are not checked here (that needs a host sync: see `check_finite` in
regdrop_fast.rdrop): a row with +-inf or NaN gets a NaN loss and NaN gradients, never a finite
wrong value. A label outside [0, V) that is not ignore_index also gives that row a NaN loss and
NaN gradients (the label is never used as an address).
"""
import functools

import torch
import triton
import triton.language as tl

from .utils import calculate_settings, cdiv, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): the hardware ex2
LN2 = tl.constexpr(0.6931471805599453)
# columns of one block: a row this long stays in registers between the passes (bf16 and fp32
# at 16 warps: <= 127 registers, no spill on sm_90; 16384 spills even at 32 warps)
MAX_BLOCK_V = 8192
MAX_ROW_TILE = 1024  # rows * columns of one program's tile when V is small
MAX_TILE = 4096  # elements of one program's tile in the scaling kernel
ACC_PARTIAL = tl.constexpr(4)  # offset of the per-program partial sums in the fp32 acc buffer


@triton.jit
def _load_pair(z1_row, z2_row, rows_c, cols, n_cols):
    """A [BLOCK_N, BLOCK_V] block of both logits in fp32 (-inf past V) and D = z1 - z2 (0 past
    V, computed from the zero-filled loads so no inf - inf is ever formed)."""
    mask = (rows_c[:, None] >= 0) & (cols[None, :] < n_cols)
    r1 = tl.load(z1_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r2 = tl.load(z2_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.where(mask, r1, float("-inf"))
    x2 = tl.where(mask, r2, float("-inf"))
    return x1, x2, r1 - r2


@triton.jit
def _online_update(m, s, t, x, d):
    """Fold a block into the running (max, sum exp, sum exp * d) of each row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    e = tl.exp2((x - m_new[:, None]) * LOG2E)
    c = tl.exp2((m - m_new) * LOG2E)
    return m_new, s * c + tl.sum(e, axis=1), t * c + tl.sum(e * d, axis=1)


@triton.jit
def _grad_block(x1, x2, d, cols, m1, inv_s1, m2, inv_s2, e1, e2, y, w_ce, w_kl,
                HAS_CE: tl.constexpr):
    """Both gradient tiles of a block (fp32): the KL part weighted per row by w_kl (alpha/2
    included), the CE part by w_ce."""
    p1 = tl.exp2((x1 - m1[:, None]) * LOG2E) * inv_s1[:, None]
    p2 = tl.exp2((x2 - m2[:, None]) * LOG2E) * inv_s2[:, None]
    g1 = w_kl[:, None] * ((p1 - p2) + p1 * (d - e1[:, None]))
    g2 = w_kl[:, None] * ((p2 - p1) - p2 * (d + e2[:, None]))
    if HAS_CE:
        hit = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        g1 += w_ce[:, None] * (p1 - hit)
        g2 += w_ce[:, None] * (p2 - hit)
    return g1, g2


@triton.jit
def _count_rows(count_ptr, n_count, ignore_index, HAS_LABELS: tl.constexpr,
                BLOCK_COUNT: tl.constexpr):
    """1 / max(#labels != ignore_index, 1) over the n_count labels at count_ptr (all rows
    without labels)."""
    if HAS_LABELS:
        total = tl.zeros([BLOCK_COUNT], dtype=tl.int32)
        for start in range(0, n_count, BLOCK_COUNT):
            idx = start + tl.arange(0, BLOCK_COUNT)
            y = tl.load(count_ptr + idx, mask=idx < n_count, other=ignore_index)
            total += (y != ignore_index).to(tl.int32)
        count = tl.sum(total, axis=0)
    else:
        count = n_count
    return 1.0 / tl.maximum(count, 1).to(tl.float32)


@triton.jit
def rdrop_fwd_kernel(
    z1_ptr, z2_ptr,  # logits [N, V], last-dim stride 1
    g1_ptr, g2_ptr,  # gradient outputs [N, V] (may alias z1_ptr / z2_ptr)
    labels_ptr,  # int32/int64 [N] (unused without HAS_LABELS)
    count_ptr,  # int32/int64 [n_count]: the labels whose count normalizes "mean" terms
    rows_ptr,  # fp32 [N]: per-row loss CE_r + a * KL_r, 0 on ignored rows (ROW_LOSS only)
    done_ptr,  # int32 [1]: programs finished; 0 before the launch, re-armed to 0 after
    loss_ptr,  # fp32 [1]: the reduced loss
    acc_ptr,  # fp32 [ACC_PARTIAL + 2 * programs]: out = mean (CE1 + CE2) / 2, mean (KL12 +
    # KL21) / 2, CE sum, KL sum, then from ACC_PARTIAL each program's CE and KL sums (one
    # buffer: one allocation per call)
    z1_stride, z2_stride, g1_stride, g2_stride,  # row strides in elements
    n_rows, n_cols,  # N, V
    n_count,  # labels at count_ptr (rows of the whole batch)
    alpha_half,  # alpha / 2
    ignore_index,  # label of rows that count for nothing
    HAS_LABELS: tl.constexpr,  # labels given: CE targets and ignore_index
    HAS_CE: tl.constexpr,  # add the two cross-entropy terms
    NEED_GRAD: tl.constexpr,  # write the gradients (pass 2)
    MEAN_CE: tl.constexpr,  # the CE terms are divided by n_valid (else summed)
    MEAN_KL: tl.constexpr,  # the KL term is divided by n_valid (else summed)
    ROW_LOSS: tl.constexpr,  # store the per-row losses (reduction "none")
    ONE_BLOCK: tl.constexpr,  # V <= BLOCK_V: the whole row stays in registers
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_V: tl.constexpr,  # columns per block
    BLOCK_COUNT: tl.constexpr,  # labels per step of the count
    PROGRAMS_P2: tl.constexpr,  # next power of two >= the number of programs
):
    inv_count = _count_rows(count_ptr, n_count, ignore_index, HAS_LABELS, BLOCK_COUNT)
    scale_ce = inv_count if MEAN_CE else 1.0
    scale_kl = inv_count if MEAN_KL else 1.0
    cols0 = tl.arange(0, BLOCK_V)
    ce_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # persistent over row tiles: the launcher may give fewer programs than tiles, so that the
    # rows in flight (re-read in pass 2) stay within L2
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
        rows = tl.arange(0, BLOCK_N).to(tl.int64) + tile * BLOCK_N  # int64 before stride math
        row_ok = rows < n_rows
        rows_c = tl.minimum(rows, n_rows - 1)  # tail rows read a real row, never store
        z1_row = z1_ptr + rows_c * z1_stride
        z2_row = z2_ptr + rows_c * z2_stride

        if HAS_LABELS:
            y = tl.load(labels_ptr + rows_c).to(tl.int64)
            valid = row_ok & (y != ignore_index)
        else:
            y = tl.zeros([BLOCK_N], dtype=tl.int64)
            valid = row_ok
        label_ok = (y >= 0) & (y < n_cols)
        bad = valid & ((y < 0) | (y >= n_cols))  # only meaningful with HAS_CE

        m1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
        m2 = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        t1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        t2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        if ONE_BLOCK:
            x1, x2, d = _load_pair(z1_row, z2_row, rows_c, cols0, n_cols)
            m1, s1, t1 = _online_update(m1, s1, t1, x1, d)
            m2, s2, t2 = _online_update(m2, s2, t2, x2, -d)
        else:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + cols0
                x1, x2, d = _load_pair(z1_row, z2_row, rows_c, cols, n_cols)
                m1, s1, t1 = _online_update(m1, s1, t1, x1, d)
                m2, s2, t2 = _online_update(m2, s2, t2, x2, -d)

        inv_s1 = 1.0 / s1
        inv_s2 = 1.0 / s2
        e1 = t1 * inv_s1  # E_P1[z1 - z2]
        e2 = t2 * inv_s2  # E_P2[z2 - z1]
        kl_row = tl.where(valid, e1 + e2, 0.0)
        if HAS_CE:
            take = valid & label_ok
            zy1 = tl.load(z1_row + y, mask=take, other=0.0).to(tl.float32)
            zy2 = tl.load(z2_row + y, mask=take, other=0.0).to(tl.float32)
            ce_row = (m1 - zy1 + tl.log2(s1) * LN2) + (m2 - zy2 + tl.log2(s2) * LN2)
            ce_row = tl.where(bad, float("nan"), tl.where(valid, ce_row, 0.0))
        else:
            ce_row = tl.zeros([BLOCK_N], dtype=tl.float32)
        ce_acc += tl.where(row_ok, ce_row, 0.0)
        kl_acc += tl.where(row_ok, kl_row, 0.0)
        if ROW_LOSS:
            tl.store(rows_ptr + rows, ce_row + alpha_half * kl_row, mask=row_ok)

        if NEED_GRAD:
            w_ce = tl.where(valid, scale_ce, 0.0)
            w_kl = tl.where(valid, scale_kl, 0.0) * alpha_half
            if HAS_CE:
                w_ce = tl.where(bad, float("nan"), w_ce)
            g1_row = g1_ptr + rows * g1_stride
            g2_row = g2_ptr + rows * g2_stride
            if ONE_BLOCK:
                g1, g2 = _grad_block(x1, x2, d, cols0, m1, inv_s1, m2, inv_s2, e1, e2, y, w_ce,
                                     w_kl, HAS_CE)
                smask = row_ok[:, None] & (cols0[None, :] < n_cols)
                tl.store(g1_row[:, None] + cols0[None, :], g1.to(g1_ptr.dtype.element_ty),
                         mask=smask)
                tl.store(g2_row[:, None] + cols0[None, :], g2.to(g2_ptr.dtype.element_ty),
                         mask=smask)
            else:
                for start in range(0, n_cols, BLOCK_V):
                    cols = start + cols0
                    x1, x2, d = _load_pair(z1_row, z2_row, rows_c, cols, n_cols)
                    g1, g2 = _grad_block(x1, x2, d, cols, m1, inv_s1, m2, inv_s2, e1, e2, y,
                                         w_ce, w_kl, HAS_CE)
                    smask = row_ok[:, None] & (cols[None, :] < n_cols)
                    tl.store(g1_row[:, None] + cols[None, :], g1.to(g1_ptr.dtype.element_ty),
                             mask=smask)
                    tl.store(g2_row[:, None] + cols[None, :], g2.to(g2_ptr.dtype.element_ty),
                             mask=smask)

    out_ptr = acc_ptr
    partial_ptr = acc_ptr + ACC_PARTIAL
    pid = tl.program_id(0)
    tl.store(partial_ptr + 2 * pid, tl.sum(ce_acc, axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(kl_acc, axis=0))
    # acq_rel: this program's partials are visible to whichever program counts last
    finished = tl.atomic_add(done_ptr, 1)
    if finished == tl.num_programs(0) - 1:
        idx = tl.arange(0, PROGRAMS_P2)
        here = idx < tl.num_programs(0)
        ce_sum = tl.sum(tl.load(partial_ptr + 2 * idx, mask=here, other=0.0, volatile=True),
                        axis=0)
        kl_sum = tl.sum(tl.load(partial_ptr + 2 * idx + 1, mask=here, other=0.0,
                                volatile=True), axis=0)
        tl.store(loss_ptr, ce_sum * scale_ce + alpha_half * kl_sum * scale_kl)
        tl.store(out_ptr, 0.5 * ce_sum * inv_count)
        tl.store(out_ptr + 1, 0.5 * kl_sum * inv_count)
        tl.store(out_ptr + 2, ce_sum)
        tl.store(out_ptr + 3, kl_sum)
        tl.atomic_xchg(done_ptr, 0)  # re-armed for the next launch on this stream


@triton.jit
def rdrop_scale_grads_kernel(
    g1_ptr, g2_ptr,  # saved gradients [N, V], scaled in place
    go_ptr,  # grad_output: one fp value ([] or [N])
    g1_stride, g2_stride,  # row strides
    go_stride,  # 0 for a scalar grad_output, else its row stride
    n_rows, n_cols,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    go = tl.load(go_ptr + rows * go_stride, mask=row_ok, other=1.0).to(tl.float32)
    if tl.max(tl.where(go != 1.0, 1, 0), axis=0) > 0:
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        p1 = g1_ptr + rows[:, None] * g1_stride + cols[None, :]
        p2 = g2_ptr + rows[:, None] * g2_stride + cols[None, :]
        a = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (a * go[:, None]).to(g1_ptr.dtype.element_ty), mask=mask)
        b = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p2, (b * go[:, None]).to(g2_ptr.dtype.element_ty), mask=mask)


def _tile(n_rows: int, n_cols: int, block_v=None, block_n=None):
    """(BLOCK_N, BLOCK_V, num_warps). Small-V rows are packed BLOCK_N to a program (tile up to
    MAX_ROW_TILE elements) while keeping >= ~512 programs; long rows get one program each.
    num_warps: the kernel keeps ~6 fp32 values live per element, so it takes more warps than
    calculate_settings gives a one-tensor kernel: 8 elements per thread for a single row (16 at
    8192), 2 for a multi-row tile (per-row state adds up there), 16 warps at most. With these,
    ptxas for sm_90 reports 26-127 registers and no spills over V in 2..151936 (bf16 and
    fp32). block_v/block_n override the choice (powers of two; tests use them to reach every
    code path)."""
    if block_v is None:
        block_v = calculate_settings(n_cols, MAX_BLOCK_V)[0]
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if block_n is None:
        block_n = max(1, min(MAX_ROW_TILE // block_v,
                             next_power_of_2(cdiv(n_rows, 512))))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if block_n == 1:
        num_warps = min(16, max(1, block_v // 256))
    else:
        num_warps = min(16, max(1, block_n * block_v // 64))
    return block_n, block_v, num_warps


def _device_caps(device):
    """(SM count, L2 bytes) of a CUDA device; an H100's on meta (the sm_90 check's dry run
    records the grid, and so PROGRAMS_P2, a GPU launch has); (4, 4 MiB) on the CPU (the
    interpreter: a small persistent grid, so its tests run several tiles per program)."""
    if device.type == "meta":
        return 132, 50 << 20
    if device.type != "cuda":
        return 4, 4 << 20
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def _programs(n_tiles, n_cols, block_v, elem_bytes, device, programs=None):
    """Programs of the forward grid. One per tile when the row stays on chip; when pass 2
    re-reads it (V > BLOCK_V), a persistent grid: as many programs as keep the row pairs in
    flight within half of L2, but at least one per SM (the hardware would otherwise run several
    tiles per SM at once and evict each row before its re-read)."""
    if programs is not None:
        return max(1, min(programs, n_tiles))
    if n_cols <= block_v:
        return n_tiles
    sms, l2_bytes = _device_caps(device)
    fit = l2_bytes // 2 // (2 * n_cols * elem_bytes)
    return max(1, min(n_tiles, max(sms, fit)))


_done_counters = {}


def _done_counter(device):
    """The int32 counter of rdrop_fwd_kernel for the current stream of `device`: zero at rest
    (every launch re-arms it), so no memset precedes a launch; one per stream, since launches
    on two streams may overlap. One made during a CUDA graph capture is that launch's alone:
    its zeroing is captured, not run, so it is zero only once that graph has replayed (another
    graph captured on the stream, or an eager launch, would start from uninitialized memory)."""
    # the raw stream handle: torch.cuda.current_stream() builds a Stream object per call
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    counter = _done_counters.get(key)
    if counter is None:
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        if not _capturing(device):
            _done_counters[key] = counter
    return counter


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=1024)
def _forward_plan(n_rows, n_cols, elem_bytes, device, block_v, block_n, programs, has_labels,
                  ce, need_grad, mean_ce, mean_kl, row_loss):
    """(grid size, the keywords of rdrop_fwd_kernel.run: grid, constexprs, num_warps): a
    function of the shape, dtype size, device and flags alone, so computed once per key."""
    block_n, block_v, num_warps = _tile(n_rows, n_cols, block_v, block_n)
    grid = _programs(cdiv(n_rows, block_n), n_cols, block_v, elem_bytes, device, programs)
    return grid, dict(
        grid=(grid,), warmup=False, HAS_LABELS=has_labels, HAS_CE=ce and has_labels,
        NEED_GRAD=need_grad, MEAN_CE=mean_ce, MEAN_KL=mean_kl, ROW_LOSS=row_loss,
        ONE_BLOCK=n_cols <= block_v, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_COUNT=1024,
        PROGRAMS_P2=next_power_of_2(grid), num_warps=num_warps)


def launch_forward(z1, z2, labels, alpha, ignore_index, ce, need_grad, *, mean_ce=True,
                   mean_kl=True, row_loss=False, count_labels=None, n_count=None, g1=None,
                   g2=None, block_v=None, block_n=None, programs=None):
    """`rdrop_forward` returning the fp32 buffer it reduces into: (loss, acc, rows, g1, g2),
    with out at acc[:4]; callers take the views they need."""
    n_rows, n_cols = z1.shape
    device = z1.device
    has_labels = labels is not None
    if count_labels is None:
        count_labels = labels
    if n_count is None:
        n_count = count_labels.numel() if has_labels else n_rows
    grid, launch = _forward_plan(n_rows, n_cols, z1.element_size(), device, block_v, block_n,
                                 programs, has_labels, bool(ce), bool(need_grad),
                                 bool(mean_ce), bool(mean_kl), bool(row_loss))
    # size=(): a positional () takes a slower path through torch's argument parser
    loss = torch.empty(size=(), dtype=torch.float32, device=device)
    acc = torch.empty(ACC_PARTIAL.value + 2 * grid, dtype=torch.float32, device=device)
    rows = torch.empty(n_rows, dtype=torch.float32, device=device) if row_loss else None
    if need_grad:
        if g1 is None:
            g1 = torch.empty_like(z1)
        if g2 is None:
            g2 = torch.empty_like(z2)
    else:
        g1 = g2 = None
    done = _done_counter(device)
    try:
        # .run(grid=, warmup=False) is what kernel[grid](...) calls, without its per-call lambda
        rdrop_fwd_kernel.run(
            z1, z2, z1 if g1 is None else g1, z2 if g2 is None else g2,
            labels if has_labels else acc, count_labels if has_labels else acc,
            acc if rows is None else rows, done, loss, acc,
            z1.stride(0), z2.stride(0),
            0 if g1 is None else g1.stride(0), 0 if g2 is None else g2.stride(0),
            n_rows, n_cols, n_count, float(alpha) * 0.5, int(ignore_index), **launch)
    except BaseException:
        done.zero_()  # a launch that failed part-way must not leave the counter off zero
        raise
    return loss, acc, rows, g1, g2


def rdrop_forward(z1, z2, labels, alpha, ignore_index, ce, need_grad, **options):
    """Launch the fused forward on 2-D logits [N, V] (last-dim stride 1): one launch.

    labels: int [N] or None. mean_ce / mean_kl: divide the CE / KL term by the number of
    counted rows (labels != ignore_index in `count_labels`, default `labels`; n_count rows
    without labels, default N), else sum it. row_loss: also return the per-row losses.
    g1/g2: gradient outputs (default: new tensors like the logits; pass z1/z2 to write in
    place). block_v/block_n/programs override the tile and grid (tests). Returns (loss fp32 [];
    out fp32 [4]: mean (CE1 + CE2) / 2, mean (KL12 + KL21) / 2, CE sum, KL sum; rows fp32 [N]
    or None; g1; g2); g1/g2 are None without need_grad."""
    loss, acc, rows, g1, g2 = launch_forward(z1, z2, labels, alpha, ignore_index, ce,
                                             need_grad, **options)
    return loss, acc[:4], rows, g1, g2


@functools.lru_cache(maxsize=1024)
def _scale_plan(n_rows, n_cols):
    """The keywords of rdrop_scale_grads_kernel.run (grid, constexprs, num_warps)."""
    block_v = min(next_power_of_2(n_cols), MAX_TILE)
    block_n = max(1, min(MAX_TILE // block_v, next_power_of_2(n_rows)))
    num_warps = calculate_settings(block_n * block_v, MAX_TILE)[1]
    return dict(grid=(cdiv(n_rows, block_n), cdiv(n_cols, block_v)), warmup=False,
                BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps)


def rdrop_scale_grads_(g1, g2, grad_output):
    """g1, g2 *= grad_output in place (scalar or per-row [N]); tiles with grad_output == 1 are
    skipped on the device."""
    n_rows, n_cols = g1.shape
    if grad_output.dim() == 0:
        go, go_stride = grad_output, 0
    else:
        go = grad_output.reshape(-1)
        go_stride = 0 if go.numel() == 1 else go.stride(0)
    rdrop_scale_grads_kernel.run(g1, g2, go, g1.stride(0), g2.stride(0), go_stride, n_rows,
                                 n_cols, **_scale_plan(n_rows, n_cols))
    return g1, g2
