"""Masked flash attention (Triton, fwd + bwd) vs eager reference attention with the unpacked
AD-DROP mask, key padding, 4-D masks and Philox attention dropout."""
import pytest
import torch
import triton

from regdrop_fast.addrop.attention import masked_attention
from regdrop_fast.addrop.mask import keep_mask
from regdrop_fast.masks import PackedMask, pack_mask, unpack_mask
from regdrop_fast.reference import masked_attention as ref
from utils import require_backend
from utils.sm90 import compile_script_for_sm90


def _inputs(batch, heads, lq, lk, d, device, gen, dtype=torch.float32):
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64).to(device, dtype)
            for n in (lq, lk, lk)]


def _run(fn, q, k, v, grad, **kwargs):
    """Output and (dq, dk, dv) of fn(q, k, v, **kwargs) for the upstream gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _compare(q, k, v, keep=None, rtol=1e-5, atol=1e-5, **kwargs):
    """Triton fp32 vs the reference in fp64 (same masks, same Philox dropout decisions)."""
    gen = torch.Generator().manual_seed(99)
    grad = torch.randn(*q.shape, generator=gen, dtype=torch.float64).to(q.device)
    got = _run(masked_attention, q, k, v, grad, keep=keep, backend="triton", **kwargs)
    dense = None if keep is None else unpack_mask(keep, backend="reference")
    ref_kwargs = dict(kwargs)
    if kwargs.get("attn_mask") is not None and kwargs["attn_mask"].is_floating_point():
        ref_kwargs["attn_mask"] = kwargs["attn_mask"].double()
    want = _run(ref.masked_attention, q.double(), k.double(), v.double(), grad, keep=dense,
                **ref_kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: {m}")
    return got


def _padding(batch, lk, lengths, device):
    return torch.arange(lk)[None, :].expand(batch, lk).lt(torch.tensor(lengths)[:, None]).to(device)


def test_plain_attention_matches_eager(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(0)
    _compare(*_inputs(2, 2, 33, 33, 16, device, gen))


def test_keep_mask_and_padding_with_an_all_pad_sample(device):
    """Sample 1 has no real key: its rows are fully masked -> zeros and zero gradients."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(2, 2, 20, 20, 32, device, gen)
    kpm = _padding(2, 20, [13, 0], device)
    keep = keep_mask(torch.randn(2, 2, 20, 20, generator=gen).to(device), 0.4, 0.8, kpm,
                     seed=3, backend="reference")
    out, dq, dk, dv = _compare(q, k, v, keep=keep, attn_mask=kpm)
    for t in (out, dq, dk, dv):
        assert torch.count_nonzero(t[1]) == 0
    assert torch.count_nonzero(out[0]) == out[0].numel()


def test_dropout_with_keep_mask_and_padding(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(2)
    q, k, v = _inputs(2, 2, 33, 33, 16, device, gen)
    kpm = _padding(2, 33, [33, 21], device)
    keep = keep_mask(torch.randn(2, 2, 33, 33, generator=gen).to(device), 0.3, 0.5, kpm,
                     backend="reference")
    _compare(q, k, v, keep=keep, attn_mask=kpm, dropout_p=0.25, seed=2**35 + 1, step=7,
             stream=3)


def test_single_query_and_key(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 2, 1, 1, 16, device, gen)
    keep = pack_mask(torch.tensor([True, False]).view(2, 1, 1, 1).expand(2, 2, 1, 1)
                     .contiguous().to(device))
    out = _compare(q, k, v, keep=keep)[0]
    torch.testing.assert_close(out[0], v[0])
    assert torch.count_nonzero(out[1]) == 0


def test_4d_bool_mask_and_lq_ne_lk(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(2, 2, 7, 40, 16, device, gen)
    attn_mask = (torch.rand(2, 1, 7, 40, generator=gen) < 0.7).to(device)
    attn_mask[0, 0, 3] = False  # one fully masked row
    keep = keep_mask(torch.randn(2, 2, 7, 40, generator=gen).to(device), 0.5, 0.5,
                     backend="reference")
    out = _compare(q, k, v, keep=keep, attn_mask=attn_mask)[0]
    assert torch.count_nonzero(out[0, :, 3]) == 0


def test_additive_mask_and_strided_inputs(device):
    """Additive float mask with −inf entries; q/k/v as transposed views of [B,L,H,D] (HF)."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in _inputs(2, 3, 18, 18, 16, device, gen))
    assert not q.is_contiguous()
    bias = torch.randn(2, 1, 18, 18, generator=gen).to(device)
    bias[:, :, :, 15:] = float("-inf")
    _compare(q, k, v, attn_mask=bias, scale=0.3)


def test_dropout_decisions_follow_the_philox_contract(device):
    """q = 0 makes the attention uniform and v = I exposes each kept probability:
    out[b,h,i,j] = Z[b,h,i,j] / ((1 − p)·Lk). Z must equal the reference's Philox decisions
    (word < floor((1 − p)·2^32) at the element's flat index) and drop about p of them."""
    require_backend("triton", device)
    batch, heads, lq, lk, p = 2, 2, 48, 16, 0.3
    q = torch.zeros(batch, heads, lq, 16, device=device)
    k = torch.randn(batch, heads, lk, 16, device=device)
    v = torch.eye(lk, 16, device=device).expand(batch, heads, lk, 16).contiguous()
    args = dict(dropout_p=p, seed=77, step=5, stream=2)
    out = masked_attention(q, k, v, backend="triton", **args)
    kept = out * (1 - p) * lk > 0.5
    want = ref.dropout_keep((batch, heads, lq, lk), p, 77, 5, 2, device)
    assert torch.equal(kept, want)
    assert abs(1 - kept.float().mean().item() - p) < 0.03
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / ((1 - p) * lk)))
    other = masked_attention(q, k, v, backend="triton", **dict(args, step=6))
    assert not torch.equal(other, out)


def test_reference_backend_through_public_api():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _inputs(1, 2, 5, 9, 16, "cpu", gen)
    kpm = _padding(1, 9, [6], "cpu")
    keep = keep_mask(torch.randn(1, 2, 5, 9, generator=gen), 0.3, 1.0, kpm, backend="reference")
    out = masked_attention(q, k, v, keep, attn_mask=kpm, backend="reference")
    dense = unpack_mask(keep) & kpm[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q=torch.randn(2, 3, 16)), ValueError, "q must have 4"),
    (dict(k=torch.randn(1, 2, 5, 16, dtype=torch.float64)), TypeError, "k must have dtype"),
    (dict(k=torch.randn(1, 2, 5, 16).half()), TypeError, "share a dtype"),
    (dict(v=torch.randn(1, 2, 6, 16)), ValueError, "k and v must be"),
    (dict(k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8)), ValueError, "k and v must be"),
    (dict(q=torch.randn(0, 2, 4, 16), k=torch.randn(0, 2, 5, 16), v=torch.randn(0, 2, 5, 16)),
     ValueError, "non-empty"),
    (dict(keep=torch.ones(1, 2, 4, 5, dtype=torch.bool)), TypeError, "PackedMask"),
    (dict(keep=PackedMask(torch.zeros(1, 2, 4, 1, dtype=torch.int32), (1, 2, 4, 6))),
     ValueError, "keep must have shape"),
    (dict(attn_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, "2-D attn_mask"),
    (dict(attn_mask=torch.ones(1, 5)), TypeError, "key padding"),
    (dict(attn_mask=torch.ones(1, 2, 4, 5, dtype=torch.long)), TypeError, "attn_mask"),
    (dict(attn_mask=torch.ones(1, 3, 4, 5, dtype=torch.bool)), ValueError, "broadcast"),
    (dict(attn_mask=torch.ones(1, 5, dtype=torch.bool)[0]), ValueError, "attn_mask"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(step=2**32), ValueError, "step"),
])
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(1, 2, 4, 16), k=torch.randn(1, 2, 5, 16),
                v=torch.randn(1, 2, 5, 16), backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        masked_attention(**args)


