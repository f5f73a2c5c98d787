"""Tokenized examples and batches: texts are tokenized once, batches padded to their longest row.

Every batch is the dict a transformers classification model takes plus "labels"; the dataset
positions of its rows travel beside it (debiasing losses look up per-example bias scores).
"""
from __future__ import annotations

import math

from torch.utils.data import DistributedSampler

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
    """Pads a list of examples and their label ids into tensors (transformers'
    DataCollatorWithPadding, labels attached), as a plain dict."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list, labels: list) -> dict:
        return dict(self.pad([dict(f, labels=label) for f, label in zip(features, labels)]))


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainBatches:
    """The batches of one epoch on this process: DistributedSampler order (the same permutation
    on every process count), `local_batch` rows per process and step."""

    def __init__(self, n: int, local_batch: int, seed: int, rank: int, world_size: int):
        self.sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.local_batch = local_batch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.local_batch)

    def epoch(self, epoch: int) -> list:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [order[i:i + self.local_batch] for i in range(0, len(order), self.local_batch)]


class ExampleLoader:
    """An iterable of padded batches over given example positions (Fisher pass, evaluation)."""

    def __init__(self, features: list, labels: list, collate: Collator, batches: list, device):
        self.features, self.labels, self.collate = features, labels, collate
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for rows in self.batches:
            yield to_device(self.collate([self.features[i] for i in rows],
                                         [self.labels[i] for i in rows]), self.device)


def eval_batches(features: list, rank: int, world_size: int, batch_size: int) -> list:
    """This process's share of an evaluation set, sorted by length so batches pad little."""
    rows = list(range(rank, len(features), world_size))
    rows.sort(key=lambda i: len(features[i]["input_ids"]))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
