"""ADDrop.step, attribution kinds against the official procedure, CrossTuning, Trainer mixin."""
import copy
import math

import pytest
import torch

from regdrop_fast import addrop
from regdrop_fast.reference import addrop as ref
from utils import require_backend
from utils.addrop import (batch_of, load_minilm, lm_batch, no_dropout, official_attributions,
                          official_integrated_gradients, tiny_decoder, tiny_model)


def _ref_masks(grads, batch, p, q, seed, step, drop="high"):
    pad = batch["attention_mask"].bool()
    return {layer: ref.keep_mask(g, p, q, key_padding_mask=pad, seed=seed, step=step,
                                 stream=layer, drop=drop) for layer, g in grads.items()}


def _assert_attr_close(ours, theirs):
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-5 * scale)


# -- attribution and masks vs the official procedure -----------------------------------------------
@pytest.mark.parametrize("task,head,labels", [("classification", "sequence", 3),
                                              ("regression", "sequence", 1),
                                              ("token", "token", 5)])
def test_gradient_attribution_and_masks_equal_official(task, head, labels):
    model = tiny_model("bert", head=head, num_labels=labels)
    batch = batch_of(model, [9, 6, 2], 9, task=task, seed=1)
    official, _ = official_attributions(model, batch, (0, 1), task)
    ad = addrop.ADDrop(model, p=0.3, q=0.5, layers=(0, 1), task=task, seed=11)
    ours = ad.attributions(None, batch)
    for layer in (0, 1):
        _assert_attr_close(ours[layer], official[layer])
    masks = ad.compute_masks(None, batch)
    assert ad.last_step == {"step": 0, "seed": 11, "streams": {0: 0, 1: 1}}
    expected = _ref_masks(official, batch, 0.3, 0.5, seed=11, step=0)
    for layer in (0, 1):
        assert torch.equal(masks[layer].unpack(), expected[layer])


def test_gradient_attribution_equals_official_minilm_drop_low():
    model = no_dropout(load_minilm())
    batch = batch_of(model, [10, 7], 10, seed=2)
    official, _ = official_attributions(model, batch, (0, 3))
    ad = addrop.ADDrop(model, p=0.4, q=0.3, layers=(0, 3), drop="low", seed=5)
    ours = ad.attributions(None, batch)
    for layer in (0, 3):
        _assert_attr_close(ours[layer], official[layer])
    masks = ad.compute_masks(None, batch, step=7)
    expected = _ref_masks(official, batch, 0.4, 0.3, seed=5, step=7, drop="low")
    for layer in (0, 3):
        assert torch.equal(masks[layer].unpack(), expected[layer])


def test_integrated_gradients_equal_official():
    model = tiny_model("bert", num_labels=3, seed=4)
    batch = batch_of(model, [7, 4], 7, seed=4)
    ad = addrop.ADDrop(model, layers=(0, 1), attribution="integrated_gradients", ig_steps=3)
    ours = ad.attributions(None, batch)
    for layer in (0, 1):
        _assert_attr_close(ours[layer], official_integrated_gradients(model, batch, layer, 3))
    assert model.training  # restored after the eval-mode IG passes


def test_attention_attribution_is_the_map():
    model = tiny_model("bert", seed=5)
    batch = batch_of(model, [6, 3], 6, seed=5)
    _, maps = official_attributions(model, batch, (1,))
    ad = addrop.ADDrop(model, layers=(1,), attribution="attention", seed=2)
    ours = ad.attributions(None, batch)
    torch.testing.assert_close(ours[1], maps[1], rtol=1e-5, atol=1e-6)
    masks = ad.compute_masks(None, batch)
    assert torch.equal(masks[1].unpack(), _ref_masks(maps, batch, 0.3, 0.2, 2, 0)[1])


def test_random_candidates_follow_the_official_rates():
    model = tiny_model("bert", seed=6)
    batch = batch_of(model, [40, 40, 20], 40, seed=6)
    ad = addrop.ADDrop(model, p=0.5, q=0.6, layers=(0, 1), attribution="random", seed=9)
    masks = ad.compute_masks(None, batch)
    pad = batch["attention_mask"].bool()[:, None, None, :]
    for layer in (0, 1):
        keep = masks[layer].unpack()
        assert not (keep & ~pad).any()
        dropped = (~keep & pad).sum().item() / pad.expand_as(keep).sum().item()
        assert abs(dropped - 0.5 * 0.6) < 0.02  # candidate with p, dropped with q
    assert not torch.equal(masks[0].unpack(), masks[1].unpack())
    with pytest.raises(ValueError, match="random"):
        ad.attributions(None, batch)


