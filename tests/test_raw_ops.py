"""The raw extension ops (torch.ops.regdrop_fast.*) have fake (meta) implementations: torch's
opcheck passes on CPU (schema, fake tensors, AOT dispatch with dynamic shapes), they run on meta
tensors with the output shapes of the real kernels, reject the arguments the C++ checks reject,
and a torch.compile'd function calling them traces as one graph."""
import pytest
import torch

from regdrop_fast import backends


@pytest.fixture(scope="module")
def op():
    reason = backends.unavailable_reason("cpu", "cpu")
    if reason is not None:
        pytest.skip(reason)
    backends.extension()
    return torch.ops.regdrop_fast


def _adamw_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    sizes = (40, 7)
    params = [torch.rand(n, generator=gen).to(device) for n in sizes]
    return ([p.clone() for p in params], [torch.rand(n, generator=gen).to(device) for n in sizes],
            [torch.zeros(n, device=device) for n in sizes],
            [torch.zeros(n, device=device) for n in sizes],
            [torch.full((2,), -1431655766, dtype=torch.int32, device=device),
             torch.zeros(0, dtype=torch.int32, device=device)],
            [2, 1], [3, 3], [0, 40], [0, 1], [1e-3, 1e-3], [1.0, 1.0], 0.9, 0.999, 1e-6, 0.01,
            5, 0, 0.5, 0, True)


def _cases(op):
    words = torch.randint(-2**31, 2**31 - 1, (3, 2), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(1))
    return {
        "pack_mask": (op.pack_mask.default, (torch.rand(3, 40) > 0.5,)),
        "unpack_mask": (op.unpack_mask.default, (words, 40)),
        "mask_popcount": (op.mask_popcount.default, (words,)),
        "philox_words": (op.philox_words.default, (torch.arange(10), 1, 2, 3, 4)),
        "philox_keep_": (op.philox_keep_.default,
                         (torch.zeros(10, dtype=torch.bool), 3, 1, 2, 3, 4, 2**31)),
        "masked_adamw_": (op.masked_adamw_.default, _adamw_args()),
    }


@pytest.mark.parametrize("name", ["pack_mask", "unpack_mask", "mask_popcount", "philox_words",
                                  "philox_keep_", "masked_adamw_"])
def test_opcheck(op, name):
    overload, args = _cases(op)[name]
    results = torch.library.opcheck(overload, args)
    assert set(results.values()) == {"SUCCESS"}, results


def test_every_op_runs_on_meta_tensors(op):
    meta = torch.device("meta")
    words = op.pack_mask(torch.zeros(3, 40, dtype=torch.bool, device=meta))
    assert words.device == meta and words.shape == (3, 2) and words.dtype == torch.int32
    mask = op.unpack_mask(words, 40)
    assert mask.shape == (3, 40) and mask.dtype == torch.bool
    count = op.mask_popcount(words)
    assert count.shape == () and count.dtype == torch.int64
    out = op.philox_words(torch.zeros(2, 5, dtype=torch.int64, device=meta), 1, 2, 3, 4)
    assert out.shape == (2, 5) and out.dtype == torch.int64
    op.philox_keep_(torch.zeros(5, dtype=torch.bool, device=meta), 0, 1, 2, 3, 4, 7)
    op.masked_adamw_(*_adamw_args(meta))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fake_and_cpu_kernels_reject_the_same_arguments(op, device):
    def t(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    with pytest.raises(TypeError, match="mask"):
        op.pack_mask(t(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="words must have 2 columns"):
        op.unpack_mask(t(2, 1, dtype=torch.int32), 40)
    with pytest.raises(ValueError, match="n must be >= 0"):
        op.unpack_mask(t(2, 0, dtype=torch.int32), -1)
    with pytest.raises(TypeError, match="words"):
        op.mask_popcount(t(3))
    with pytest.raises(ValueError, match="seed_hi"):
        op.philox_words(t(3, dtype=torch.int64), 0, 2**32, 0, 0)
    with pytest.raises(ValueError, match="offset"):
        op.philox_keep_(t(8, dtype=torch.bool), 2**63 - 5, 0, 0, 0, 0, 1)
    args = list(_adamw_args(device))
    args[7] = [0, -1]  # index_offsets
    with pytest.raises(ValueError, match=r"index_offsets\[1\]"):
        op.masked_adamw_(*args)
    args = list(_adamw_args(device))
    args[4] = [t(1, dtype=torch.int32), args[4][1]]  # 32 bits for a 40-element tensor
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        op.masked_adamw_(*args)
    args = list(_adamw_args(device))
    args[2] = [t(5), args[2][1]]  # a truncated exp_avg
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        op.masked_adamw_(*args)


def test_compiled_function_calls_the_ops_in_one_graph(op):
    def keep_density(index, mask):
        words = op.philox_words(index, 1, 2, 3, 4)
        return (words < 2**31).float().mean() + op.mask_popcount(op.pack_mask(mask)).float()

    index = torch.arange(64)
    mask = torch.rand(4, 40, generator=torch.Generator().manual_seed(2)) > 0.5
    compiled = torch.compile(keep_density, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(index, mask), keep_density(index, mask))
