"""The elementwise kernels of the default masked linear (triton_kernels/mask_training.py) in the
interpreter, against the torch expressions they replace; their sm_90 compile."""
import pytest
import torch

from regdrop_fast.reference import masks as ref_masks
from utils import require_backend
from utils.sm90 import compile_script_for_sm90

SHAPES = [(1, 1), (33, 70), (40, 161)]  # none a multiple of the 32 x 128 tiles


def _kernels(device):
    require_backend("triton", device)
    from regdrop_fast.triton_kernels import mask_training
    return mask_training


def _inputs(n, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, k + 5, generator=g).to(device)
    weight = wide[:, 2:2 + k]  # a row stride that is not k
    scores = torch.randn(n, k, generator=g).to(device)
    scores[n // 2] = 0.1  # a row tied with φ: pruned (keep iff score > φ)
    phi = torch.tensor([0.1], device=device)
    keep = scores > phi
    words = ref_masks.pack_bits(keep.cpu()).to(device)
    return weight, scores, phi, keep, words


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", ["scores", "packed"])
def test_materialize(device, n, k, dtype, source):
    mt = _kernels(device)
    weight, scores, phi, keep, words = _inputs(n, k, device)
    if source == "scores":
        got = mt.materialize(weight, None, scores, phi, dtype)
    else:
        got = mt.materialize(weight, words, None, None, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    want = torch.where(keep, weight, 0.0)
    assert torch.equal(got == 0, want == 0)  # the mask exactly
    if dtype == torch.float32 or device.type == "cuda":
        assert torch.equal(got, want.to(dtype))
    else:  # the interpreter's fp32 -> 16-bit cast may round the other way: one ulp
        torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("source", ["scores", "packed"])
def test_ste_grads(device, n, k, source):
    mt = _kernels(device)
    weight, scores, phi, keep, words = _inputs(n, k, device, seed=1)
    g = torch.randn(n, k, generator=torch.Generator().manual_seed(2)).to(device).bfloat16()
    src = (None, scores, phi) if source == "scores" else (words, None, None)
    dscore, dw = mt.ste_grads(g, weight, *src, want_dscore=source == "scores", want_dw=True,
                              score_dtype=torch.float32)
    if source == "scores":
        assert dscore.dtype == torch.float32
        assert torch.equal(dscore, g.float() * weight)
    else:
        assert dscore is None
    assert dw.dtype == weight.dtype
    assert torch.equal(dw, torch.where(keep, g.float(), 0.0))
    only, none = mt.ste_grads(g, weight, None, scores, phi, True, False, torch.float32)
    assert none is None and torch.equal(only, g.float() * weight)


def _adam_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, generator=g)
    exp_avg = 0.1 * torch.randn(n, k, generator=g)
    exp_avg_sq = 0.01 * torch.rand(n, k, generator=g)
    return scores, exp_avg, exp_avg_sq


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("ste", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_score_adamw_steps_match_float64_reference(device, n, k, ste, out_dtype, weight_decay):
    """Three steps of the fused kernel against the float64 reference: scores, m and v within
    fp32 rounding; the W' it writes is W where the new scores exceed φ, exactly."""
    mt = _kernels(device)
    from regdrop_fast.reference.masked_linear import score_adamw_step
    scores, m, v = (t.to(device) for t in _adam_inputs(n, k, seed=3))
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(4)).to(device)
    phi = torch.tensor([0.05], device=device)
    ref = tuple(t.double() for t in (scores, m, v))
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    for t in range(1, 4):
        gen = torch.Generator().manual_seed(10 + t)
        if ste:  # G = dW' in bf16, the gradient G ⊙ W formed in the kernel
            grad = torch.randn(n, k, generator=gen).bfloat16().to(device)
        else:
            grad = torch.randn(n, k, generator=gen).to(device)
        out = None if out_dtype is None else torch.empty(n, k, dtype=out_dtype, device=device)
        mt.score_adamw(scores, m, v, grad, weight, phi, out, step_size=lr / (1 - beta1 ** t),
                       bc2_sqrt=(1 - beta2 ** t) ** 0.5, decay=1 - lr * weight_decay,
                       beta1=beta1, beta2=beta2, eps=eps, ste=ste)
        ref = score_adamw_step(*ref, grad, step=t, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, weight=weight if ste else None)
        for got, want in zip((scores, m, v), ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        if out is not None:
            assert torch.equal(scores > phi, ref[0] > phi.double())  # the mask exactly
            want = torch.where(scores > phi, weight, 0.0)
            assert torch.equal(out == 0, want == 0)
            if out_dtype == torch.float32 or device.type == "cuda":
                assert torch.equal(out, want.to(out_dtype))
            else:  # the interpreter's fp32 -> 16-bit cast may round the other way: one ulp
                torch.testing.assert_close(out.float(), want, rtol=torch.finfo(out_dtype).eps,
                                           atol=0)


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regdrop_fast.triton_kernels import mask_training as K

target = GPUTarget("cuda", 90, 32)
BLOCKS = dict(BLOCK_N=K._BLOCK_N, BLOCK_K=K._BLOCK_K)


def compile_(fn, sig, flags, blocks=BLOCKS):
    sig = {**sig, **{n: "constexpr" for n in list(flags) + list(blocks)}}
    ordered = {name: sig[name] for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=ordered, constexprs={**flags, **blocks}),
                   target=target, options={"num_warps": 4})


ints = {n: "i32" for n in ("N", "K")}
for src in (True, False):
    compile_(K.materialize_kernel,
             dict(w_ptr="*fp32", words_ptr="*i32", scores_ptr="*fp32", phi_ptr="*fp32",
                  out_ptr="*bf16", stride_wn="i64", stride_words_n="i64",
                  stride_scores_n="i64", **ints), dict(FROM_SCORES=src))
    compile_(K.ste_grads_kernel,
             dict(g_ptr="*bf16", w_ptr="*fp32", words_ptr="*i32", scores_ptr="*fp32",
                  phi_ptr="*fp32", dscore_ptr="*fp32", dw_ptr="*fp32", stride_gn="i64",
                  stride_wn="i64", stride_words_n="i64", stride_scores_n="i64", **ints),
             dict(FROM_SCORES=src, WANT_DSCORE=True, WANT_DW=True))
scalars = {n: "fp32" for n in ("step_size", "bc2_sqrt", "decay", "beta1", "beta2",
                               "one_minus_beta1", "one_minus_beta2", "eps")}
for ste in (True, False):
    for write in (True, False):
        compile_(K.score_adamw_kernel,
                 dict(s_ptr="*fp32", m_ptr="*fp32", v_ptr="*fp32",
                      grad_ptr="*bf16" if ste else "*fp32", w_ptr="*fp32", phi_ptr="*fp32",
                      out_ptr="*bf16", n="i32", **scalars),
                 dict(STE=ste, WRITE_MASKED=write), dict(BLOCK=K._ADAM_BLOCK))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The kernels, both mask sources and every score_adamw variant, as a GPU compiles them
    (no GPU needed)."""
    compile_script_for_sm90(_SM90_COMPILE, timeout=600)
