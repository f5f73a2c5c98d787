"""Two-pass forward helpers (duplicate / twice, every=k, passes=m) and the HF Trainer mixin on
tiny random BERT models (built from a BertConfig, nothing downloaded)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from regdrop_fast import rdrop_forward
from regdrop_fast.rdrop.forward import duplicate_batch, multi_rdrop_loss, single_pass_loss
from regdrop_fast.reference.rdrop import multi_rdrop_loss_reference, rdrop_loss_reference
from utils.rdrop import assert_rel, official_bert_glue


class TinyClassifier(nn.Module):
    """x [B, 4] -> logits [B, 5] through dropout, returning a dict like HF models."""

    def __init__(self, p=0.3):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.drop = nn.Dropout(p)

    def forward(self, x, scale=1.0):
        return {"logits": self.lin(self.drop(x)) * scale}


def tiny_batch(batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, generator=gen), "scale": 2.0,
            "labels": torch.randint(0, 5, (batch,), generator=gen)}


def test_duplicate_batch_repeats_batch_tensors_only():
    batch = {"a": torch.arange(3), "b": torch.ones(3, 2), "c": torch.ones(4), "d": 7}
    out = duplicate_batch(batch, 2)
    assert torch.equal(out["a"], torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out["b"].shape == (6, 2) and out["c"].shape == (4,) and out["d"] == 7


@pytest.mark.parametrize("mode", ["duplicate", "twice"])
def test_rdrop_forward_two_passes(mode):
    torch.manual_seed(0)
    model = TinyClassifier().train()
    batch = tiny_batch()
    out = rdrop_forward(model, batch, alpha=0.6, mode=mode)
    assert out.applied and len(out.logits) == 2
    assert not torch.equal(out.logits[0], out.logits[1])  # dropout differs between passes
    ref = rdrop_loss_reference(out.logits[0].detach(), out.logits[1].detach(), batch["labels"],
                               alpha=0.6)
    assert_rel(out.loss, ref, 1e-5, "two-pass loss")
    out.loss.backward()
    assert model.lin.weight.grad is not None and torch.isfinite(model.lin.weight.grad).all()


def test_rdrop_forward_without_dropout_is_twice_ce():
    model = TinyClassifier(p=0.0).train()
    batch = tiny_batch()
    out = rdrop_forward(model, batch, alpha=5.0)
    ce = nn.functional.cross_entropy(out.logits[0], batch["labels"])
    assert_rel(out.loss, 2 * ce, 1e-5, "no-dropout R-Drop = 2 CE")


def test_m_passes_match_reference():
    torch.manual_seed(1)
    model = TinyClassifier().train()
    batch = tiny_batch(seed=1)
    batch["labels"][0] = -100
    out = rdrop_forward(model, batch, alpha=0.8, passes=3)
    assert len(out.logits) == 3
    ref = multi_rdrop_loss_reference([z.detach() for z in out.logits], batch["labels"], alpha=0.8)
    assert_rel(out.loss, ref, 1e-5, "3-pass loss")
    two = multi_rdrop_loss(out.logits[:2], batch["labels"], alpha=0.8)
    ref2 = multi_rdrop_loss_reference([z.detach() for z in out.logits[:2]], batch["labels"],
                                      alpha=0.8)
    assert_rel(two, ref2, 1e-5, "m=2 reference equals rdrop_loss")


def test_every_k_steps():
    torch.manual_seed(2)
    model = TinyClassifier().train()
    batch = tiny_batch()
    skipped = rdrop_forward(model, batch, every=3, step=4)
    assert not skipped.applied and len(skipped.logits) == 1
    expected = single_pass_loss(skipped.logits[0], batch["labels"])
    assert_rel(skipped.loss, nn.functional.cross_entropy(skipped.logits[0], batch["labels"]),
                1e-6, "skipped-step CE")
    assert_rel(expected, skipped.loss, 1e-6, "single_pass_loss")
    assert rdrop_forward(model, batch, every=3, step=6).applied


def test_bad_arguments():
    model = TinyClassifier()
    with pytest.raises(ValueError, match="passes"):
        rdrop_forward(model, tiny_batch(), passes=1)
    with pytest.raises(ValueError, match="every"):
        rdrop_forward(model, tiny_batch(), every=0)
    with pytest.raises(ValueError, match="mode"):
        rdrop_forward(model, tiny_batch(), mode="thrice")
    with pytest.raises(TypeError, match="batch"):
        rdrop_forward(model, [1, 2])


# --- Hugging Face Trainer integration -----------------------------------------------------

transformers = pytest.importorskip("transformers")


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=16, hidden_dropout_prob=0.2,
                                   attention_probs_dropout_prob=0.1, **kw)


def bert_inputs(batch=4, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class TrainerStandIn:
    """The slice of transformers.Trainer that RDropTrainerMixin relies on (the real Trainer
    needs `accelerate`, which this environment does not ship; test_real_trainer_trains runs
    it where it is installed)."""

    def __init__(self, model, args=None, train_dataset=None):
        self.model = model
        self.state = SimpleNamespace(global_step=0)
        self.accelerator = SimpleNamespace(unwrap_model=lambda m: m, num_processes=1)
        self.args = SimpleNamespace(average_tokens_across_devices=False)
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, start_time=None):
        self.logged = logs


def make_trainer(model, tmp_path, dataset=None, **kw):
    from regdrop_fast.rdrop import RDropTrainerMixin

    class StandInTrainer(RDropTrainerMixin, TrainerStandIn):
        pass

    return StandInTrainer(model, train_dataset=dataset, **kw)


def test_mixin_matches_trainer_interface():
    import inspect

    from regdrop_fast.rdrop import RDropTrainer, RDropTrainerMixin

    assert issubclass(RDropTrainer, transformers.Trainer)
    ours = inspect.signature(RDropTrainerMixin.compute_loss).parameters
    theirs = inspect.signature(transformers.Trainer.compute_loss).parameters
    assert list(ours) == list(theirs)


def test_trainer_sequence_classification_loss(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=3)).train()
    trainer = make_trainer(model, tmp_path, rdrop_alpha=0.5)
    inputs = {**bert_inputs(), "labels": torch.tensor([0, 2, 1, 1])}
    torch.manual_seed(7)
    loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    torch.manual_seed(7)
    logits = model(**duplicate_batch(bert_inputs(), 2)).logits
    ref = rdrop_loss_reference(logits[:4].detach(), logits[4:].detach(), inputs["labels"],
                               alpha=0.5)
    assert_rel(loss, ref, 1e-5, "trainer R-Drop loss")
    assert outputs.logits.shape == (8, 3)
    # gradient accumulation: normalized by the Trainer's item count
    trainer.model_accepts_loss_kwargs = True
    torch.manual_seed(7)
    by_items = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(10))
    assert_rel(by_items, ref * 4 / 10, 1e-5, "loss / num_items_in_batch")
    # evaluation: the model's own single-pass loss
    model.eval()
    eval_loss = trainer.compute_loss(model, dict(inputs))
    with torch.no_grad():
        expected = model(**inputs).loss
    assert_rel(eval_loss, expected, 1e-6, "eval loss")


def test_trainer_token_classification_and_regression(tmp_path):
    torch.manual_seed(1)
    model = transformers.BertForTokenClassification(bert_config(num_labels=4)).train()
    trainer = make_trainer(model, tmp_path, rdrop_alpha=1.0, rdrop_mode="twice")
    labels = torch.randint(0, 4, (4, 6))
    labels[0, -2:] = -100
    inputs = {**bert_inputs(), "labels": labels}
    torch.manual_seed(3)
    loss = trainer.compute_loss(model, dict(inputs))
    torch.manual_seed(3)
    z1 = model(**bert_inputs()).logits
    z2 = model(**bert_inputs()).logits
    ref = rdrop_loss_reference(z1.detach(), z2.detach(), labels, alpha=1.0)
    assert_rel(loss, ref, 1e-5, "token-classification R-Drop loss")

    reg = transformers.BertForSequenceClassification(bert_config(num_labels=1)).train()
    trainer = make_trainer(reg, tmp_path, rdrop_alpha=0.3)
    target = torch.randn(4)
    torch.manual_seed(4)
    loss = trainer.compute_loss(reg, {**bert_inputs(), "labels": target})
    torch.manual_seed(4)
    pred = reg(**duplicate_batch(bert_inputs(), 2)).logits.detach()
    expected = (0.3 * (pred[:4] - pred[4:]).square()[:, 0] + (pred[:4, 0] - target).square()
                + (pred[4:, 0] - target).square()).mean()
    assert_rel(loss, expected, 1e-5, "regression R-Drop loss")


def test_mixin_training_loop_every_k():
    torch.manual_seed(2)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=2)).train()
    trainer = make_trainer(model, None, rdrop_alpha=0.5, rdrop_every=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.classifier.weight.detach().clone()
    inputs = {**bert_inputs(), "labels": torch.tensor([0, 1, 1, 0])}
    for step in range(3):
        trainer.state.global_step = step
        torch.manual_seed(10 + step)
        loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
        # R-Drop doubles the batch on steps 0 and 2 only
        assert outputs.logits.shape[0] == (8 if step % 2 == 0 else 4)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(before, model.classifier.weight.detach())


def test_real_trainer_trains(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from regdrop_fast.rdrop import RDropTrainer

    torch.manual_seed(2)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=2))
    gen = torch.Generator().manual_seed(5)
    data = [{"input_ids": torch.randint(1, 50, (6,), generator=gen),
             "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(8)]
    before = model.classifier.weight.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          num_train_epochs=1, report_to=[], use_cpu=True,
                                          logging_strategy="steps", logging_steps=1,
                                          save_strategy="no", learning_rate=1e-2)
    trainer = RDropTrainer(model=model, args=args, train_dataset=data, rdrop_alpha=0.5,
                           rdrop_every=2)
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.classifier.weight.detach())
    # the Trainer's own log carries the parts: CE on both steps, KL on the R-Drop step only
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and {"rdrop_ce", "rdrop_kl"} <= set(steps[0])
    assert "rdrop_ce" in steps[1] and "rdrop_kl" not in steps[1]
    assert abs(steps[1]["loss"] - steps[1]["rdrop_ce"]) <= 1e-5 * steps[1]["loss"]


def test_trainer_kl_sum_is_the_official_bert_glue_script_and_logs_parts(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=3)).train()
    trainer = make_trainer(model, tmp_path, rdrop_alpha=0.5, rdrop_kl_reduction="sum")
    labels = torch.tensor([0, 2, 1, 1])
    torch.manual_seed(7)
    loss = trainer.compute_loss(model, {**bert_inputs(), "labels": labels})
    torch.manual_seed(7)
    logits = model(**duplicate_batch(bert_inputs(), 2)).logits.detach().double()
    expected = official_bert_glue(logits[:4], logits[4:], labels, 0.5)
    assert_rel(loss, expected, 1e-5, "kl_reduction='sum' trainer loss")
    # the logged parts: mean single-pass CE and mean symmetric KL of the step
    ce = (nn.functional.cross_entropy(logits[:4], labels)
          + nn.functional.cross_entropy(logits[4:], labels)) / 2
    kl = (expected - 2 * ce) / (0.5 * 4)
    trainer.log({"loss": 1.0})
    assert set(trainer.logged) == {"loss", "rdrop_ce", "rdrop_kl"}
    assert abs(trainer.logged["rdrop_ce"] - ce.item()) <= 1e-5 * ce.item()
    assert abs(trainer.logged["rdrop_kl"] - kl.item()) <= 1e-4 * kl.item()
    trainer.log({"eval_loss": 1.0})  # evaluation logs carry no training parts
    assert set(trainer.logged) == {"eval_loss"}


def test_rdrop_forward_kl_reduction_and_parts():
    torch.manual_seed(0)
    model = TinyClassifier().train()
    batch = tiny_batch()
    torch.manual_seed(1)
    out = rdrop_forward(model, batch, alpha=0.5, kl_reduction="sum")
    z1, z2 = (z.detach().double() for z in out.logits)
    assert_rel(out.loss, official_bert_glue(z1, z2, batch["labels"], 0.5), 1e-5, "kl sum loss")
    ce = (nn.functional.cross_entropy(z1, batch["labels"])
          + nn.functional.cross_entropy(z2, batch["labels"])) / 2
    assert_rel(out.ce, ce, 1e-5, "ce part")
    mean = rdrop_forward(model, batch, alpha=0.5, passes=3)
    assert_rel(mean.loss.detach(), 3 * mean.ce + 0.5 * mean.kl, 1e-5, "3 passes: 3 ce + alpha kl")
    skipped = rdrop_forward(model, batch, every=2, step=1)
    assert skipped.kl is None and torch.equal(skipped.ce, skipped.loss.detach())
    with pytest.raises(ValueError, match="kl_reduction"):
        rdrop_forward(model, batch, kl_reduction="batchmean")


# --- causal language models ---------------------------------------------------------------


def llama(cls_name="LlamaForCausalLM", dropout=0.0, **kw):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      attention_dropout=dropout, pad_token_id=0, **kw)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config)


def lm_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_detection_from_the_config():
    from regdrop_fast.rdrop import is_causal_lm

    class MyLM(transformers.LlamaForCausalLM):
        pass

    assert is_causal_lm(llama())
    assert is_causal_lm(MyLM(llama().config))
    for cls_name in ("LlamaForSequenceClassification", "LlamaForTokenClassification"):
        assert not is_causal_lm(llama(cls_name))
    assert not is_causal_lm(transformers.BertForMaskedLM(bert_config()))
    assert not is_causal_lm(transformers.BertForTokenClassification(bert_config()))
    assert is_causal_lm(transformers.BertLMHeadModel(bert_config(is_decoder=True)))
    assert not is_causal_lm(TinyClassifier())


def test_causal_lm_eval_is_twice_the_models_own_shifted_loss():
    """In eval mode (no dropout) both passes coincide: R-Drop = 2 x the model's own loss,
    which scores logits[:, :-1] against labels[:, 1:] and skips -100."""
    model = llama().eval()
    batch = lm_batch()
    with torch.no_grad():
        own = model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    shifted = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64),
                                          batch["labels"][:, 1:].reshape(-1))
    assert_rel(own, shifted, 1e-6, "the model's own loss is the shifted CE")
    for mode in ("duplicate", "twice"):
        out = rdrop_forward(model, batch, alpha=1.0, mode=mode)
        assert_rel(out.loss, 2 * own, 1e-5, f"R-Drop on a causal LM ({mode})")
        assert_rel(out.ce, own, 1e-5, "ce part = the model's own loss")
        assert abs(out.kl.item()) < 1e-6
    unshifted = rdrop_forward(model, batch, causal_lm=False)
    assert abs(unshifted.loss.item() - 2 * own.item()) > 1e-3  # the override is honoured
    with pytest.raises(TypeError, match="causal_lm"):
        rdrop_forward(model, batch, causal_lm="yes")


def test_trainer_on_a_causal_lm():
    model = llama(dropout=0.0).train()  # Llama has no dropout but attention's (0 here)
    trainer = make_trainer(model, None, rdrop_alpha=0.7)
    batch = lm_batch(seed=1)
    with torch.no_grad():
        own = model(**batch).loss
        n_items = (batch["labels"][:, 1:] != -100).sum()
        own_by_items = model(**batch, num_items_in_batch=n_items * 2).loss
    loss = trainer.compute_loss(model, dict(batch))
    assert_rel(loss, 2 * own, 1e-5, "trainer R-Drop on a causal LM = 2 x its own loss")
    trainer.model_accepts_loss_kwargs = True  # gradient accumulation over token counts
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items * 2)
    assert_rel(loss, 2 * own_by_items, 1e-5, "normalized by num_items_in_batch")
    trainer.log({"loss": 0.0})
    assert_rel(torch.tensor(trainer.logged["rdrop_ce"]), own, 1e-5, "logged CE")
    # with attention dropout the passes differ and the KL is positive
    model = llama(dropout=0.3).train()
    trainer = make_trainer(model, None, rdrop_alpha=0.7)
    loss = trainer.compute_loss(model, dict(batch))
    trainer.log({"loss": 0.0})
    assert trainer.logged["rdrop_kl"] > 0
    assert_rel(loss.detach(), torch.tensor(2 * trainer.logged["rdrop_ce"]
                                           + 0.7 * trainer.logged["rdrop_kl"]), 1e-5,
               "loss = 2 ce + alpha kl")
