"""R-Drop against the official scripts' loss formulas (dropreg/R-Drop), written out here from
their code: the HF BERT GLUE script (KL summed over the batch: kl_reduction="sum"; its formula,
shared with test_rdrop_forward.py, is in utils/rdrop.py) and the fairseq RoBERTa
sentence-prediction criterion (everything summed, then divided by the sample size:
kl_reduction="mean"). Loss and every gradient by float64 autograd of the formula, on
every backend."""
import pytest
import torch
import torch.nn.functional as F

from regdrop_fast import RDropLoss, fused_linear_rdrop_loss, rdrop_loss
from regdrop_fast.reference.rdrop import rdrop_grads_reference
from utils import require_backend
from utils.rdrop import assert_rel, make_inputs, official_bert_glue

BACKENDS = ["reference", "triton"]
TOLS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def official_bert_glue_regression(pred1, pred2, labels):
    """The same script's regression head (num_labels == 1): MSE means, consistency weight 1."""
    loss = F.mse_loss(pred1.view(-1), labels.view(-1)) + F.mse_loss(pred2.view(-1), labels.view(-1))
    return loss + F.mse_loss(pred1.view(-1), pred2.view(-1))


def official_roberta(z1, z2, labels, alpha):
    """reg_sentence_prediction.forward_kl: NLL sums + alpha * compute_kl_loss, then fairseq
    divides by sample_size (the number of sentences)."""
    loss = F.nll_loss(torch.log_softmax(z1, -1), labels, reduction="sum")
    loss = loss + F.nll_loss(torch.log_softmax(z2, -1), labels, reduction="sum")
    p_loss = F.kl_div(torch.log_softmax(z1, -1), torch.softmax(z2, -1), reduction="none").sum()
    q_loss = F.kl_div(torch.log_softmax(z2, -1), torch.softmax(z1, -1), reduction="none").sum()
    return (loss + alpha * (p_loss + q_loss) / 2) / labels.numel()


def autograd64(formula, tensors, *args):
    leaves = [t.detach().double().requires_grad_(True) for t in tensors]
    loss = formula(*leaves, *args)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def ours(tensors, fn):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def check(ours_result, official_result, tol):
    (loss, grads), (ref, ref_grads) = ours_result, official_result
    assert_rel(loss, ref, tol, "loss")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_rel(g, r, tol, f"gradient {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows,n_classes", [(16, 2), (7, 3), (5, 257)])