@pytest.mark.slow
@pytest.mark.parametrize("lq,lk,d,dropout_p", [(64, 64, 32, 0.0), (50, 37, 32, 0.1),
                                               (64, 100, 16, 0.5)])
def test_larger_shapes(device, lq, lk, d, dropout_p):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lq + lk)
    q, k, v = _inputs(2, 2, lq, lk, d, device, gen)
    kpm = _padding(2, lk, [lk, lk // 3], device)
    keep = keep_mask(torch.randn(2, 2, lq, lk, generator=gen).to(device), 0.3, 0.6, kpm,
                     seed=lq, backend="reference")
    _compare(q, k, v, keep=keep, attn_mask=kpm, dropout_p=dropout_p, seed=1, step=2)


@pytest.mark.cuda
@pytest.mark.parametrize("lq,lk,dropout_p", [(128, 128, 0.0), (512, 512, 0.1), (200, 333, 0.0)])
def test_cuda_bf16(lq, lk, dropout_p):
    """bf16 kernel error vs the fp64 reference within 3x the error of eager bf16 + 1e-2."""
    gen = torch.Generator().manual_seed(lq)
    q, k, v = _inputs(2, 4, lq, lk, 64, "cuda", gen, torch.bfloat16)
    kpm = _padding(2, lk, [lk, lk // 2], "cuda")
    keep = keep_mask((q, k), 0.3, 0.5, kpm, seed=3, backend="triton")
    grad = torch.randn(2, 4, lq, 64, generator=gen, dtype=torch.float64).cuda()
    args = dict(attn_mask=kpm, dropout_p=dropout_p, seed=5)
    dense = unpack_mask(keep)
    got = _run(masked_attention, q, k, v, grad, keep=keep, backend="triton", **args)
    want = _run(ref.masked_attention, q.double(), k.double(), v.double(), grad, keep=dense,
                **args)
    eager = _run(ref.masked_attention, q, k, v, grad, keep=dense, upcast=False, **args)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, eager):
        err = (a.double() - b).abs().max().item()
        eager_err = (c.double() - b).abs().max().item()
        assert err <= 3 * eager_err + 1e-2, f"{name}: kernel {err}, eager bf16 {eager_err}"


def test_official_additive_form_of_the_mask(device):
    """docs/differences.md: the keep mask as the official additive (1 − m)·(−10000) mask gives the
    official pass-2 attention, including a row whose keys are all dropped (softmax over every
    key, pads included), where keep= gives zeros."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(8)
    q, k, v = _inputs(1, 2, 6, 9, 16, device, gen)
    kpm = _padding(1, 9, [7], device)
    keep = keep_mask(torch.randn(1, 2, 6, 9, generator=gen).to(device), 0.3, 0.5, kpm, seed=2,
                     backend="reference")
    dense = unpack_mask(keep, backend="reference").clone()
    dense[0, 1, 4] = False  # every key of this row dropped
    additive = (1 - dense.float()) * -10000.0
    scores = q @ k.transpose(-1, -2) / 4 + additive
    official = torch.softmax(scores, -1) @ v
    # scores shifted by -10000 keep ~1e-3 absolute precision in fp32, in the official code too
    all_dropped = torch.softmax(q[0, 1, 4] @ k[0, 1].T / 4, -1) @ v[0, 1]
    torch.testing.assert_close(official[0, 1, 4], all_dropped, rtol=0, atol=2e-3)
    for backend in ("reference", "triton"):
        got = masked_attention(q, k, v, attn_mask=additive, backend=backend)
        torch.testing.assert_close(got, official, rtol=1e-5, atol=2e-3)
        zeros = masked_attention(q, k, v, keep=pack_mask(dense), backend=backend)
        assert torch.count_nonzero(zeros[0, 1, 4]) == 0
        torch.testing.assert_close(zeros[0, 0], official[0, 0], rtol=1e-5, atol=1e-5)


def _kernels():
    from regdrop_fast.triton_kernels import masked_attention as K
    return K, (K.masked_attention_fwd_kernel, K.masked_attention_bwd_dkdv_kernel,
               K.masked_attention_bwd_dq_kernel)


@pytest.fixture
def tma_tiles(monkeypatch):
    """Each autotuned kernel holds one config: the tensor-descriptor (TMA) twin of its first
    tile, so the descriptor loads and stores run (the interpreter implements them, with TMA's
    16-byte alignment checks)."""
    for kernel in _kernels()[1]:
        first = kernel.configs[0]
        monkeypatch.setattr(kernel, "configs", [triton.Config(
            {**first.kwargs, "USE_TMA": True}, num_warps=first.num_warps,
            num_stages=first.num_stages)])


@pytest.mark.parametrize("case", ["keep_padding_dropout", "padded_d_bool_mask",
                                  "strided_additive", "gqa_causal"])
def test_tma_tiles_match_eager(device, tma_tiles, case):
    """The descriptor path: keys past Lk and the columns of a padded D (D=20 in a 32-wide
    tile) read as zeros, partial tiles store only their rows, GQA heads and causal skipping."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(11)
    if case == "keep_padding_dropout":
        q, k, v = _inputs(2, 2, 33, 40, 16, device, gen)
        kpm = _padding(2, 40, [40, 0], device)
        keep = keep_mask(torch.randn(2, 2, 33, 40, generator=gen).to(device), 0.3, 0.5, kpm,
                         backend="reference")
        out = _compare(q, k, v, keep=keep, attn_mask=kpm, dropout_p=0.25, seed=5, step=2)[0]
        assert torch.count_nonzero(out[1]) == 0
    elif case == "padded_d_bool_mask":
        q, k, v = _inputs(1, 2, 19, 37, 20, device, gen)
        mask = (torch.rand(1, 2, 19, 37, generator=gen) < 0.7).to(device)
        _compare(q, k, v, attn_mask=mask)
    elif case == "strided_additive":  # [B,L,H,D] storage seen as [B,H,L,D] (HF)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
                   for t in _inputs(2, 3, 18, 18, 16, device, gen))
        bias = torch.randn(2, 1, 18, 18, generator=gen).to(device)
        _compare(q, k, v, attn_mask=bias, scale=0.3)
    else:
        q = _inputs(2, 4, 40, 40, 16, device, gen)[0]
        k, v = _inputs(2, 2, 33, 33, 16, device, gen)[1:]
        _compare(q, k, v, is_causal=True, dropout_p=0.1, seed=9)


def test_tma_eligibility_and_pruning():
    """Inputs TMA cannot address (a base or stride not a multiple of 16 bytes, a D beyond one
    box, overlapping rows) get TMA_OK = 0, and then the autotuner keeps only the pointer
    configs."""
    K, _ = _kernels()
    x = torch.zeros(2, 3, 8, 16)
    assert K.tma_ok(x, x.transpose(1, 2).contiguous().transpose(1, 2)) == 1
    assert K.tma_ok(x, torch.zeros(2 * 3 * 8 * 16 + 1)[1:].view(2, 3, 8, 16)) == 0  # base + 4 B
    assert K.tma_ok(torch.zeros(2, 3, 8, 12, dtype=torch.bfloat16)) == 0  # 24-byte rows
    assert K.tma_ok(torch.zeros(1, 1, 8, 320, dtype=torch.bfloat16)) == 0  # D > 256
    assert K.tma_ok(torch.zeros(2, 3, 1, 16).expand(2, 3, 8, 16)) == 0  # rows overlap
    configs = [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, USE_TMA=t)) for t in (False, True)]
    half = torch.zeros(1, dtype=torch.bfloat16)
    assert K._prune(configs, dict(q_ptr=half, TMA_OK=0)) == configs[:1]
    assert K._prune(configs, dict(q_ptr=half, TMA_OK=1)) == configs


