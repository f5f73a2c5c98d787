"""Property tests (hypothesis) of the AD-DROP ops over shapes, strides and dtypes: keep_mask and
masked_attention on the triton backend against the references, inputs contiguous, transposed
(HF's [B,L,H,D] views), sliced, or expanded with stride 0."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regdrop_fast.addrop.attention import masked_attention
from regdrop_fast.addrop.mask import keep_mask
from regdrop_fast.masks import unpack_mask
from regdrop_fast.reference import masked_attention as ref
from utils import require_backend

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _laid_out(shape, layout, dtype, device, gen, integers=False):
    """A tensor of `shape` with the given memory layout (values drawn once, then viewed);
    integers: small integer values (exact products in fp32)."""
    b, h, n, d = shape

    def draw(*size):
        values = torch.randn(*size, generator=gen)
        return (values * 2).round().to(device, dtype) if integers else values.to(device, dtype)

    if layout == "transposed":
        return draw(b, n, h, d).transpose(1, 2)
    if layout == "sliced":
        return draw(b, h + 1, n + 2, d + 3)[:, 1:, 1:n + 1, 2:d + 2]
    if layout == "expanded":  # stride 0 along the batch and the last dim (repeated values)
        return draw(1, h, n, 1).expand(b, h, n, d)
    return draw(*shape)


@st.composite
def mask_cases(draw):
    return dict(batch=draw(st.integers(1, 3)), heads=draw(st.integers(1, 3)),
                lq=draw(st.integers(1, 40)), lk=draw(st.integers(1, 70)),
                p=draw(st.integers(1, 99)) / 100, q=draw(st.sampled_from([0.0, 0.3, 1.0])),
                drop=draw(st.sampled_from(["high", "low"])), causal=draw(st.booleans()),
                layout=draw(st.sampled_from(LAYOUTS)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                padded=draw(st.booleans()), seed=draw(st.integers(0, 2**64 - 1)))


@SETTINGS
@given(case=mask_cases())
def test_keep_mask_bit_identical_for_any_layout(device, case):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(case["seed"] % 2**63)
    shape = (case["batch"], case["heads"], case["lq"], case["lk"])
    attr = _laid_out(shape, case["layout"], case["dtype"], device, gen)
    kpm = None
    if case["padded"]:
        lengths = torch.randint(0, case["lk"] + 1, (case["batch"],), generator=gen)
        kpm = (torch.arange(case["lk"])[None, :] < lengths[:, None]).to(device)
    args = dict(p=case["p"], q=case["q"], key_padding_mask=kpm, seed=case["seed"], step=3,
                stream=1, drop=case["drop"], is_causal=case["causal"])
    got = keep_mask(attr, backend="triton", **args)
    want = keep_mask(attr.contiguous(), backend="reference", **args)
    assert torch.equal(got.words, want.words)


@st.composite
def pair_cases(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 2)), kv_heads=kv_heads,
                heads=kv_heads * draw(st.integers(1, 2)), lq=draw(st.integers(1, 24)),
                lk=draw(st.integers(1, 70)), d=draw(st.sampled_from([8, 16])),
                layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 2)),
                p=draw(st.integers(1, 99)) / 100, drop=draw(st.sampled_from(["high", "low"])),
                causal=draw(st.booleans()), seed=draw(st.integers(0, 2**32)))


@SETTINGS
@given(case=pair_cases())
def test_keep_mask_from_gqa_pair_for_any_layout(device, case):
    """(dO, v) pairs, v with Hkv heads: small-integer values make dO·Vᵀ exact in fp32 in any
    summation order, so the kernel's in-tile attribution must give the reference's bits."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, lq, lk, d = (case[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "d"))
    dO = _laid_out((b, h, lq, d), case["layouts"][0], torch.float32, device, gen, True)
    v = _laid_out((b, hkv, lk, d), case["layouts"][1], torch.float32, device, gen, True)
    args = dict(p=case["p"], q=0.5, seed=case["seed"], drop=case["drop"],
                is_causal=case["causal"])
    got = keep_mask((dO, v), backend="triton", **args)
    want = keep_mask((dO.contiguous(), v.contiguous()), backend="reference", **args)
    assert torch.equal(got.words, want.words)


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 2)), kv_heads=kv_heads,
                heads=kv_heads * draw(st.integers(1, 2)), lq=draw(st.integers(1, 40)),
                lk=draw(st.integers(1, 40)), d=draw(st.sampled_from([8, 16, 24])),
                layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3)),
                causal=draw(st.booleans()), keep=draw(st.booleans()),
                padded=draw(st.booleans()),
                dropout=draw(st.sampled_from([0.0, 0.2])), seed=draw(st.integers(0, 2**32)))


@SETTINGS
@given(case=attention_cases())
def test_masked_attention_matches_reference_for_any_layout(device, case):
    """fp32 kernel (the interpreter's tl.dot is fp32) vs the fp64 reference on contiguous
    copies: output and the gradients of the strided leaves, 1e-5."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, lq, lk, d = (case[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "d"))
    q = _laid_out((b, h, lq, d), case["layouts"][0], torch.float32, device, gen)
    k = _laid_out((b, hkv, lk, d), case["layouts"][1], torch.float32, device, gen)
    v = _laid_out((b, hkv, lk, d), case["layouts"][2], torch.float32, device, gen)
    kpm = None
    if case["padded"]:
        lengths = torch.randint(0, lk + 1, (b,), generator=gen)
        kpm = (torch.arange(lk)[None, :] < lengths[:, None]).to(device)
    keep = None
    if case["keep"]:
        keep = keep_mask(torch.randn(b, h, lq, lk, generator=gen).to(device), 0.3, 0.5, kpm,
                         seed=case["seed"], is_causal=case["causal"], backend="reference")
    args = dict(attn_mask=kpm, dropout_p=case["dropout"], seed=case["seed"], step=1,
                is_causal=case["causal"])
    grad = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64).to(device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*leaves, keep=keep, backend="triton", **args)
    out.backward(grad.float())
    refs = [t.detach().double().contiguous().requires_grad_() for t in (q, k, v)]
    dense = None if keep is None else unpack_mask(keep, backend="reference")
    want = ref.masked_attention(*refs, keep=dense, **args)
    want.backward(grad)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for name, got_leaf, ref_leaf in zip("qkv", leaves, refs):
        torch.testing.assert_close(got_leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.cuda
@settings(max_examples=20, deadline=None)
@given(case=attention_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_masked_attention_half_precision_on_cuda(case, dtype):
    """bf16/fp16 on the GPU: within 3x eager half-precision error + 1e-2 of the fp64 reference."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, lq, lk, d = (case[k] for k in ("batch", "heads", "kv_heads", "lq", "lk", "d"))
    q = _laid_out((b, h, lq, d), case["layouts"][0], dtype, "cuda", gen)
    k = _laid_out((b, hkv, lk, d), case["layouts"][1], dtype, "cuda", gen)
    v = _laid_out((b, hkv, lk, d), case["layouts"][2], dtype, "cuda", gen)
    args = dict(dropout_p=case["dropout"], seed=case["seed"], is_causal=case["causal"])
    got = masked_attention(q, k, v, backend="triton", **args).double()
    want = ref.masked_attention(q.double(), k.double(), v.double(), **args)
    eager = ref.masked_attention(q, k, v, upcast=False, **args).double()
    assert (got - want).abs().max() <= 3 * (eager - want).abs().max() + 1e-2