def test_kl_sum_is_the_official_bert_glue_script(device, backend, dtype, n_rows, n_classes):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((n_rows, n_classes), device, dtype=dtype, ignore_frac=0.0,
                                 seed=n_classes)
    official = autograd64(official_bert_glue, (z1, z2), labels, 0.5)
    check(ours((z1, z2), lambda a, b: rdrop_loss(a, b, labels, 0.5, backend=backend,
                                                 kl_reduction="sum")), official, TOLS[dtype])
    module = RDropLoss(alpha=0.5, kl_reduction="sum", backend=backend)
    check(ours((z1, z2), lambda a, b: module(a, b, labels)), official, TOLS[dtype])
    assert "kl_reduction='sum'" in repr(module)
    # the KL term summed is N times the averaged one: the two settings differ by that much
    mean = rdrop_loss(z1, z2, labels, 0.5, backend=backend, ce=False)
    total = rdrop_loss(z1, z2, labels, 0.5, backend=backend, ce=False, kl_reduction="sum")
    assert_rel(total, mean * n_rows, TOLS[dtype], "KL sum = N * KL mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 5.0])
def test_kl_mean_is_the_official_roberta_criterion(device, backend, alpha):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((9, 5), device, ignore_frac=0.0, seed=3)
    official = autograd64(official_roberta, (z1, z2), labels, alpha)
    check(ours((z1, z2), lambda a, b: rdrop_loss(a, b, labels, alpha, backend=backend)),
          official, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_head_is_the_official_bert_script_with_kl_mean(device, backend):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(4)
    p1, p2 = (torch.randn(6, 1, generator=gen).to(device) for _ in range(2))
    y = torch.randn(6, generator=gen).to(device)
    official = autograd64(official_bert_glue_regression, (p1, p2), y)
    check(ours((p1, p2), lambda a, b: rdrop_loss(a, b, y, 1.0, backend=backend)), official,
          1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kl_sum_is_the_official_bert_glue_script(device, backend, dtype):
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(6)
    h1 = torch.randn(10, 8, generator=gen)
    h2 = h1 + 0.3 * torch.randn(10, 8, generator=gen)
    w = torch.randn(3, 8, generator=gen) / 2
    b = torch.randn(3, generator=gen)
    labels = torch.randint(0, 3, (10,), generator=gen).to(device)
    tensors = [t.to(device=device, dtype=dtype) for t in (h1, h2, w, b)]

    def official(a, c, weight, bias):
        return official_bert_glue(F.linear(a, weight, bias), F.linear(c, weight, bias), labels,
                                  0.5)

    check(ours(tensors, lambda a, c, weight, bias: fused_linear_rdrop_loss(
        a, c, weight, bias, labels, 0.5, backend=backend, kl_reduction="sum", chunk_size=3)),
        autograd64(official, tensors), 3e-2 if dtype == torch.bfloat16 else 1e-5)
    # (bf16: the GEMM rounds the logits themselves to bf16 before the loss sees them)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kl_sum_with_ignored_rows_and_reductions(device, backend, reduction):
    """Ignored rows count in neither term; "sum" and "none" do not depend on kl_reduction."""
    require_backend(backend, device)
    z1, z2, labels = make_inputs((2, 6, 11), device, seed=8)
    go = torch.rand(labels.shape if reduction == "none" else ()).to(device) + 0.5
    loss, grads = ours((z1, z2), lambda a, b: (rdrop_loss(
        a, b, labels, 0.7, reduction=reduction, kl_reduction="sum", backend=backend) * go).sum())
    ref, r1, r2 = rdrop_grads_reference(z1, z2, labels, 0.7, reduction=reduction,
                                        kl_reduction="sum", grad_output=go)
    assert_rel(loss, (ref * go.double()).sum(), 1e-5, "loss")
    assert_rel(grads[0], r1, 1e-5, "grad logits1")
    assert_rel(grads[1], r2, 1e-5, "grad logits2")
    if reduction == "mean":
        valid = labels != -100
        ce = F.cross_entropy(z1.double()[valid], labels[valid]) + F.cross_entropy(
            z2.double()[valid], labels[valid])
        kl = rdrop_loss(z1, z2, labels, 0.7, ce=False, reduction="sum", backend=backend)
        assert_rel(ref, ce + kl.double(), 1e-6, "CE means + KL sum over counted rows")
    else:
        same = rdrop_grads_reference(z1, z2, labels, 0.7, reduction=reduction, grad_output=go)
        assert_rel(ref, same[0], 1e-12, f"{reduction}: kl_reduction changes nothing")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_parts_on_the_ce_scale(device, backend, task):
    """return_parts: ce = mean (CE1 + CE2) / 2, kl = mean (KL12 + KL21) / 2 (|p1 - p2|^2 for
    regression) over the counted rows, whatever the reductions; loss = 2 ce + alpha kl."""
    require_backend(backend, device)
    if task == "classification":
        z1, z2, labels = make_inputs((8, 7), device, seed=9)
        valid = labels != -100
        a, b, y = z1.double()[valid], z2.double()[valid], labels[valid]
        ce = (F.cross_entropy(a, y) + F.cross_entropy(b, y)) / 2
        kl = (F.kl_div(a.log_softmax(-1), b.log_softmax(-1), reduction="sum", log_target=True)
              + F.kl_div(b.log_softmax(-1), a.log_softmax(-1), reduction="sum",
                         log_target=True)) / 2 / valid.sum()
    else:
        gen = torch.Generator().manual_seed(1)
        z1, z2 = (torch.randn(5, 1, generator=gen).to(device) for _ in range(2))
        labels = torch.randn(5, generator=gen).to(device)
        a, b, y = z1.double()[:, 0], z2.double()[:, 0], labels.double()
        ce = ((a - y).square().mean() + (b - y).square().mean()) / 2
        kl = (a - b).square().mean()
    for reduction in ("mean", "sum", "none"):
        for kl_reduction in ("mean", "sum"):
            out = rdrop_loss(z1.clone().requires_grad_(True), z2, labels, 0.3, task=task,
                             backend=backend, reduction=reduction, kl_reduction=kl_reduction,
                             return_parts=True)
            assert not out.ce.requires_grad and not out.kl.requires_grad
            assert_rel(out.ce, ce, 1e-5, "ce part")
            assert_rel(out.kl, kl, 1e-5, "kl part")
            if reduction == "mean" and kl_reduction == "mean":
                assert_rel(out.loss.detach(), 2 * ce + 0.3 * kl, 1e-5, "loss = 2 ce + alpha kl")


def test_bad_kl_reduction_names_the_argument(device):
    z1, z2, labels = make_inputs((4, 5), device)
    for fn in (lambda: rdrop_loss(z1, z2, labels, kl_reduction="batchmean"),
               lambda: RDropLoss(kl_reduction="max")(z1, z2, labels),
               lambda: fused_linear_rdrop_loss(z1, z2, torch.ones(3, 5, device=device),
                                               labels=None, kl_reduction="none")):
        with pytest.raises(ValueError, match="kl_reduction must be one of"):
            fn()


def official_hf_roberta(z1, z2, labels):
    """modeling_roberta.py (HF RoBERTa GLUE script): halved CE means, 0.7 * summed KLs / 2."""
    loss = 0.5 * F.cross_entropy(z1, labels) + 0.5 * F.cross_entropy(z2, labels)
    kl = F.kl_div(torch.log_softmax(z1, -1), torch.softmax(z2, -1), reduction="none").sum()
    reverse = F.kl_div(torch.log_softmax(z2, -1), torch.softmax(z1, -1), reduction="none").sum()
    return loss + 0.7 * (kl + reverse) / 2


def official_hf_roberta_regression(p1, p2, labels):
    loss = 0.5 * F.mse_loss(p1.view(-1), labels.view(-1)) + 0.5 * F.mse_loss(p2.view(-1),
                                                                              labels.view(-1))
    return loss + 0.8 * F.mse_loss(p1.view(-1), p2.view(-1))


def official_vit(z1, z2, labels, alpha=0.3):
    """vit_src/models/modeling.py: CE means + alpha * (summed KL12 + summed KL21)."""
    loss = F.cross_entropy(z1, labels) + F.cross_entropy(z2, labels)
    kl = F.kl_div(torch.log_softmax(z1, -1), torch.softmax(z2, -1), reduction="none").sum()
    reverse = F.kl_div(torch.log_softmax(z2, -1), torch.softmax(z1, -1), reduction="none").sum()
    return loss + alpha * (kl + reverse)


def official_roberta_fairseq_regression(p1, p2, labels, alpha):
    """reg_sentence_prediction.forward_kl, regression branch: only the first pass has a target
    term; sums divided by the sample size."""
    p1 = p1.view(-1)
    loss = F.mse_loss(p1, labels, reduction="sum")
    loss = loss + alpha * F.mse_loss(p1, p2.view(-1), reduction="sum")
    return loss / labels.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_other_official_scripts_as_documented(device, backend):
    """docs/differences.md, R-Drop: each official script as one setting of rdrop_loss."""
    require_backend(backend, device)
    z1, z2, labels = make_inputs((12, 4), device, ignore_frac=0.0, seed=11)

    def ours_fn(**kw):
        return lambda a, b: rdrop_loss(a, b, labels, backend=backend, **kw)

    check(ours((z1, z2), lambda a, b: 0.5 * ours_fn(alpha=1.4, kl_reduction="sum")(a, b)),
          autograd64(official_hf_roberta, (z1, z2), labels), 1e-5)
    check(ours((z1, z2), ours_fn(alpha=0.6, kl_reduction="sum")),
          autograd64(official_vit, (z1, z2), labels), 1e-5)
    gen = torch.Generator().manual_seed(12)
    p1, p2 = (torch.randn(6, 1, generator=gen).to(device) for _ in range(2))
    y = torch.randn(6, generator=gen).to(device)
    check(ours((p1, p2), lambda a, b: 0.5 * rdrop_loss(a, b, y, 1.6, backend=backend)),
          autograd64(official_hf_roberta_regression, (p1, p2), y), 1e-6)
    check(ours((p1, p2), lambda a, b: rdrop_loss(a, b, y, 0.7, ce=False, task="regression",
                                                 backend=backend) + F.mse_loss(a[:, 0], y)),
          autograd64(official_roberta_fairseq_regression, (p1, p2), y, 0.7), 1e-6)
