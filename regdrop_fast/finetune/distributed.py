"""The process layout of a `torchrun` / `accelerate launch` run, read before the Trainer joins
the process group (accelerate does that, gloo on CPU, NCCL on CUDA, and wraps the model in DDP).

Batch semantics: --batch-size is the global batch, split evenly over the processes. The
Trainer's seedable sampler gives every run the same permutation of the training set, and
accelerate hands process r the r-th slice of every global batch, so global batch i of a
W-process run holds exactly the examples of batch i of a 1-process run, and DDP's gradient
average over equal local batches is the global batch mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import FinetuneError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
