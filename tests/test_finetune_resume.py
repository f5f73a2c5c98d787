"""`regdrop-fast finetune --resume`: a run crashed mid-epoch and resumed from its last checkpoint
ends bit-identical to an uninterrupted run (weights, optimizer state, metrics); an interrupted
checkpoint save leaves the previous checkpoint intact."""
from __future__ import annotations

import pytest
import torch

from regdrop_fast.cli import main
from regdrop_fast.finetune import checkpoint as ckpt
from regdrop_fast.finetune import train
from utils.finetune import assert_same_run, base_args, tiny_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("resume"), n_train=20, n_eval=8)


def _crash_at(monkeypatch, step, where="_step"):
    original = getattr(train.Job, where)

    def crashing(self, *args):
        if self.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, *args)
    monkeypatch.setattr(train.Job, where, crashing)


@pytest.mark.parametrize("method", ["none", "rdrop"])
def test_resume_mid_epoch_is_bit_identical(task, tmp_path, monkeypatch, method):
    if method != "none":
        from regdrop_fast.finetune.methods import build_methods
        from regdrop_fast.finetune.methods.base import MethodUnavailable
        try:
            build_methods(method, train.FinetuneConfig())
        except MethodUnavailable as exc:
            pytest.skip(str(exc))
    # 20 examples, batch 4: 5 steps per epoch; checkpoints every 3 steps and at epoch ends
    args = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--save-steps", "3",
            "--method", method, "--seed", "7"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main(base_args(task, full, *args)) == 0
    with monkeypatch.context() as patch:
        _crash_at(patch, 7)  # epoch 2, after the step-6 checkpoint
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(base_args(task, crashed, *args))
    state = torch.load(crashed / "checkpoint" / ckpt.STATE_FILE, weights_only=False)
    assert (state["global_step"], state["epoch"], state["batches_done"]) == (6, 1, 1)
    assert main(base_args(task, crashed, *args, "--resume")) == 0
    assert_same_run(full, crashed)


def test_interrupted_save_keeps_previous_checkpoint(task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3"]
    calls = {"n": 0}
    original = ckpt.write_rng

    def failing(staging, rank):  # the second save (end of epoch 2) dies half-written
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(staging, rank)
    monkeypatch.setattr(ckpt, "write_rng", failing)
    assert main(base_args(task, out, *args)) == 130
    monkeypatch.undo()
    state = torch.load(out / "checkpoint" / ckpt.STATE_FILE, weights_only=False)
    assert state["epoch"] == 1 and (out / "checkpoint" / "rng_rank0.pt").is_file()
    assert main(base_args(task, out, *args, "--resume")) == 0
    reference = tmp_path / "reference"
    assert main(base_args(task, reference, *args)) == 0
    assert_same_run(reference, out)


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