_SM90_TMA = r"""
import io, contextlib, re
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regdrop_fast.triton_kernels import masked_attention as K

TYPES = dict(lse_ptr="*fp32", delta_ptr="*fp32", keep_ptr="*i32", kpm_ptr="*u8", am_ptr="*u8",
             qk_scale="fp32", sm_scale="fp32", dropout_scale="fp32", dropout_keep_thr="i64")
FLAGS = dict(HAS_KEEP=True, HAS_KPM=True, MASK_KIND=0, HAS_DROPOUT=True, IS_CAUSAL=True,
             BLOCK_D=64, DOT_PRECISION="tf32", TMA_OK=1, GROUP=1)
knobs.nvidia.dump_ptxas_log = True
knobs.compilation.always_compile = True
for autotuner in (K.masked_attention_fwd_kernel, K.masked_attention_bwd_dkdv_kernel,
                  K.masked_attention_bwd_dq_kernel):
    fn = autotuner.fn
    config = next(c for c in autotuner.configs if c.kwargs["USE_TMA"])
    constexprs = {**FLAGS, **config.kwargs}
    sig = {n: "constexpr" if n in constexprs else TYPES.get(n, "*bf16" if n.endswith("_ptr")
                                                           else "i32") for n in fn.arg_names}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps,
                                               num_stages=config.num_stages))
    ptx = compiled.asm["ptx"]
    name = fn.__name__
    assert "cp.async.bulk.tensor.2d.shared::cta.global" in ptx, f"{name}: no TMA load"
    assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx, f"{name}: no TMA store"
    assert "wgmma.mma_async" in ptx, f"{name}: no wgmma"
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    assert spills and spills.group(1) == "0", f"{name}: {log.getvalue()[-500:]}"
print("compiled")
"""


