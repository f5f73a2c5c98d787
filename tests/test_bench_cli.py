"""`regdrop-fast bench`: the real quick benches end to end, failure isolation, argument errors,
and a syntax check of benchmarks/gpu_check.sh."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regdrop_fast import backends
from regdrop_fast.cli import main

REPO = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {
    "bench", "op", "impl", "baseline", "case", "dtype", "shape", "device", "ms", "p20_ms",
    "p80_ms", "gbps", "peak_mem_bytes", "speedup", "device_name", "torch_version",
    "triton_version", "python_version", "timestamp", "run_id", "quick",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _table_rows(md, op):
    """The data rows of the markdown table under `## op`, as lists of cells."""
    section = md.split(f"## {op}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")][2:]  # header, rule
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("bench_out")
    code, stdout, stderr = _run(["bench", "--quick", "--ops", "philox", "masks", "--out",
                                 str(out), "--device", device.type])
    return code, out, stdout, stderr


def test_quick_benches_succeed_and_print_the_table(quick_run):
    code, out, stdout, stderr = quick_run
    assert code == 0, stderr
    md = (out / "results.md").read_text()
    assert stdout == md
    for op in ("philox_keep_mask", "pack_mask", "unpack_mask"):
        assert f"## {op}" in md


def test_jsonl_rows_have_required_keys(quick_run, device):
    _, out, _, _ = quick_run
    rows = _rows(out / "results.jsonl")
    assert rows
    for row in rows:
        missing = REQUIRED_KEYS - row.keys()
        assert not missing, f"row {row['op']}/{row['impl']} lacks {sorted(missing)}"
        assert row["quick"] is True
        assert row["ms"] > 0 and row["p20_ms"] <= row["p80_ms"]
        assert row["torch_version"] == torch.__version__
        assert row["device"].startswith(device.type)
        assert row["bench"] in ("philox", "masks")
    assert len({row["run_id"] for row in rows}) == 1


def test_every_available_backend_is_benchmarked(quick_run, device):
    _, out, _, _ = quick_run
    impls = {(r["op"], r["impl"]) for r in _rows(out / "results.jsonl")}
    ours = backends.available(device)
    if device.type == "cpu":
        ours = [n for n in ours if n != "triton"]  # the interpreter is never timed
    for name in ours:
        assert ("philox_keep_mask", f"bernoulli_keep[{name}]") in impls
        assert ("pack_mask", f"pack_mask[{name}]") in impls
        assert ("unpack_mask", f"unpack_mask[{name}]") in impls
    for baseline in (("philox_keep_mask", "torch.rand<p"), ("philox_keep_mask", "torch.bernoulli_"),
                     ("pack_mask", "bool.clone()"), ("unpack_mask", "bool.clone()")):
        assert baseline in impls
    if device.type == "cpu":
        assert not any("[triton]" in impl for _, impl in impls)


def test_speedup_is_baseline_over_impl_in_the_same_run(quick_run):
    _, out, _, _ = quick_run
    rows = _rows(out / "results.jsonl")
    ms = {(r["op"], r["case"], r["impl"]): r["ms"] for r in rows}
    for row in rows:
        expected = ms[(row["op"], row["case"], row["baseline"])] / row["ms"]
        assert row["speedup"] == pytest.approx(expected)
        if row["gbps"] is not None:
            assert row["gbps"] > 0


def test_markdown_has_a_row_per_impl_and_the_environment(quick_run, device):
    _, out, _, _ = quick_run
    md = (out / "results.md").read_text()
    rows = _rows(out / "results.jsonl")
    assert rows[0]["device_name"] in md and torch.__version__ in md
    for op in {r["op"] for r in rows}:
        table = _table_rows(md, op)
        impls = [r["impl"] for r in rows if r["op"] == op]
        assert [cells[2] for cells in table] == impls
        for cells, row in zip(table, (r for r in rows if r["op"] == op)):
            assert cells[0] == row["case"]
            if row["impl"] == row["baseline"]:
                assert cells[4] == "baseline"
            else:
                assert f"x vs {row['baseline']}" in cells[4]
    if device.type == "cpu":
        assert "interpreter timings are NOT performance" in md


def test_png_is_a_valid_image(quick_run):
    _, out, _, _ = quick_run
    data = (out / "results.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    import matplotlib.image
    image = matplotlib.image.imread(out / "results.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


GOOD_BENCH = """
def run(ctx):
    import torch
    x = torch.ones(1000, device=ctx.device)
    for impl, fn in (("base", x.clone), ("ours", lambda: x + 1)):
        ctx.record(op="toy", impl=impl, baseline="base", case="n=1000", dtype="float32",
                   shape=[1000], bytes_moved=8000, **ctx.measure(fn, warmup=1, repeat=5))
"""


@pytest.fixture()
def toy_benches(tmp_path):
    bench_dir = tmp_path / "benches"
    bench_dir.mkdir()
    (bench_dir / "bench_good.py").write_text(GOOD_BENCH)
    (bench_dir / "bench_broken.py").write_text(
        "def run(ctx):\n    raise RuntimeError('boom: deliberately broken bench')\n")
    (bench_dir / "bench_noimport.py").write_text("import a_module_that_does_not_exist\n")
    (bench_dir / "not_a_bench.py").write_text("raise SystemExit('must not be imported')\n")
    return bench_dir


def test_failing_bench_gives_nonzero_exit_but_others_report(toy_benches, tmp_path, device):
    out = tmp_path / "out"
    code, stdout, stderr = _run(["bench", "--bench-dir", str(toy_benches), "--out", str(out),
                                 "--device", device.type])
    assert code == 1
    assert "boom: deliberately broken bench" in stderr  # the traceback is shown
    rows = _rows(out / "results.jsonl")
    assert {(r["bench"], r["impl"]) for r in rows} == {("good", "base"), ("good", "ours")}
    md = (out / "results.md").read_text()
    assert stdout == md
    assert [c[2] for c in _table_rows(md, "toy")] == ["base", "ours"]
    failed = md.split("## Failed benches", 1)[1]
    assert "`broken`" in failed and "RuntimeError" in failed
    assert "`noimport`" in failed and "ModuleNotFoundError" in failed
    assert (out / "results.png").read_bytes().startswith(PNG_MAGIC)


def test_results_jsonl_is_appended(toy_benches, tmp_path, device):
    out = tmp_path / "out"
    argv = ["bench", "--bench-dir", str(toy_benches), "--ops", "good", "--out", str(out),
            "--device", device.type]
    assert _run(argv)[0] == 0
    assert _run(argv)[0] == 0
    rows = _rows(out / "results.jsonl")
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 2


def test_rows_are_written_after_each_bench(toy_benches, tmp_path):
    """A run killed mid-way (gpu_check.sh's stage timeout) keeps the benches it finished."""
    (toy_benches / "bench_killed.py").write_text(
        "import os\ndef run(ctx):\n    os._exit(9)  # like SIGKILL: no cleanup runs\n")
    out = tmp_path / "out"
    code = "import sys; from regdrop_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "bench", "--bench-dir", str(toy_benches), "--ops", "good",
         "killed", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert {r["impl"] for r in _rows(out / "results.jsonl")} == {"base", "ours"}
    assert [c[2] for c in _table_rows((out / "results.md").read_text(), "toy")] == [
        "base", "ours"]


def test_unknown_op_is_an_argument_error(toy_benches, tmp_path):
    code, _, stderr = _run(["bench", "--bench-dir", str(toy_benches), "--ops", "good", "nope",
                            "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    assert "nope" in stderr and "good" in stderr
    assert not (tmp_path / "out").exists()


def test_missing_bench_dir_is_a_clear_error(tmp_path):
    code, _, stderr = _run(["bench", "--bench-dir", str(tmp_path / "absent"), "--out",
                            str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and "absent" in stderr and "not found" in stderr


def test_benches_ship_in_the_package():
    from setuptools import find_packages

    from regdrop_fast.benchmarking.runner import packaged_benches

    benches = packaged_benches()
    assert {"philox", "masks", "rdrop", "addrop", "childtuning", "sparse"} <= set(benches)
    assert benches["philox"] == "regdrop_fast.benchmarking.ops.philox"
    # setup.py's package list (a non-editable install copies exactly these)
    assert "regdrop_fast.benchmarking.ops" in find_packages(
        str(REPO), include=["regdrop_fast", "regdrop_fast.*"])


def test_bench_runs_from_any_directory(tmp_path):
    """No source tree needed: the CLI in a fresh process, from an empty working directory."""
    proc = subprocess.run([sys.executable, "-m", "regdrop_fast", "bench", "--quick", "--ops",
                           "philox", "--device", "cpu", "--out", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## philox_keep_mask" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    code, _, stderr = _run(["bench", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert code == 2 and "CUDA" in stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_script_is_valid_bash():
    script = REPO / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr.lower()


def test_markdown_of_a_cuda_run_shows_both_times_roofline_and_missing_backends():
    # the CUDA-only parts of the report, from a synthetic run (no GPU needed)
    from regdrop_fast.benchmarking import roofline_share
    from regdrop_fast.benchmarking.report import add_speedups, markdown
    from regdrop_fast.benchmarking.runner import RunResult

    env = {"device_name": "Some GPU", "torch_version": "2.x", "triton_version": "3.x",
           "python_version": "3.12", "cuda_version": "12.8", "timestamp": "t", "quick": False,
           "copy_gbps": 1000.0, "mm_tflops": 800.0,
           "unavailable_backends": {"cuda": "built without CUDA kernels"}}
    common = {"op": "toy", "case": "n=8", "dtype": "bool", "baseline": "base",
              "device": "cuda", "p20_ms": None, "p80_ms": None}
    rows = [dict(common, impl="base", ms=2.0, graph_ms=1.5, host_ms=0.5, gbps=250.0,
                 peak_mem_bytes=3 * 2 ** 20),
            dict(common, impl="ours", ms=0.5, graph_ms=0.5, host_ms=0.0, gbps=500.0,
                 tflops=200.0, peak_mem_bytes=2 ** 20)]
    for row in rows:
        row["roofline_share"], row["roofline_of"] = roofline_share(row, 1000.0, 800.0)
    assert (rows[0]["roofline_share"], rows[1]["roofline_share"]) == (0.25, 0.25)
    assert (rows[0]["roofline_of"], rows[1]["roofline_of"]) == ("copy", "mm")  # FLOPs first
    add_speedups(rows)
    md = markdown(RunResult(env=env, rows=rows, benches=["toy"]), "cuda")
    assert "NOT performance" not in md
    assert "`cuda`: built without CUDA kernels" in md
    assert "GB/s (% of copy)" in md and "800 TFLOP/s" in md
    table = _table_rows(md, "toy")
    assert table[1][2:] == ["ours", "0.5", "0.5", "0", "4x vs base", "500 (50%)", "25% of mm",
                            "1.0 MiB", ""]
    assert table[0][3:10] == ["2", "1.5", "0.5", "baseline", "250 (25%)", "25% of copy",
                              "3.0 MiB"]


def test_graph_time_and_host_overhead_on_cuda_only(device):
    from regdrop_fast.benchmarking import BenchContext
    from regdrop_fast.benchmarking.report import markdown
    from regdrop_fast.benchmarking.runner import RunResult, environment

    ctx = BenchContext(device=device)
    timing = ctx.measure(lambda: torch.ones(8, device=device) + 1, warmup=1, repeat=3)
    # CUDA graphs exist on CUDA only: a CPU measurement has no graph time, no host overhead
    assert ("graph_ms" in timing) == ("host_ms" in timing) == (device.type == "cuda")
    ctx.record(op="toy", impl="base", baseline="base", case="c", dtype="float32", ms=2.0,
               note="first note")
    ctx.record(op="toy", impl="ours", baseline="base", case="c", dtype="float32", ms=1.0)
    result = RunResult(env=environment(torch.device("cpu"), quick=True), benches=["toy"],
                       rows=ctx.rows)
    md = markdown(result, "cpu")
    rows = _table_rows(md, "toy")
    assert rows[0][-1] == "first note" and rows[1][-1] == ""
    assert "graph ms" not in md and "roofline" not in md  # CPU: no ceilings measured


def test_measure_rounds_alternates_order_and_pairs_each_round(monkeypatch):
    """Scripted timings: the baseline drifts up to 4x between rounds and "ours" takes 0.9 of
    the baseline's time in most rounds: the median per-round speedup is 1/0.9, where the ratio
    of the two medians (2.0 / 1.6) would say 1.25."""
    from regdrop_fast.benchmarking import BenchContext

    ctx = BenchContext(device=torch.device("cpu"))
    calls = []
    drift = [1.0, 2.0, 1.0, 2.0, 4.0]
    ours = [0.9, 0.8, 0.9, 0.9, 1.0]  # share of the baseline's time, per round

    def scripted(fn, **timing):
        assert timing == {"warmup": 1, "repeat": 2}
        name = fn()
        calls.append(name)
        r = sum(1 for c in calls if c == name) - 1  # the round of this call
        ms = drift[r] * (ours[r] if name == "ours" else 1.0 if name == "base" else 3.0)
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_bytes": 7}

    monkeypatch.setattr(ctx, "measure", scripted)
    fns = {"base": lambda: "base", "ours": lambda: "ours", "slow": lambda: "slow"}
    timings = ctx.measure_rounds(fns, baseline="base", rounds=5, warmup=1, repeat=2)
    assert calls[:6] == ["base", "ours", "slow", "slow", "ours", "base"]  # order alternates
    assert timings["ours"]["paired_speedup"] == pytest.approx(1 / 0.9)
    # ratios sorted: 1.0, 1/0.9 (3x), 1/0.8; p80 lies 0.2 of the way from the 4th to the 5th
    assert timings["ours"]["paired_p80"] == pytest.approx(1 / 0.9 + 0.2 * (1 / 0.8 - 1 / 0.9))
    assert timings["slow"]["paired_speedup"] == pytest.approx(1 / 3)
    assert timings["base"]["paired_speedup"] == pytest.approx(1.0)
    assert timings["ours"]["ms"] == pytest.approx(1.6)  # median of 0.9, 1.6, 0.9, 1.8, 4.0
    assert timings["base"]["ms"] == pytest.approx(2.0)
    assert timings["ours"]["rounds"] == 5 and timings["ours"]["peak_mem_bytes"] == 7
    with pytest.raises(ValueError, match="baseline"):
        ctx.measure_rounds(fns, baseline="nope", rounds=2)
    with pytest.raises(ValueError, match="rounds"):
        ctx.measure_rounds(fns, baseline="base", rounds=0)


def test_host_overhead_bench_times_every_public_op_without_a_gpu(tmp_path):
    code, _, stderr = _run(["bench", "--quick", "--ops", "host_overhead", "--device", "cpu",
                            "--out", str(tmp_path)])
    assert code == 0, stderr
    rows = {r["impl"]: r for r in _rows(tmp_path / "results.jsonl")}
    for name in ("bernoulli_keep", "pack_mask", "rdrop_loss fwd", "masked_attention fwd+bwd",
                 "masked_linear fwd+bwd", "ChildTuningAdamW.step F (201 tensors)"):
        assert rows[name]["op"] == "host_overhead" and rows[name]["ms"] > 0
    torch_step = "torch AdamW(fused=True).step (201 tensors)"
    assert rows["ChildTuningAdamW.step D (201 tensors)"]["baseline"] == torch_step
    assert rows["pack_mask"]["baseline"] == "pack_mask"
    floor = rows["torch autograd floor: masked_attention fwd+bwd"]
    assert floor["ms"] > 0 and "above the autograd floor" in rows["masked_attention fwd+bwd"][
        "note"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("mode, stages", [
    (["--playbook"], ["env", "liger", "build", "pytest_cuda", "autotune", "bench", "goals"]),
    (["--remeasure", "rdrop childtuning"], ["env", "liger", "build", "bench", "goals"])])
def test_gpu_playbook_dry_run_runs_its_stages_in_order_and_prints_the_goals(tmp_path, mode,
                                                                         stages):
    script = REPO / "benchmarks" / "gpu_check.sh"
    # a large budget: the stage caps scale with it, and a loaded CI machine imports torch slowly
    proc = subprocess.run(["bash", str(script), str(tmp_path), *mode, "--dry-run", "--budget",
                           "3000"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary[:-1]] == stages
    assert all(" ok " in line for line in summary[:-1]), summary
    assert summary[-1] == "dry run: nothing copied to benchmarks/results/"
    from regdrop_fast.benchmarking.goals import GOALS

    table = (tmp_path / "goals.md").read_text().splitlines()[2:]
    assert len(table) == len(GOALS)
    # the synthetic rows: R-Drop at 70% of copy (goal 80%) and 2x Liger (goal 1.5x)
    assert any("80% of copy" in line and line.endswith("| **NOT met** |") for line in table)
    assert any("Liger" in line and line.endswith("| met |") for line in table)
    assert "==== performance goals ====" in proc.stdout


def test_sparse_train_step_bench_rows_pair_with_the_issue_18_goals():
    """The sparse bench's training-step rows (CPU, quick): one per setup on the same case, the
    mask-training rows carrying one bf16 copy of the masked matrices as their memory allowance;
    the issue-18 goals select the BERT-base case only, so a tiny CPU case stays unmeasured."""
    from regdrop_fast.benchmarking import BenchContext, goals
    from regdrop_fast.benchmarking.ops import sparse as sparse_bench
    from regdrop_fast.benchmarking.ops._models import random_bert
    from regdrop_fast.sparse import MaskTrainer, masked_modules

    ctx = BenchContext(device=torch.device("cpu"), quick=True)
    sparse_bench.bench_train_step(ctx)
    impls = [r["impl"] for r in ctx.rows]
    assert impls == ["dense step (AdamW)", "mask training (fwd+bwd+AdamW on scores)",
                     "mask training, deferred STE (defer_ste_grad=True)",
                     "mask training, unfused (torch AdamW on dScore)",
                     "mask training + φ reset every step (MaskTrainer default interval=1)",
                     "IMP fixed masks (MaskedAdamW)"]
    assert {(r["op"], r["case"], r["dtype"], r["baseline"]) for r in ctx.rows} == {
        ("sparse_train_step", "tiny L=16,B=2", "float32", "dense step (AdamW)")}
    assert all(r["ms"] > 0 and r["peak_total_bytes"] is None for r in ctx.rows)
    model = random_bert(torch.device("cpu"), small=True)
    MaskTrainer(model, 0.7)
    allowance = 2 * sum(m.weight.numel() for m in masked_modules(model).values())
    assert [r.get("peak_allowance_bytes") for r in ctx.rows] == [None] + [allowance] * 4 + [
        None]
    issue18 = [g for g in goals.GOALS if g.issue == 18]
    assert len(issue18) == 3
    assert all(goals.evaluate(g, ctx.rows)["met"] is None for g in issue18)
    assert sparse_bench._ours(torch.device("cpu")) == [None, "reference"]
