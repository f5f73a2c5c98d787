"""Outputs of a run: metrics per epoch and per logging step as JSON lines, a markdown summary,
and a PNG of the train/eval loss and accuracy curves (the overfitting picture of the AD-DROP
paper), the training loss drawn per logging step."""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
CURVES_PNG = "curves.png"


def write_metrics(output_dir, history: list, name: str = METRICS_FILE) -> Path:
    """All rows so far (rewritten whole, so a resumed run never duplicates lines)."""
    path = Path(output_dir) / name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in history:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_steps(output_dir, steps: list) -> Path:
    """The per-step rows (step, fractional epoch, train_loss, lr, method parts)."""
    return write_metrics(output_dir, steps, STEPS_FILE)


def _fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list, columns: list) -> str:
    """`columns`: (header, key, digits) triples."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k), d) for _, k, d in columns) + " |")
    return "\n".join(lines)


EPOCH_COLUMNS = [("epoch", "epoch", 0), ("step", "step", 0), ("train loss", "train_loss", 4),
                 ("train acc", "train_accuracy", 4), ("eval loss", "eval_loss", 4),
                 ("eval acc", "eval_accuracy", 4), ("ood acc", "ood_accuracy", 4),
                 ("samples/s", "train_samples_per_s", 1), ("epoch s", "epoch_time_s", 1)]


def write_summary(output_dir, summary: dict, history: list) -> tuple:
    """summary.json (machine-readable) and summary.md (for people)."""
    out = Path(output_dir)
    with open(out / SUMMARY_JSON, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    columns = [c for c in EPOCH_COLUMNS if any(r.get(c[1]) is not None for r in history)]
    text = [f"# Fine-tuning summary: method `{summary['method']}`", "",
            f"- model: `{summary['model']}`",
            f"- train: `{summary['train']}` ({summary['train_examples']} examples), "
            f"eval: `{summary['eval']}` ({summary['eval_examples']} examples)",
            f"- labels: {', '.join(summary['labels'])}",
            f"- device: {summary['device']} x {summary['world_size']} process(es), "
            f"global batch {summary['batch_size']}, lr {summary['lr']}, "
            f"max length {summary['max_length']}, seed {summary['seed']}",
            f"- final eval accuracy: **{_fmt(summary['eval_accuracy'])}**"
            + (f", best {_fmt(summary['best_eval_accuracy'])} (epoch {summary['best_epoch']})"),
            f"- wall time {summary['train_time_s']:.1f} s, peak memory "
            f"{summary['peak_mem_mb']:.0f} MB ({summary['peak_mem_kind']})", "",
            markdown_table(history, columns), ""]
    with open(out / SUMMARY_MD, "w", encoding="utf-8") as handle:
        handle.write("\n".join(text))
    return out / SUMMARY_JSON, out / SUMMARY_MD


def plot_curves(output_dir, history: list, title: str, steps: list = ()) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split, style in (("train", "o-"), ("eval", "s-"), ("ood", "^--")):
            values = [row.get(f"{split}_{key}") for row in history]
            if any(v is not None for v in values):
                ax.plot([e for e, v in zip(epochs, values) if v is not None],
                        [v for v in values if v is not None], style, label=f"{split} {label}")
        if key == "loss" and steps:
            ax.plot([row["epoch"] for row in steps], [row["train_loss"] for row in steps], "-",
                    alpha=0.6, label="train loss per step")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(output_dir) / CURVES_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
