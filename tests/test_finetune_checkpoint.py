"""The checkpoint save protocol under crashes and damage: whatever point of a save the process
is killed at, twice in a row, `--resume` finds a complete checkpoint (the newest sealed one) and
finishes bit-identical to an uninterrupted run; a damaged checkpoint (truncated, emptied,
deleted or flipped file), a truncated model file and a full disk give a one-line error, exit 2.

Kill points are every call of the protocol's two file-system steps, `_rename` (the manifest:
the seal) and `_remove` (deleting older or unsealed folders; before it and half-way through),
counted from the start of a save's seal or of a resumed run's clean-up; a kill before the seal
is a kill while the Trainer writes the folder."""
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
    folder = out / f"{ckpt.PREFIX}{version}"
    folder.mkdir()  # what the Trainer writes
    (folder / "weights.bin").write_bytes(bytes([version]) * 1000)
    (folder / "state.txt").write_text(f"version {version}")
    ckpt.seal(folder)
    ckpt.retire(out, folder)


def _version(folder: Path) -> int:
    return int((folder / "state.txt").read_text().split()[1])


def _run(monkeypatch, phase: int, step: int, action) -> Injector:
    """`action` killed at `step` of its protocol phase `phase` (if it gets that far)."""
    with monkeypatch.context() as patch:
        injector = Injector(patch, save=phase, step=step)
        try:
            action()
        except Killed:
            pass
    return injector


def _resumed(out: Path) -> None:
    ckpt.discard_unsealed(out)
    _save(out, 3)


def test_every_pair_of_kill_points_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    cases = 0
    for first in range(0, 8):  # 0: killed while the Trainer wrote checkpoint-2
        for phase in (1, 2):  # the resumed run's clean-up, then its own save
            for second in range(1, 8):
                out = tmp_path / f"{first}-{phase}-{second}"
                out.mkdir()
                _save(out, 1)
                if first == 0:
                    (out / "checkpoint-2").mkdir()
                    (out / "checkpoint-2" / "state.txt").write_text("version 2")
                    killed_first, newest = True, 1
                else:
                    run = _run(monkeypatch, 1, first, lambda: _save(out, 2))
                    killed_first, newest = run.killed, 2 if run.sealed else 1
                assert _version(ckpt.find(out)) == newest, (first, phase, second)
                run = _run(monkeypatch, phase, second, lambda: _resumed(out))
                assert _version(ckpt.find(out)) == (3 if run.sealed else newest), \
                    (first, phase, second)
                _save(out, 4)
                assert _version(ckpt.find(out)) == 4
                assert sorted(p.name for p in out.iterdir()) == [ckpt.PREFIX + "4"]
                cases += 1
                if not run.killed:
                    break
        if not killed_first:
            break
    assert cases > 30  # every kill point of both runs was reached


def test_only_an_unsealed_newer_folder_and_a_half_deleted_older_one(tmp_path):
    """A kill while the previous checkpoint was being deleted, then another while the next
    save was written: the half-deleted folder and the unsealed one are both refused, and the
    complete checkpoint between them is found."""
    out = tmp_path / "run"
    out.mkdir()
    _save(out, 1)
    _save(out, 2)
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "state.txt").write_text("version 1")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "state.txt").write_text("version 3")
    assert _version(ckpt.find(out)) == 2
    ckpt.discard_unsealed(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


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


# 20 examples, batch 4: 5 steps per epoch; saves at steps 3, 5 (epoch end), 6, 9, 10
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


# a run is killed in a save's protocol phase, then the resumed run in one of its own phases
# (phase 1: its clean-up of unsealed folders, 2: its first save), then a second resume finishes
@pytest.mark.parametrize("first, second", [
    # checkpoint-5 unsealed (killed before its manifest), then half-way through deleting it
    ((2, 1), (1, 2)),
    # checkpoint-5 sealed and checkpoint-3 half deleted, then before the clean-up deletes it
    pytest.param((2, 3), (1, 1), marks=pytest.mark.slow),
    # both sealed (before deleting checkpoint-3), then the resumed run's checkpoint-6 unsealed
    pytest.param((2, 2), (2, 1), marks=pytest.mark.slow),
])
def test_sigkill_twice_in_a_save_then_resume_is_bit_identical(task, reference, tmp_path,
                                                              first, second):
    out = tmp_path / "run"
    _run_killed(base_args(task, out, *ARGS), *first)
    _run_killed(base_args(task, out, *ARGS, "--resume"), *second)
    assert main(base_args(task, out, *ARGS, "--resume")) == 0
    assert_same_run(reference, out)
    assert [p.name for p in out.iterdir() if p.name.startswith(ckpt.PREFIX)] == ["checkpoint-10"]


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
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "rng_state.pth",
                                  ckpt.STATE_FILE])
def test_damaged_checkpoint_is_refused(task, saved, capsys, damage, expect, name):
    file = ckpt.find(saved) / name
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
        (file.parent / ckpt.MANIFEST).write_text('{"files": ')
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
    original = torch.save

    def full(obj, file, *args, **kwargs):  # the second save (step 4) hits a full disk
        if "checkpoint-4" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return original(obj, file, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full)
    args = ["--epochs", "2", "--batch-size", "10"]
    err = _error(capsys, base_args(task, out, *args))
    assert "cannot save the checkpoint" in err and "No space left on device" in err
    monkeypatch.undo()
    assert ckpt.find(out).name == "checkpoint-2"  # epoch 1's
    assert main(base_args(task, out, *args, "--resume")) == 0
    assert ckpt.find(out).name == "checkpoint-4"


def test_disk_full_while_writing_metrics_is_a_one_line_error(task, tmp_path, monkeypatch,
                                                             capsys):
    from regdrop_fast.finetune import report

    def full(output_dir, rows, name=report.METRICS_FILE):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir / name))
    monkeypatch.setattr(report, "write_metrics", full)
    err = _error(capsys, base_args(task, tmp_path / "run", "--epochs", "1", "--no-save"))
    assert "cannot write" in err and "metrics.jsonl: No space left on device" in err
