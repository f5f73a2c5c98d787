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
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The kernels, both mask sources, as a GPU compiles them (no GPU needed)."""
    compile_script_for_sm90(_SM90_COMPILE, timeout=600)
