"""`regdrop-fast finetune`: the fine-tuning job with composable regularization methods.

Python use: `run_finetune(FinetuneConfig(model=..., train=..., eval=..., method="rdrop"))`.
Method adapters live in `regdrop_fast.finetune.methods` (one file per method); the HF Trainer
integration in `regdrop_fast.finetune.hf_trainer`.
"""
from .config import FinetuneConfig
from .errors import FinetuneError

__all__ = ["FinetuneConfig", "FinetuneError", "run_finetune"]


def run_finetune(config, progress: bool = True) -> dict:
    from .train import run_finetune as _run
    return _run(config, progress=progress)
