"""The finetune methods through transformers' Trainer (`make_trainer`), composed like --method,
on a tiny random BERT: the right mixins and optimizer, ChildTuning-D's Fisher mask limiting the
first update to reserve_p of the encoder weights, mask training moving only the scores, IMP
pruning in place, the debiasing loss read from the batch's bias_probs column."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from regdrop_fast.finetune.config import FinetuneConfig  # noqa: E402
from regdrop_fast.finetune.errors import FinetuneError  # noqa: E402
from regdrop_fast.finetune.methods import unavailable  # noqa: E402
from utils.finetune import make_tiny_bert, review_rows  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import AutoTokenizer, DataCollatorWithPadding
    folder = make_tiny_bert(tmp_path_factory.mktemp("trainer") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = review_rows(16, 4)
    encoded = tokenizer([r["review"] for r in rows])
    data = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "labels": int(r["sentiment"] == "pos")} for i, r in enumerate(rows)]
    return folder, data, DataCollatorWithPadding(tokenizer)


def _trainer(parts, tmp_path, method, config=None, steps=2, **extra):
    from transformers import AutoModelForSequenceClassification, TrainingArguments
    from regdrop_fast.finetune.hf_trainer import make_trainer
    for name in method.split(","):
        if unavailable(name):
            pytest.skip(unavailable(name))
    folder, data, collator = parts
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.0,
                             warmup_steps=0, lr_scheduler_type="constant", report_to=[],
                             save_strategy="no", logging_strategy="no", seed=1,
                             disable_tqdm=True, **extra)
    return make_trainer(method, config, model=model, args=args, train_dataset=data,
                        data_collator=collator)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rdrop_with_childtuning_f(parts, tmp_path):
    trainer = _trainer(parts, tmp_path, "rdrop,childtuning-f",
                       FinetuneConfig(reserve_p=0.5, rdrop_kl_reduction="sum"))
    from regdrop_fast.childtuning import ChildTuningAdamW
    from regdrop_fast.rdrop import RDropTrainerMixin
    assert isinstance(trainer, RDropTrainerMixin) and trainer.rdrop_alpha == 0.5
    assert trainer.rdrop_kl_reduction == "sum"
    before = _snapshot(trainer.model)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                      else trainer.optimizer, ChildTuningAdamW)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_childtuning_d_first_update_touches_reserve_p_of_encoder(parts, tmp_path):
    trainer = _trainer(parts, tmp_path, "childtuning-d",
                       FinetuneConfig(reserve_p=0.3, fisher_batches=2), steps=1)
    before = _snapshot(trainer.model)
    trainer.train()
    changed = total = 0
    for name, p in trainer.model.named_parameters():
        if "layer" in name:
            changed += (p.detach() != before[name]).sum().item()
            total += p.numel()
        elif name.startswith("classifier"):
            assert not torch.equal(p, before[name])  # unmasked: always updated
    assert 0.2 < changed / total <= 0.3 + 1e-3


def test_addrop_and_mask_training(parts, tmp_path):
    trainer = _trainer(parts, tmp_path / "a", "addrop",
                       FinetuneConfig(addrop_cross_tuning=False, addrop_p=0.5))
    from regdrop_fast.addrop import ADDropTrainerMixin
    assert isinstance(trainer, ADDropTrainerMixin) and trainer.addrop_active()
    trainer.train()
    trainer = _trainer(parts, tmp_path / "m", "mask-train", FinetuneConfig(sparsity=0.5))
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
               if "mask_scores" not in n}
    trainer.train()
    assert trainer.mask_trainer.t == 2
    for name, p in trainer.model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name


def test_imp_prunes_in_place_and_keeps_pruned_weights_zero(parts, tmp_path):
    # sparsity 0.2 at rate 0.1: two prunes, at steps 2 and 4 of 6
    trainer = _trainer(parts, tmp_path, "imp", FinetuneConfig(sparsity=0.2, imp_rate=0.1),
                       steps=6)
    trainer.train()
    pruner = trainer.imp_pruner
    assert pruner.iteration == 2 and pruner.done()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    # the same optimizer object throughout; its Adam state restarted at the last prune
    steps = {int(s["step"]) for s in inner.state.values() if "step" in s}
    assert steps == {2}
    for name, module in pruner.modules.items():
        zero = (module.weight == 0).float().mean().item()
        assert 0.19 <= zero <= 0.21, name


def test_debias_reads_bias_probs_from_the_batch(parts, tmp_path):
    folder, data, collator = parts
    from regdrop_fast.finetune.batches import Collator
    rows = [dict(r, bias_probs=[0.9, 0.1] if r["labels"] == 0 else [0.5, 0.5]) for r in data]
    losses = {}
    for kind in ("reweight", None):
        trainer = _trainer((folder, rows, Collator(collator.tokenizer)), tmp_path / str(kind),
                           "none", FinetuneConfig(debias=kind), steps=1,
                           remove_unused_columns=False)
        losses[kind] = trainer.train().training_loss
    assert losses["reweight"] != losses[None]
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        _trainer(parts, tmp_path, "none", FinetuneConfig(debias="poe"))


@pytest.mark.parametrize("method, config, match", [
    ("rdrop,addrop", None, "both replace the training forward pass"),
    ("childtuning-f", FinetuneConfig(reserve_p=1.5), r"--reserve-p must be in \(0, 1\]"),
])
def test_trainer_refuses_what_it_cannot_run(method, config, match):
    from regdrop_fast.finetune.hf_trainer import make_trainer
    with pytest.raises(FinetuneError, match=match):
        make_trainer(method, config)