# -- the step --------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_step_backpropagates_pass_two_only():
    model = tiny_model("bert", seed=7)
    batch = batch_of(model, [8, 5, 8], 8, seed=7)
    ad = addrop.ADDrop(model, layers=(0, 1), p=0.5, q=0.9, seed=3)
    out = ad.step(None, batch)
    step_grads = _grads(model)
    assert out.loss.requires_grad is False and torch.isfinite(out.loss)
    assert out.logits.shape == (3, 2) and set(out.masks) == {0, 1}
    model.zero_grad(set_to_none=True)
    with ad.masked(out.masks, step=0):
        again = model(**batch)
        again.loss.backward()
    torch.testing.assert_close(again.loss.detach(), out.loss, rtol=0, atol=0)
    manual = _grads(model)
    assert step_grads.keys() == manual.keys()
    for name in manual:
        torch.testing.assert_close(step_grads[name], manual[name], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        plain_loss = model(**batch).loss
    assert abs(plain_loss.item() - out.loss.item()) > 1e-6  # the masks changed pass 2


def test_step_counter_reproducibility_and_custom_loss():
    model = tiny_model("bert", seed=8)
    batch = batch_of(model, [6, 6], 6, seed=8)
    ad = addrop.ADDrop(model, layers=(0,), p=0.5, q=0.5, seed=4)
    first = ad.compute_masks(None, batch)
    second = ad.compute_masks(None, batch)
    assert ad.step_count == 2 and ad.last_step["step"] == 1
    assert not torch.equal(first[0].words, second[0].words)
    assert torch.equal(ad.compute_masks(None, batch, step=0)[0].words, first[0].words)
    calls = []

    def loss_fn(outputs, b):
        calls.append(b is batch)
        return outputs.logits.float().pow(2).mean()

    out = ad.step(None, batch, loss_fn=loss_fn, backward=False)
    assert calls == [True] and out.loss.requires_grad
    plain = ad.plain_step(None, batch)
    assert plain.masks == {} and torch.isfinite(plain.loss)


@pytest.mark.parametrize("task,head,labels", [("regression", "sequence", 1),
                                              ("token", "token", 4)])
def test_regression_and_token_steps_run(task, head, labels):
    model = tiny_model("bert", head=head, num_labels=labels, dropout=0.1, seed=9)
    batch = batch_of(model, [7, 3, 0], 7, task=task, seed=9)  # includes an all-pad row
    out = addrop.ADDrop(model, layers=(0, 1), task=task).step(None, batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_step_runs_on_other_encoders(kind):
    model = tiny_model(kind, dropout=0.1, seed=17)
    batch = batch_of(model, [6, 4], 6, seed=17)
    out = addrop.ADDrop(model, layers=(0, 1), p=0.5, q=0.5).step(None, batch)
    assert torch.isfinite(out.loss) and all(m.density < 1.0 for m in out.masks.values())
    assert model.base_model.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("kind", ["gradient", "integrated_gradients", "attention", "random"])
def test_all_pad_rows_and_length_one(kind):
    model = tiny_model("electra", dropout=0.1, seed=10)
    ad = addrop.ADDrop(model, layers=(1,), attribution=kind, ig_steps=2)
    for lengths, seq_len in (([5, 0, 2], 5), ([1, 1], 1), ([0, 0], 3)):
        batch = batch_of(model, lengths, seq_len, seed=10)
        out = ad.step(None, batch)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
        keep = out.masks[1].unpack()
        assert not keep[torch.tensor(lengths) == 0].any()


@pytest.mark.parametrize("kind", ["gradient", "integrated_gradients"])
def test_step_under_bf16_autocast(kind):
    model = tiny_model("bert", dropout=0.1, seed=16)
    batch = batch_of(model, [6, 3], 6, seed=16)
    ad = addrop.ADDrop(model, layers=(0, 1), attribution=kind, ig_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad.step(None, batch)
    assert torch.isfinite(out.loss) and out.masks[0].density < 1.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_minilm_step_reference_and_triton_agree(device):
    require_backend("triton", device)
    base = no_dropout(load_minilm(seed=1)).to(device)
    batch = {k: v.to(device) for k, v in batch_of(base, [6, 4], 6, seed=11).items()}
    results = {}
    for backend in ("reference", "triton"):
        model = copy.deepcopy(base)
        out = addrop.ADDrop(model, layers=(0, 1), p=0.3, q=0.5, seed=12,
                            backend=backend).step(None, batch)
        results[backend] = (out, _grads(model))
    (ref_out, ref_grads), (tri_out, tri_grads) = results["reference"], results["triton"]
    # interpreter: bit-identical masks; a GPU's tensor-core dot may round B = dO·Vᵀ apart from
    # torch's matmul and swap a near-tie at the threshold
    exact = device.type == "cpu"
    for layer in (0, 1):
        differing = (ref_out.masks[layer].unpack() != tri_out.masks[layer].unpack()).sum().item()
        assert differing == 0 if exact else differing <= 1e-3 * ref_out.masks[layer].numel()
    tol = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(tri_out.loss, ref_out.loss, **tol)
    torch.testing.assert_close(tri_out.logits, ref_out.logits, **tol)
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"):
        torch.testing.assert_close(tri_grads[name], ref_grads[name],
                                   rtol=10 * tol["rtol"], atol=tol["atol"])


def test_step_bad_input():
    model = tiny_model("bert", seed=12)
    batch = batch_of(model, [4, 2], 4)
    with pytest.raises(ValueError, match="task must be one of"):
        addrop.ADDrop(model, task="seq2seq")
    with pytest.raises(ValueError, match="p must be in"):
        addrop.ADDrop(model, p=1.0)
    with pytest.raises(ValueError, match="layers must be in"):
        addrop.ADDrop(model, layers=(3,))
    ad = addrop.ADDrop(model, layers=(0,), task="regression")
    with pytest.raises(ValueError, match="labels"):
        ad.compute_masks(None, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(TypeError, match="batch must be a mapping"):
        ad.compute_masks(None, [batch["input_ids"]])
    with pytest.raises(ValueError, match="not enabled"):
        ad.step(tiny_model("bert"), batch)
    other = tiny_model("bert")
    addrop.enable(other)
    with pytest.raises(ValueError, match="not the model"):
        ad.step(other, batch)
    classifier = addrop.ADDrop(model, layers=(0,))
    with pytest.raises(ValueError, match="no loss"):
        classifier.step(None, {k: v for k, v in batch.items() if k != "labels"})
    token_model = tiny_model("bert", head="token")
    with pytest.raises(ValueError, match="task='token'"):
        addrop.ADDrop(token_model).compute_masks(None, batch_of(token_model, [4], 4,
                                                                task="token"))


# -- pass 1 is as cheap as the method allows; no host syncs ------------------------------------
def _tiny(kind):
    if kind == "bert":
        model = tiny_model("bert", dropout=0.1, seed=30)
        return model, batch_of(model, [6, 4, 5], 6, seed=30), "classification", \
            model.bert.encoder.layer
    model = tiny_decoder("llama", seed=30)
    return model, lm_batch([6, 4, 5], 6, seed=30), "token", model.model.layers


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_pass_one_touches_no_parameter_grad_and_nothing_below_the_lowest_layer(kind):
    model, batch, task, blocks = _tiny(kind)
    step = addrop.ADDrop(model, layers=(1,), task=task)
    sentinel = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = sentinel[name].clone()
    backward_calls, graph_below = [], []
    blocks[0].register_full_backward_hook(lambda *args: backward_calls.append(1))
    blocks[0].register_forward_hook(
        lambda mod, args, out: graph_below.append((out[0] if isinstance(out, tuple)
                                                   else out).requires_grad))
    masks = step.compute_masks(None, batch)
    assert masks[1].density < 1.0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[name]), name
    assert backward_calls == [] and graph_below == [False]
    with step.masked(masks):  # the hooks do fire on a pass that back-propagates
        step._loss(model(**batch), batch, None).backward()
    assert backward_calls and graph_below[-1] is True


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_pass_one_masks_equal_a_full_graph_pass_one(kind):
    """The graph starting at the lowest chosen layer gives the same dO, hence the same masks,
    as a pass 1 recording autograd through the whole model."""
    model, batch, task, _ = _tiny(kind)
    step = addrop.ADDrop(model, layers=(0, 1), task=task, p=0.5, q=0.5, seed=6)
    torch.manual_seed(1)  # the same hidden dropout in both passes
    ours = step.compute_masks(None, batch, step=3)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.manual_seed(1)
    with torch.enable_grad(), step.state.recording() as records:
        logits = model(**inputs).logits
    assert records[0].out.grad_fn is not None  # the whole model is in this graph
    causal = records[0].causal
    grads = torch.autograd.grad(step.target(logits, batch, causal=causal),
                                [records[layer].out for layer in (0, 1)])
    for layer, dO in zip((0, 1), grads):
        record = records[layer]
        expected = addrop.keep_mask((dO, record.value), 0.5, 0.5,
                                    key_padding_mask=record.key_padding, seed=6, step=3,
                                    stream=layer, is_causal=causal)
        assert torch.equal(ours[layer].words, expected.words)


_SYNCS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_asks_the_host_for_no_tensor_value(kind, backend, monkeypatch):
    """No Tensor.item / bool / tolist / int / float / index in a step: the Python ways of a
    host sync (the first step may validate; later ones must not)."""
    model, batch, task, _ = _tiny(kind)
    step = addrop.ADDrop(model, layers=(0, 1), task=task, backend=backend)
    step.step(None, batch)
    calls = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _o=original, **k: (calls.append(_n),
                                                                         _o(self, *a, **k))[1])
    out = step.step(None, batch)
    monkeypatch.undo()
    assert calls == [] and torch.isfinite(out.loss)


# -- cross-tuning ----------------------------------------------------------------------------------
def test_cross_tuning_schedule():
    official = addrop.CrossTuning()
    assert [official(e) for e in range(5)] == [False, True, False, True, False]
    assert [addrop.CrossTuning(period=1, addrop_phase=0)(e) for e in range(3)] == [True] * 3
    delayed = addrop.CrossTuning(period=3, addrop_phase=0, start_epoch=2)
    assert [delayed(e) for e in range(7)] == [False, False, False, True, False, False, True]
    assert addrop.CrossTuning(rule=lambda e: e >= 2)(3)
    with pytest.raises(ValueError, match="addrop_phase"):
        addrop.CrossTuning(period=2, addrop_phase=2)
    with pytest.raises(ValueError, match="period"):
        addrop.CrossTuning(period=0)
    with pytest.raises(TypeError, match="rule"):
        addrop.CrossTuning(rule=3)
    with pytest.raises(ValueError, match="epoch"):
        official(-1)


def test_cross_tuning_train_step_dispatches():
    model = tiny_model("bert", seed=13)
    batch = batch_of(model, [5, 3], 5)
    ad = addrop.ADDrop(model, layers=(0,))
    schedule = addrop.CrossTuning()
    plain = schedule.train_step(ad, None, batch, epoch=0)
    assert plain.masks == {} and ad.step_count == 0
    masked = schedule.train_step(ad, None, batch, epoch=1)
    assert set(masked.masks) == {0} and ad.step_count == 1


# -- Trainer ---------------------------------------------------------------------------------------
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_mixin_runs_two_steps(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import TrainingArguments
    model = tiny_model("bert", dropout=0.1, seed=14)
    batch = batch_of(model, [6, 4, 5, 2], 6, seed=14)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=2,
                             per_device_train_batch_size=2, use_cpu=True, save_strategy="no",
                             logging_strategy="no", learning_rate=1e-3)
    trainer = addrop.ADDropTrainer(model=model, args=args, train_dataset=_ListDataset(rows),
                                   addrop=dict(layers=(0, 1)),
                                   cross_tuning=addrop.CrossTuning(period=1, addrop_phase=0))
    before = model.classifier.weight.detach().clone()
    result = trainer.train()
    assert trainer.addrop.step_count == 2 and math.isfinite(result.training_loss)
    assert not torch.equal(before, model.classifier.weight)


class _FakeTrainer:
    """The Trainer surface the mixin uses (transformers' Trainer needs accelerate)."""

    def __init__(self, model):
        self.model = model
        self.callbacks = []
        self.steps = []

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def _prepare_inputs(self, inputs):
        return inputs

    def compute_loss_context_manager(self):
        import contextlib
        return contextlib.nullcontext()

    def training_step(self, model, inputs, num_items_in_batch=None):
        state = self.addrop.state
        self.steps.append(state.mode)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach()


def test_trainer_mixin_follows_the_schedule_and_epoch_callback():
    from transformers import TrainerControl, TrainerState
    from regdrop_fast.addrop.trainer import ADDropTrainerMixin

    class Trainer(ADDropTrainerMixin, _FakeTrainer):
        pass

    model = tiny_model("bert", seed=15)
    batch = batch_of(model, [5, 2], 5)
    trainer = Trainer(model, addrop=dict(layers=(1,)))
    callback = trainer.callbacks[0]
    assert callback is trainer.addrop_epochs
    for epoch_value in (0.0, 1.0, 2.0, 1.5):
        callback.on_epoch_begin(None, TrainerState(epoch=epoch_value), TrainerControl())
        trainer.training_step(model, batch)
    assert trainer.steps == ["plain", "masked", "plain", "masked"]
    assert trainer.addrop.step_count == 2
    with pytest.raises(ValueError, match="addrop must be"):
        Trainer(model)
    with pytest.raises(TypeError, match="cross_tuning"):
        Trainer(model, addrop=dict(layers=(1,)), cross_tuning="odd")