def test_tma_kernels_compile_for_sm90_with_bulk_tensor_copies():
    """The first TMA config of each kernel, bf16 D=64 with keep bits, padding, dropout and
    causal, as a GPU compiles it: bulk tensor copies in (Q/K/V/dO) and out (O, dQ, dK/dV),
    wgmma dots, no spills (tools/triton_aot checks every config; this pins the TMA path)."""
    compile_script_for_sm90(_SM90_TMA, timeout=600)


def test_forward_only_call_equals_the_autograd_path(device):
    """Without a gradient to track (no_grad, or no input requiring one) the kernel runs
    without the autograd Function: same output, no graph node."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(12)
    q, k, v = _inputs(1, 2, 20, 24, 16, device, gen)
    kpm = _padding(1, 24, [19], device)
    args = dict(attn_mask=kpm, dropout_p=0.2, seed=4, backend="triton")
    tracked = masked_attention(q.requires_grad_(), k, v, **args)
    assert tracked.grad_fn is not None
    with torch.no_grad():
        plain = masked_attention(q, k, v, **args)
    assert plain.grad_fn is None and not plain.requires_grad
    assert torch.equal(plain, tracked.detach())
    assert torch.equal(masked_attention(q.detach(), k, v, **args), plain)


def test_calls_of_one_geometry_reuse_its_plan_and_still_check(device):
    """A second call with the shapes, strides and dtypes of a first one launches with the
    first one's cached plan: other seeds, steps and data still give the reference's values,
    bad scalars still raise, and a changed stride (a non-unit last stride, copied) or mask
    kind is a new geometry."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(13)
    q, k, v = _inputs(1, 2, 9, 40, 16, device, gen)
    kpm = _padding(1, 40, [33], device)
    keep = keep_mask(torch.randn(1, 2, 9, 40, generator=gen).to(device), 0.3, 0.5, kpm,
                     backend="reference")
    for seed, step in ((1, 0), (2**40 + 3, 9)):
        _compare(q, k, v, keep=keep, attn_mask=kpm, dropout_p=0.2, seed=seed, step=step)
    q2, k2, v2 = _inputs(1, 2, 9, 40, 16, device, gen)
    _compare(q2, k2, v2, keep=keep, attn_mask=kpm, dropout_p=0.2, seed=1)
    for bad, error in ((dict(dropout_p=1.0), ValueError), (dict(step=-1), ValueError),
                       (dict(is_causal=1), TypeError), (dict(scale=float("nan")), ValueError)):
        with pytest.raises(error, match=next(iter(bad))):
            masked_attention(q, k, v, keep, attn_mask=kpm, **{"dropout_p": 0.2, **bad},
                             backend="triton")
    with pytest.raises(ValueError, match="2-D attn_mask"):
        masked_attention(q, k, v, keep, attn_mask=kpm[:, :39], dropout_p=0.2, backend="triton")
    wide = torch.randn(1, 2, 9, 32, generator=gen, dtype=torch.float64).to(device, q.dtype)
    strided = wide[..., ::2]  # last stride 2: copied before the launch
    assert strided.stride(-1) == 2
    _compare(strided, k, v, keep=keep, attn_mask=kpm, dropout_p=0.2, seed=1)
    _compare(q, k, v, keep=keep, attn_mask=kpm[:, None, None, :], dropout_p=0.2, seed=1)


