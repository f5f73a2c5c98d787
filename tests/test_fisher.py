"""fisher_mask against the official ChildTuning-D computation on a tiny random BERT."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from regdrop_fast import ChildTuningAdamW, PackedMask, fisher_mask  # noqa: E402
from regdrop_fast.childtuning.fisher import percentile_rank  # noqa: E402


def _bert(device):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(device)


def _loader(device, n_batches=3):
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 6:] = 0
        batches.append({"input_ids": torch.randint(0, 50, (4, 9), generator=gen).to(device),
                        "attention_mask": mask.to(device),
                        "labels": torch.randint(0, 3, (4,), generator=gen).to(device)})
    return batches


def _official_fisher_masks(model, loader, reserve_p, max_grad_norm=1.0):
    """calculate_fisher of the official run_glue.py (ChildTuning), re-written here."""
    gradient_mask = {}
    model.train()
    for name, params in model.named_parameters():
        if "layer" in name:
            gradient_mask[params] = params.new_zeros(params.size())
    n = len(loader)
    for batch in loader:
        loss = model(**batch)[0]
        loss.backward()
        for name, params in model.named_parameters():
            if "layer" in name:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                gradient_mask[params] += (params.grad ** 2) / n
        model.zero_grad()
    r = np.concatenate([v.view(-1).cpu().numpy() for v in gradient_mask.values()])
    polar = np.percentile(r, (1 - reserve_p) * 100)
    return {k: v >= float(polar) for k, v in gradient_mask.items()}


@pytest.mark.parametrize("reserve_p", [0.3, 0.1])
def test_matches_official_fisher_mask(device, reserve_p):
    model = _bert(device)
    loader = _loader(device)
    masks = fisher_mask(model, loader, reserve_p)
    want = _official_fisher_masks(model, loader, reserve_p)
    names = {p: n for n, p in model.named_parameters()}
    assert list(masks) == [p for p in model.parameters() if p.requires_grad]
    for p, mask in masks.items():
        if "layer" in names[p]:
            assert isinstance(mask, PackedMask)
            assert torch.equal(mask.unpack(), want[p]), names[p]
        else:  # embeddings, pooler, classifier: always updated
            assert mask is None, names[p]
    kept = sum(int(want[p].sum()) for p in want)
    total = sum(want[p].numel() for p in want)
    assert kept >= reserve_p * total and kept <= reserve_p * total + 64


def test_percentile_rank_matches_numpy_with_ties():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        for values in (rng.standard_normal(n), rng.integers(0, 4, n).astype(np.float64)):
            for reserve_p in (1.0, 0.9, 0.5, 0.3, 0.2, 0.1, 0.01):
                polar = np.percentile(values, (1 - reserve_p) * 100)
                want = values >= polar
                t = torch.from_numpy(values)
                threshold = torch.kthvalue(t, percentile_rank(n, reserve_p)).values
                assert np.array_equal((t >= threshold).numpy(), want), (n, reserve_p)


def test_scope_params_and_max_batches(device):
    model = _bert(device)
    loader = _loader(device, 4)
    per_tensor = fisher_mask(model, loader, 0.25, scope="per_tensor", max_batches=2)
    for mask in per_tensor.values():
        if mask is not None:  # every tensor keeps its own top 25% (ties kept)
            assert mask.density >= 0.25 and mask.density < 0.25 + 2.0 / mask.numel() + 0.05
    chosen = fisher_mask(model, loader, 0.5, params=lambda n: "classifier" in n)
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p, m in chosen.items() if m is not None} == {
        "classifier.weight", "classifier.bias"}
    by_name = fisher_mask(model, loader, 0.5, params=["classifier.weight"])
    assert sum(m is not None for m in by_name.values()) == 1
    model.eval()
    fisher_mask(model, iter(loader), 0.5)  # no len(): divided by the batch count at the end
    assert not model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())


def test_with_childtuning_d(device):
    model = _bert(device)
    loader = _loader(device)
    masks = fisher_mask(model, loader, 0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ChildTuningAdamW(model.parameters(), mode="D", masks=masks, drop="update", lr=1e-3,
                           seed=0)
    model(**loader[0]).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = p.detach() != before[n]
        if masks[p] is None:
            continue
        assert not (moved & ~masks[p].unpack()).any(), n  # dropped elements never move
    classifier = dict(model.named_parameters())["classifier.weight"]
    assert (classifier.detach() != before["classifier.weight"]).all()


def test_bad_input(device):
    model = _bert(device)
    loader = _loader(device, 1)
    with pytest.raises(ValueError, match="reserve_p"):
        fisher_mask(model, loader, 0.0)
    with pytest.raises(ValueError, match="scope"):
        fisher_mask(model, loader, 0.3, scope="layer")
    with pytest.raises(ValueError, match="no batch"):
        fisher_mask(model, [], 0.3)
    with pytest.raises(ValueError, match="no parameter selected"):
        fisher_mask(model, loader, 0.3, params=lambda n: False)
    with pytest.raises(ValueError, match="not trainable parameters"):
        fisher_mask(model, loader, 0.3, params=["nope.weight"])
    with pytest.raises(ValueError, match="no scalar loss"):
        fisher_mask(model, [{"input_ids": loader[0]["input_ids"]}], 0.3)


@pytest.mark.parametrize("where", ["weight", "gradient"])
def test_nan_score_names_the_parameter(device, where):
    model = _bert(device)
    loader = _loader(device, 2)
    target = dict(model.named_parameters())["bert.encoder.layer.1.output.dense.weight"]
    if where == "weight":
        with torch.no_grad():
            target[0, 0] = float("nan")
        loss_fn = None
    else:
        def loss_fn(model, batch):  # a loss whose gradient for one weight is NaN
            return model(**batch).loss + (target[0, 0] * float("nan")).sum() * 0.0
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.\d\..*' is NaN or infinite"):
        fisher_mask(model, loader, 0.3, loss_fn=loss_fn)
