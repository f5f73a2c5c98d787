"""Debiasing losses against hand-computed values; overlap features; the bias-only model."""
import math

import pytest
import torch

from regdrop_fast.sparse import (claim_features, conf_reg_loss, overlap_features, poe_loss,
                                 reweight_loss, train_bias_model)

# one example by hand: logits z = [1, 2, 0], label 1; bias probs [0.2, 0.5, 0.3]
Z = [1.0, 2.0, 0.0]
PB = [0.2, 0.5, 0.3]


def _log_softmax(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def test_poe_matches_hand_computation(device):
    # CE(log_softmax(z) + log p_b, y) = -log( p_y p_b,y / Σ_c p_c p_b,c )
    p = [math.exp(x) for x in _log_softmax(Z)]
    want = -math.log(p[1] * PB[1] / sum(pc * bc for pc, bc in zip(p, PB)))
    logits = torch.tensor([Z], device=device, requires_grad=True)
    loss = poe_loss(logits, torch.tensor([1], device=device),
                    torch.tensor([PB], device=device).log())
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_reweight_matches_hand_computation(device):
    rows = [([1.0, 2.0, 0.0], 1, [0.2, 0.5, 0.3]),
            ([0.5, -1.0, 3.0], 2, [0.1, 0.1, 0.8]),
            ([0.0, 0.0, 0.0], 0, [0.6, 0.2, 0.2])]
    ces = [-_log_softmax(z)[y] for z, y, _ in rows]
    ws = [1.0 - pb[y] for _, y, pb in rows]
    want = sum(w * ce for w, ce in zip(ws, ces)) / sum(ws)
    got = reweight_loss(torch.tensor([r[0] for r in rows], device=device),
                        torch.tensor([r[1] for r in rows], device=device),
                        torch.tensor([r[2] for r in rows], device=device))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # normalized by Σw, not by the batch size
    assert got.item() != pytest.approx(sum(w * ce for w, ce in zip(ws, ces)) / len(rows))


def test_conf_reg_matches_hand_computation(device):
    teacher = [0.1, 0.7, 0.2]
    beta = PB[1]
    scaled = [t ** (1 - beta) for t in teacher]
    s = [x / sum(scaled) for x in scaled]
    want = -sum(sc * lp for sc, lp in zip(s, _log_softmax(Z)))
    got = conf_reg_loss(torch.tensor([Z], device=device), torch.tensor([1], device=device),
                        torch.tensor([teacher], device=device), torch.tensor([PB], device=device))
    assert got.item() == pytest.approx(want, rel=1e-6)
    # a bias model certain of the label (β = 1) flattens the teacher to uniform
    certain = conf_reg_loss(torch.tensor([Z], device=device), torch.tensor([1], device=device),
                            torch.tensor([teacher], device=device),
                            torch.tensor([[0.0, 1.0, 0.0]], device=device))
    assert certain.item() == pytest.approx(-sum(_log_softmax(Z)) / 3, rel=1e-6)


def test_ignored_and_zero_weight_rows_are_finite(device):
    logits = torch.randn(2, 3, device=device)
    ignored = torch.tensor([-100, -100], device=device)
    probs = torch.tensor([[0.0, 1.0, 0.0]] * 2, device=device)
    for loss in (poe_loss(logits, ignored, probs.log()), reweight_loss(logits, ignored, probs),
                 conf_reg_loss(logits, ignored, probs, probs),
                 reweight_loss(logits, torch.tensor([1, 1], device=device), probs)):
        assert loss.item() == 0.0
    # an ignored row does not change the loss of the others
    labels = torch.tensor([1, -100], device=device)
    bias = torch.tensor([PB, PB], device=device)
    assert poe_loss(logits, labels, bias.log()).item() == pytest.approx(
        poe_loss(logits[:1], labels[:1], bias[:1].log()).item(), rel=1e-6)


def test_loss_bad_input():
    z, y, p = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="bias_probs must have the logits' shape"):
        reweight_loss(z, y, p[:, :2])
    with pytest.raises(ValueError, match="labels must have shape"):
        poe_loss(z, y[:3], p.log())
    with pytest.raises(ValueError, match="empty batch"):
        conf_reg_loss(z[:0], y[:0], p[:0], p[:0])
    with pytest.raises(TypeError, match="labels must have dtype"):
        poe_loss(z, y.float(), p.log())


