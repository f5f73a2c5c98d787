"""Benchmark outputs: results.jsonl (appended), results.md and results.png (this run).

Speedup = baseline ms / impl ms, both measured in the same run on the same device ("x faster";
below 1 means slower). The PNG is drawn with matplotlib's Agg canvas directly, so no GUI
backend and no global pyplot state are touched.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .runner import RunResult

__all__ = ["add_speedups", "markdown", "plot", "write_outputs"]

MIB = 1024 * 1024

CPU_NOTE = (
    "**CPU run.** Timed here: the PyTorch baselines, the pure-PyTorch reference and the C++ "
    "(csrc) CPU kernels. Triton kernels run on CPU tensors only under the Triton interpreter "
    "(TRITON_INTERPRET=1), a correctness tool: interpreter timings are NOT performance, so "
    "Triton is not timed on CPU. GPU numbers come from `benchmarks/gpu_check.sh` on a CUDA "
    "machine.")


def _key(row: dict) -> tuple:
    return row["op"], row["case"], row["dtype"]


def add_speedups(rows: List[dict]) -> None:
    """Set row["speedup"] = baseline ms / row ms from the baseline row of the same op, case and
    dtype in these rows (None when that baseline was not measured)."""
    by_impl = {(_key(r), r["impl"]): r for r in rows}
    for row in rows:
        base = by_impl.get((_key(row), row["baseline"]))
        ok = base is not None and base["ms"] and row["ms"]
        row["speedup"] = base["ms"] / row["ms"] if ok else None


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _ms(row: dict) -> str:
    text = _num(row["ms"], 4)
    if row.get("p20_ms") is not None and row.get("p80_ms") is not None:
        text += f" ({_num(row['p20_ms'], 3)}–{_num(row['p80_ms'], 3)})"
    return text


def _speedup(row: dict) -> str:
    if row["impl"] == row["baseline"]:
        return "baseline"
    if row.get("speedup") is None:
        return f"n/a ({row['baseline']} not measured)"
    return f"{row['speedup']:.3g}x vs {row['baseline']}"


def _gbps(row: dict, ceiling: Optional[float]) -> str:
    if row.get("gbps") is None:
        return "n/a"
    share = f" ({100 * row['gbps'] / ceiling:.0f}%)" if ceiling else ""
    return _num(row["gbps"]) + share


def _mem(row: dict) -> str:
    if row.get("peak_mem_bytes") is None:
        return "n/a (CPU)" if row.get("device", "").startswith("cpu") else "n/a"
    return f"{row['peak_mem_bytes'] / MIB:.1f} MiB"


def _roofline(row: dict) -> str:
    if row.get("roofline_share") is None:
        return "n/a"
    return f"{100 * row['roofline_share']:.0f}% of {row['roofline_of']}"


def _notes(row: dict) -> str:
    return row.get("note") or ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ops(rows: List[dict]) -> List[str]:
    return list(dict.fromkeys(r["op"] for r in rows))


def markdown(result: RunResult, device_type: str) -> str:
    env = result.env
    cuda = f" (CUDA {env['cuda_version']})" if env.get("cuda_version") else ""
    lines = [
        "# regdrop_fast benchmarks",
        "",
        f"- device: {device_type} — {env['device_name']}",
        f"- torch {env['torch_version']}{cuda}, triton {env['triton_version'] or 'not installed'}, "
        f"python {env['python_version']}",
        f"- run {env['timestamp']}, {'quick' if env['quick'] else 'full'} sizes, benches: "
        f"{', '.join(result.benches) or 'none'}",
        "- ms: median (p20–p80) of many runs: triton.testing.do_bench on CUDA, perf_counter on "
        "CPU; speedup = baseline ms / impl ms, measured in the same run (above 1 = faster); "
        "GB/s = the bytes each bench counts (see its docstring) / median time"
        + (f", with its share of this device's measured copy bandwidth "
           f"({_num(env['copy_gbps'])} GB/s, read + write of a 1 GiB copy)"
           if env.get("copy_gbps") else ""),
    ]
    if device_type == "cuda":
        lines.append(
            "- graph ms: median of a CUDA-graph replay (GPU time without launch work); host ms "
            "= ms − graph ms, the host overhead per call; roofline: a FLOP-counted row's rate "
            "as a share of this run's bf16 torch.mm 8192³ rate "
            f"({_num(env.get('mm_tflops'))} TFLOP/s, \"mm\"), else its GB/s as a share of the "
            "copy bandwidth (\"copy\")")
    if device_type == "cpu":
        load = env.get("load_avg_1m")
        lines.append(f"- CPU threads: {env.get('cpu_threads')} of {env.get('cpu_count')} cores; "
                     f"1-minute load average at start: "
                     f"{'n/a' if load is None else f'{load:.1f}'} (other work on the machine "
                     f"makes CPU timings noisy: see the p20–p80 spread)")
        lines += ["", CPU_NOTE]
    missing = env.get("unavailable_backends") or {}
    if missing:
        lines += ["", "Backends not benchmarked (no rows for them):", ""]
        lines += [f"- `{name}`: {_cell(reason)}" for name, reason in missing.items()]
    gbps_title = "GB/s (% of copy)" if env.get("copy_gbps") else "GB/s"
    gpu = device_type == "cuda"
    head = ["case", "dtype", "impl", "ms (p20–p80)", *(["graph ms", "host ms"] if gpu else []),
            "speedup", gbps_title, *(["roofline"] if gpu else []), "peak mem", "notes"]
    for op in _ops(result.rows):
        lines += ["", f"## {op}", "", "| " + " | ".join(head) + " |",
                  "|" + " --- |" * len(head)]
        for row in (r for r in result.rows if r["op"] == op):
            times = [_num(row.get("graph_ms"), 4), _num(row.get("host_ms"), 3)] if gpu else []
            cells = [row["case"], row["dtype"], row["impl"], _ms(row), *times, _speedup(row),
                     _gbps(row, env.get("copy_gbps")), *([_roofline(row)] if gpu else []),
                     _mem(row), _notes(row)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not result.rows:
        lines += ["", "No results were recorded."]
    if result.failures:
        lines += ["", "## Failed benches", ""]
        lines += [f"- `{f.bench}`: {_cell(f.error)} (traceback on stderr)"
                  for f in result.failures]
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], path: Path, title: str) -> None:
    """One panel per op: grouped bars of median ms, one bar per impl per (case, dtype)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ops = _ops(rows)
    fig = Figure(figsize=(9, 3.6 * max(1, len(ops))))
    FigureCanvasAgg(fig)
    if not ops:
        fig.text(0.5, 0.5, "no results recorded", ha="center", va="center")
    axes = fig.subplots(len(ops), 1, squeeze=False)[:, 0] if ops else []
    for ax, op in zip(axes, ops):
        op_rows = [r for r in rows if r["op"] == op]
        groups = list(dict.fromkeys((r["case"], r["dtype"]) for r in op_rows))
        impls = list(dict.fromkeys(r["impl"] for r in op_rows))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            ms = {(r["case"], r["dtype"]): r["ms"] for r in op_rows if r["impl"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i, g in enumerate(groups) if g in ms]
            ax.bar(xs, [ms[g] for g in groups if g in ms], width, label=impl)
        one_dtype = len({g[1] for g in groups}) == 1
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([c if one_dtype else f"{c}\n{d}" for c, d in groups], fontsize=8)
        values = [r["ms"] for r in op_rows if r["ms"] and r["ms"] > 0]
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("ms (median, lower is better)")
        ax.set_title(f"{op} — {title}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(result: RunResult, out_dir: Path, device_type: str,
                  new_rows: Optional[List[dict]] = None, with_plot: bool = True
                  ) -> Dict[str, Path]:
    """Append new_rows (default: all of the run's rows) to results.jsonl, (re)write results.md
    from all the run's rows and, with_plot, results.png; return the paths (png None when not
    drawn, or when matplotlib is missing, as it may be on a preinstalled GPU machine)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_speedups(result.rows)
    paths = {"jsonl": out_dir / "results.jsonl", "md": out_dir / "results.md",
             "png": out_dir / "results.png" if with_plot else None}
    with open(paths["jsonl"], "a", encoding="utf-8") as f:
        for row in result.rows if new_rows is None else new_rows:
            f.write(json.dumps(row, default=str) + "\n")
    paths["md"].write_text(markdown(result, device_type), encoding="utf-8")
    if not with_plot:
        return paths
    try:
        import matplotlib  # noqa: F401  (only the plot needs it)
    except ImportError:
        print("matplotlib is not installed: results.png not written", file=sys.stderr)
        paths["png"] = None
    else:
        plot(result.rows, paths["png"], f"{device_type}: {result.env['device_name']}")
    return paths
