"""addrop.apply_addrop: one call on a model (an ADDrop) or on a transformers Trainer."""
import math

import pytest
import torch

from regdrop_fast import addrop
from utils.addrop import batch_of, tiny_model


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_apply_to_a_model_returns_its_addrop():
    model = tiny_model("bert", dropout=0.1, seed=21)
    step = addrop.apply_addrop(model, p=0.4, q=0.6, layers=(1,), seed=5)
    assert isinstance(step, addrop.ADDrop) and step.layers == (1,)
    assert (step.state.p, step.state.q, step.state.seed) == (0.4, 0.6, 5)
    out = step.step(None, batch_of(model, [6, 3], 6, seed=21))
    assert torch.isfinite(out.loss) and out.masks[1].density < 1.0
    with pytest.raises(ValueError, match="cross_tuning applies to a Trainer"):
        addrop.apply_addrop(model, cross_tuning=addrop.CrossTuning())
    with pytest.raises(TypeError, match="PreTrainedModel or an nn.Module built from"):
        addrop.apply_addrop(torch.nn.Linear(2, 2))


def test_apply_to_a_trainer_trains_with_addrop(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments
    model = tiny_model("bert", dropout=0.1, seed=22)
    batch = batch_of(model, [6, 4, 5, 2], 6, seed=22)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=2,
                             per_device_train_batch_size=2, use_cpu=True, save_strategy="no",
                             logging_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(rows))
    returned = addrop.apply_addrop(trainer, layers=(0,), p=0.5)
    # again: reconfigures the same trainer (one epoch callback, the new ADDrop)
    addrop.apply_addrop(trainer, layers=(0, 1), cross_tuning=addrop.CrossTuning(
        period=1, addrop_phase=0))
    assert returned is trainer and isinstance(trainer, Trainer)
    assert trainer.addrop.layers == (0, 1)
    callbacks = [cb for cb in trainer.callback_handler.callbacks
                 if isinstance(cb, addrop.ADDropEpochCallback)]
    assert callbacks == [trainer.addrop_epochs]
    before = model.classifier.weight.detach().clone()
    result = trainer.train()
    assert trainer.addrop.step_count == 2 and math.isfinite(result.training_loss)
    assert not torch.equal(before, model.classifier.weight)
