"""fused_linear_rdrop_loss vs the float64 reference linear + R-Drop loss: loss and the gradients
of hidden1, hidden2, weight and bias, over chunk sizes, shapes, dtypes and edge cases."""
import pytest
import torch

from regdrop_fast import fused_linear_rdrop_loss
from regdrop_fast.reference.rdrop import fused_linear_rdrop_loss_reference
from utils import require_backend
from utils.rdrop import assert_rel


def make_linear(lead, n_hidden, n_classes, device, dtype=torch.float32, bias=True, seed=0,
                ignore_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    h1 = torch.randn(*lead, n_hidden, generator=gen)
    h2 = h1 + 0.3 * torch.randn(*lead, n_hidden, generator=gen)
    weight = torch.randn(n_classes, n_hidden, generator=gen) / n_hidden ** 0.5 * 2
    b = torch.randn(n_classes, generator=gen) if bias else None
    labels = torch.randint(0, n_classes, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h1), cast(h2), cast(weight), cast(b), labels.to(device)


def grads_of(fn, tensors, grad_output):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward(grad_output)
    return loss, [None if t is None else t.grad for t in leaves]


def check(h1, h2, weight, bias, labels, backend, tol, **kw):
    go = torch.tensor(1.7, device=h1.device)
    loss, grads = grads_of(
        lambda a, b, w, c: fused_linear_rdrop_loss(a, b, w, c, labels, backend=backend, **kw),
        (h1, h2, weight, bias), go)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref, ref_grads = grads_of(
        lambda a, b, w, c: fused_linear_rdrop_loss_reference(a, b, w, c, labels, **ref_kw),
        [None if t is None else t.double() for t in (h1, h2, weight, bias)], go.double())
    assert_rel(loss, ref, tol, "loss")
    for name, g, r in zip(("hidden1", "hidden2", "weight", "bias"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == h1.dtype
        assert_rel(g, r, tol, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("n_classes", [3, 257])
def test_fp32_matches_reference(device, backend, chunk_size, n_classes):
    require_backend(backend, device)
    h1, h2, w, b, labels = make_linear((10,), 16, n_classes, device, seed=n_classes)
    check(h1, h2, w, b, labels, backend, 1e-5, alpha=0.7, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_three_dim_no_bias_sum_no_labels(device, backend):
    require_backend(backend, device)
    h1, h2, w, _, labels = make_linear((2, 5), 8, 33, device, bias=False, seed=4)
    check(h1, h2, w, None, labels, backend, 1e-5, reduction="sum", chunk_size=4)
    check(h1, h2, w, None, None, backend, 1e-5, alpha=2.0, ce=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_within_1e2(device, backend):
    require_backend(backend, device)
    h1, h2, w, b, labels = make_linear((12,), 16, 100, device, dtype=torch.bfloat16, seed=2)
    check(h1, h2, w, b, labels, backend, 1e-2, alpha=0.5, chunk_size=5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_all_ignored_and_frozen_weight(device, backend):
    require_backend(backend, device)
    h1, h2, w, b, labels = make_linear((6,), 8, 11, device)
    labels.fill_(-100)
    a = h1.clone().requires_grad_(True)
    wq = w.clone().requires_grad_(True)
    loss = fused_linear_rdrop_loss(a, h2, wq, b, labels, backend=backend, chunk_size=4)
    loss.backward()
    assert loss.item() == 0 and (a.grad == 0).all() and (wq.grad == 0).all()
    # only hidden1 needs a gradient: weight/bias accumulation is skipped, the result still right
    a = h1.clone().requires_grad_(True)
    labels = make_linear((6,), 8, 11, device)[4]
    loss = fused_linear_rdrop_loss(a, h2, w, b, labels, backend=backend, chunk_size=4)
    loss.backward()
    ref_a = h1.double().requires_grad_(True)
    fused_linear_rdrop_loss_reference(ref_a, h2.double(), w.double(), b.double(),
                                      labels).backward()
    assert_rel(a.grad, ref_a.grad, 1e-5, "hidden1 grad with frozen weight")


def test_bad_inputs(device):
    h1, h2, w, b, labels = make_linear((4,), 8, 5, device)
    cases = [
        (dict(hidden2=h2[:, :7]), ValueError, "hidden2"),
        (dict(weight=w[:, :7]), ValueError, "hidden1"),
        (dict(weight=w[0]), ValueError, "weight"),
        (dict(bias=b[:4]), ValueError, "bias"),
        (dict(labels=labels[:3]), ValueError, "labels"),
        (dict(labels=torch.tensor([0, 9, 1, 1], device=device), check_labels=True), ValueError,
         "labels"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(hidden1=h1[:0], hidden2=h2[:0], labels=labels[:0]), ValueError, "empty"),
        (dict(weight=w[:1]), ValueError, "V >= 2"),
        (dict(hidden2=h2.double()), TypeError, "hidden2"),
    ]
    for override, error, match in cases:
        kw = {**dict(hidden1=h1, hidden2=h2, weight=w, bias=b, labels=labels), **override}
        if "weight" in override and override["weight"].dim() == 2 and "bias" not in override:
            kw["bias"] = None
        with pytest.raises(error, match=match):
            fused_linear_rdrop_loss(**kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_default_out_of_range_label_is_nan_never_finite(device, backend):
    """Unchecked (the default), an out-of-range label makes the loss and the gradients of its
    row's hidden states NaN, as in rdrop_loss; the other rows' hidden gradients stay finite."""
    require_backend(backend, device)
    h1, h2, w, b, labels = make_linear((6,), 8, 5, device, ignore_frac=0.0)
    labels[4] = 5
    a = h1.clone().requires_grad_(True)
    loss = fused_linear_rdrop_loss(a, h2, w, b, labels, backend=backend, chunk_size=4)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(a.grad[4]).all() and torch.isfinite(a.grad[[0, 1, 2, 3, 5]]).all()


def test_non_finite_hidden_raises_on_reference(device):
    h1, h2, w, b, labels = make_linear((4,), 8, 5, device)
    h1[2, 0] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        fused_linear_rdrop_loss(h1, h2, w, b, labels, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_grad_forward(device, backend):
    require_backend(backend, device)
    h1, h2, w, b, labels = make_linear((7,), 8, 9, device)
    with torch.no_grad():
        loss = fused_linear_rdrop_loss(h1, h2, w, b, labels, backend=backend, chunk_size=3)
    ref = fused_linear_rdrop_loss_reference(h1.double(), h2.double(), w.double(), b.double(),
                                            labels)
    assert_rel(loss, ref, 1e-5, "no-grad loss")


def test_backend_errors_name_this_op_and_hidden1(device, monkeypatch):
    """Dispatch errors say fused_linear_rdrop_loss and hidden1, the names the caller used."""
    from regdrop_fast.backends import BackendUnavailableError

    h1, h2, w, b, labels = make_linear((4,), 8, 5, device)
    with pytest.raises(TypeError, match="fused_linear_rdrop_loss: hidden1 is torch.float64"):
        fused_linear_rdrop_loss(h1.double(), h2.double(), w.double(), b.double(), labels,
                                backend="triton")
    monkeypatch.setenv("REGDROP_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="fused_linear_rdrop_loss has no 'cuda'"):
        fused_linear_rdrop_loss(h1, h2, w, b, labels)
    # float64 on auto runs the reference
    monkeypatch.setenv("REGDROP_FAST_BACKEND", "auto")
    loss = fused_linear_rdrop_loss(h1.double(), h2.double(), w.double(), b.double(), labels)
    assert loss.dtype == torch.float64
