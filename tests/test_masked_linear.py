"""Fused masked linear (triton_kernels/masked_linear.py) vs the reference F.linear(x, W*M, b)."""
import pytest
import torch

from regdrop_fast.masks import pack_mask
from regdrop_fast.reference import masked_linear as ref
from regdrop_fast.sparse import masked_linear
from utils import require_backend
from utils.sm90 import compile_script_for_sm90

SHAPES = [  # (leading dims of x, out N, in K): none a multiple of the 32-wide interpreter tiles
    ((37,), 45, 70),
    ((2, 5), 33, 100),
    ((1,), 1, 1),
]


def _inputs(lead, n, k, device, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)
    b = torch.randn(n, generator=g).to(device)
    scores = torch.randn(n, k, generator=g).to(device)
    phi = 0.2
    keep = scores > phi
    keep[n // 2] = False  # an all-pruned row
    if kind == "packed":
        return x, w, b, pack_mask(keep.cpu(), backend="reference").to(device), None
    scores[n // 2] = phi - 1.0
    return x, w, b, scores, phi


def _run(backend, x, w, b, mask, phi, dy, train_w=True):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(train_w)
    b = b.clone().requires_grad_(True)
    leaves = [x, w, b]
    if isinstance(mask, torch.Tensor):
        mask = mask.clone().requires_grad_(True)
        leaves.append(mask)
    y = masked_linear(x, w, mask, b, threshold=phi, backend=backend)
    need = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, need, dy)
    return y, dict(zip([id(t) for t in need], grads)), leaves


def _ref64(x, w, b, mask, phi, dy):
    """float64 reference outputs and grads (x, w, b[, scores])."""
    leaves = [t.double().requires_grad_(True) for t in (x, w, b)]
    kwargs = {}
    if isinstance(mask, torch.Tensor):
        s = mask.double().requires_grad_(True)
        leaves.append(s)
        kwargs = {"scores": s, "threshold": phi}
    else:
        kwargs = {"words": mask.words}
    y = ref.masked_linear(leaves[0], leaves[1], bias=leaves[2], **kwargs)
    return (y,) + torch.autograd.grad(y, leaves, dy.double())


def _close(got, want, name):
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("kind", ["packed", "scores"])
def test_triton_matches_reference_fwd_bwd(device, lead, n, k, kind):
    require_backend("triton", device)
    x, w, b, mask, phi = _inputs(lead, n, k, device, kind)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(device)
    y, grads, leaves = _run("triton", x, w, b, mask, phi, dy)
    want = _ref64(x, w, b, mask, phi, dy)
    _close(y, want[0], "y")
    for name, leaf, ref_grad in zip(["dx", "dW", "db", "dScore"], leaves, want[1:]):
        _close(grads[id(leaf)], ref_grad, name)


@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("kind", ["packed", "scores"])
@pytest.mark.parametrize("train_w", [True, False])
def test_default_path_matches_reference_fwd_bwd(device, lead, n, k, kind, train_w):
    """backend=None: W ⊙ M once + torch GEMMs; y, dx, db, dW, dScore against float64."""
    x, w, b, mask, phi = _inputs(lead, n, k, device, kind)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(device)
    y, grads, leaves = _run(None, x, w, b, mask, phi, dy, train_w=train_w)
    want = _ref64(x, w, b, mask, phi, dy)
    _close(y, want[0], "y")
    for name, leaf, ref_grad in zip(["dx", "dW", "db", "dScore"], leaves, want[1:]):
        if leaf.requires_grad:
            _close(grads[id(leaf)], ref_grad, name)
    assert train_w or id(leaves[1]) not in grads


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_expanded_bias_and_strided_operands(device, backend):
    """Issue 15 W1: a stride-0 (expanded) bias, a transposed weight and sliced scores give the
    reference's answer on every path (the Triton kernel read the bias as if contiguous)."""
    if backend == "triton":
        require_backend("triton", device)
    x, w, b, scores, phi = _inputs((7,), 20, 40, device, "scores")
    bias = torch.tensor(0.75, device=device).expand(20)
    weight = w.t().contiguous().t()  # a transposed view: column stride 20
    wide = torch.randn(20, 90, device=device)
    wide[:, 3:43] = scores
    sliced = wide[:, 3:43]
    y = masked_linear(x, weight, sliced, bias, threshold=phi, backend=backend)
    want = ref.masked_linear(x.double(), w.double(), bias=torch.full((20,), 0.75).double().to(
        device), scores=scores, threshold=phi)
    _close(y, want, f"y[{backend}]")


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_nan_threshold_tensor_raises(device, backend):
    """Issue 15 W2: a NaN threshold tensor pruned every weight silently; ±inf stay valid."""
    if backend == "triton":
        require_backend("triton", device)
    x, w, b, scores, _ = _inputs((3,), 8, 40, device, "scores")
    for phi in (torch.tensor(float("nan")), torch.tensor([float("nan")], device=device)):
        with pytest.raises(ValueError, match="threshold must not be NaN"):
            masked_linear(x, w, scores, b, threshold=phi, backend=backend)
    y = masked_linear(x, w, scores, b, threshold=torch.tensor(float("-inf")), backend=backend)
    _close(y, (x.double() @ w.double().T + b.double()), "phi=-inf keeps all")
    y = masked_linear(x, w, scores, b, threshold=float("inf"), backend=backend)
    assert torch.equal(y, b.expand(3, 8))


def test_default_path_under_autocast_matches_reference():
    """Mixed precision: fp32 weights, bias and scores, x in fp32 or bf16, compute in bf16; the
    bias gradient is the fp32 sum of the bf16 dy, in the bias's dtype (not rounded to bf16)."""
    x, w, b, scores, phi = _inputs((16,), 24, 48, "cpu", "scores")
    dy = torch.randn(16, 24)
    for x_dtype in (torch.float32, torch.bfloat16):
        xx = x.detach().to(x_dtype).requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = masked_linear(xx, w, s, bb, threshold=phi)
        assert y.dtype == torch.bfloat16
        y.backward(dy.bfloat16())
        assert bb.grad.dtype == torch.float32
        assert torch.equal(bb.grad, dy.bfloat16().float().sum(0))
        want = _ref64(x, w, b, scores, phi, dy)
        torch.testing.assert_close(y.double(), want[0], rtol=2e-2, atol=5e-2)
        assert xx.grad.dtype == x_dtype
        torch.testing.assert_close(xx.grad.double(), want[1], rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(s.grad.double(), want[4], rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("kind", ["packed", "scores"])
def test_default_backward_ignores_the_autocast_state_it_runs_under(kind):
    """A backward run inside an autocast region (the forward outside it) computes in the
    forward's dtype: its gradients equal those of a backward outside autocast, bit for bit."""
    x, w, b, mask, phi = _inputs((2, 6), 24, 48, "cpu", kind)
    dy = torch.randn(2, 6, 24)
    grads = []
    for under_autocast in (False, True):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        if kind == "scores":
            leaves.append(mask.clone().requires_grad_(True))
        y = masked_linear(leaves[0], leaves[1], leaves[2] if kind == "scores" else mask, b,
                          threshold=phi)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            grads.append(torch.autograd.grad(y, leaves, dy))
    for got, want in zip(*grads):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def _saved_new_bytes(fn, inputs):
    """Bytes of the tensors autograd saves during fn() that share no storage with `inputs`."""
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_mask_training_saves_one_compute_dtype_copy():
    """Issue 18 memory: a mask-training layer (frozen fp32 W, fp32 scores, bf16 autocast) keeps
    for backward what a dense layer keeps (x and one bf16 copy of the weight), nothing more: no
    fp32 W ⊙ M, no float mask (checked: an fp32 W ⊙ M makes it fail)."""
    n, k, m = 64, 96, 8
    w = torch.randn(n, k)
    scores = torch.randn(n, k, requires_grad=True)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    dense_w = w.clone().requires_grad_(True)

    def dense():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, dense_w)

    def default():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masked_linear(x, w, scores, threshold=0.1)

    inputs = [x, w, scores, dense_w]
    assert _saved_new_bytes(dense, inputs) == n * k * 2  # the bf16 weight copy
    # the bf16 W ⊙ M and the 4-byte fp32 threshold, only
    assert _saved_new_bytes(default, inputs) == n * k * 2 + 4


@pytest.mark.parametrize("kind", ["packed", "scores"])
def test_all_pruned_rows_output_bias(device, kind, kernel_backends):
    x, w, b, mask, phi = _inputs((9,), 20, 40, device, kind)
    for backend in ["reference"] + [n for n in kernel_backends if n == "triton"]:
        y = masked_linear(x, w, mask, b, threshold=phi, backend=backend)
        assert torch.equal(y[:, 10], b[10].expand(9)), backend
        assert torch.isfinite(y).all()


def test_ste_and_masked_weight_grad_formulas(device):
    """dScore = (dyᵀx) ⊙ W (straight-through) and dW = (dyᵀx) ⊙ M, checked by hand."""
    x, w, b, scores, phi = _inputs((13,), 11, 17, device, "scores")
    dy = torch.randn(13, 11).to(device)
    backends_here = ["reference"] + (["triton"] if _triton_ok(device) else [])
    for backend in backends_here:
        y, grads, leaves = _run(backend, x, w, b, scores, phi, dy)
        g = dy.double().T @ x.double()
        keep = (scores > phi).double()
        _close(grads[id(leaves[3])], g * w.double(), f"{backend} dScore")
        _close(grads[id(leaves[1])], g * keep, f"{backend} dW")
        assert (grads[id(leaves[1])][keep == 0] == 0).all()


def test_frozen_weight_gets_no_grad_and_scores_still_train(device):
    require_backend("triton", device)
    x, w, b, scores, phi = _inputs((8,), 9, 35, device, "scores")
    dy = torch.randn(8, 9).to(device)
    y, grads, leaves = _run("triton", x, w, b, scores, phi, dy, train_w=False)
    want = _ref64(x, w, b, scores, phi, dy)
    assert id(leaves[1]) not in grads
    _close(grads[id(leaves[3])], want[4], "dScore")
    _close(grads[id(leaves[0])], want[1], "dx")


def test_reference_gradcheck_packed():
    x, w, b, mask, _ = _inputs((4,), 5, 7, "cpu", "packed")
    args = [t.double().requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: ref.masked_linear(x_, w_, bias=b_, words=mask.words), args)


def test_no_weight_sized_copy_saved(device):
    """The fused op saves x, W and the mask source, never a W ⊙ M tensor."""
    require_backend("triton", device)
    x, w, b, mask, _ = _inputs((6,), 40, 64, device, "packed")
    w.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_linear(x, w, mask, b, backend="triton")
    weight_sized = [t for t in saved if t.shape == w.shape and t.is_floating_point()]
    assert len(weight_sized) == 1 and weight_sized[0].data_ptr() == w.data_ptr()


def test_launch_plans_follow_the_flags(device):
    """The Triton launchers reuse a launch plan per (shape, flags): calls alternating bias/no
    bias, bits/scores, wanted gradients and a 2-d/3-d x at one shape each get the reference's
    answer (a plan reused across flags would launch the wrong specialization)."""
    require_backend("triton", device)
    dy = torch.randn(2, 6, 21).to(device)
    for _ in range(2):
        for kind in ("packed", "scores"):
            x, w, b, mask, phi = _inputs((2, 6), 21, 45, device, kind)
            for bias, lead in ((b, (2, 6)), (None, (12,)), (b, (12,)), (None, (2, 6))):
                xx = x.reshape(*lead, 45).clone().requires_grad_(True)
                y = masked_linear(xx, w, mask, bias, threshold=phi, backend="triton")
                (dx,) = torch.autograd.grad(y, xx, dy.reshape(*lead, 21))
                zero = torch.zeros(21, device=device)
                want = _ref64(xx.detach(), w, b if bias is not None else zero, mask, phi,
                              dy.reshape(*lead, 21))
                _close(y, want[0], f"y {kind} bias={bias is not None} lead={lead}")
                _close(dx, want[1], f"dx {kind} bias={bias is not None} lead={lead}")


def test_packed_layer_follows_its_mask_buffer(device):
    """A "packed" MaskedLinear keeps the PackedMask its forward passes on while the buffer,
    its shape and dtype stay: an in-place set_mask still shows in the next forward, and a
    buffer replaced by a wrong one still raises."""
    from regdrop_fast.sparse import MaskedLinear

    torch.manual_seed(0)
    layer = MaskedLinear.from_linear(torch.nn.Linear(40, 8).to(device), "packed")
    x = torch.randn(5, 40, device=device)
    for density in (0.5, 0.2):
        keep = torch.rand(8, 40, device=device) < density
        layer.set_mask(keep)
        want = ref.masked_linear(x.double(), layer.weight.double(), bias=layer.bias.double(),
                                 words=layer.mask_words)
        _close(layer(x), want, f"density {density}")
    words = layer.mask_words
    layer.mask_words = torch.zeros(8, 3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="words must have shape"):
        layer(x)
    layer.mask_words = words.float()
    with pytest.raises(TypeError, match="words must have dtype"):
        layer(x)
    layer.mask_words = words
    _close(layer(x), want, "buffer restored")


def _triton_ok(device):
    from regdrop_fast import backends
    return backends.unavailable_reason("triton", device) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cuda(dtype):
    x, w, b, mask, phi = _inputs((64,), 96, 160, "cuda", "scores")
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    dy = torch.randn(64, 96, device="cuda", dtype=dtype)
    y, grads, leaves = _run("triton", x, w, b, mask, phi, dy)
    want = _ref64(x, w, b, mask, phi, dy)
    torch.testing.assert_close(y.double(), want[0], rtol=1e-2, atol=1e-2)
    for leaf, ref_grad in zip(leaves, want[1:]):
        torch.testing.assert_close(grads[id(leaf)].double(), ref_grad, rtol=1e-2, atol=2e-2)


def test_bad_input():
    x, w, b, mask, _ = _inputs((3,), 8, 40, "cpu", "packed")
    other = pack_mask(torch.ones(8, 41, dtype=torch.bool), backend="reference")
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        masked_linear(x, w, other, b)
    with pytest.raises(ValueError, match=r"mask \(scores\) must have the weight's shape"):
        masked_linear(x, w, torch.zeros(8, 39), b, threshold=0.0)
    nan_scores = torch.zeros(8, 40)
    nan_scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        masked_linear(x, w, nan_scores, b, threshold=0.0)
    with pytest.raises(ValueError, match="threshold is required"):
        masked_linear(x, w, torch.zeros(8, 40), b)
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        masked_linear(x, w, torch.zeros(8, 40), b, threshold=float("nan"))
    with pytest.raises(ValueError, match="in_features=40"):
        masked_linear(x[:, :39], w, mask, b)
    with pytest.raises(TypeError, match="same dtype"):
        masked_linear(x.half(), w, mask, b)
    with pytest.raises(TypeError, match=r"mask \(scores\) must have dtype"):
        masked_linear(x, w, torch.ones(8, 40, dtype=torch.bool), b, threshold=0.0)
    with pytest.raises(TypeError, match="mask must be a PackedMask or a scores tensor"):
        masked_linear(x, w, [[1.0]], b)


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regdrop_fast.triton_kernels import masked_linear as K

target = GPUTarget("cuda", 90, 32)
BLOCKS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
MASK = dict(words_ptr="*i32", phi_ptr="*fp32")


def compile_(fn, ptrs, ints, flags, dt, sdt="fp32"):
    sig = {n: ("*" + dt) for n in ptrs}
    sig.update(MASK)
    sig["scores_ptr"] = "*" + sdt
    if "dscore_ptr" in sig:
        sig["dscore_ptr"] = "*" + sdt
    sig.update({n: "i32" for n in ("M", "N", "K")})
    sig.update({n: "i64" for n in ints})
    sig.update({n: "constexpr" for n in list(flags) + list(BLOCKS)})
    ordered = {name: sig[name] for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=ordered, constexprs={**flags, **BLOCKS}),
                   target=target, options={"num_warps": 8, "num_stages": 3})


FWD = (("x_ptr", "w_ptr", "b_ptr", "y_ptr"),
       ("stride_xm", "stride_wn", "stride_words_n", "stride_scores_n", "stride_ym"))
compile_(K.masked_linear_fwd_kernel, *FWD,
         dict(HAS_BIAS=True, FROM_SCORES=False, INPUT_PRECISION="ieee"), "fp32")
for dt, prec in (("bf16", "tf32"),):
    compile_(K.masked_linear_fwd_kernel, *FWD,
             dict(HAS_BIAS=True, FROM_SCORES=True, INPUT_PRECISION=prec), dt)
    compile_(K.masked_linear_bwd_input_kernel, ("dy_ptr", "w_ptr", "dx_ptr"),
             ("stride_dym", "stride_wn", "stride_words_n", "stride_scores_n", "stride_dxm"),
             dict(FROM_SCORES=True, INPUT_PRECISION=prec), dt)
    compile_(K.masked_linear_bwd_weight_kernel, ("dy_ptr", "x_ptr", "w_ptr", "dscore_ptr",
                                                 "dw_ptr"),
             ("stride_dym", "stride_xm", "stride_wn", "stride_words_n", "stride_scores_n"),
             dict(FROM_SCORES=False, WANT_DSCORE=True, WANT_DW=True, INPUT_PRECISION=prec), dt)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The three kernels as a GPU compiles them (Triton -> PTX -> cubin for an H100, no GPU
    needed): fp32 IEEE forward from bits; bf16 forward, dx and dW/dScore from scores/bits."""
    compile_script_for_sm90(_SM90_COMPILE, timeout=600)
