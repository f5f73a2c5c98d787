"""`regdrop-fast finetune --resume`: a run crashed mid-epoch and resumed from its last checkpoint
ends bit-identical to an uninterrupted run (weights, optimizer state, metrics) with every
method (AD-DROP's mask step and the mask-training / IMP schedules follow the global step, the
ChildTuning-D Fisher masks and IMP's masks come back with the optimizer state and the model's
buffers); an interrupted checkpoint save leaves the previous checkpoint intact."""
from __future__ import annotations

import pytest
from transformers import Trainer

from regdrop_fast.cli import main
from regdrop_fast.finetune import checkpoint as ckpt
from regdrop_fast.finetune.methods import unavailable
from utils.finetune import assert_same_run, base_args, tiny_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("resume"), n_train=20, n_eval=8)


def _crash_at(monkeypatch, step):
    original = Trainer.training_step

    def crashing(self, *args, **kwargs):
        if self.state.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, "training_step", crashing)


@pytest.mark.parametrize("method, extra", [
    ("none", []),
    ("rdrop", []),
    # AD-DROP in both epochs (no cross-tuning), so the resumed epoch draws masks
    ("addrop", ["--no-addrop-cross-tuning"]),
    ("childtuning-d", ["--fisher-batches", "2"]),
    # thresholds reset every epoch (5 steps); the step-6 checkpoint is mid-schedule
    ("mask-train", ["--sparsity", "0.5"]),
    # 3 prunes at steps 2, 4, 6: the step-6 checkpoint holds the new masks and the reset optimizer
    ("imp", ["--sparsity", "0.3"]),
])
def test_resume_mid_epoch_is_bit_identical(task, tmp_path, monkeypatch, method, extra):
    if unavailable(method):
        pytest.skip(unavailable(method))
    # 20 examples, batch 4: 5 steps per epoch; checkpoints every 3 steps and at epoch ends
    args = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--save-steps", "3",
            "--method", method, "--seed", "7", *extra]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main(base_args(task, full, *args)) == 0
    with monkeypatch.context() as patch:
        _crash_at(patch, 7)  # epoch 2, after the step-6 checkpoint
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(base_args(task, crashed, *args))
    assert ckpt.find(crashed).name == "checkpoint-6"
    assert main(base_args(task, crashed, *args, "--resume")) == 0
    assert_same_run(full, crashed)


def test_interrupted_save_keeps_previous_checkpoint(task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3"]
    calls = {"n": 0}
    original = ckpt.seal

    def failing(folder):  # the second save (end of epoch 2) dies before its manifest
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(folder)
    monkeypatch.setattr(ckpt, "seal", failing)
    assert main(base_args(task, out, *args)) == 130
    monkeypatch.undo()
    assert ckpt.find(out).name == "checkpoint-5"  # the unsealed checkpoint-10 is not one
    assert main(base_args(task, out, *args, "--resume")) == 0
    reference = tmp_path / "reference"
    assert main(base_args(task, reference, *args)) == 0
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-10"]


def test_resume_refuses_other_settings(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(task, out, "--epochs", "1", "--batch-size", "4")) == 0
    capsys.readouterr()
    assert main(base_args(task, out, "--epochs", "1", "--batch-size", "8", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("regdrop-fast finetune: error: --resume:") and "batch_size=4" in err
    assert "\n" not in err


def test_resume_without_checkpoint_is_an_error(task, tmp_path, capsys):
    assert main(base_args(task, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
