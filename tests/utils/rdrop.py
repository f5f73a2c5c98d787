"""R-Drop test helpers: the normwise relative-error assert, seeded logits/labels, and the loss
of the official HF BERT GLUE script (dropreg/R-Drop), written out from its code."""
import torch
import torch.nn.functional as F


def assert_rel(actual, expected, tol, what, atol=1e-12):
    """Normwise relative error: max|a - e| <= tol * max|e| + atol (a tiny floor for zeros by
    default; a caller whose result can cancel to ~0 passes the size of the cancelling terms)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale + atol, (f"{what}: max abs err {err:.3e} vs tol {tol} * "
                                       f"{scale:.3e} + {atol:.3e}")


def make_inputs(shape, device, dtype=torch.float32, scale=3.0, ignore_frac=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_classes = shape[-1]
    z1 = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)
    z2 = (z1.float().cpu() + torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, n_classes, shape[:-1], generator=gen)
    labels[torch.rand(shape[:-1], generator=gen) < ignore_frac] = -100
    return z1, z2, labels.to(device)


def official_bert_glue(z1, z2, labels, alpha):
    """bert_kl in the official modeling_bert.py: CE means of both passes, then
    alpha * (kl_div(p, q_tec).sum() + kl_div(q, p_tec).sum()) / 2 (alpha = 0.5 there)."""
    loss = F.cross_entropy(z1, labels) + F.cross_entropy(z2, labels)
    p, p_tec = torch.log_softmax(z1, dim=-1), torch.softmax(z1, dim=-1)
    q, q_tec = torch.log_softmax(z2, dim=-1), torch.softmax(z2, dim=-1)
    kl = F.kl_div(p, q_tec, reduction="none").sum()
    reverse = F.kl_div(q, p_tec, reduction="none").sum()
    return loss + alpha * (kl + reverse) / 2.0
