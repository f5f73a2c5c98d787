"""Checkpoints: the Trainer's own `checkpoint-N` folders, sealed by a manifest.

    checkpoint-N/
      config.json, model.safetensors, tokenizer files   (loads with from_pretrained)
      optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json, training_args.bin
                                  (the Trainer's: `trainer.train(resume_from_checkpoint=...)`)
      finetune_state.pt           the job's: settings fingerprint, metrics so far
      masks.safetensors           packed masks of mask-train / imp (int32 words; shapes in the
                                  metadata), for inspection; the run itself restores them from
                                  the model buffers and the optimizer state
      MANIFEST.json               size and sha256 of every other file, written last

Save protocol: the Trainer writes checkpoint-N (not atomically); then the job adds its files,
fsyncs everything and renames MANIFEST.json into place (`seal`): only from here is the folder
a checkpoint. Only then are the other checkpoint folders deleted (`retire`), so at every
instant the newest sealed folder is complete, however the process is killed. `find` returns
the newest sealed folder after checking every file against the manifest (sha256): a corrupted,
truncated or deleted file is refused with a one-line error instead of resuming on wrong
weights. `discard_unsealed` deletes what an interrupted save left.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..masks import PackedMask
from .errors import FinetuneError

PREFIX = "checkpoint-"
STATE_FILE = "finetune_state.pt"
MASK_FILE = "masks.safetensors"
MANIFEST = "MANIFEST.json"


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


def folders(output_dir) -> list:
    """The checkpoint-N folders of `output_dir`, newest (largest N) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if (m := re.fullmatch(re.escape(PREFIX) + r"(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


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


def seal(folder: Path) -> None:
    """Fsync every file and record its size and hash: the folder is a checkpoint from here."""
    folder = Path(folder)
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.name.startswith(MANIFEST):
            continue
        _fsync(file)
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size,
                                                      "sha256": _sha256(file)}
    part = folder / (MANIFEST + ".part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump({"format": 2, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    _rename(part, folder / MANIFEST)


def retire(output_dir, keep: Path) -> None:
    """Delete every checkpoint folder but `keep` (sealed), oldest first."""
    for folder in reversed(folders(output_dir)):
        if folder.name != Path(keep).name:
            _remove(folder)


def discard_unsealed(output_dir) -> None:
    """Delete the folders of interrupted saves (no complete manifest)."""
    for folder in folders(output_dir):
        if not is_complete(folder):
            _remove(folder)


# -- resume --------------------------------------------------------------------------------------
def find(output_dir) -> Path:
    """The newest complete checkpoint in `output_dir`, its files verified against the manifest."""
    candidates = folders(output_dir)
    for folder in candidates:
        if is_complete(folder):
            verify(folder)
            return folder
    if candidates:
        verify(candidates[0])  # names what is wrong with it
    raise FinetuneError(f"--resume: no checkpoint in {output_dir} (expected "
                        f"{Path(output_dir) / (PREFIX + 'N')} folders)")


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


def load_state(folder: Path) -> dict:
    file = Path(folder) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; the file passed its checksum
        raise FinetuneError(f"--resume: cannot read {file}: {exc}") from None
