"""AD-DROP keep mask in Triton: attribution row, exact top-p threshold, Philox drop, bit packing.

For each (batch b, head h, query row i) over the row's allowed keys (real, and with IS_CAUSAL
j <= i + Lk − Lq; semantics and the reference: regdrop_fast/reference/addrop.py):
  B[i, j]   = dO[i]·V[j]  (tl.dot, fp32 accumulation; or read from an attribution tensor; V of
              kv head h // GROUP for grouped-query attention)
  threshold = value at ascending index rank of the row's n allowed keys, rank computed here with
              the official float32 rule: trunc(f32(n)·frac) (frac = f32(1 − p) for "high",
              f32(p) for "low"; one rounded float32 product), clamped to [0, n − 1]
  candidate = B[i,j] >= threshold ("high") or B[i,j] < threshold ("low")
  keep[i,j] = allowed(i,j) AND (NOT candidate OR philox_word(b·H·Lq·Lk + h·Lq·Lk + i·Lk + j)
              >= floor(q·2^32))
and writes keep as bits [B,H,Lq,ceil(Lk/32)] int32 (bit j of word w = key 32w + j). No
[B,H,Lq,Lk] float tensor is written.

Several layers in one launch: inputs stacked on a leading layer axis ([n,B,H,Lq,D] dO and
[n,B,Hkv,Lk,D] V, or [n,B,H,Lq,Lk] attributions; key padding [B,Lk] shared or [n,B,Lk]) give
words [n,B,H,Lq,W]; layer l draws with its own stream (streams[l], an int64 device table), and
its Philox indices are those of its own [B,H,Lq,Lk] map, so each layer's words equal a
single-layer launch with that stream.

Exact selection: each score maps to an int32 sort key with the same order (fp32 bit pattern,
negatives' magnitude bits flipped, −0 folded into +0); the rank-th smallest key is found by a
32-step bisection on the key's bits (count of keys below each probe), then candidates are the
keys >= it ("high": ties included) or the keys below it ("low": ties kept), exactly like the
sort-based reference.

Two paths (constexpr RESIDENT): when the padded row fits one tile (16 rows x the row in
registers, and V's [D, row] dot operand within 64 KiB of shared memory: Lk <= 512 for bf16
D=64), a program computes its rows' scores once and bisects in registers; otherwise it streams
key tiles (64 rows per program on GPU), recomputing each tile's scores (dO·Vᵀ or attribution
loads) for each of the 33 passes: 33x the dot FLOPs, traded for no L² scratch.

Memory traffic per (layer,b,h): dO and V read once per BLOCK_M rows (resident; ×33 from L2
when streamed), key padding mask Lk bytes (twice when streamed: the row counts), mask written
Lq·Lk/8 bytes. Attribution input instead: Lq·Lk·elt bytes read (×33 when streamed). Launch
grid: (cdiv(Lq, BLOCK_M), B·H, layers).

`addrop_random_mask_kernel` (the official RD kind, no attribution): per element two Philox
words at the same index, candidate stream and drop stream of its layer (an int64 table [2n]),
  keep = allowed AND (candidate_word >= floor(p·2^32) OR drop_word >= floor(q·2^32)).
When Lk % 4 == 0 (GROUPED) the 4 keys of a Philox counter lie in one row, so each Philox call
serves 4 keys (its 4 words) instead of 1. Traffic: the key padding mask, Lq·Lk/8 bytes written;
no input map. Grid: (cdiv(Lq, BLOCK_M), B·H, layers).
"""
import torch
import triton
import triton.language as tl

from .philox import philox4x32, philox_word
from .utils import cdiv, next_power_of_2

INT32_MAX = tl.constexpr(2147483647)
SIGN_BIT = tl.constexpr(2147483648)
RESIDENT_BLOCK_M = 16  # query rows per program on the resident path (tl.dot needs >= 16)
RESIDENT_MAX_ELEMS = 32768  # BLOCK_M x padded row of scores and keys held in registers
RESIDENT_MAX_OPERAND = 65536  # bytes of the [D, padded row] V operand staged in shared memory
STREAM_BLOCK_M = 64  # streamed path on GPU: more rows per program amortize the V re-reads
STREAM_BLOCK_N = 128


