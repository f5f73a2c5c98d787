"""Checkpoints: a folder that is both a transformers model folder and a resumable state.

    checkpoint/
      config.json, model.safetensors, tokenizer files   (save_pretrained: loads with from_pretrained)
      masks.safetensors        packed masks of the methods (int32 words; shapes in the metadata)
      training_state.pt        optimizer, LR schedule, loop position, metrics so far, method state
      rng_rank{r}.pt           torch/python/numpy RNG state of each process

The folder is written under a temporary name and renamed into place, so an interrupted save
never leaves a partial checkpoint; the previous one is kept as `checkpoint.old` until the rename.
"""
from __future__ import annotations

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
STATE_FILE = "training_state.pt"
MASK_FILE = "masks.safetensors"


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


def find(output_dir) -> Path:
    """The checkpoint to resume from in `output_dir` (falls back to an interrupted swap)."""
    for name in (NAME, NAME + ".old"):
        path = Path(output_dir) / name
        if (path / STATE_FILE).is_file():
            return path
    raise FinetuneError(f"--resume: no checkpoint in {output_dir} (expected {Path(output_dir) / NAME})")


def staging_dir(output_dir) -> Path:
    path = Path(output_dir) / (NAME + ".tmp")
    if path.exists():
        shutil.rmtree(path)
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
    torch.save(rng_state(), staging / f"rng_rank{rank}.pt")


def commit(staging: Path, output_dir) -> Path:
    """Move the staged folder into place: never a moment without a complete checkpoint."""
    final = Path(output_dir) / NAME
    old = Path(output_dir) / (NAME + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_state(path: Path) -> dict:
    # python's RNG state is a tuple of ints and numpy's holds an ndarray: trusted, our own file
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_rng(path: Path, rank: int) -> dict:
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        raise FinetuneError(f"--resume: {path} has no RNG state for rank {rank} (was it written by "
                            "a run with another number of processes?)")
    return torch.load(file, map_location="cpu", weights_only=False)


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