@pytest.mark.parametrize("bad_label", [3, -1, 7])
def test_out_of_range_labels(device, bad_label):
    """Issue 15: a label outside [0, C) that is not ignore_index is refused naming `labels` on
    the CPU; on a GPU (no host sync per step) it makes the loss NaN, never an index error."""
    logits = torch.randn(4, 3, device=device)
    probs = torch.softmax(torch.randn(4, 3), -1).to(device)
    labels = torch.tensor([0, 1, bad_label, -100], device=device)
    calls = [lambda: poe_loss(logits, labels, probs.log()),
             lambda: reweight_loss(logits, labels, probs),
             lambda: conf_reg_loss(logits, labels, probs, probs)]
    for call in calls:
        if device.type == "cpu":
            with pytest.raises(ValueError, match=f"labels must be in \\[0, 3\\).*got {bad_label}"):
                call()
        else:
            assert torch.isnan(call())
    # the same batch with the bad row ignored is fine
    ok = labels.clone()
    ok[2] = -100
    assert torch.isfinite(poe_loss(logits, ok, probs.log()))
    assert torch.isfinite(reweight_loss(logits, ok, probs))
    assert torch.isfinite(conf_reg_loss(logits, ok, probs, probs))


def test_overlap_features():
    feats = overlap_features(
        ["the doctor saw the lawyer", "the cat sat", "a b c"],
        ["the lawyer saw the doctor", "the cat", "x y"])
    assert feats.shape == (3, 5)
    assert feats[0].tolist()[:3] == [1.0, 0.0, 1.0]  # all words in premise, not contiguous
    assert feats[1].tolist()[:3] == [1.0, 1.0, 1.0]  # contiguous subsequence
    assert feats[2].tolist()[:3] == [0.0, 0.0, 0.0]
    assert feats[0, 3] == 1.0 and feats[0, 4] == 1.0  # every word matched exactly
    assert 0.0 <= feats[2, 4] <= feats[2, 3] < 1.0
    vectors = {"dog": torch.tensor([1.0, 0.0]), "puppy": torch.tensor([0.6, 0.8])}
    sim = overlap_features(["a dog barked"], ["puppy"], embed=vectors.get)
    assert sim[0, 3].item() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="same length"):
        overlap_features(["a"], [])


def test_bias_model_learns_overlap_heuristic():
    # label 0 (entailment) iff the hypothesis is inside the premise: the heuristic the bias
    # model exists to capture
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    premises, hypotheses, labels = [], [], []
    for i in range(200):
        prem = [words[j] for j in torch.randperm(8, generator=g)[:5].tolist()]
        if i % 2 == 0:
            hyp, label = prem[1:3], 0
        else:
            hyp, label = [w for w in words if w not in prem][:2], 1
        premises.append(" ".join(prem))
        hypotheses.append(" ".join(hyp))
        labels.append(label)
    feats = overlap_features(premises, hypotheses)
    model = train_bias_model(feats, torch.tensor(labels), num_classes=2)
    probs = model.probs(feats)
    assert torch.allclose(probs.sum(-1), torch.ones(200))
    assert (probs.argmax(-1) == torch.tensor(labels)).float().mean() > 0.95
    with pytest.raises(ValueError, match="labels must be in"):
        train_bias_model(feats, torch.tensor(labels) + 1, num_classes=2)


def test_claim_features_are_deterministic_hashes():
    a = claim_features(["Paris is not in France", "Paris is in France"], dim=64)
    assert a.shape == (2, 64)
    assert a[0].sum() == 5 + 4 and a[1].sum() == 4 + 3  # unigrams + bigrams
    assert torch.equal(a, claim_features(["Paris is not in France", "Paris is in France"],
                                         dim=64))
