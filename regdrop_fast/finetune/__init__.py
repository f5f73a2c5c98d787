"""`regdrop-fast finetune`: the fine-tuning job with composable regularization methods.

Python use: `run_finetune(FinetuneConfig(model=..., train=..., eval=..., method="rdrop"))`, or
your own Trainer from `regdrop_fast.finetune.hf_trainer.make_trainer`. The methods plug in
through the registry in `regdrop_fast.finetune.methods` (a Trainer mixin beside each method's
kernels); the job runs on that same Trainer (`train.py`, `callbacks.py`).
"""
from .config import FinetuneConfig
from .errors import FinetuneError

__all__ = ["FinetuneConfig", "FinetuneError", "run_finetune"]


def run_finetune(config, progress: bool = True) -> dict:
    from .train import run_finetune as _run
    return _run(config, progress=progress)