@triton.jit
def mask_element_index(b, h, H, Lq, Lk, offs_m, offs_n):
    """int64 flat index of elements (b, h, offs_m, offs_n) in [B,H,Lq,Lk]: the Philox index."""
    row = (b * H + h) * Lq + offs_m.to(tl.int64)
    return row[:, None] * Lk + offs_n[None, :]


@triton.jit
def visible_key_end(start_m, Lq, Lk, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Exclusive end of the keys visible from query rows start_m .. start_m + BLOCK_M − 1
    (causal: key j <= i + Lk − Lq); key tiles past it hold no allowed key."""
    end = Lk
    if IS_CAUSAL:
        end = tl.minimum(Lk, tl.maximum(0, start_m + BLOCK_M + (Lk - Lq)))
    return end


@triton.jit
def _sort_key(score):
    """int32 keys ordered like the fp32 scores; −0 and +0 share a key."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _tile_allowed(kpm_ptr, b, offs_m, offs_n, kpm_b, Lq, Lk, HAS_KPM: tl.constexpr,
                  IS_CAUSAL: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: key offs_n is real and (causal) visible from row offs_m."""
    real = offs_n < Lk
    if HAS_KPM:
        flags = tl.load(kpm_ptr + b * kpm_b + offs_n, mask=real, other=0)
        real = real & (flags != 0)
    allowed = real[None, :] & (offs_m[:, None] < Lq)
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return allowed


@triton.jit
def _threshold_rank(n, frac):
    """int32 rank per row from its allowed-key count n: the official (frac·n).long() as torch
    computes it (float32 factors, one rounded product, truncated), clamped to [0, n − 1]."""
    rank = (n.to(tl.float32) * frac).to(tl.int32)
    return tl.maximum(tl.minimum(rank, n - 1), 0)


@triton.jit
def _tile_keys(src_ptr, v_ptr, kpm_ptr, do, b, h, hkv, offs_m, start_n,
               s_b, s_h, s_m, s_n, v_b, v_h, v_n, kpm_b, Lq, Lk, D,
               FROM_ATTR: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sort keys [BLOCK_M, BLOCK_N] of one key tile (INT32_MAX where not allowed), the allowed
    flags [BLOCK_M, BLOCK_N] and the key offsets. h: the query head, hkv: its kv head (V)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_k = offs_n < Lk
    if FROM_ATTR:
        ptrs = src_ptr + b * s_b + h * s_h + offs_m[:, None] * s_m + offs_n[None, :] * s_n
        score = tl.load(ptrs, mask=(offs_m[:, None] < Lq) & in_k[None, :], other=0.0)
        score = score.to(tl.float32)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        vt_ptrs = v_ptr + b * v_b + hkv * v_h + offs_n[None, :] * v_n + offs_d[:, None]
        vt = tl.load(vt_ptrs, mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)
        score = tl.dot(do, vt, input_precision=DOT_PRECISION)
    allowed = _tile_allowed(kpm_ptr, b, offs_m, offs_n, kpm_b, Lq, Lk, HAS_KPM, IS_CAUSAL)
    key = tl.where(allowed, _sort_key(score), INT32_MAX)
    return key, allowed, offs_n


@triton.jit
def _store_keep_bits(words_ptr, key, allowed, thr, offs_m, offs_n, start_n, b, h, H, Lq, Lk, W,
                     seed_lo, seed_hi, step, stream, drop_threshold, DROP_LOW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep = allowed AND (NOT candidate OR word >= drop_threshold), packed 32 keys per int32
    word; candidates are key >= thr ("high") or key < thr ("low")."""
    index = mask_element_index(b, h, H, Lq, Lk, offs_m, offs_n)
    word = philox_word(seed_lo, seed_hi, index, step, stream)
    spared = word.to(tl.int64) >= drop_threshold
    if DROP_LOW:
        not_candidate = key >= thr[:, None]
    else:
        not_candidate = key < thr[:, None]
    keep = allowed & (not_candidate | spared)
    _store_words(words_ptr, _pack_bits(keep, 1, BLOCK_M, BLOCK_N), offs_m, start_n, b, h, H,
                 Lq, W, BLOCK_N)


@triton.jit
def _pack_bits(bits, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N // 32] words from [BLOCK_M, BLOCK_N // WIDTH] fields of WIDTH
    bits each (bools: WIDTH 1); field f lands at bit WIDTH·f mod 32 of word WIDTH·f // 32."""
    fields = tl.reshape(bits.to(tl.int32), (BLOCK_M, BLOCK_N // 32, 32 // WIDTH))
    shifts = tl.arange(0, 32 // WIDTH) * WIDTH
    # distinct bits never carry, so the sum is the bitwise OR (bit 31 wraps to the sign bit)
    return tl.sum(fields << shifts[None, None, :], axis=2)


@triton.jit
def _store_words(words_ptr, packed, offs_m, start_n, b, h, H, Lq, W, BLOCK_N: tl.constexpr):
    """Writes the [BLOCK_M, BLOCK_N // 32] words of key tile start_n of rows offs_m."""
    offs_w = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    row = (b * H + h) * Lq + offs_m.to(tl.int64)
    ptrs = words_ptr + row[:, None] * W + offs_w[None, :]
    tl.store(ptrs, packed, mask=(offs_m[:, None] < Lq) & (offs_w[None, :] < W))


@triton.jit
def addrop_mask_kernel(
    src_ptr,  # FROM_ATTR: attribution [(n,)B,H,Lq,Lk]; else dO [(n,)B,H,Lq,D] (last stride 1)
    v_ptr,  # V [(n,)B,Hkv,Lk,D] (last stride 1); unused when FROM_ATTR
    kpm_ptr,  # uint8 [(n,)B,Lk], 1 = real key (last stride 1); unused unless HAS_KPM
    streams_ptr,  # int64 [n]: each layer's Philox stream; unused unless STREAM_TABLE
    words_ptr,  # int32 [(n,)B,H,Lq,W] output bits, contiguous
    s_l, s_b, s_h, s_m, s_n,  # strides of src (s_n unused for dO; s_l 0 for one layer)
    v_l, v_b, v_h, v_n,  # strides of V
    kpm_l, kpm_b,  # layer (0 when shared) and row strides of the key padding mask
    words_l,  # layer stride of the words
    H, Lq, Lk, D, W,  # heads, query/key lengths, head dim, words per row
    GROUP,  # query heads per kv head: V of kv head h // GROUP
    seed_lo, seed_hi, step, stream,  # Philox key halves, counter words 2 and 3 (one layer)
    frac,  # float32 f32(1 − p) ("high") or f32(p) ("low"): rank = trunc(n·frac)
    drop_threshold,  # floor(q * 2^32): a candidate is dropped iff its word is below it
    FROM_ATTR: tl.constexpr,  # read B from an attribution tensor instead of dO·Vᵀ
    HAS_KPM: tl.constexpr,  # a key padding mask is given
    STREAM_TABLE: tl.constexpr,  # layer l's stream is streams_ptr[l], not `stream`
    DROP_LOW: tl.constexpr,  # candidates strictly below the threshold (official "low")
    IS_CAUSAL: tl.constexpr,  # only keys j <= i + Lk - Lq are allowed
    RESIDENT: tl.constexpr,  # the whole padded row is one tile (BLOCK_N >= Lk)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key tile (multiple of 32)
    BLOCK_D: tl.constexpr,  # padded head dim (>= 16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so B is not computed in tf32
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    src_ptr += layer * s_l
    v_ptr += layer * v_l
    kpm_ptr += layer * kpm_l
    words_ptr += layer * words_l
    if STREAM_TABLE:
        stream = tl.load(streams_ptr + layer)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hkv = h // GROUP
    drop_thr = tl.cast(drop_threshold, tl.int64)
    if FROM_ATTR:
        do = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        do_ptrs = src_ptr + b * s_b + h * s_h + offs_m[:, None] * s_m + offs_d[None, :]
        do = tl.load(do_ptrs, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    # the counts skip the key tiles past the block's last visible key
    hi = visible_key_end(pid_m * BLOCK_M, Lq, Lk, IS_CAUSAL, BLOCK_M)
    if RESIDENT:
        key, allowed, offs_n = _tile_keys(src_ptr, v_ptr, kpm_ptr, do, b, h, hkv, offs_m, 0,
                                          s_b, s_h, s_m, s_n, v_b, v_h, v_n, kpm_b, Lq, Lk, D,
                                          FROM_ATTR, HAS_KPM, IS_CAUSAL, BLOCK_N, BLOCK_D,
                                          DOT_PRECISION)
        n_allowed = tl.sum(allowed.to(tl.int32), axis=1)
    else:
        n_allowed = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for start_n in range(0, hi, BLOCK_N):
            tile = _tile_allowed(kpm_ptr, b, offs_m, start_n + tl.arange(0, BLOCK_N), kpm_b,
                                 Lq, Lk, HAS_KPM, IS_CAUSAL)
            n_allowed += tl.sum(tile.to(tl.int32), axis=1)
    rank = _threshold_rank(n_allowed, frac)
    # bisection on the key bits in the unsigned domain u = key + 2^31: the largest u with
    # count(keys < u) <= rank is the rank-th smallest key
    ans = tl.zeros((BLOCK_M,), dtype=tl.int64)
    for i in range(32):
        probe = ans | (tl.full((BLOCK_M,), 1, tl.int64) << (31 - i))
        probe_key = (probe - SIGN_BIT).to(tl.int32)
        if RESIDENT:
            below = tl.sum((key < probe_key[:, None]).to(tl.int32), axis=1)
        else:
            below = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for start_n in range(0, hi, BLOCK_N):
                tkey, _, _ = _tile_keys(src_ptr, v_ptr, kpm_ptr, do, b, h, hkv, offs_m, start_n,
                                        s_b, s_h, s_m, s_n, v_b, v_h, v_n, kpm_b, Lq, Lk, D,
                                        FROM_ATTR, HAS_KPM, IS_CAUSAL, BLOCK_N, BLOCK_D,
                                        DOT_PRECISION)
                below += tl.sum((tkey < probe_key[:, None]).to(tl.int32), axis=1)
        ans = tl.where(below <= rank, probe, ans)
    thr = (ans - SIGN_BIT).to(tl.int32)
    if RESIDENT:
        _store_keep_bits(words_ptr, key, allowed, thr, offs_m, offs_n, 0, b, h, H, Lq, Lk, W,
                         seed_lo, seed_hi, step, stream, drop_thr, DROP_LOW, BLOCK_M, BLOCK_N)
    else:
        # every tile is written (zeros past the causal limit): the words are not pre-cleared
        for start_n in range(0, Lk, BLOCK_N):
            tkey, tallowed, toffs = _tile_keys(src_ptr, v_ptr, kpm_ptr, do, b, h, hkv, offs_m,
                                               start_n, s_b, s_h, s_m, s_n, v_b, v_h, v_n,
                                               kpm_b, Lq, Lk, D, FROM_ATTR, HAS_KPM, IS_CAUSAL,
                                               BLOCK_N, BLOCK_D, DOT_PRECISION)
            _store_keep_bits(words_ptr, tkey, tallowed, thr, offs_m, toffs, start_n, b, h, H,
                             Lq, Lk, W, seed_lo, seed_hi, step, stream, drop_thr, DROP_LOW,
                             BLOCK_M, BLOCK_N)


def keep_mask_bits(attr, v, key_padding_mask, frac: float, drop_threshold: int, seed: int,
                   step: int, stream, drop_low: bool, is_causal: bool = False,
                   block_n=None) -> torch.Tensor:
    """Launcher: int32 bits [B,H,Lq,ceil(Lk/32)], or [n,B,H,Lq,ceil(Lk/32)] for n stacked layers.

    attr: a [B,H,Lq,Lk] attribution tensor (v None) or dO [B,H,Lq,D] with v [B,Hkv,Lk,D] (Hkv
    dividing H; last stride 1, same dtype), each with a leading layer axis n for several
    layers; key_padding_mask: bool [B,Lk] (shared) or [n,B,Lk] (per layer, stacked inputs
    only), last stride 1, or None; frac: f32(1 − p) for "high", f32(p) for "low";
    drop_threshold = floor(q·2^32); stream: an int, or for stacked inputs an int64 tensor [n]
    of per-layer streams on attr's device. block_n forces the streamed path with that key tile
    (tests)."""
    from_attr = v is None
    layered = attr.dim() == 5
    strides = attr.stride()
    s_l, (s_b, s_h, s_m, s_n) = (strides[0], strides[1:]) if layered else (0, strides)
    if from_attr:
        *_, batch, heads, lq, lk = attr.shape
        d, group = 1, 1
        v_l = v_b = v_h = v_n = 0
        v = attr
    else:
        *_, batch, heads, lq, d = attr.shape
        lk = v.shape[-2]
        group = heads // v.shape[-3]
        v_strides = v.stride()
        v_l, v_b, v_h, v_n = v_strides[:4] if layered else (0, *v_strides[:3])
    n_words = cdiv(lk, 32)
    words = torch.empty(*attr.shape[:-1], n_words, dtype=torch.int32, device=attr.device)
    if words.numel() == 0:
        return words
    lk_pad = max(32, next_power_of_2(lk))
    block_d = max(16, next_power_of_2(d))
    resident = block_n is None and RESIDENT_BLOCK_M * lk_pad <= RESIDENT_MAX_ELEMS and (
        from_attr or block_d * lk_pad * attr.element_size() <= RESIDENT_MAX_OPERAND)
    if resident:
        block_m, tile_n = RESIDENT_BLOCK_M, lk_pad
    else:
        # the interpreter gains nothing from big tiles; tests force small ones via block_n
        block_m = RESIDENT_BLOCK_M if attr.device.type == "cpu" else STREAM_BLOCK_M
        tile_n = block_n or STREAM_BLOCK_N
    if tile_n % 32:
        raise ValueError(f"block_n must be a multiple of 32, got {tile_n}")
    has_kpm = key_padding_mask is not None
    if has_kpm:
        kpm = key_padding_mask.view(torch.uint8)
        kpm_l, kpm_b = (kpm.stride(0), kpm.stride(1)) if kpm.dim() == 3 else (0, kpm.stride(0))
    else:
        kpm, kpm_l, kpm_b = words, 0, 0
    table = isinstance(stream, torch.Tensor)
    streams, stream = (stream, 0) if table else (words, stream)
    precision = "ieee" if attr.dtype == torch.float32 else "tf32"
    num_warps = 8 if block_m * tile_n >= 8192 else 4
    grid = (cdiv(lq, block_m), batch * heads, attr.shape[0] if layered else 1)
    addrop_mask_kernel[grid](
        attr, v, kpm, streams, words,
        s_l, s_b, s_h, s_m, s_n, v_l, v_b, v_h, v_n, kpm_l, kpm_b,
        words.stride(0) if layered else 0,
        heads, lq, lk, d, n_words, group,
        seed & 0xFFFFFFFF, seed >> 32, step, stream, frac, drop_threshold,
        FROM_ATTR=from_attr, HAS_KPM=has_kpm, STREAM_TABLE=table, DROP_LOW=drop_low,
        IS_CAUSAL=is_causal, RESIDENT=resident, BLOCK_M=block_m, BLOCK_N=tile_n,
        BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=num_warps)
    return words


@triton.jit
def _random_keep_tile(kpm_ptr, b, h, H, Lq, Lk, offs_m, start_n, kpm_b, seed_lo, seed_hi, step,
                      stream, candidate_stream, candidate_thr, drop_thr, HAS_KPM: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_M, BLOCK_N // 32] of one key tile of the random keep mask."""
    if GROUPED:
        # key start_n + 4g + k takes word k of counter (row·Lk + start_n + 4g) / 4
        offs_g = start_n + 4 * tl.arange(0, BLOCK_N // 4)
        counter = mask_element_index(b, h, H, Lq, Lk, offs_m, offs_g) >> 2
        c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
        c1 = (counter >> 32).to(tl.uint32)
        zero = c0 * 0
        k0 = tl.cast(seed_lo, tl.uint32)
        k1 = tl.cast(seed_hi, tl.uint32)
        step_c = zero + tl.cast(step, tl.uint32)
        cw_0, cw_1, cw_2, cw_3 = philox4x32(c0, c1, step_c,
                                            zero + tl.cast(candidate_stream, tl.uint32), k0, k1)
        dw_0, dw_1, dw_2, dw_3 = philox4x32(c0, c1, step_c, zero + tl.cast(stream, tl.uint32),
                                            k0, k1)
        nibble = _random_keep_lane(kpm_ptr, b, offs_m, offs_g, 0, kpm_b, Lq, Lk, cw_0, dw_0,
                                   candidate_thr, drop_thr, HAS_KPM, IS_CAUSAL)
        nibble |= _random_keep_lane(kpm_ptr, b, offs_m, offs_g, 1, kpm_b, Lq, Lk, cw_1, dw_1,
                                    candidate_thr, drop_thr, HAS_KPM, IS_CAUSAL)
        nibble |= _random_keep_lane(kpm_ptr, b, offs_m, offs_g, 2, kpm_b, Lq, Lk, cw_2, dw_2,
                                    candidate_thr, drop_thr, HAS_KPM, IS_CAUSAL)
        nibble |= _random_keep_lane(kpm_ptr, b, offs_m, offs_g, 3, kpm_b, Lq, Lk, cw_3, dw_3,
                                    candidate_thr, drop_thr, HAS_KPM, IS_CAUSAL)
        return _pack_bits(nibble, 4, BLOCK_M, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    allowed = _tile_allowed(kpm_ptr, b, offs_m, offs_n, kpm_b, Lq, Lk, HAS_KPM, IS_CAUSAL)
    index = mask_element_index(b, h, H, Lq, Lk, offs_m, offs_n)
    not_candidate = philox_word(seed_lo, seed_hi, index, step,
                                candidate_stream).to(tl.int64) >= candidate_thr
    spared = philox_word(seed_lo, seed_hi, index, step, stream).to(tl.int64) >= drop_thr
    return _pack_bits(allowed & (not_candidate | spared), 1, BLOCK_M, BLOCK_N)


@triton.jit
def _random_keep_lane(kpm_ptr, b, offs_m, offs_g, LANE: tl.constexpr, kpm_b, Lq, Lk,
                      candidate_word, drop_word, candidate_thr, drop_thr, HAS_KPM: tl.constexpr,
                      IS_CAUSAL: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N // 4]: keep bit of key offs_g + LANE, at bit LANE."""
    allowed = _tile_allowed(kpm_ptr, b, offs_m, offs_g + LANE, kpm_b, Lq, Lk, HAS_KPM, IS_CAUSAL)
    keep = allowed & ((candidate_word.to(tl.int64) >= candidate_thr)
                      | (drop_word.to(tl.int64) >= drop_thr))
    return keep.to(tl.int32) << LANE


@triton.jit
def addrop_random_mask_kernel(
    kpm_ptr,  # uint8 [(n,)B,Lk], 1 = real key (last stride 1); unused unless HAS_KPM
    streams_ptr,  # int64 [2n]: layer l's drop stream at l, its candidate stream at n + l
    words_ptr,  # int32 [n,B,H,Lq,W] output bits, contiguous
    kpm_l, kpm_b,  # layer (0 when shared) and row strides of the key padding mask
    words_l,  # layer stride of the words
    n_layers, H, Lq, Lk, W,  # layers, heads, query/key lengths, words per row
    seed_lo, seed_hi, step,  # Philox key halves, counter word 2
    candidate_threshold,  # floor(p * 2^32): a key is a candidate iff its word is below it
    drop_threshold,  # floor(q * 2^32): a candidate is dropped iff its word is below it
    HAS_KPM: tl.constexpr,  # a key padding mask is given
    IS_CAUSAL: tl.constexpr,  # only keys j <= i + Lk - Lq are allowed
    GROUPED: tl.constexpr,  # Lk % 4 == 0: one Philox call per 4 keys
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key tile (multiple of 32)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    kpm_ptr += layer * kpm_l
    words_ptr += layer * words_l
    stream = tl.load(streams_ptr + layer)
    candidate_stream = tl.load(streams_ptr + n_layers + layer)
    candidate_thr = tl.cast(candidate_threshold, tl.int64)
    drop_thr = tl.cast(drop_threshold, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # the key tiles past the block's last visible key are zeros, without Philox
    hi = visible_key_end(pid_m * BLOCK_M, Lq, Lk, IS_CAUSAL, BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        packed = _random_keep_tile(kpm_ptr, b, h, H, Lq, Lk, offs_m, start_n, kpm_b, seed_lo,
                                   seed_hi, step, stream, candidate_stream, candidate_thr,
                                   drop_thr, HAS_KPM, IS_CAUSAL, GROUPED, BLOCK_M, BLOCK_N)
        _store_words(words_ptr, packed, offs_m, start_n, b, h, H, Lq, W, BLOCK_N)
    for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, Lk, BLOCK_N):
        _store_words(words_ptr, tl.zeros((BLOCK_M, BLOCK_N // 32), dtype=tl.int32), offs_m,
                     start_n, b, h, H, Lq, W, BLOCK_N)


RANDOM_BLOCK_M = 16
RANDOM_BLOCK_N = 128  # GPU key tile; the interpreter takes the padded row up to this


def random_mask_bits(shape, n_layers: int, key_padding_mask, candidate_threshold: int,
                     drop_threshold: int, seed: int, step: int, streams: torch.Tensor,
                     is_causal: bool, device) -> torch.Tensor:
    """Launcher: int32 bits [n,B,H,Lq,ceil(Lk/32)] of the random keep masks of n layers.

    shape: (B, H, Lq, Lk) of one layer; key_padding_mask: bool [B,Lk] (shared) or [n,B,Lk],
    last stride 1, or None; candidate_threshold = floor(p·2^32), drop_threshold =
    floor(q·2^32); streams: int64 [2n] on `device`, the drop streams then the candidate
    streams."""
    batch, heads, lq, lk = shape
    n_words = cdiv(lk, 32)
    words = torch.empty(n_layers, batch, heads, lq, n_words, dtype=torch.int32, device=device)
    if words.numel() == 0:
        return words
    has_kpm = key_padding_mask is not None
    if has_kpm:
        kpm = key_padding_mask.view(torch.uint8)
        kpm_l, kpm_b = (kpm.stride(0), kpm.stride(1)) if kpm.dim() == 3 else (0, kpm.stride(0))
    else:
        kpm, kpm_l, kpm_b = words, 0, 0
    block_n = RANDOM_BLOCK_N
    if torch.device(device).type == "cpu":
        block_n = min(block_n, max(32, next_power_of_2(lk)))
    grid = (cdiv(lq, RANDOM_BLOCK_M), batch * heads, n_layers)
    addrop_random_mask_kernel[grid](
        kpm, streams, words, kpm_l, kpm_b, words.stride(0), n_layers, heads, lq, lk, n_words,
        seed & 0xFFFFFFFF, seed >> 32, step, candidate_threshold, drop_threshold,
        HAS_KPM=has_kpm, IS_CAUSAL=is_causal, GROUPED=lk % 4 == 0, BLOCK_M=RANDOM_BLOCK_M,
        BLOCK_N=block_n, num_warps=4)
    return words