def test_upstream_gradient_of_any_layout(device):
    """A non-contiguous dO (expanded, transposed, last stride 2) gives the gradients of the
    same values in a contiguous dO, bit for bit."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(14)
    q, k, v = _inputs(1, 2, 12, 20, 16, device, gen)
    kpm = _padding(1, 20, [17], device)
    args = dict(attn_mask=kpm, dropout_p=0.1, seed=3, backend="triton")
    base = torch.randn(1, 12, 2, 32, generator=gen).to(device)
    for grad in (torch.randn(1, 1, 12, 16, generator=gen).to(device).expand(1, 2, 12, 16),
                 base[..., :16].transpose(1, 2), base[..., ::2].transpose(1, 2)):
        assert not grad.is_contiguous()
        want = _run(masked_attention, q, k, v, grad.contiguous(), **args)
        got = _run(masked_attention, q, k, v, grad, **args)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_changing_a_mask_in_place_before_backward_raises(device):
    """The masks are saved for backward like q, k, v: changing one in place in between is
    an error, not silently different gradients."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(15)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 8, 32, 16, device, gen))
    kpm = _padding(1, 32, [30], device)
    keep = keep_mask(torch.randn(1, 2, 8, 32, generator=gen).to(device), 0.3, 0.5, kpm,
                     backend="reference")
    for change in (lambda: kpm.__setitem__((0, 3), False), lambda: keep.words.zero_()):
        out = masked_attention(q, k, v, keep, attn_mask=kpm, backend="triton")
        change()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("scale", [0.0, 1e-40])
def test_scale_at_or_below_the_fp32_floor_with_masks(device, scale):
    """The kernels fold the scale into exp2 by an FMA on the masked (−inf) scores, with
    scale·log2 e floored at 2^-126 so that −inf stays −inf: a zero or subnormal scale still
    gives the reference's uniform weights over the allowed keys, no NaN, in values and grads."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(16)
    q, k, v = _inputs(1, 2, 10, 40, 16, device, gen)
    kpm = _padding(1, 40, [35], device)
    keep = keep_mask(torch.randn(1, 2, 10, 40, generator=gen).to(device), 0.3, 0.6, kpm,
                     backend="reference")
    _compare(q, k, v, keep=keep, attn_mask=kpm, scale=scale, dropout_p=0.1, seed=8)
