"""Process-group setup for `torchrun` / `accelerate launch` and the collectives the job needs.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with them the job
joins a process group (gloo on CPU, NCCL on CUDA) and wraps the model in DDP. Without them it
is a single process and every helper here is a no-op.

Batch semantics: --batch-size is the global batch. A DistributedSampler with the same seed gives
every run the same permutation; rank r takes positions r, r+W, ... of it, so global batch i of a
W-process run holds exactly the examples of batch i of a 1-process run (with the same padding
rule), and DDP's gradient average over equal local batches is the global batch mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import FinetuneError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_env() -> DistInfo:
    """Rank layout from the launcher's environment (torchrun, accelerate launch, srun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise FinetuneError(f"bad distributed environment variable: {exc}") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"--device {name}: not a torch device (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else 0)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise FinetuneError(f"--device {name}: only cpu and cuda are supported")
    return device


def setup(info: DistInfo, device: torch.device) -> DistInfo:
    """Join the launcher's process group (if any and not joined yet)."""
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    info.initialized_here = True
    return info


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: DistInfo, values: list, device) -> list:
    """Sum of a list of floats over ranks (float64 so counts stay exact)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model, info: DistInfo, device):
    """DDP around `model` in a distributed run; the model itself otherwise."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    # every trainable parameter takes part in each step (frozen ones are skipped by DDP), so
    # the unused-parameter graph walk is not needed
    return DistributedDataParallel(model, device_ids=device_ids)
