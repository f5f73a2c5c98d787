"""Bit-packed masks: pack/unpack/density on the reference, Triton (interpreter on CPU), C++ and
CUDA backends give exactly the same words and bools; odd sizes, empty rows, strides, bad input."""
import pytest
import torch
from utils import require_backend

from regdrop_fast import backends
from regdrop_fast.masks import PackedMask, mask_density, num_words, pack_mask, unpack_mask
from regdrop_fast.reference import masks as ref

ALL_BACKENDS = ["reference", "triton", "cpu", "cuda"]
SHAPES = [(1,), (31,), (32,), (33,), (1000,), (3, 1), (4, 31), (2, 64), (5, 65), (2, 3, 33),
          (2, 1, 2, 1001), (0, 5), (3, 0), (0,)]


def _random_mask(shape, keep_prob, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < keep_prob


def _assert_same_words(got, want):
    if not torch.equal(got, want):
        diff = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"{int((got != want).sum())} words differ, first at {diff}")


def _density_backend(backend):
    """mask_density has no Triton kernel: its popcount runs on reference, cpu or cuda."""
    return "reference" if backend == "triton" else backend


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_unpack_density_match_reference(backend, shape, device):
    require_backend(backend, device)
    for seed, keep_prob in enumerate([0.0, 0.3, 0.9, 1.0]):
        mask = _random_mask(shape, keep_prob, seed)
        want = ref.pack_bits(mask)
        assert want.shape == (*shape[:-1], num_words(shape[-1]))
        packed = pack_mask(mask.to(device), backend=backend)
        assert packed.words.dtype == torch.int32 and packed.shape == mask.shape
        assert packed.device.type == torch.device(device).type
        _assert_same_words(packed.words.cpu(), want)
        unpacked = unpack_mask(packed, backend=backend)
        assert unpacked.dtype == torch.bool and unpacked.shape == mask.shape
        assert torch.equal(unpacked.cpu(), mask)
        numel = mask.numel()
        want_density = int(mask.sum()) / numel if numel else 0.0
        assert mask_density(packed, backend=_density_backend(backend)) == want_density


