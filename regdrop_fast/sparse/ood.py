"""In-distribution and OOD evaluation sets from local files, with their label maps.

  MNLI (GLUE tsv: ..., sentence1, sentence2, [label1..], gold_label)  labels MNLI_LABELS
  HANS (tsv: gold_label, parses..., sentence1, sentence2, pairID, heuristic, subcase,
        template)                                                    labels HANS_LABELS
  QQP  (GLUE tsv: id, qid1, qid2, question1, question2, is_duplicate) labels 0/1
  PAWS (tsv: id, sentence1, sentence2, label; PAWS-QQP too)          labels 0/1 (1 = paraphrase,
        as QQP's is_duplicate)
  FEVER / FEVER-Symmetric (jsonl: claim, evidence | evidence_sentence, gold_label | label)
                                                                     labels FEVER_LABELS
An MNLI model is scored on HANS by mapping its predictions: entailment -> entailment,
neutral and contradiction -> non-entailment (`mnli_to_hans`). Columns are found by header
name; an unlabeled file (a GLUE test split) gives label None.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["Example", "MNLI_LABELS", "HANS_LABELS", "FEVER_LABELS", "load_mnli", "load_hans",
           "load_qqp", "load_paws", "load_fever", "mnli_to_hans", "accuracy", "hans_accuracy"]

MNLI_LABELS = ("contradiction", "entailment", "neutral")  # the GLUE processors' order
HANS_LABELS = ("entailment", "non-entailment")
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
BINARY_LABELS = ("0", "1")


@dataclass
class Example:
    guid: str
    text_a: str
    text_b: Optional[str]
    label: Optional[int]
    meta: dict = field(default_factory=dict)


def _read_tsv(path: str) -> tuple:
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing file, got {path!r}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path} is empty (expected a header row)")
    return rows[0], rows[1:]


def _columns(path, header, required) -> dict:
    index = {name: i for i, name in enumerate(header)}
    missing = [name for name in required if name not in index]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; header has {header}")
    return index


def _label_id(path, line_no, value, labels) -> int:
    try:
        return labels.index(value)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: label {value!r} is not one of {labels}") from None


def _pairs(path, text_a, text_b, label_col, labels, guid_col, meta_cols=(), clean=str):
    header, rows = _read_tsv(path)
    cols = _columns(path, header, [text_a, text_b, guid_col])
    has_label = label_col in cols
    out = []
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) < len(header):
            raise ValueError(f"{path}:{line_no}: expected {len(header)} columns, got {len(row)}")
        label = _label_id(path, line_no, row[cols[label_col]], labels) if has_label else None
        meta = {name: row[cols[name]] for name in meta_cols if name in cols}
        out.append(Example(row[cols[guid_col]], clean(row[cols[text_a]]),
                           clean(row[cols[text_b]]), label, meta))
    return out


def load_mnli(path: str) -> list:
    """MNLI GLUE tsv (train / dev_matched / dev_mismatched / test)."""
    return _pairs(path, "sentence1", "sentence2", "gold_label", MNLI_LABELS, "pairID",
                  meta_cols=("genre",))


def load_hans(path: str) -> list:
    """HANS tsv (heuristics_evaluation_set.txt); meta keeps heuristic, subcase, template."""
    return _pairs(path, "sentence1", "sentence2", "gold_label", HANS_LABELS, "pairID",
                  meta_cols=("heuristic", "subcase", "template"))


def load_qqp(path: str) -> list:
    """QQP GLUE tsv; label = is_duplicate."""
    return _pairs(path, "question1", "question2", "is_duplicate", BINARY_LABELS, "id")


def _unwrap_bytes_repr(text: str) -> str:
    # PAWS-QQP's generation script writes sentences as Python bytes literals: b'...'
    if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        return text[2:-1]
    return text


def load_paws(path: str) -> list:
    """PAWS / PAWS-QQP tsv; label 1 = paraphrase (QQP's duplicate)."""
    return _pairs(path, "sentence1", "sentence2", "label", BINARY_LABELS, "id",
                  clean=_unwrap_bytes_repr)


def load_fever(path: str) -> list:
    """FEVER / FEVER-Symmetric jsonl: claim (text_a), evidence (text_b), label."""
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing file, got {path!r}")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({exc})") from None
            evidence = record.get("evidence", record.get("evidence_sentence"))
            raw_label = record.get("gold_label", record.get("label"))
            if "claim" not in record or evidence is None:
                raise ValueError(f"{path}:{line_no}: needs 'claim' and 'evidence' (or "
                                 f"'evidence_sentence'), got keys {sorted(record)}")
            label = None if raw_label is None else _label_id(path, line_no, raw_label,
                                                             FEVER_LABELS)
            out.append(Example(str(record.get("id", line_no)), record["claim"], evidence, label))
    return out


def mnli_to_hans(mnli_labels: torch.Tensor) -> torch.Tensor:
    """MNLI label ids -> HANS label ids (entailment 0; neutral, contradiction 1)."""
    entail = MNLI_LABELS.index("entailment")
    return (mnli_labels != entail).long()


def accuracy(preds: torch.Tensor, examples: Sequence[Example]) -> float:
    """Fraction of examples whose label equals the prediction (labeled examples only)."""
    labels = [e.label for e in examples]
    if len(labels) != len(preds):
        raise ValueError(f"preds must have one entry per example ({len(labels)}), got "
                         f"{len(preds)}")
    if not labels or any(label is None for label in labels):
        raise ValueError("accuracy needs labeled examples")
    return (torch.as_tensor(preds).cpu() == torch.tensor(labels)).float().mean().item()


def hans_accuracy(mnli_preds: torch.Tensor, examples: Sequence[Example]) -> dict:
    """HANS accuracy of an MNLI model's predicted label ids: "all", per gold label, and per
    (gold label, heuristic) as in the HANS paper's tables."""
    preds = mnli_to_hans(torch.as_tensor(mnli_preds).cpu())
    out = {"all": accuracy(preds, examples)}
    groups = {}
    for i, ex in enumerate(examples):
        for key in (HANS_LABELS[ex.label], (HANS_LABELS[ex.label], ex.meta.get("heuristic"))):
            groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        out[key] = accuracy(preds[idx], [examples[i] for i in idx])
    return out
