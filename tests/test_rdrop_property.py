"""Property tests: rdrop_loss and fused_linear_rdrop_loss on every backend against float64
autograd of the reference, over shapes (odd N and V, 2-D and 3-D), memory layouts (contiguous,
transposed, sliced with offsets, stride 0 along rows or along V), dtypes, labels (ignored rows,
none), alpha, the CE flag and both reductions."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regdrop_fast import fused_linear_rdrop_loss, rdrop_loss
from regdrop_fast.reference.rdrop import fused_linear_rdrop_loss_reference, rdrop_loss_reference
from utils import require_backend
from utils.rdrop import assert_rel

LAYOUTS = ("contiguous", "transposed", "sliced", "stride0_rows", "stride0_cols")
TOLS = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def strided(lead, n_cols, layout, gen):
    """(base, view): a leaf `base` and a function of it with shape lead + (n_cols,) in the
    given memory layout (autograd flows through the view back to the base)."""
    if layout == "contiguous":
        base = torch.randn(*lead, n_cols, generator=gen)
        return base, lambda b: b
    if layout == "transposed":  # last-dim stride != 1
        base = torch.randn(*lead[:-1], n_cols, lead[-1], generator=gen)
        return base, lambda b: b.transpose(-1, -2)
    if layout == "sliced":  # row stride > V, storage offset, every other row
        base = torch.randn(*lead[:-1], 2 * lead[-1], n_cols + 3, generator=gen)
        return base, lambda b: b[..., ::2, 1:n_cols + 1]
    if layout == "stride0_rows":  # one row broadcast to every row
        base = torch.randn(*lead[:-1], 1, n_cols, generator=gen)
        return base, lambda b: b.expand(*lead, n_cols)
    base = torch.randn(*lead, 1, generator=gen)  # stride 0 along V: constant rows
    return base, lambda b: b.expand(*lead, n_cols)


def run(fn, bases, views, dtype, device):
    """Loss and the gradients the op returned for its (strided) inputs."""
    leaves = [b.detach().to(device=device, dtype=dtype).requires_grad_(True) for b in bases]
    inputs = [v(t) for v, t in zip(views, leaves)]
    for t in inputs:
        t.retain_grad()
    loss = fn(*inputs)
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    loss.backward(go.to(device=device, dtype=loss.dtype))
    return loss.detach(), [t.grad for t in inputs], go


@pytest.mark.parametrize("backend", ["reference", "triton"])
@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), n_rows=st.integers(1, 9), n_cols=st.integers(2, 70),
       three_d=st.booleans(), layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 2),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       alpha=st.floats(0.0, 4.0), ce=st.booleans(), with_labels=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       kl_reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2 ** 16))
def test_rdrop_loss_any_layout(device, backend, data, n_rows, n_cols, three_d, layouts, dtype,
                               alpha, ce, with_labels, reduction, kl_reduction, seed):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)
    lead = (2, n_rows) if three_d else (n_rows,)
    (b1, v1), (b2, v2) = (strided(lead, n_cols, layout, gen) for layout in layouts)
    labels = None
    if with_labels:
        labels = torch.randint(0, n_cols, lead, generator=gen)
        labels[torch.rand(lead, generator=gen) < data.draw(st.floats(0.0, 0.5))] = -100
        labels = labels.to(device)
    kw = dict(alpha=alpha, reduction=reduction, ce=ce, kl_reduction=kl_reduction)
    loss, grads, go = run(lambda a, b: rdrop_loss(a, b, labels, backend=backend, **kw),
                          (b1, b2), (v1, v2), dtype, device)
    # the reference sees the same values, rounded to dtype first, in float64
    ref, ref_grads, _ = run(lambda a, b: rdrop_loss_reference(a, b, labels, **kw),
                            [b.to(dtype) for b in (b1, b2)], (v1, v2), torch.float64, device)
    tol = TOLS[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_rel(loss, ref, tol, "loss")
    # A gradient can cancel to ~0 (constant rows, a tiny alpha without CE): its rounding is
    # relative to the terms that cancel, at least grad_output * (1 + alpha) / rows each, and a
    # half-precision gradient cannot hold less than its smallest subnormal.
    rows = labels.numel() if labels is not None else b1.new_empty(lead).numel()
    term = float(go.max()) * (1.0 + alpha) / rows
    atol = tol * term + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    for name, g, r in zip(("logits1", "logits2"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_rel(g, r, tol, f"grad {name}", atol=atol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@settings(max_examples=20, **SETTINGS)
@given(n_rows=st.integers(1, 11), n_hidden=st.integers(1, 12), n_cols=st.integers(2, 40),
       hidden_layouts=st.tuples(*[st.sampled_from(LAYOUTS[:4])] * 2),
       weight_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(),
       alpha=st.floats(0.0, 4.0), reduction=st.sampled_from(["mean", "sum"]),
       kl_reduction=st.sampled_from(["mean", "sum"]), chunk_size=st.one_of(
           st.none(), st.integers(1, 12)), seed=st.integers(0, 2 ** 16))
def test_fused_linear_any_layout(device, backend, n_rows, n_hidden, n_cols, hidden_layouts,
                                 weight_layout, dtype, bias, alpha, reduction, kl_reduction,
                                 chunk_size, seed):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)
    (h1, v1), (h2, v2) = (strided((n_rows,), n_hidden, layout, gen) for layout in hidden_layouts)
    w, vw = strided((n_cols,), n_hidden, weight_layout, gen)
    bases, views = [h1, h2, w], [v1, v2, vw]
    if bias:
        bases.append(torch.randn(n_cols, generator=gen))
        views.append(lambda b: b)
    labels = torch.randint(0, n_cols, (n_rows,), generator=gen)
    labels[torch.rand(n_rows, generator=gen) < 0.25] = -100
    labels = labels.to(device)
    kw = dict(alpha=alpha, reduction=reduction, kl_reduction=kl_reduction)

    def ours(a, b, weight, c=None):
        return fused_linear_rdrop_loss(a, b, weight, c, labels, backend=backend,
                                       chunk_size=chunk_size, **kw)

    def reference(a, b, weight, c=None):
        return fused_linear_rdrop_loss_reference(a, b, weight, c, labels, **kw)

    loss, grads, _ = run(ours, bases, views, dtype, device)
    ref, ref_grads, _ = run(reference, [b.to(dtype) for b in bases], views, torch.float64, device)
    # bf16: the GEMM rounds the logits to bf16 before the loss sees them
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
    assert_rel(loss, ref, tol, "loss")
    for name, g, r in zip(("hidden1", "hidden2", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_rel(g, r, tol, f"grad {name}")