@pytest.mark.parametrize("n", [1, 31, 32, 33, 95, 1000])
def test_bit_layout(n):
    """Bit j of word w is element 32w + j, bits past n are 0, element 31 is the sign bit."""
    for element in {0, n // 2, n - 1, min(31, n - 1)}:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[element] = True
        words = ref.pack_bits(mask)
        want = torch.zeros(num_words(n), dtype=torch.int64)
        want[element // 32] = 1 << (element % 32)
        assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, want)
    full = ref.pack_bits(torch.ones(n, dtype=torch.bool)).to(torch.int64) & 0xFFFFFFFF
    assert int(full[-1]) == (1 << (n - 32 * (num_words(n) - 1))) - 1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unpack_ignores_bits_past_the_row(backend, device):
    require_backend(backend, device)
    n = 45
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(-2**31, 2**31, (7, num_words(n)), dtype=torch.int32, generator=gen)
    words[:, -1] |= -1 << (n % 32)  # set every bit past n
    packed = PackedMask(words.to(device), (7, n))
    want = ref.unpack_bits(words, n)
    assert torch.equal(unpack_mask(packed, backend=backend).cpu(), want)
    # repacking clears them again
    repacked = pack_mask(want.to(device), backend=backend)
    _assert_same_words(repacked.words.cpu(), ref.pack_bits(want))
    last = repacked.words[:, -1].cpu().to(torch.int64) & 0xFFFFFFFF
    assert not (last >> (n % 32)).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    require_backend(backend, device)
    base = _random_mask((40, 70), 0.5, 11).to(device)
    for mask in (base.t(), base[:, ::3], base[::2, 5:], base.flip(0).t()):
        want = ref.pack_bits(mask.cpu())
        packed = pack_mask(mask, backend=backend)
        _assert_same_words(packed.words.cpu(), want)
        assert torch.equal(unpack_mask(packed, backend=backend).cpu(), mask.cpu())
    words = ref.pack_bits(base.cpu()).t().contiguous().t()  # [40, 3] with column-major strides
    assert not words.is_contiguous()
    strided = PackedMask(words.to(device), (40, 70))
    assert torch.equal(unpack_mask(strided, backend=backend).cpu(), base.cpu())
    density = mask_density(strided, backend=_density_backend(backend))
    assert density == int(base.sum()) / base.numel()


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_density_counts_all_32_bits(backend, device):
    require_backend(backend, device)
    words = torch.full((3, 2), -1, dtype=torch.int32, device=device)  # every bit set
    assert mask_density(PackedMask(words, (3, 64)), backend=backend) == 1.0
    assert mask_density(PackedMask(words[:, :1].clone(), (3, 32)), backend=backend) == 1.0
    sign_only = torch.full((5, 1), -2**31, dtype=torch.int32, device=device)
    assert mask_density(PackedMask(sign_only, (5, 32)), backend=backend) == 1 / 32
    assert mask_density(PackedMask(words[:0], (0, 64)), backend=backend) == 0.0


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu", "cuda"])
def test_density_equals_mean(backend, device):
    require_backend(backend, device)
    mask = _random_mask((6, 333), 0.37, 5)
    packed = pack_mask(mask.to(device), backend=backend)
    density = mask_density(packed, backend=_density_backend(backend))
    assert density == pytest.approx(mask.float().mean().item(), abs=1e-7)
    assert packed.density == density


def test_packed_mask_round_trips_random_words():
    gen = torch.Generator().manual_seed(8)
    for n in (1, 33, 64, 100):
        words = torch.randint(-2**31, 2**31, (4, num_words(n)), dtype=torch.int32, generator=gen)
        bools = unpack_mask(PackedMask(words, (4, n)), backend="reference")
        tail = n % 32
        if tail:
            words[:, -1] &= (1 << tail) - 1
        _assert_same_words(pack_mask(bools, backend="reference").words, words)


def test_bad_input_names_the_argument(device):
    with pytest.raises(TypeError, match="mask"):
        pack_mask(torch.zeros(4, 33, dtype=torch.float32, device=device))
    with pytest.raises(TypeError, match="mask"):
        pack_mask(torch.zeros(4, 33, dtype=torch.uint8, device=device))
    with pytest.raises(TypeError, match="mask"):
        pack_mask([True, False])
    with pytest.raises(ValueError, match="mask"):
        pack_mask(torch.tensor(True, device=device))
    with pytest.raises(ValueError, match="words"):
        PackedMask(torch.zeros(4, 2, dtype=torch.int32), (4, 65))
    with pytest.raises(ValueError, match="words"):
        PackedMask(torch.zeros(8, dtype=torch.int32), (4, 64))
    with pytest.raises(TypeError, match="words"):
        PackedMask(torch.zeros(4, 2, dtype=torch.int64), (4, 64))
    with pytest.raises(ValueError, match="shape"):
        PackedMask(torch.zeros(1, dtype=torch.int32), ())
    with pytest.raises(TypeError, match="packed"):
        unpack_mask(torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="packed"):
        mask_density(torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(backends.BackendUnavailableError, match="mask_popcount has no 'triton'"):
        mask_density(PackedMask(torch.zeros(1, 1, dtype=torch.int32), (1, 5)), backend="triton")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_extension_ops_check_their_arguments(backend, device):
    require_backend(backend, device)
    ops = torch.ops.regdrop_fast
    with pytest.raises(TypeError, match="mask"):
        ops.pack_mask(torch.zeros(2, 3, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="mask"):
        ops.pack_mask(torch.zeros(6, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="words"):
        ops.unpack_mask(torch.zeros(2, 1, dtype=torch.int64, device=device), 5)
    with pytest.raises(ValueError, match="words"):
        ops.unpack_mask(torch.zeros(2, 1, dtype=torch.int32, device=device), 33)
    with pytest.raises(ValueError, match="words"):
        ops.unpack_mask(torch.zeros(2, dtype=torch.int32, device=device), 5)
    with pytest.raises(ValueError, match="n must be"):
        ops.unpack_mask(torch.zeros(2, 0, dtype=torch.int32, device=device), -1)
    with pytest.raises(TypeError, match="words"):
        ops.mask_popcount(torch.zeros(3, dtype=torch.float32, device=device))
    count = ops.mask_popcount(torch.tensor([[-1, 3]], dtype=torch.int32, device=device).t())
    assert count.dim() == 0 and count.dtype == torch.int64 and int(count) == 34


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_density_ignores_padding_bits(backend, device):
    require_backend(backend, device)
    words = torch.full((3, 1), -1, dtype=torch.int32, device=device)  # bits past n = 5 set too
    assert mask_density(PackedMask(words, (3, 5)), backend=backend) == 1.0
    words = torch.full((2, 2), -1, dtype=torch.int32, device=device)
    words[:, 1] = -2  # element 32 of each row dropped, bits past n = 33 set
    assert mask_density(PackedMask(words, (2, 33)), backend=backend) == 64 / 66
    assert words[0, 1] == -2  # the caller's words are not modified


def test_packed_mask_is_immutable():
    import dataclasses

    packed = pack_mask(torch.ones(3, 40, dtype=torch.bool), backend="reference")
    for name, value in (("words", torch.zeros(3, 1, dtype=torch.int32)),
                        ("shape", torch.Size((3, 4000))), ("_popcount", 7)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(packed, name, value)
    assert packed.words.shape == (3, 2) and packed.shape == (3, 40)
    assert mask_density(packed, backend="reference") == 1.0  # the cache still fills
