"""The Philox RNG contract: torch reference, Triton (interpreter on CPU) and C++ words are
identical; compatible with tl.randint4x; keep rates; chunking invariance; bad input."""
import math

import pytest
import torch
from utils import require_backend

from regdrop_fast import rng
from regdrop_fast._checks import keep_threshold
from regdrop_fast.reference.philox import philox_words as ref_words

KERNEL_BACKENDS = ["triton", "cpu", "cuda"]
SEEDS = [0, 1, 2**32 - 1, 2**32, 0x123456789ABCDEF0, 2**63 + 5, 2**64 - 1]
STEP_STREAMS = [(0, 0), (1, 7), (2**32 - 1, 0), (0, 2**32 - 1), (2**32 - 1, 2**32 - 1)]


def _indices(gen, n=257):
    """int64 global indices mixing small ones, the 2^32 boundary and large ones up to 2^62."""
    return torch.cat([
        torch.arange(0, 37),
        torch.arange(2**32 - 9, 2**32 + 11),
        torch.tensor([2**33 + 1, 2**40 + 3, 2**61 + 2, 2**62 - 1, 2**62]),
        torch.randint(0, 2**31, (n // 2,), generator=gen),
        torch.randint(0, 2**62, (n // 2,), generator=gen),
    ])


def _words(backend, seed, index, step, stream, device):
    require_backend(backend, device)
    words = rng.philox_words(seed, index.to(device), step, stream, backend=backend)
    assert words.dtype == torch.int64 and words.device.type == torch.device(device).type
    return words.cpu()


def _assert_equal_words(got, want):
    if not torch.equal(got, want):
        bad = (got != want).nonzero().flatten()[:5].tolist()
        got_bad, want_bad = got.flatten()[bad].tolist(), want.flatten()[bad].tolist()
        raise AssertionError(f"{int((got != want).sum())} words differ, first at {bad}: "
                             f"got {got_bad}, want {want_bad}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_backend_words_equal_reference(backend, seed, device):
    gen = torch.Generator().manual_seed(seed % 2**63)
    index = _indices(gen)
    for step, stream in STEP_STREAMS:
        want = ref_words(seed, index, step, stream)
        assert int(want.min()) >= 0 and int(want.max()) < 2**32
        _assert_equal_words(_words(backend, seed, index, step, stream, device), want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_words_random_arguments(backend, device):
    gen = torch.Generator().manual_seed(1234)
    for _ in range(4):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 4 + 3  # up to ~2^64
        step, stream = (int(v) for v in torch.randint(0, 2**32, (2,), generator=gen))
        index = _indices(gen, n=64)
        _assert_equal_words(_words(backend, seed, index, step, stream, device),
                            ref_words(seed, index, step, stream))


def test_reference_matches_random123_known_answer():
    # Philox4x32-10 with counter 0 and key 0 (Random123 kat_vectors): indices 0..3 are its words.
    want = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert ref_words(0, torch.arange(4), 0, 0).tolist() == want


def test_words_depend_on_every_argument():
    index = torch.arange(2**32, 2**32 + 64)
    base = ref_words(5, index, 3, 4)
    for other in (ref_words(6, index, 3, 4), ref_words(5 + 2**32, index, 3, 4),
                  ref_words(5, index, 2, 4), ref_words(5, index, 3, 5),
                  ref_words(5, index + 2**32, 3, 4)):
        assert (other != base).float().mean() > 0.9


def _randint4x_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(seed, counter_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        counter = tl.load(counter_ptr + offs, mask=valid, other=0)
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int64), mask=valid)
        tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64), mask=valid)
        tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64), mask=valid)
        tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64), mask=valid)

    return randint4x_kernel


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 11, 0x0123456789ABCDEF])
def test_contract_matches_triton_randint4x(seed, device):
    """Word i % 4 of tl.randint4x(seed, i // 4) is the contract's word at step 0, stream 0."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(seed % 1000)
    counter = torch.cat([torch.arange(0, 8), torch.arange(2**30 - 2, 2**30 + 2),
                         torch.randint(0, 2**60, (20,), generator=gen)]).to(device)
    out = torch.empty(counter.numel() * 4, dtype=torch.int64, device=device)
    _randint4x_kernel()[(1,)](seed, counter, out, counter.numel(), BLOCK=32)
    index = (counter.cpu()[:, None] * 4 + torch.arange(4)).flatten()
    _assert_equal_words(out.cpu() & 0xFFFFFFFF, ref_words(seed, index, 0, 0))


@pytest.mark.parametrize("keep_prob", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_keep_rate_within_binomial_bound(keep_prob, device):
    n = 1 << 18
    kept = rng.bernoulli_keep((n,), keep_prob, seed=99, step=3, stream=1, device=device)
    expected = n * keep_prob
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(int(kept.sum()) - expected) <= 6 * sigma + 1


def test_keep_is_an_integer_compare_with_floor_threshold():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1])
    assert keep_threshold(0.5) == 2**31
    assert rng.keep_mask_from_words(words, 0.5).tolist() == [True, True, True, False, False,
                                                             False]
    assert rng.keep_mask_from_words(words, 1.0).all()
    assert not rng.keep_mask_from_words(words, 0.0).any()


def test_bernoulli_keep_uses_the_contract_words(device):
    mask = rng.bernoulli_keep((3, 5), 0.7, seed=2**40 + 1, step=2, stream=9, offset=2**33,
                              device=device)
    words = ref_words(2**40 + 1, torch.arange(2**33, 2**33 + 15), 2, 9)
    assert torch.equal(mask.cpu(), (words < keep_threshold(0.7)).view(3, 5))


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("offset,n", [(0, 1), (1, 7), (2**33 + 3, 70), (5, 1030)])
def test_bernoulli_keep_fused_kernels_match_the_words(backend, offset, n, device):
    """The fused keep kernels (one Philox block per 4 elements, any offset alignment) decide
    exactly as word < floor(p * 2^32) on the contract's words."""
    require_backend(backend, device)
    mask = rng.bernoulli_keep((n,), 0.37, seed=2**35 + 11, step=4, stream=3, offset=offset,
                              device=device, backend=backend)
    words = ref_words(2**35 + 11, torch.arange(offset, offset + n), 4, 3)
    assert torch.equal(mask.cpu(), words < keep_threshold(0.37))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_chunking_invariance(backend, device):
    """Words of a slice of the indices equal the slice of the words: shards draw the same bits."""
    index = torch.arange(2**32 - 50, 2**32 + 150)
    whole = _words(backend, 77, index, 5, 6, device)
    for start, stop in [(0, 1), (3, 64), (50, 51), (97, 200)]:
        _assert_equal_words(_words(backend, 77, index[start:stop], 5, 6, device),
                            whole[start:stop])
    grid = index.view(8, 25)
    _assert_equal_words(_words(backend, 77, grid, 5, 6, device), whole.view(8, 25))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_non_contiguous_and_narrow_dtype_index(backend, device):
    base = torch.arange(2**33, 2**33 + 6 * 10).view(6, 10)
    for index in (base.t(), base[:, ::3], base[::2].t()[1:]):
        assert not index.is_contiguous()
        got = _words(backend, 123, index, 1, 2, device)
        assert got.shape == index.shape
        _assert_equal_words(got, ref_words(123, index.contiguous(), 1, 2))
    small = torch.arange(0, 40, dtype=torch.int32).view(4, 10)[:, ::2]
    _assert_equal_words(_words(backend, 4, small, 0, 0, device),
                        ref_words(4, small.to(torch.int64), 0, 0))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_empty_index(backend, device):
    got = _words(backend, 1, torch.empty(0, 3, dtype=torch.int64), 0, 0, device)
    assert got.shape == (0, 3) and got.dtype == torch.int64


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(step=-1), ValueError, "step"),
    (dict(step=2**32), ValueError, "step"),
    (dict(stream=-3), ValueError, "stream"),
    (dict(stream=2**32), ValueError, "stream"),
    (dict(index=torch.arange(4.0)), TypeError, "index"),
    (dict(index=torch.tensor([True, False])), TypeError, "index"),
    (dict(index=[0, 1, 2]), TypeError, "index"),
    (dict(index=torch.tensor([3, -1, 5])), ValueError, "index"),
])
def test_bad_input_names_the_argument(kwargs, error, name, device):
    args = dict(seed=1, index=torch.arange(4), step=0, stream=0)
    args.update(kwargs)
    if isinstance(args["index"], torch.Tensor):
        args["index"] = args["index"].to(device)
    with pytest.raises(error, match=name):
        rng.philox_words(args["seed"], args["index"], args["step"], args["stream"])


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_extension_op_checks_its_arguments(backend, device):
    require_backend(backend, device)
    op = torch.ops.regdrop_fast.philox_words
    index = torch.arange(8, device=device)
    with pytest.raises(TypeError, match="index"):
        op(index.float(), 0, 0, 0, 0)
    for position, name in enumerate(["seed_lo", "seed_hi", "step", "stream"]):
        for bad in (-1, 2**32):
            args = [0, 0, 0, 0]
            args[position] = bad
            with pytest.raises(ValueError, match=name):
                op(index, *args)
    # the op itself takes any strides
    strided = torch.arange(2**32, 2**32 + 40, device=device).view(4, 10).t()
    _assert_equal_words(op(strided, 5, 1, 2, 3).cpu(), ref_words(5 + 2**32, strided.cpu(), 2, 3))


def test_bernoulli_keep_rejects_a_negative_or_non_integer_size(device):
    with pytest.raises(ValueError, match="shape"):
        rng.bernoulli_keep((3, -1), 0.5, seed=1, device=device)
    with pytest.raises(ValueError, match="shape"):
        rng.bernoulli_keep(-4, 0.5, seed=1, device=device)
    with pytest.raises(TypeError, match="shape"):
        rng.bernoulli_keep((2.5,), 0.5, seed=1, device=device)
    assert rng.bernoulli_keep(4, 1.0, seed=1, device=device).shape == (4,)
