"""The demo comparison (`regdrop-fast finetune` with no --train and no --method): the same job,
through the same CLI and loaders, once per method in its own process (so peak memory is per
method), then a table of eval accuracy, time and peak memory, written as comparison.md/.json and
a comparison.png of the eval curves. Methods whose package is missing are listed as skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from . import report
from .config import FinetuneConfig
from .errors import FinetuneError
from .methods import unavailable

DEMO_METHODS = ("none", "rdrop", "childtuning-f", "addrop")


# always passed: the child has no --train, so it would otherwise apply the demo's own defaults
ALWAYS = ("method", "epochs", "lr", "max_length", "output_dir")


def config_argv(config: FinetuneConfig) -> list:
    """Flags reproducing `config` (fields left at their defaults are omitted)."""
    default = FinetuneConfig()
    argv = []
    for f in fields(FinetuneConfig):
        value = getattr(config, f.name)
        if value == getattr(default, f.name) and f.name not in ALWAYS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            if f.name == "addrop_cross_tuning":
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _available(name: str, config) -> str:
    """'' when the method can run here, else the reason."""
    return unavailable(name)


COLUMNS = [("method", "method", 0), ("eval acc", "eval_accuracy", 4),
           ("best eval acc", "best_eval_accuracy", 4), ("eval loss", "eval_loss", 4),
           ("train+eval s", "train_time_s", 1), ("wall s", "wall_time_s", 1),
           ("peak MB", "peak_mem_mb", 0), ("status", "status", 0)]


def plot_comparison(out: Path, runs: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, history) in enumerate(runs.items()):
        color = f"C{index}"  # one colour per method, train dotted / eval solid
        epochs = [r["epoch"] for r in history]
        ax_loss.plot(epochs, [r["eval_loss"] for r in history], "o-", color=color,
                     label=f"{name} eval")
        ax_loss.plot(epochs, [r["train_loss"] for r in history], ":", color=color,
                     label=f"{name} train")
        ax_acc.plot(epochs, [r["eval_accuracy"] for r in history], "o-", color=color, label=name)
    for ax, label in ((ax_loss, "loss"), (ax_acc, "eval accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(config: FinetuneConfig, methods=DEMO_METHODS) -> int:
    from .distributed import launched_env
    from .train import check_writable
    if launched_env().enabled:
        raise FinetuneError("the demo comparison runs in one process; under torchrun/accelerate "
                            "pass --method (and --train/--eval)")
    if config.resume:
        raise FinetuneError("--resume needs a single run: pass --method")
    out = Path(config.output_dir)
    check_writable(out)
    rows, curves, failed = [], {}, False
    started = time.perf_counter()
    for name in methods:
        reason = _available(name, config)
        if reason:
            print(f"[demo] skipping {name}: {reason}", flush=True)
            rows.append({"method": name, "status": "skipped: " + reason.split(": ", 1)[-1]})
            continue
        run_dir = out / name
        run_config = replace(config, method=name, output_dir=str(run_dir))
        argv = [sys.executable, "-m", "regdrop_fast", "finetune", *config_argv(run_config)]
        print(f"[demo] {name}: {' '.join(argv[1:])}", flush=True)
        code = subprocess.call(argv, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        summary_file = run_dir / report.SUMMARY_JSON
        if code != 0 or not summary_file.is_file():
            failed = True
            rows.append({"method": name, "status": f"failed (exit {code})"})
            continue
        summary = json.loads(summary_file.read_text())
        rows.append({**summary, "method": name, "status": "ok"})
        curves[name] = [json.loads(line) for line in
                        (run_dir / report.METRICS_FILE).read_text().splitlines() if line]
    table = report.markdown_table(rows, COLUMNS)
    first = next((r for r in rows if r["status"] == "ok"), None)
    header = ["# regdrop-fast finetune demo", ""]
    if first is not None:
        header += [f"model `{first['model']}`, {first['train_examples']} train / "
                   f"{first['eval_examples']} eval examples, {config.epochs} epochs, batch "
                   f"{config.batch_size}, lr {config.lr}, max length {config.max_length}, "
                   f"device {first['device']}", ""]
    (out / "comparison.md").write_text("\n".join(header + [table, ""]), encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(rows, indent=2, sort_keys=True),
                                         encoding="utf-8")
    if curves:
        plot_comparison(out, curves)
    print("\n" + "\n".join(header) + table, flush=True)
    print(f"\n[demo] total {time.perf_counter() - started:.0f} s; wrote {out}/comparison.md, "
          "comparison.json, comparison.png and one folder per method", flush=True)
    return 1 if failed else 0
