"""Fixtures for the finetune tests: a tiny random BERT with a tokenizer built from a small
vocab file, and tiny CSV files of a learnable two-class task, written to a tmp folder; the
comparison of two runs; the kill-point injector of the checkpoint save."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "boring", "fun", "the", "a",
         "is", "was", "very", "not", "premise", "says", "yes", "no"]
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "awful", "boring"]


def make_tiny_bert(folder: Path, dropout: float = 0.1, tokenizer: bool = True) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from transformers.utils import logging as hf_logging
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    BertForSequenceClassification(config).save_pretrained(folder)
    if tokenizer:
        BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    else:
        (folder / "vocab.txt").unlink()
    hf_logging.enable_progress_bar()
    return folder


def review_rows(n: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        cue = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        words = rng.sample(WORDS[4:15], rng.randint(2, 6)) + [cue]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label, "id": len(rows)})
    return rows


def write_csv(path: Path, rows: list, delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_task(folder: Path, n_train: int = 32, n_eval: int = 16, dropout: float = 0.1) -> dict:
    """{'model', 'train', 'eval'} paths: CSV columns review, sentiment (pos/neg), id."""
    model = make_tiny_bert(folder / "model", dropout=dropout)
    train = write_csv(folder / "train.csv", review_rows(n_train, 1))
    evaluation = write_csv(folder / "eval.csv", review_rows(n_eval, 2))
    return {"model": str(model), "train": str(train), "eval": str(evaluation)}


def base_args(task: dict, out: Path, *extra) -> list:
    return ["finetune", "--model", task["model"], "--train", task["train"], "--eval", task["eval"],
            "--text-cols", "review", "--label-col", "sentiment", "--output-dir", str(out),
            "--device", "cpu", *map(str, extra)]


STABLE_METRICS = ("epoch", "step", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
                  "lr", "train_ce", "train_kl")


def stable_metrics(out: Path, name: str = "metrics.jsonl") -> list:
    """The metrics rows (of metrics.jsonl or steps.jsonl) without the timings, which differ
    between runs."""
    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    return [{k: r[k] for k in STABLE_METRICS if k in r} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs' final checkpoints and metrics are bit-identical (weights, optimizer state)."""
    import torch
    from safetensors.torch import load_file
    from regdrop_fast.finetune import checkpoint as ckpt

    ca, cb = ckpt.find(a), ckpt.find(b)
    assert ca.name == cb.name
    wa = load_file(str(ca / "model.safetensors"))
    wb = load_file(str(cb / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = torch.load(ca / "optimizer.pt", weights_only=False)
    sb = torch.load(cb / "optimizer.pt", weights_only=False)
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for pid, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][pid][key])), \
                (pid, key)
    assert stable_metrics(a) == stable_metrics(b)
    assert stable_metrics(a, "steps.jsonl") == stable_metrics(b, "steps.jsonl")


class Killed(BaseException):
    """A crash no handler catches (the in-process stand-in for SIGKILL)."""


class Injector:
    """Counts the file-system steps (`_rename`, `_remove`) of phase number `save` and kills at
    step `step`. A phase starts with each `seal` (a save: its manifest rename, then the
    deletion of the older folders) and with `discard_unsealed` (a resumed run's clean-up)."""

    def __init__(self, monkeypatch, save: int, step: int, kill=None):
        self.save, self.step, self.kill = save, step, kill or self._raise
        self.saves = self.events = 0
        self.killed = self.sealed = False
        from regdrop_fast.finetune import checkpoint as ckpt
        seal, discard, rename, remove = (ckpt.seal, ckpt.discard_unsealed, ckpt._rename,
                                         ckpt._remove)

        def phase(function):
            def counted(*args):
                self.saves += 1
                self.events = 0
                return function(*args)
            return counted

        def counted_rename(src, dst):
            self._tick()
            rename(src, dst)
            self.sealed |= Path(dst).name == ckpt.MANIFEST

        def counted_remove(path):
            self._tick()
            if self._tick(arm=True):  # half-way: some files gone, the folder still there
                files = sorted(p for p in Path(path).rglob("*") if p.is_file())
                for file in files[: (len(files) + 1) // 2]:
                    file.unlink()
                self.killed = True
                self.kill()
            return remove(path)

        monkeypatch.setattr(ckpt, "seal", phase(seal))
        monkeypatch.setattr(ckpt, "discard_unsealed", phase(discard))
        monkeypatch.setattr(ckpt, "_rename", counted_rename)
        monkeypatch.setattr(ckpt, "_remove", counted_remove)

    def _tick(self, arm: bool = False) -> bool:
        if self.saves != self.save:
            return False
        self.events += 1
        if self.events != self.step:
            return False
        if arm:
            return True
        self.killed = True
        self.kill()

    @staticmethod
    def _raise():
        raise Killed()
