"""Checkpoints: a folder that is both a transformers model folder and a resumable state.

    checkpoint/
      config.json, model.safetensors, tokenizer files   (save_pretrained: loads with from_pretrained)
      masks.safetensors        packed masks of the methods (int32 words; shapes in the metadata)
      training_state.pt        optimizer, LR schedule, loop position, metrics so far, method state
      rng_rank{r}.pt           torch/python/numpy RNG state of each process
      MANIFEST.json            size and sha256 of every other file, written last

Save protocol: at every instant there is a complete checkpoint that `find` returns, however
many times the process is killed, because a folder under a name `find` reads is only ever
complete (its manifest lists every file with its size) and a complete folder is only ever
renamed, never deleted while it is the newest:
  1. `recover`: finish or undo what an interrupted save left (below)
  2. every file into checkpoint.tmp, each fsync'd; the manifest last, by an atomic rename,
     then the folder fsync'd: from here checkpoint.tmp is complete and newer than checkpoint
  3. checkpoint -> checkpoint.trash, checkpoint.tmp -> checkpoint (renames, the parent fsync'd),
     then checkpoint.trash is deleted
`recover` completes step 3 when checkpoint.tmp is complete, deletes it when it is not, and
deletes any trash. `find` prefers a complete checkpoint.tmp over checkpoint; `verify` checks
every file against the manifest (sha256) before anything is loaded, so a corrupted, truncated
or deleted file is refused with a one-line error instead of resuming on wrong weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..masks import PackedMask
from .errors import FinetuneError

NAME = "checkpoint"
STAGING = NAME + ".tmp"
TRASH = NAME + ".trash"
STATE_FILE = "training_state.pt"
MASK_FILE = "masks.safetensors"
MANIFEST = "MANIFEST.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_masks(path: Path, masks: dict) -> None:
    """Packed masks (name -> PackedMask) in one safetensors file."""
    from safetensors.torch import save_file
    tensors = {name: m.words.detach().cpu().contiguous() for name, m in masks.items()}
    meta = {"shapes": json.dumps({name: list(m.shape) for name, m in masks.items()})}
    save_file(tensors, str(path), metadata=meta)


def load_masks(path: Path) -> dict:
    from safetensors import safe_open
    if not path.is_file():
        return {}
    out = {}
    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads((handle.metadata() or {}).get("shapes", "{}"))
        for name in handle.keys():
            out[name] = PackedMask(handle.get_tensor(name), torch.Size(shapes[name]))
    return out


# -- the save protocol ---------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: so a rename survives a power cut)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _fsync(dst.parent)


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path):
    """The manifest's file table, or None when it is absent or unreadable."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def is_complete(folder: Path) -> bool:
    """Every file the manifest lists is there with its size (cheap: no hashing)."""
    files = _manifest(folder)
    if files is None:
        return False
    for name, entry in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != entry.get("size"):
            return False
    return True


def recover(output_dir) -> None:
    """Finish the commit of a complete staged checkpoint, or drop an incomplete one (rank 0)."""
    out = Path(output_dir)
    staging, final, trash = out / STAGING, out / NAME, out / TRASH
    if trash.exists():
        _remove(trash)
    if staging.exists():
        if is_complete(staging):
            _swap_in(staging, final, trash)
        else:
            _remove(staging)


def _swap_in(staging: Path, final: Path, trash: Path) -> None:
    if final.exists():
        _rename(final, trash)
    _rename(staging, final)
    if trash.exists():
        _remove(trash)


def staging_dir(output_dir) -> Path:
    """An empty checkpoint.tmp, after `recover` put any earlier save in order."""
    recover(output_dir)
    path = Path(output_dir) / STAGING
    path.mkdir(parents=True)
    return path


def write_main(staging: Path, model, tokenizer, state: dict, masks: dict) -> None:
    """Rank 0's part: model folder, masks and training state."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a bar per save would interleave with the epoch bars
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(str(staging))
    save_masks(staging / MASK_FILE, masks)
    torch.save(state, staging / STATE_FILE)


def write_rng(staging: Path, rank: int) -> None:
    file = staging / f"rng_rank{rank}.pt"
    torch.save(rng_state(), file)
    _fsync(file)


def write_manifest(staging: Path) -> None:
    """Fsync every staged file and record its size and hash: the folder is complete from here."""
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        _fsync(file)
        files[file.relative_to(staging).as_posix()] = {"size": file.stat().st_size,
                                                       "sha256": _sha256(file)}
    part = staging / (MANIFEST + ".part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump({"format": 1, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    _rename(part, staging / MANIFEST)


def commit(staging: Path, output_dir) -> Path:
    """Seal the staged folder with its manifest and move it into place."""
    out = Path(output_dir)
    write_manifest(staging)
    _swap_in(staging, out / NAME, out / TRASH)
    return out / NAME


# -- resume --------------------------------------------------------------------------------------
def find(output_dir) -> Path:
    """The newest complete checkpoint in `output_dir`, its files verified against the manifest."""
    out = Path(output_dir)
    for name in (STAGING, NAME):  # a complete staged folder is newer than the one it replaces
        if is_complete(out / name):
            verify(out / name)
            return out / name
    final = out / NAME
    if final.is_dir():
        verify(final)  # names what is wrong with it
    raise FinetuneError(f"--resume: no checkpoint in {out} (expected {final})")


def verify(folder: Path) -> None:
    files = _manifest(folder)
    if files is None:
        raise FinetuneError(f"--resume: {folder / MANIFEST} is missing or unreadable (an "
                            "interrupted save, or a checkpoint of an older regdrop-fast)")
    for name, entry in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            raise FinetuneError(f"--resume: checkpoint file {file} is missing")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise FinetuneError(f"--resume: checkpoint file {file} has {size} bytes, the manifest "
                                f"says {entry.get('size')} (truncated or overwritten)")
        if _sha256(file) != entry.get("sha256"):
            raise FinetuneError(f"--resume: checkpoint file {file} is corrupted (its sha256 does "
                                "not match the manifest)")


def _load(file: Path):
    # python's RNG state is a tuple of ints and numpy's holds an ndarray: trusted, our own file
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises many types; the file passed its checksum
        raise FinetuneError(f"--resume: cannot read {file}: {exc}") from None


def load_state(path: Path) -> dict:
    return _load(path / STATE_FILE)


def load_rng(path: Path, rank: int) -> dict:
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        raise FinetuneError(f"--resume: {path} has no RNG state for rank {rank} (was it written by "
                            "a run with another number of processes?)")
    return _load(file)


def load_model_weights(model, path: Path) -> None:
    from safetensors.torch import load_file
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights are stored once by save_pretrained
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise FinetuneError(f"--resume: {path} does not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")


def _is_tied(model, name: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return name in tied
