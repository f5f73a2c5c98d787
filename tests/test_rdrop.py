"""rdrop_loss: every backend vs autograd of the float64 reference (loss and both gradients),
edge cases, bad input, torch.compile without graph breaks."""
import pytest
import torch

from regdrop_fast import rdrop_loss, RDropLoss
from regdrop_fast.reference.rdrop import (rdrop_grads_reference, rdrop_loss_reference,
                                          rdrop_regression_reference)
from utils import require_backend
from utils.rdrop import assert_rel, make_inputs
from utils.sm90 import compile_script_for_sm90

TOLS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def run_backend(z1, z2, labels, backend, grad_seed=1, **kw):
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    loss = rdrop_loss(a, b, labels, backend=backend, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    go = (torch.rand(loss.shape, generator=gen) + 0.5).to(loss.device)
    loss.backward(go)
    return loss, a.grad, b.grad, go


def check_against_reference(z1, z2, labels, backend, dtype, **kw):
    loss, g1, g2, go = run_backend(z1, z2, labels, backend, **kw)
    ref, r1, r2 = rdrop_grads_reference(z1, z2, labels, grad_output=go, **kw)
    tol = TOLS[dtype]
    assert loss.dtype == torch.float32
    assert g1.dtype == dtype and g2.dtype == dtype
    assert_rel(loss, ref, tol, "loss")
    assert_rel(g1, r1, tol, "grad logits1")
    assert_rel(g2, r2, tol, "grad logits2")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("n_classes", [3, 257, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_float64_reference(device, backend, n_classes, reduction):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((7, n_classes), device, seed=n_classes)
    check_against_reference(z1, z2, labels, backend, torch.float32, alpha=0.7,
                            reduction=reduction)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_1e2(device, backend, dtype):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((2, 3, 257), device, dtype=dtype)
    check_against_reference(z1, z2, labels, backend, dtype, alpha=1.3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("ce,with_labels", [(True, True), (False, True), (True, False)])
def test_three_dim_ce_flag_and_no_labels(device, backend, ce, with_labels):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((2, 5, 33), device, seed=3)
    labels = labels if with_labels else None
    check_against_reference(z1, z2, labels, backend, torch.float32, alpha=2.0, ce=ce,
                            reduction="none")
    check_against_reference(z1, z2, labels, backend, torch.float32, alpha=2.0, ce=ce)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_extreme_logits(device, backend):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(5)
    z1 = (torch.randint(-1, 2, (6, 257), generator=gen) * 1e4).float().to(device)
    z2 = (torch.randn(6, 257, generator=gen) * 1e4).to(device)
    z2[0] = z1[0]  # identical extreme rows: KL exactly 0
    labels = torch.randint(0, 257, (6,), generator=gen).to(device)
    check_against_reference(z1, z2, labels, backend, torch.float32, alpha=0.5)


def test_kernel_paths_multi_block_and_row_tiles(device):
    """The launcher's loop over V blocks, multi-row tiles (tail rows, ignored rows) and the
    persistent grid (programs < tiles: each program loops over several tiles)."""
    require_backend("triton", device)
    from regdrop_fast.triton_kernels.rdrop import rdrop_forward

    for n_classes, block_v, block_n, programs in [(1000, 256, 1, None), (257, 64, 4, 2),
                                                  (3, 4, 8, 1), (1000, 1024, 2, 3),
                                                  (1000, 128, 1, 3)]:
        z1, z2, labels = make_inputs((10, n_classes), device, seed=block_v)
        n_valid = int((labels != -100).sum())
        # CE averaged, KL summed: separate gradient weights 1/n_valid and 1
        loss, out, rows, g1, g2 = rdrop_forward(
            z1, z2, labels, 0.9, -100, True, True, mean_kl=False, row_loss=True,
            block_v=block_v, block_n=block_n, programs=programs)
        ce_ref, c1, c2 = rdrop_grads_reference(z1, z2, labels, alpha=0.0, reduction="none",
                                               grad_output=torch.full((10,), 1.0 / n_valid))
        kl_ref, k1, k2 = rdrop_grads_reference(z1, z2, labels, alpha=2.0, reduction="none",
                                               ce=False, grad_output=torch.ones(10))
        assert_rel(rows, ce_ref + 0.45 * kl_ref, 1e-5, f"row losses V={n_classes}")
        assert_rel(loss, ce_ref.sum() / n_valid + 0.45 * kl_ref.sum(), 1e-5, f"loss V={n_classes}")
        expected = torch.stack([ce_ref.sum() / n_valid / 2, kl_ref.sum() / n_valid / 2,
                                ce_ref.sum(), kl_ref.sum()])
        assert_rel(out, expected, 1e-5, f"reduced outputs V={n_classes}")
        assert_rel(g1, c1 + 0.45 * k1, 1e-5, f"grad1 V={n_classes}")
        assert_rel(g2, c2 + 0.45 * k2, 1e-5, f"grad2 V={n_classes}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero(device, backend, reduction):
    require_backend(backend, device)
    z1, z2, _ = make_inputs((4, 9), device)
    labels = torch.full((4,), -100, device=device)
    loss, g1, g2, _ = run_backend(z1, z2, labels, backend, reduction=reduction)
    assert torch.equal(loss.cpu(), torch.zeros_like(loss).cpu())
    assert torch.equal(g1.cpu(), torch.zeros_like(g1).cpu())
    assert torch.equal(g2.cpu(), torch.zeros_like(g2).cpu())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ignore_index_rows_and_custom_ignore(device, backend):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((8, 11), device, ignore_frac=0.0)
    labels[::3] = 5
    loss, g1, g2, _ = run_backend(z1, z2, labels, backend, ignore_index=5, reduction="none")
    ignored = (labels == 5).cpu()
    assert (loss.detach().cpu()[ignored] == 0).all() and (loss.detach().cpu()[~ignored] > 0).all()
    assert (g1.cpu()[ignored] == 0).all() and (g2.cpu()[ignored] == 0).all()
    check_against_reference(z1, z2, labels, backend, torch.float32, ignore_index=5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_identical_passes_have_zero_kl(device, backend):
    require_backend(backend, device)
    z1, _, labels = make_inputs((5, 17), device)
    kl = rdrop_loss(z1, z1.clone(), labels, ce=False, backend=backend)
    assert abs(kl.item()) < 1e-6
    ce_only = rdrop_loss(z1, z1.clone(), labels, alpha=0.0, backend=backend, reduction="sum")
    expected = 2 * torch.nn.functional.cross_entropy(z1, labels, reduction="sum")
    assert abs(ce_only.item() - expected.item()) <= 1e-5 * expected.item()


def test_reference_backend_closed_form_matches_autograd_fp64(device):
    z1, z2, labels = make_inputs((6, 13), device)
    a = z1.double().requires_grad_(True)
    b = z2.double().requires_grad_(True)
    loss = rdrop_loss(a, b, labels, alpha=0.8, backend="reference")
    loss.backward()
    assert loss.dtype == torch.float64
    ref, r1, r2 = rdrop_grads_reference(z1, z2, labels, alpha=0.8)
    assert_rel(a.grad, r1, 1e-12, "closed-form grad1")
    assert_rel(b.grad, r2, 1e-12, "closed-form grad2")
    assert torch.autograd.gradcheck(
        lambda x, y: rdrop_loss_reference(x, y, labels[:3], alpha=0.8),
        (z1[:3, :5].double().requires_grad_(True), z2[:3, :5].double().requires_grad_(True)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_regression_head(device, backend):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(2)
    p1 = torch.randn(6, 1, generator=gen).to(device).requires_grad_(True)
    p2 = torch.randn(6, 1, generator=gen).to(device).requires_grad_(True)
    y = torch.randn(6, generator=gen).to(device)
    loss = rdrop_loss(p1, p2, y, alpha=0.3, backend=backend)
    loss.backward()
    a, b = p1.detach().double().requires_grad_(True), p2.detach().double().requires_grad_(True)
    ref = rdrop_regression_reference(a, b, y.double(), alpha=0.3)
    ref.backward()
    expected = (0.3 * (a - b).square() + (a[:, 0] - y.double())[:, None].square()
                + (b[:, 0] - y.double())[:, None].square()).mean()
    assert_rel(ref, expected, 1e-12, "regression reference")
    assert_rel(loss, ref, 1e-6, "regression loss")
    assert_rel(p1.grad, a.grad, 1e-6, "regression grad1")
    assert_rel(p2.grad, b.grad, 1e-6, "regression grad2")


def test_module_matches_functional(device):
    z1, z2, labels = make_inputs((4, 7), device)
    module = RDropLoss(alpha=0.4, reduction="sum")
    assert torch.equal(module(z1, z2, labels), rdrop_loss(z1, z2, labels, alpha=0.4,
                                                          reduction="sum"))
    assert "alpha=0.4" in repr(module)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_grad_and_partial_grad(device, backend):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((4, 7), device)
    with torch.no_grad():
        plain = rdrop_loss(z1, z2, labels, backend=backend)
    a = z1.clone().requires_grad_(True)
    loss = rdrop_loss(a, z2, labels, backend=backend)
    loss.backward()
    _, r1, _ = rdrop_grads_reference(z1, z2, labels)
    assert_rel(plain, loss.detach(), 1e-6, "no_grad loss")
    assert_rel(a.grad, r1, 1e-5, "grad with one side frozen")


def test_triton_backward_twice_is_refused(device):
    require_backend("triton", device)
    z1, z2, labels = make_inputs((4, 7), device)
    a = z1.clone().requires_grad_(True)
    loss = rdrop_loss(a, z2, labels, backend="triton")
    loss.backward(torch.tensor(2.0, device=device), retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward(torch.tensor(2.0, device=device))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_name_the_argument(device, backend):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((4, 7), device)
    cases = [
        (dict(logits2=z2[:, :6]), ValueError, "logits2"),
        (dict(labels=labels[:3]), ValueError, "labels"),
        (dict(labels=labels.float()), TypeError, "labels"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(logits1=z1[:0], logits2=z2[:0], labels=labels[:0]), ValueError, "empty"),
        (dict(logits1=z1.long(), logits2=z2.long()), TypeError, "logits1"),
        (dict(logits2=z2.double()), TypeError, "logits2"),
        (dict(labels=torch.tensor([0, 1, 7, 2], device=device), check_labels=True), ValueError,
         "labels"),
        (dict(labels=torch.tensor([0, -1, 2, 2], device=device), check_labels=True), ValueError,
         "labels"),
        (dict(logits1=z1[:, :1], logits2=z2[:, :1]), ValueError, "V=1"),
        (dict(logits1=z1[:, :1], logits2=z2[:, :1], labels=labels.float(),
              task="classification"), ValueError, "logits1"),
        (dict(task="ranking"), ValueError, "task"),
    ]
    for override, error, match in cases:
        kw = {**dict(logits1=z1, logits2=z2, labels=labels, backend=backend), **override}
        with pytest.raises(error, match=match):
            rdrop_loss(**kw)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf arithmetic in the interpreter
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_logits(device, value):
    z1, z2, labels = make_inputs((4, 7), device, ignore_frac=0.0)
    z1[1, 3] = value
    with pytest.raises(ValueError, match="logits1 contains inf or NaN"):
        rdrop_loss(z1, z2, labels, backend="reference")
    with pytest.raises(ValueError, match="logits1"):
        rdrop_loss_reference(z1, z2, labels)
    if torch.device(device).type == "cpu" and "triton" not in _available(device):
        return
    with pytest.raises(ValueError, match="logits1 contains inf or NaN"):
        rdrop_loss(z1, z2, labels, backend="triton", check_finite=True)
    # documented kernel behaviour without the check: that row's loss and gradients are NaN
    a = z1.clone().requires_grad_(True)
    rows = rdrop_loss(a, z2, labels, backend="triton", reduction="none")
    rows.sum().backward()
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
    assert torch.isnan(a.grad[1]).all() and torch.isfinite(a.grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad_label", [7, 9, -1, -101])
def test_default_out_of_range_label_is_nan_never_finite(device, backend, bad_label):
    """The label check is opt-in (it syncs the host); without it an out-of-range label gives
    its row a NaN loss and NaN gradients, and every reduction of the loss is NaN."""
    require_backend(backend, device)
    z1, z2, labels = make_inputs((4, 7), device, ignore_frac=0.0)
    labels[2] = bad_label
    loss, g1, g2, _ = run_backend_unchecked(z1, z2, labels, backend, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    for g in (g1, g2):
        assert torch.isnan(g[2]).all() and torch.isfinite(g[[0, 1, 3]]).all()
    for reduction in ("mean", "sum"):
        assert torch.isnan(rdrop_loss(z1, z2, labels, backend=backend, reduction=reduction))
    # the ignored label stays ignored, and the check still raises when asked for
    labels[2] = -100
    assert torch.isfinite(rdrop_loss(z1, z2, labels, backend=backend))
    labels[2] = bad_label
    with pytest.raises(ValueError, match=f"labels must be in \\[0, 7\\).*got {bad_label}"):
        rdrop_loss(z1, z2, labels, backend=backend, check_labels=True)


def run_backend_unchecked(z1, z2, labels, backend, **kw):
    a = z1.detach().clone().requires_grad_(True)
    b = z2.detach().clone().requires_grad_(True)
    loss = rdrop_loss(a, b, labels, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), a.grad, b.grad, None


def _available(device):
    from regdrop_fast import backends
    return backends.available(device)


def _compiled_step(backend):
    def step(a, b, y):
        return rdrop_loss(a, b, y, alpha=0.5, backend=backend) * 2.0
    return step


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_has_no_graph_break(device, backend):
    require_backend(backend, device)
    import torch._dynamo

    z1, z2, labels = make_inputs((5, 9), device)
    step = _compiled_step(backend)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(z1, z2, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    loss = compiled(a, b, labels)
    loss.backward()
    ref, r1, r2 = rdrop_grads_reference(z1, z2, labels, alpha=0.5,
                                        grad_output=torch.tensor(2.0))
    assert_rel(loss, 2 * ref, 1e-5, "compiled loss")
    assert_rel(a.grad, r1, 1e-5, "compiled grad1")
    assert_rel(b.grad, r2, 1e-5, "compiled grad2")


def test_backend_environment_variable(device, monkeypatch):
    from regdrop_fast.backends import BackendUnavailableError

    z1, z2, labels = make_inputs((3, 5), device)
    monkeypatch.setenv("REGDROP_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="rdrop_loss has no 'cuda' backend"):
        rdrop_loss(z1, z2, labels)
    monkeypatch.setenv("REGDROP_FAST_BACKEND", "reference")
    assert torch.isfinite(rdrop_loss(z1, z2, labels))


def test_float64_on_triton_names_the_op_and_logits1(device):
    with pytest.raises(TypeError, match="rdrop_loss: logits1 is torch.float64"):
        rdrop_loss(*make_inputs((3, 5), device, dtype=torch.float64)[:2], backend="triton")


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regdrop_fast.triton_kernels import rdrop as K

def sig(dt):
    s = {n: "*" + dt for n in ("z1_ptr", "z2_ptr", "g1_ptr", "g2_ptr")}
    s.update(labels_ptr="*i64", count_ptr="*i64", rows_ptr="*fp32", done_ptr="*i32",
             loss_ptr="*fp32", acc_ptr="*fp32", z1_stride="i64", z2_stride="i64",
             g1_stride="i64", g2_stride="i64", n_rows="i32", n_cols="i32", n_count="i32",
             alpha_half="fp32", ignore_index="i64")
    s.update({k: "constexpr" for k in ("HAS_LABELS", "HAS_CE", "NEED_GRAD", "MEAN_CE",
                                       "MEAN_KL", "ROW_LOSS", "ONE_BLOCK", "BLOCK_N", "BLOCK_V",
                                       "BLOCK_COUNT", "PROGRAMS_P2")})
    return s

target = GPUTarget("cuda", 90, 32)
for dt, n_rows, n_cols in [("bf16", 8192, 2), ("fp32", 64, 1000), ("bf16", 64, 128256)]:
    bn, bv, nw = K._tile(n_rows, n_cols)
    src = ASTSource(fn=K.rdrop_fwd_kernel, signature=sig(dt), constexprs=dict(
        HAS_LABELS=True, HAS_CE=True, NEED_GRAD=True, MEAN_CE=True, MEAN_KL=False,
        ROW_LOSS=False, ONE_BLOCK=n_cols <= bv, BLOCK_N=bn, BLOCK_V=bv, BLOCK_COUNT=1024,
        PROGRAMS_P2=1024))
    triton.compile(src, target=target, options={"num_warps": nw})
src = ASTSource(fn=K.rdrop_scale_grads_kernel, signature=dict(
    g1_ptr="*bf16", g2_ptr="*bf16", go_ptr="*fp32", g1_stride="i64", g2_stride="i64",
    go_stride="i64", n_rows="i32", n_cols="i32", BLOCK_N="constexpr", BLOCK_V="constexpr"),
    constexprs=dict(BLOCK_N=1, BLOCK_V=4096))
triton.compile(src, target=target, options={"num_warps": 8})
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The kernels as a GPU compiles them (not the interpreter): Triton -> PTX -> cubin for an
    H100, which needs no GPU, only Triton's bundled NVIDIA backend."""
    compile_script_for_sm90(_SM90_COMPILE, timeout=300)


# aten ops that would mean host-side reduction work or a host sync around the kernel
_REDUCTION_OR_SYNC_OPS = ("aten::sum", "aten::ne", "aten::reciprocal", "aten::clamp_min",
                          "aten::stack", "aten::mul", "aten::add", "aten::item",
                          "aten::_local_scalar_dense", "aten::is_nonzero", "aten::any")


@pytest.mark.parametrize("reduction,kl_reduction", [("mean", "mean"), ("mean", "sum"),
                                                    ("sum", "mean"), ("none", "mean")])
def test_triton_call_is_one_launch_without_host_work(device, reduction, kl_reduction):
    """The default triton call runs one kernel and no torch op that reduces or syncs: the row
    count, the reduction and the parts are computed inside the launch (CUDA-graph capturable);
    its outputs take as few allocations as the kernel's contract allows."""
    require_backend("triton", device)
    from regdrop_fast.triton_kernels import rdrop as K

    z1, z2, labels = make_inputs((6, 9), device, seed=4)
    a = z1.clone().requires_grad_(True)
    rdrop_loss(z1, z2, labels, backend="triton")  # creates the kernel's persistent counter
    launches = []
    real_run = K.rdrop_fwd_kernel.run

    def counting_run(*args, **kwargs):
        launches.append(kwargs.get("grid"))
        with torch.profiler.record_function("launch"):  # the interpreter allocates too
            return real_run(*args, **kwargs)

    K.rdrop_fwd_kernel.run = counting_run
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = rdrop_loss(a, z2, labels, 0.7, reduction=reduction, kl_reduction=kl_reduction,
                              backend="triton")
    finally:
        K.rdrop_fwd_kernel.run = real_run
    ops = {event.name for event in prof.events()}
    assert len(launches) == 1
    assert not ops & set(_REDUCTION_OR_SYNC_OPS), ops & set(_REDUCTION_OR_SYNC_OPS)
    # the loss (the row losses for "none" too), one fp32 buffer for the parts and the
    # programs' partial sums, the two gradients
    def in_launch(event):
        while event is not None and event.name != "launch":
            event = event.cpu_parent
        return event is not None

    allocations = [e.name for e in prof.events()
                   if e.name in ("aten::empty", "aten::empty_like") and not in_launch(e)]
    assert len(allocations) == 4 + (reduction == "none"), allocations
    ref = rdrop_loss_reference(z1, z2, labels, 0.7, reduction=reduction,
                               kl_reduction=kl_reduction)
    assert_rel(loss, ref, 1e-5, "loss")


@pytest.mark.cuda
def test_cuda_graph_capture_of_forward_and_backward():
    """A step with rdrop_loss (forward and backward) captured in a CUDA graph replays to the
    eager values, with new logits and labels copied into the captured buffers."""
    device = torch.device("cuda")
    z1, z2, labels = make_inputs((64, 1000), device, dtype=torch.bfloat16, seed=5)
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    static_labels = labels.clone()

    def step():
        a.grad = b.grad = None
        loss = rdrop_loss(a, b, static_labels, 0.5, kl_reduction="sum", backend="triton")
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (compiles the kernels) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
        static_g1, static_g2 = a.grad, b.grad
    new1, new2, new_labels = make_inputs((64, 1000), device, dtype=torch.bfloat16, seed=6)
    with torch.no_grad():
        a.copy_(new1)
        b.copy_(new2)
    static_labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    ref, r1, r2 = rdrop_grads_reference(new1, new2, new_labels, 0.5, kl_reduction="sum")
    assert_rel(static_loss, ref, 1e-2, "replayed loss")
    assert_rel(static_g1, r1, 1e-2, "replayed grad1")
    assert_rel(static_g2, r2, 1e-2, "replayed grad2")


def test_done_counter_made_during_a_capture_is_not_kept(monkeypatch):
    """The launch's done counter made while a CUDA graph is being captured (its zeroing only
    captured, not run) serves that launch alone: the next launch on the stream gets a counter
    that is zero now, and keeps it."""
    require_backend("triton", torch.device("cpu"))
    from regdrop_fast.triton_kernels import rdrop as K
    z1, z2, labels = make_inputs((8, 40), torch.device("cpu"), seed=3)
    want = rdrop_loss(z1, z2, labels, backend="reference")
    monkeypatch.setattr(K, "_done_counters", {})
    monkeypatch.setattr(K, "_capturing", lambda device: True)
    assert_rel(rdrop_loss(z1, z2, labels, backend="triton"), want, 1e-5, "loss in a capture")
    assert K._done_counters == {}
    monkeypatch.setattr(K, "_capturing", lambda device: False)
    assert_rel(rdrop_loss(z1, z2, labels, backend="triton"), want, 1e-5, "loss")
    (counter,) = K._done_counters.values()
    assert counter.item() == 0


@pytest.mark.cuda
def test_cuda_graph_replayed_before_an_earlier_captured_one():
    """Two graphs captured on one stream, each with rdrop_loss, the first capture being the
    stream's first launch: the second graph replayed before the first ever ran gives the eager
    loss (its counter must not be the first capture's, whose zeroing had not run; the capture
    pool's memory is first filled with 7s so that such a counter would not read 0)."""
    device = torch.device("cuda")
    z1, z2, labels = make_inputs((64, 1000), device, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) off the capture stream
        rdrop_loss(z1, z2, labels, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    capture, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
    poison = torch.cuda.CUDAGraph()
    with torch.cuda.graph(poison, pool=pool, stream=capture):
        sevens = torch.full((1 << 12,), 7, dtype=torch.int32, device=device)
    poison.replay()
    torch.cuda.synchronize()
    del sevens
    graphs, losses = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=capture):
            losses.append(rdrop_loss(z1, z2, labels, backend="triton"))
        graphs.append(graph)
    graphs[1].replay()
    torch.cuda.synchronize()
    assert_rel(losses[1], rdrop_loss(z1, z2, labels, backend="reference"), 1e-5,
               "second graph's loss")


def test_eager_backward_drops_its_gradient_buffers(device):
    """The triton backward hands its in-place scaled buffers to .grad and keeps no reference:
    with the loss still alive, clearing .grad frees them (a loss kept for logging must not
    hold two [N, V] buffers)."""
    import weakref

    require_backend("triton", device)
    z1, z2, labels = make_inputs((4, 6), device)
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    loss = rdrop_loss(a, b, labels, backend="triton")
    loss.backward()
    grads = weakref.ref(a.grad), weakref.ref(b.grad)
    a.grad = b.grad = None
    assert grads[0]() is None and grads[1]() is None
    assert loss.grad_fn is not None


@pytest.mark.parametrize("return_parts", [False, True])
def test_reference_backward_twice_with_retain_graph(device, return_parts):
    """Only the triton backward (in place) refuses a second pass; the reference one scales
    out of place and gives the same gradients again."""
    z1, z2, labels = make_inputs((4, 6), device)
    a = z1.clone().requires_grad_(True)
    out = rdrop_loss(a, z2, labels, backend="reference", return_parts=return_parts)
    loss = out.loss if return_parts else out
    loss.backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    loss.backward()
    assert torch.equal(a.grad, first)


@pytest.mark.parametrize("return_parts", [False, True])
def test_custom_op_passes_opcheck(device, return_parts):
    """The op torch.compile traces: schema, fake implementation, autograd registration and
    no aliasing between its outputs (the parts are a view of the kernel's fp32 buffer)."""
    require_backend("triton", device)
    from regdrop_fast.rdrop.loss import rdrop_loss_op

    z1, z2, labels = make_inputs((2, 3, 5), device, seed=2)
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    args = (a, b, labels, 0.5, -100, "mean", "mean", True, "classification", "triton", False,
            -1, True, return_parts)
    torch.library.opcheck(rdrop_loss_op, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))
