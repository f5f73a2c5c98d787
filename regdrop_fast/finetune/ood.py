"""Out-of-distribution evaluation sets (HANS, PAWS, FEVER-Symmetric style) read from local files.

The file is read through the same loader as the training data. Its labels are either in the
training label set, or it is a two-way entailment set (HANS: entailment / non-entailment)
evaluated on a three-way NLI model, where neutral and contradiction predictions count as
non-entailment (the HANS convention for MNLI models).
"""
from __future__ import annotations

import numpy as np

from .data import load_table
from .errors import FinetuneError

NON_ENTAILMENT = "non-entailment"


class OODSet:
    """An OOD file's texts and label ids; `dataset` (rows for the Trainer's evaluate) is set
    once tokenized, `accuracy` is its compute_metrics."""

    def __init__(self, path: str, texts: list, labels: list, collapse_to: list = None):
        self.path, self.texts, self.labels = path, texts, labels
        self.collapse_to = collapse_to  # model class id -> OOD class id, or None (same ids)
        self.dataset = None

    def accuracy(self, prediction) -> dict:
        predicted = np.asarray(prediction.predictions).argmax(-1)
        if self.collapse_to is not None:
            predicted = np.asarray(self.collapse_to)[predicted]
        return {"accuracy": float((predicted == np.asarray(prediction.label_ids)).mean())}


def load_ood(path: str, train_table, label_set) -> OODSet:
    try:
        table = load_table(path, list(train_table.text_cols), None, what="OOD evaluation file")
    except FinetuneError as exc:
        if "no column" not in str(exc):
            raise
        table = load_table(path, None, None, what="OOD evaluation file")
    labels = sorted(set(table.labels))
    if set(labels) <= set(label_set.names):
        return OODSet(path, table.texts, label_set.encode(table.labels, path))
    if set(labels) <= {"entailment", NON_ENTAILMENT} and "entailment" in label_set.names:
        ood_ids = {"entailment": 0, NON_ENTAILMENT: 1}
        collapse = [0 if name == "entailment" else 1 for name in label_set.names]
        return OODSet(path, table.texts, [ood_ids[x] for x in table.labels], collapse)
    raise FinetuneError(f"OOD evaluation file {path}: labels {', '.join(labels)} are neither in the "
                        f"training label set ({', '.join(label_set.names)}) nor entailment/"
                        f"{NON_ENTAILMENT} for an NLI model")
