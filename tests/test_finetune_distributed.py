"""`torchrun --nproc_per_node=2 -m regdrop_fast finetune`: the Trainer's DDP on CPU (gloo) over a
tiny random BERT gives the same model as a 1-process run with the same global batch (dropout
off, so the only differences are float summation order and per-rank padding); ChildTuning-D's
Fisher pass over global batches gives the 1-process mask."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from regdrop_fast.cli import main
from regdrop_fast.finetune import checkpoint as ckpt
from regdrop_fast.finetune import distributed as D
from regdrop_fast.finetune.methods import unavailable
from utils.finetune import base_args, tiny_task


@pytest.mark.parametrize("method", ["none", "childtuning-f", "childtuning-d"])
def test_two_process_ddp_matches_one_process(tmp_path, method):
    reason = unavailable(method)
    if reason:
        pytest.skip(reason)
    task = tiny_task(tmp_path, n_train=24, n_eval=10, dropout=0.0)
    args = ["--epochs", "2", "--batch-size", "8", "--lr", "2e-3", "--method", method,
            "--warmup-ratio", "0", "--reserve-p", "0.5"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(base_args(task, single, *args)) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "regdrop_fast", *base_args(task, double, *args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 8
    one = load_file(str(ckpt.find(single) / "model.safetensors"))
    two = load_file(str(ckpt.find(double) / "model.safetensors"))
    # one RNG state per process in the checkpoint
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.find(double).iterdir()}
    pre = load_file(str(os.path.join(task["model"], "model.safetensors")))
    moved = max((one[k] - pre[k]).abs().max().item() for k in pre if k in one)
    assert moved > 1e-3  # training really changed the weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    m1 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (double / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        assert a["step"] == b["step"] == 3 * a["epoch"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4
        assert a["eval_accuracy"] == b["eval_accuracy"]


def test_launcher_environment(monkeypatch):
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    info = D.launched_env()  # torchrun and `accelerate launch` export the same variables
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(D.FinetuneError, match="distributed environment"):
        D.launched_env()


def test_single_process_without_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = D.launched_env()
    assert not info.enabled and info.is_main and info.world_size == 1


def test_global_batch_must_split_over_processes(tmp_path, monkeypatch, capsys):
    task = tiny_task(tmp_path, n_train=8, n_eval=4)
    from regdrop_fast.finetune import train
    monkeypatch.setattr(train, "launched_env", lambda: D.DistInfo(rank=0, world_size=3))
    assert main(base_args(task, tmp_path / "out", "--batch-size", "4")) == 2
    assert "divisible by the 3 processes" in capsys.readouterr().err
