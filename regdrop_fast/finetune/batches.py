"""Tokenized examples and their batches: texts are tokenized once, a batch is padded to its
longest row. A row is the dict a transformers classification model takes plus "labels", and,
for debiasing, per-example probability lists ("bias_probs", "teacher_probs")."""
from __future__ import annotations

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(tokenizer, texts: list, max_length: int) -> list:
    """One dict of id lists per example; a second and later text columns form the pair segment."""
    if not texts:
        return []
    first = [t[0] for t in texts]
    second = [" ".join(t[1:]) for t in texts] if len(texts[0]) > 1 else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_length)
    keys = [k for k in MODEL_KEYS if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


class Collator:
    """transformers' DataCollatorWithPadding over the token columns and labels; any other
    column (per-example probabilities) stacked as float32 beside them; a plain dict."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding
        self.tokenizer = tokenizer
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list) -> dict:
        other = [k for k in rows[0] if k not in MODEL_KEYS and k != "labels"]
        batch = dict(self.pad([{k: v for k, v in r.items() if k not in other} for r in rows]))
        for key in other:
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch
