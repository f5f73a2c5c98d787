"""tools/op_error_probe.py: every raw extension op, given hostile arguments (negative and
overflowing offsets, short lists, short mask words, wrong dtypes, devices and layouts, keys out of
range), raises a Python exception naming the bad argument, each case in its own process so a
crash is a reported signal, never the end of the test run; on CPU here, on CUDA where there is
a GPU (the first H200 run crashed there with SIGSEGV)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from regdrop_fast import backends

PROBE = Path(__file__).resolve().parents[1] / "tools" / "op_error_probe.py"


@pytest.fixture(scope="module")
def probe():
    reason = backends.unavailable_reason("cpu", "cpu")
    if reason is not None:
        pytest.skip(reason)
    spec = importlib.util.spec_from_file_location("op_error_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_every_case_raises(probe, capsys, device):
    assert probe.main(["--device", device, "--no-stacktrace-variant", "--batch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(f"ok   {device}") for line in lines) == len(probe.CASES)
    ops = {name.split(":")[0] for name in probe.CASES} - {"control"}
    # every raw op the extension registers (a C++ CPU kernel; the Python custom op rdrop_loss
    # shares the namespace but has none) has hostile cases, a new op included
    backends.extension()
    registered = {name.split("::")[1].split(".")[0] for name in
                  torch._C._dispatch_get_all_op_names() if name.startswith("regdrop_fast::")
                  and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")}
    assert ops == registered
    for op in ops:
        assert any(op in line and "raised" in line for line in lines)
    # a check rejects with the Python type of the mistake, not a bare RuntimeError
    assert not any("raised RuntimeError" in line for line in lines if "control" not in line)


def test_every_op_raises_on_cpu(probe, capsys):
    _assert_every_case_raises(probe, capsys, "cpu")


@pytest.mark.cuda
def test_every_op_raises_on_cuda(probe, capsys):
    reason = backends.unavailable_reason("cuda", "cuda")
    if reason is not None:
        pytest.skip(reason)
    _assert_every_case_raises(probe, capsys, "cuda")


def test_a_crash_or_an_unnamed_argument_is_reported_not_fatal(probe):
    ok, text = probe.run_case("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "cpu",
                              stacktraces=False)
    assert not ok and "CRASHED (SIGSEGV)" in text
    ok, text = probe.run_case("x = 1", "cpu", stacktraces=False)
    assert not ok and text == "raised nothing"
    ok, text = probe.run_case("adamw(steps=[-1])", "cpu", stacktraces=False, must_name="seed_lo")
    assert not ok and "does not name 'seed_lo'" in text
    ok, text = probe.run_case("adamw()", "cpu", stacktraces=False)
    assert not ok and text == "raised nothing"  # the valid call of the harness runs


def test_batched_cases_go_on_after_a_crash(probe):
    results = probe.run_cases([("int('x')", "invalid literal"),
                               ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", ""),
                               ("adamw(action=3)", "action")], "cpu", stacktraces=False)
    assert [ok for ok, _ in results] == [True, False, True]
    assert "CRASHED (SIGSEGV)" in results[1][1]
