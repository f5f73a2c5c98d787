"""The checkpoint save protocol under crashes and damage: whatever point of a save the process
is killed at, twice in a row, `--resume` finds a complete checkpoint (the newest sealed one) and
finishes bit-identical to an uninterrupted run; a damaged checkpoint (truncated, emptied,
deleted or flipped file), a truncated model file and a full disk give a one-line error, exit 2.

Kill points are every call of the protocol's two file-system steps, `_rename` and `_remove`
(before it, and for `_remove` also half-way through the deletion), counted from the start of a
save (its `recover` included)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regdrop_fast.cli import main
from regdrop_fast.finetune import checkpoint as ckpt
from utils.finetune import Injector, Killed, assert_same_run, base_args, tiny_task


# -- the protocol alone, every pair of kill points ----------------------------------------------
def _save(out: Path, version: int) -> None:
    staging = ckpt.staging_dir(out)
    (staging / "weights.bin").write_bytes(bytes([version]) * 1000)
    (staging / "state.txt").write_text(f"version {version}")
    ckpt.commit(staging, out)


def _version(folder: Path) -> int:
    return int((folder / "state.txt").read_text().split()[1])


def _killed_save(monkeypatch, out: Path, version: int, step: int) -> tuple:
    """(killed?, sealed?) of a save killed at `step`: sealed once its manifest is written."""
    with monkeypatch.context() as patch:
        injector = Injector(patch, save=1, step=step)
        try:
            _save(out, version)
        except Killed:
            pass
    return injector.killed, injector.sealed


def test_every_pair_of_kill_points_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    cases = 0
    for first in range(1, 20):
        for second in range(1, 20):
            out = tmp_path / f"{first}-{second}"
            out.mkdir()
            _save(out, 1)
            killed_first, sealed = _killed_save(monkeypatch, out, 2, first)
            newest = 2 if sealed else 1
            # the resumed run finds the newest sealed checkpoint, then its own save is killed too
            assert _version(ckpt.find(out)) == newest, (first, second)
            killed_second, sealed = _killed_save(monkeypatch, out, 3, second)
            assert _version(ckpt.find(out)) == (3 if sealed else newest), (first, second)
            _save(out, 4)
            assert _version(ckpt.find(out)) == 4
            assert sorted(p.name for p in out.iterdir()) == [ckpt.NAME]
            cases += 1
            if not killed_second:
                break
        if not killed_first:
            break
    assert cases > 30  # every kill point of both saves was reached


def test_d1_only_a_sealed_staging_folder_left(tmp_path):
    """The issue's case: the previous checkpoint moved away, the new one still staged."""
    out = tmp_path / "run"
    out.mkdir()
    _save(out, 1)
    staging = ckpt.staging_dir(out)
    (staging / "state.txt").write_text("version 2")
    ckpt.write_manifest(staging)
    os.replace(out / ckpt.NAME, out / ckpt.TRASH)
    assert _version(ckpt.find(out)) == 2
    _save(out, 3)  # the next save commits the staged one first, never deletes it
    assert _version(ckpt.find(out)) == 3


# -- the CLI end to end, killed by a real SIGKILL twice in a row --------------------------------
RUNNER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import pytest
from utils.finetune import Injector
from regdrop_fast.cli import main
save, step = int(sys.argv[1]), int(sys.argv[2])
patch = pytest.MonkeyPatch()
Injector(patch, save, step, kill=lambda: os.kill(os.getpid(), signal.SIGKILL))
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("ckpt"), n_train=20, n_eval=8)


# 20 examples, batch 4: 5 steps per epoch; saves at steps 3, 5, 8, 10
ARGS = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--save-steps", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def reference(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main(base_args(task, out, *ARGS)) == 0
    return out


def _run_killed(argv, save: int, step: int) -> None:
    code = RUNNER.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code, str(save), str(step), *argv],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]


@pytest.mark.parametrize("first, second", [
    (3, 1),  # after checkpoint -> trash (only the sealed staging folder is complete), then
             # before the resumed run's first save deletes the trash
    # trash half deleted, then the resumed run's staging sealed but not moved in
    pytest.param(5, 4, marks=pytest.mark.slow),
    # before the manifest, then half-way through deleting that unsealed staging folder
    pytest.param(1, 2, marks=pytest.mark.slow),
])
def test_sigkill_twice_in_a_save_then_resume_is_bit_identical(task, reference, tmp_path,
                                                              first, second):
    out = tmp_path / "run"
    _run_killed(base_args(task, out, *ARGS), save=2, step=first)
    _run_killed(base_args(task, out, *ARGS, "--resume"), save=1, step=second)
    assert main(base_args(task, out, *ARGS, "--resume")) == 0
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(ckpt.NAME)) == [ckpt.NAME]


# -- damage: one-line errors, exit 2 -------------------------------------------------------------
def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    err = captured.err.strip().splitlines()[-1]  # after the progress bars of the epochs run
    assert err.startswith("regdrop-fast finetune: error: "), captured.err
    return err


@pytest.fixture
def saved(task, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(task, out, "--epochs", "1", "--batch-size", "10")) == 0
    return out


@pytest.mark.parametrize("damage, expect", [
    ("truncate", "bytes, the manifest says"),
    ("empty", "has 0 bytes"),
    ("delete", "is missing"),
    ("flip", "is corrupted"),
    ("manifest", "MANIFEST.json is missing or unreadable"),
])
@pytest.mark.parametrize("name", ["model.safetensors", ckpt.STATE_FILE, "rng_rank0.pt"])
def test_damaged_checkpoint_is_refused(task, saved, capsys, damage, expect, name):
    file = saved / ckpt.NAME / name
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "delete":
        file.unlink()
    elif damage == "flip":
        middle = len(data) // 2
        file.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    else:
        (saved / ckpt.NAME / ckpt.MANIFEST).write_text('{"files": ')
    err = _error(capsys, base_args(task, saved, "--epochs", "1", "--batch-size", "10",
                                   "--resume"))
    assert expect in err and (damage == "manifest" or name in err)


def test_truncated_model_file_is_a_one_line_error(task, tmp_path, capsys):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(task["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = _error(capsys, base_args(dict(task, model=str(model)), tmp_path / "o"))
    assert "cannot load the model" in err and str(model) in err


def test_disk_full_during_a_save_is_a_one_line_error(task, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    original = torch.save

    def full(obj, file, *args, **kwargs):  # the second save's training state hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return original(obj, file, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full)
    args = ["--epochs", "2", "--batch-size", "10"]
    err = _error(capsys, base_args(task, out, *args))
    assert "cannot save the checkpoint" in err and "No space left on device" in err
    monkeypatch.undo()
    assert torch.load(ckpt.find(out) / ckpt.STATE_FILE, weights_only=False)["epoch"] == 1
    assert main(base_args(task, out, *args, "--resume")) == 0


def test_disk_full_while_writing_metrics_is_a_one_line_error(task, tmp_path, monkeypatch,
                                                             capsys):
    from regdrop_fast.finetune import report

    def full(output_dir, rows, name=report.METRICS_FILE):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir / name))
    monkeypatch.setattr(report, "write_metrics", full)
    err = _error(capsys, base_args(task, tmp_path / "run", "--epochs", "1", "--no-save"))
    assert "cannot write" in err and "metrics.jsonl: No space left on device" in err
