"""AD-DROP attribution and keep mask: Triton kernel vs the sort-based reference, bit for bit."""
import math

import numpy as np
import pytest
import torch

from regdrop_fast import backends
from regdrop_fast._checks import keep_threshold
from regdrop_fast.addrop.attribution import attribution
from regdrop_fast.addrop.mask import keep_mask
from regdrop_fast.masks import unpack_mask
from regdrop_fast.reference import addrop as ref
from regdrop_fast.reference.philox import philox_words
from utils import require_backend


def _padding(batch, lk, gen, device, all_pad_sample=None):
    """bool [B,Lk] with a random number of real keys per sample (at least one, unless it is
    the all-pad sample), real keys first like HF right padding."""
    lengths = torch.randint(1, lk + 1, (batch,), generator=gen)
    if all_pad_sample is not None:
        lengths[all_pad_sample] = 0
    return (torch.arange(lk)[None, :] < lengths[:, None]).to(device)


def _assert_same_bits(got, want):
    if not torch.equal(got.words, want.words):
        diff = (unpack_mask(got, backend="reference") != unpack_mask(want, backend="reference"))
        first = diff.nonzero()[:5].tolist()
        raise AssertionError(f"{int(diff.sum())} mask bits differ, first at {first}")


@pytest.mark.parametrize("lq,lk,d", [(1, 1, 16), (7, 7, 32), (33, 33, 16), (5, 40, 16)])
def test_attribution_is_grad_of_target_wrt_attention_map(lq, lk, d):
    gen = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = (torch.randn(2, 2, n, d, generator=gen) for n in (lq, lk, lk))
    weight = torch.randn(2, 2, lq, d, generator=gen)
    probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1).requires_grad_()
    out = probs @ v
    target = (out * weight).sum() + out.square().sum()
    d_out, d_probs = torch.autograd.grad(target, (out, probs))
    torch.testing.assert_close(attribution(d_out, v), d_probs, rtol=1e-5, atol=1e-5)


CASES = [  # (lq, lk, p, q, drop, all_pad_sample)
    (1, 1, 0.3, 0.2, "high", None),
    (7, 7, 0.5, 0.7, "low", 1),
    (33, 33, 0.1, 0.5, "high", 0),
    (64, 64, 0.9, 0.3, "high", None),
    (6, 70, 0.37, 1.0, "low", None),
    (17, 45, 0.63, 0.0, "high", 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,p,q,drop,all_pad", CASES)
def test_mask_from_attribution_bit_identical(device, lq, lk, p, q, drop, all_pad, dtype):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    attr = torch.randn(2, 2, lq, lk, generator=gen).to(device, dtype)
    kpm = _padding(2, lk, gen, device, all_pad)
    args = dict(p=p, q=q, key_padding_mask=kpm, seed=2**40 + lk, step=3, stream=lq, drop=drop)
    got = keep_mask(attr, backend="triton", **args)
    _assert_same_bits(got, keep_mask(attr, backend="reference", **args))
    assert got.shape == (2, 2, lq, lk)


@pytest.mark.parametrize("drop", ["high", "low"])
def test_mask_with_many_ties_bit_identical(device, drop):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(7)
    # few distinct values, with -0.0 and +0.0 mixed: ties straddle the threshold in most rows
    attr = (torch.randint(-2, 3, (2, 3, 9, 37), generator=gen).float() * 0.5).to(device)
    attr[attr == 0] = torch.where(torch.rand((attr == 0).sum().item(), generator=gen) < 0.5,
                                  -0.0, 0.0).to(device)
    kpm = _padding(2, 37, gen, device)
    args = dict(p=0.3, q=0.5, key_padding_mask=kpm, seed=11, drop=drop)
    _assert_same_bits(keep_mask(attr, backend="triton", **args),
                      keep_mask(attr, backend="reference", **args))


@pytest.mark.parametrize("lq,lk,d", [(7, 33, 16), (33, 64, 32)])
def test_mask_from_dO_v_bit_identical(device, lq, lk, d):
    """Small-integer dO and V make every dot product exact in fp32, whatever the summation
    order, so the kernel's B equals the reference's and the masks must agree bit for bit.
    (fp32 only here: the interpreter's tl.dot does not handle bf16; bf16 runs under cuda.)"""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lq + lk + d)
    dO = torch.randint(-3, 4, (2, 2, lq, d), generator=gen).float().to(device)
    v = torch.randint(-3, 4, (2, 2, lk, d), generator=gen).float().to(device)
    kpm = _padding(2, lk, gen, device)
    for drop in ("high", "low"):
        args = dict(p=0.3, q=0.4, key_padding_mask=kpm, seed=5, step=1, stream=2, drop=drop)
        _assert_same_bits(keep_mask((dO, v), backend="triton", **args),
                          keep_mask((dO, v), backend="reference", **args))


@pytest.mark.parametrize("from_pair", [False, True])
def test_streamed_path_bit_identical(device, from_pair):
    """Rows longer than one tile: the kernel re-streams key tiles for each bisection pass."""
    require_backend("triton", device)
    from regdrop_fast.triton_kernels import addrop_mask as tk
    gen = torch.Generator().manual_seed(3)
    lq, lk, d = 5, 75, 16
    dO = torch.randint(-3, 4, (2, 2, lq, d), generator=gen).float().to(device)
    v = torch.randint(-3, 4, (2, 2, lk, d), generator=gen).float().to(device)
    kpm = _padding(2, lk, gen, device)
    p, q = 0.45, 0.6
    src, src_v = ((dO, v) if from_pair else (attribution(dO, v), None))
    words = tk.keep_mask_bits(src, src_v, kpm, np.float32(1 - p).item(), keep_threshold(q), 9,
                              4, 1, False, block_n=32)
    want = keep_mask((dO, v), p, q, kpm, seed=9, step=4, stream=1, backend="reference")
    assert torch.equal(words, want.words)


def test_reference_threshold_and_philox_contract(device):
    """All-tied rows make every real key a candidate, so keep = real AND word >= floor(q·2^32)
    with the word of the element's flat index in [B,H,Lq,Lk]: checked against the Philox
    reference directly, not through the mask reference."""
    require_backend("triton", device)
    shape = (2, 3, 5, 40)
    attr = torch.ones(shape, device=device)
    kpm = torch.ones(2, 40, dtype=torch.bool, device=device)
    kpm[1, 25:] = False
    seed, step, stream, q = 2**33 + 17, 6, 4, 0.35
    got = unpack_mask(keep_mask(attr, 0.2, q, kpm, seed=seed, step=step, stream=stream,
                                backend="triton"), backend="reference")
    index = torch.arange(math.prod(shape), dtype=torch.int64).view(shape)
    words = philox_words(seed, index, step, stream).to(device)
    assert torch.equal(got, kpm[:, None, None, :] & (words >= keep_threshold(q)))


def test_candidate_fraction_and_drop_rate(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(1)
    batch, heads, lq, lk, p = 2, 2, 64, 64, 0.3
    attr = torch.randn(batch, heads, lq, lk, generator=gen).to(device)
    kpm = torch.ones(batch, lk, dtype=torch.bool, device=device)
    kpm[1, 41:] = False
    valid = kpm.sum(-1).cpu()
    rank = ref.threshold_rank(valid, p)
    real = kpm[:, None, None, :].expand(batch, heads, lq, lk).cpu()
    # q = 1 drops every candidate: exactly rank real keys are kept per row (no ties), and
    # they are the lowest attributions
    keep_all_drop = unpack_mask(keep_mask(attr, p, 1.0, kpm, backend="triton")).cpu()
    assert torch.equal(keep_all_drop.sum(-1), rank.view(batch, 1, 1).expand(batch, heads, lq))
    a = attr.cpu()
    kept_max = a.masked_fill(~keep_all_drop, -math.inf).amax(-1)
    dropped_min = a.masked_fill(keep_all_drop | ~real, math.inf).amin(-1)
    assert bool((kept_max < dropped_min).all())
    # q = 0 drops nothing; pad keys are never kept
    assert torch.equal(unpack_mask(keep_mask(attr, p, 0.0, kpm, backend="triton")).cpu(), real)
    # 0 < q < 1: about q of the candidates are dropped
    keep = unpack_mask(keep_mask(attr, p, 0.4, kpm, seed=123, backend="triton")).cpu()
    candidates = real & ~keep_all_drop
    dropped = (candidates & ~keep).sum().item() / candidates.sum().item()
    assert abs(dropped - 0.4) < 0.03
    assert torch.equal(keep & ~candidates, real & ~candidates)


def test_all_pad_sample_and_single_key(device):
    require_backend("triton", device)
    attr = torch.randn(3, 2, 4, 1, device=device)
    kpm = torch.tensor([[True], [False], [True]], device=device)
    keep = unpack_mask(keep_mask(attr, 0.5, 1.0, kpm, backend="triton"))
    assert not keep[1].any()
    # one real key: rank floor(0.5·1) = 0 makes it the threshold, a candidate, dropped (q = 1)
    assert not keep.any()
    keep = unpack_mask(keep_mask(attr, 0.5, 0.0, kpm, backend="triton"))
    assert keep[0].all() and keep[2].all() and not keep[1].any()


def test_pair_and_tensor_inputs_agree_on_reference():
    gen = torch.Generator().manual_seed(4)
    dO, v = torch.randn(2, 2, 6, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    a = keep_mask((dO, v), 0.3, 0.5, seed=1, backend="reference")
    b = keep_mask(attribution(dO, v), 0.3, 0.5, seed=1, backend="reference")
    assert torch.equal(a.words, b.words)


P_GRID = [k / 100 for k in range(1, 100)]
LENGTHS = torch.arange(1, 4097)


def _official_index(frac: float, lengths: torch.Tensor) -> torch.Tensor:
    """The index exactly as the official compute_actual_lens(_rev) writes it: a Python float
    times the int64 lengths (torch's float32 product under the default dtype), then .long()."""
    assert torch.get_default_dtype() == torch.float32
    return (frac * lengths).long()


def _float32_index(frac: float, lengths: torch.Tensor) -> torch.Tensor:
    """The same rule in numpy: both factors rounded to float32, one rounded product, truncated."""
    product = np.float32(frac) * lengths.numpy().astype(np.float32)
    return torch.from_numpy(product.astype(np.int64))


@pytest.mark.parametrize("drop", ["high", "low"])
def test_threshold_index_is_the_official_float32_product(drop):
    """Every p on the 0.01 grid, every length 1..4096: the index of both backends (the triton
    launcher takes the same host ranks) equals the official one."""
    for p in P_GRID:
        frac = 1 - p if drop == "high" else p
        want = _official_index(frac, LENGTHS)
        assert torch.equal(want, _float32_index(frac, LENGTHS)), p
        assert torch.equal(ref.threshold_rank(LENGTHS, p, drop), want), p


def test_threshold_index_examples_where_float64_differs():
    high = ref.threshold_rank
    assert high(torch.tensor([10]), 0.9).item() == 1  # float64 floor: 0, the whole row masked
    fives = torch.arange(5, 4097, 5)
    assert torch.equal(high(fives, 0.8), fives // 5)  # float64 floor: one less
    assert high(torch.tensor([90, 170]), 0.3).tolist() == [63, 119]  # float64: 62, 118
    assert high(torch.tensor([10]), 0.25, "low").item() == 2


def _kept_counts(lengths, p, drop, backend, device, causal=False):
    """Kept keys per row with q = 1 (every candidate dropped) for samples of these lengths."""
    gen = torch.Generator().manual_seed(len(lengths))
    lk = max(lengths)
    attr = torch.randn(len(lengths), 1, 2 if not causal else lk, lk, generator=gen).to(device)
    kpm = (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]).to(device)
    keep = keep_mask(attr, p, 1.0, kpm, drop=drop, backend=backend, is_causal=causal)
    return unpack_mask(keep, backend="reference").sum(-1).cpu()


@pytest.mark.parametrize("drop", ["high", "low"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_official_counts_on_every_backend(device, backend, drop):
    """Distinct attributions and q = 1: "high" keeps exactly the official index of keys (the
    ones below the threshold), "low" keeps n minus floor(p·n) (float32 rule)."""
    require_backend(backend, device)
    lengths = [10, 5, 15, 90, 170, 1, 7]
    for p in (0.9, 0.8, 0.3, 0.25, 0.7):
        frac = 1 - p if drop == "high" else p
        index = _official_index(frac, torch.tensor(lengths)).clamp(max=torch.tensor(lengths) - 1)
        want = index if drop == "high" else torch.tensor(lengths) - index
        got = _kept_counts(lengths, p, drop, backend, device)
        assert torch.equal(got, want.view(-1, 1, 1).expand_as(got)), (p, got[:, 0, 0], want)


def test_low_keeps_ties_with_the_threshold(device):
    """Official generate_mask_low: keys equal to the threshold value are kept, only strictly
    lower ones are candidates (p = 0.25, n = 10: index 2, value 0.0 tied three times)."""
    attr = torch.tensor([-2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 1, 1, 10)
    for backend in ("reference", "triton"):
        if backends.unavailable_reason(backend, device) is not None:
            continue
        keep = unpack_mask(keep_mask(attr.to(device), 0.25, 1.0, drop="low", backend=backend))
        assert keep.view(-1).tolist() == [False, False] + [True] * 8


@pytest.mark.slow
@pytest.mark.parametrize("drop", ["high", "low"])
def test_kernel_counts_over_the_p_grid(device, drop):
    """Every p on the 0.01 grid through the kernel: causal rows give every length 1..64."""
    require_backend("triton", device)
    for p in P_GRID:
        frac = 1 - p if drop == "high" else p
        lengths = torch.arange(1, 65)
        index = _official_index(frac, lengths).clamp(max=lengths - 1)
        want = index if drop == "high" else lengths - index
        got = _kept_counts([64], p, drop, "triton", device, causal=True)
        assert torch.equal(got[0, 0], want), p


EDGE_PS = (1e-9, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99, 1 - 1e-9)


def _rank_from_counts(kept: torch.Tensor, allowed_len: torch.Tensor, drop: str):
    """The threshold index a q = 1 mask of distinct attributions implies: "high" keeps the rank
    keys below the threshold, "low" keeps the n − rank keys from it up."""
    return kept if drop == "high" else allowed_len - kept


@pytest.mark.parametrize("drop", ["high", "low"])
def test_kernel_rank_equals_threshold_rank(device, drop):
    """The kernel counts each row's allowed keys and takes the official float32 index itself:
    every length 0..37 (one sample each, padding), unpadded rows of other lengths, and causal
    rows (each row's prefix count) over edge values of p, against ref.threshold_rank."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(8)
    lk = 37
    kpm = (torch.arange(lk)[None, :] < torch.arange(lk + 1)[:, None]).to(device)
    attr = torch.randn(lk + 1, 1, 2, lk, generator=gen).to(device)
    causal_attr = torch.randn(3, 1, 12, 12, generator=gen).to(device)
    causal_kpm = (torch.rand(3, 12, generator=gen) < 0.7).to(device)
    prefix = causal_kpm.long().cumsum(-1).cpu()  # row i sees keys 0..i
    for p in EDGE_PS:
        kept = unpack_mask(keep_mask(attr, p, 1.0, kpm, drop=drop, backend="triton")).sum(-1)
        lengths = kpm.sum(-1).cpu()
        want = ref.threshold_rank(lengths, p, drop)
        got = _rank_from_counts(kept.cpu(), lengths.view(-1, 1, 1), drop)
        assert torch.equal(got, want.view(-1, 1, 1).expand_as(got)), p
        for n in (1, 7, 10, 33, 100):
            row = torch.randn(1, 1, 1, n, generator=gen).to(device)
            kept = unpack_mask(keep_mask(row, p, 1.0, drop=drop, backend="triton")).sum()
            want = ref.threshold_rank(torch.tensor([n]), p, drop)
            assert _rank_from_counts(kept.cpu(), n, drop) == want, (p, n)
        kept = unpack_mask(keep_mask(causal_attr, p, 1.0, causal_kpm, drop=drop,
                                     backend="triton", is_causal=True)).sum(-1).cpu()
        assert torch.equal(_rank_from_counts(kept[:, 0], prefix, drop),
                           ref.threshold_rank(prefix, p, drop)), p


def test_threshold_rank_clamps_to_last_real_key():
    valid = torch.tensor([0, 1, 10, 7])
    assert ref.threshold_rank(valid, 0.3).tolist() == [0, 0, 7, 4]
    assert ref.threshold_rank(valid, 1e-18).tolist() == [0, 0, 9, 6]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(p=0.0), ValueError, "p must be in"),
    (dict(p=1.0), ValueError, "p must be in"),
    (dict(q=1.5), ValueError, "q must be in"),
    (dict(q=-0.1), ValueError, "q must be in"),
    (dict(drop="middle"), ValueError, "drop"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.long)), TypeError, "key_padding_mask"),
    (dict(attr=torch.randn(2, 3, 6)), ValueError, "attr"),
    (dict(attr=torch.ones(2, 2, 3, 6, dtype=torch.long)), TypeError, "attr"),
    (dict(attr=torch.randn(0, 2, 3, 6)), ValueError, "empty"),
    (dict(attr=(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8, dtype=torch.float64))),
     TypeError, "same dtype"),
    (dict(attr=(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 4))), ValueError, "v must be"),
    (dict(attr=(torch.randn(2, 2, 3, 8),)), ValueError, "pair"),
])
def test_bad_input(kwargs, error, match):
    args = dict(attr=torch.randn(2, 2, 3, 6), p=0.3, q=0.2, backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        keep_mask(**args)


def test_triton_rejects_float64():
    require_backend("triton", "cpu")
    with pytest.raises(TypeError, match="float64"):
        keep_mask(torch.randn(1, 1, 2, 3, dtype=torch.float64), 0.3, 0.2, backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_random_sweep_bit_identical(device, trial):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(100 + trial)
    batch, heads = (int(x) for x in torch.randint(1, 4, (2,), generator=gen))
    lq, lk = (int(x) for x in torch.randint(1, 130, (2,), generator=gen))
    p = float(torch.rand((), generator=gen)) * 0.98 + 0.01
    q = float(torch.rand((), generator=gen))
    attr = torch.randn(batch, heads, lq, lk, generator=gen).to(device)
    kpm = _padding(batch, lk, gen, device, 0 if trial % 2 else None)
    for drop in ("high", "low"):
        args = dict(p=p, q=q, key_padding_mask=kpm, seed=trial, step=trial, drop=drop)
        _assert_same_bits(keep_mask(attr, backend="triton", **args),
                          keep_mask(attr, backend="reference", **args))


@pytest.mark.cuda
@pytest.mark.parametrize("lk", [128, 512, 2048, 3000])
def test_cuda_bf16_masks(lk):
    """bf16 dO/V on the GPU (resident rows up to 2048 keys, streamed beyond): bit-identical
    for exact integer inputs; bf16 attribution tensors are exact in fp32 as well."""
    gen = torch.Generator().manual_seed(lk)
    dO = torch.randint(-3, 4, (2, 4, 64, 64), generator=gen).to("cuda", torch.bfloat16)
    v = torch.randint(-3, 4, (2, 4, lk, 64), generator=gen).to("cuda", torch.bfloat16)
    kpm = _padding(2, lk, gen, "cuda", 1)
    args = dict(p=0.3, q=0.2, key_padding_mask=kpm, seed=3, step=2, stream=1)
    _assert_same_bits(keep_mask((dO, v), backend="triton", **args),
                      keep_mask((dO, v), backend="reference", **args))
    attr = torch.randn(2, 4, 64, lk, generator=gen).to("cuda", torch.bfloat16)
    _assert_same_bits(keep_mask(attr, backend="triton", **args),
                      keep_mask(attr, backend="reference", **args))
