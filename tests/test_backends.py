"""Backend dispatch: argument > REGDROP_FAST_BACKEND > auto, errors that say why, the auto
fallback logged once, and a package that still imports when the C++ extension is missing."""
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

from regdrop_fast import backends, rng
from regdrop_fast.reference.philox import philox_words as ref_words

CPU = torch.device("cpu")


def _auto_cpu_choice():
    return "cpu" if backends.unavailable_reason("cpu", CPU) is None else "reference"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture
def extension_missing(monkeypatch):
    """Make `import regdrop_fast._C` fail as on a machine where it was never built."""
    real_import = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "regdrop_fast._C":
            raise ImportError("No module named 'regdrop_fast._C' (simulated)")
        return real_import(name, *args, **kwargs)

    backends._extension_and_error.cache_clear()
    monkeypatch.setenv("REGDROP_FAST_JIT", "0")  # no JIT build of the missing module either
    monkeypatch.setattr(backends.importlib, "import_module", failing_import)
    monkeypatch.setattr(backends, "_logged_fallbacks", set())
    yield
    monkeypatch.undo()
    backends._extension_and_error.cache_clear()


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")  # unavailable for CPU tensors everywhere
    assert backends.resolve("some_op", "reference", CPU) == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="'cuda' is unavailable"):
        backends.resolve("some_op", None, CPU)


def test_environment_beats_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, " Reference ")
    assert backends.resolve("some_op", None, CPU) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.resolve("some_op", None, CPU) == _auto_cpu_choice()


def test_auto_on_cpu_prefers_the_cpp_kernels(no_env):
    assert backends.resolve("some_op", None, CPU) == _auto_cpu_choice()
    assert backends.resolve("some_op", "auto", CPU) == _auto_cpu_choice()
    assert backends.resolve("some_op", None, CPU, implemented=("reference",)) == "reference"


def test_environment_choice_reaches_the_op(monkeypatch):
    index = torch.arange(2**32, 2**32 + 8)
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        rng.philox_words(3, index)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert torch.equal(rng.philox_words(3, index), ref_words(3, index))


def test_unknown_names_raise_value_error(no_env):
    with pytest.raises(ValueError, match="'fastest'"):
        backends.resolve("some_op", "fastest", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.unavailable_reason("gpu")
    with pytest.raises(ValueError, match="'fastest'"):
        rng.philox_words(0, torch.arange(4), backend="fastest")


def test_named_unavailable_backend_says_why(no_env):
    reason = backends.unavailable_reason("cuda", CPU)
    assert reason  # a CPU tensor can never run on the cuda backend
    with pytest.raises(backends.BackendUnavailableError) as info:
        backends.resolve("philox_words", "cuda", CPU)
    assert "philox_words" in str(info.value) and reason in str(info.value)
    with pytest.raises(backends.BackendUnavailableError, match="unavailable"):
        rng.philox_words(0, torch.arange(4), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without a GPU")
def test_cuda_reason_without_a_gpu():
    reason = backends.unavailable_reason("cuda")
    assert "CUDA" in reason or "cuda" in reason


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if backends._triton_import_error() is not None:
        pytest.skip(f"triton unavailable: {backends._triton_import_error()}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in backends.unavailable_reason("triton", CPU)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        backends.resolve("some_op", "triton", CPU)


def test_op_without_the_backend_raises(no_env):
    with pytest.raises(backends.BackendUnavailableError, match="has no 'triton' backend"):
        backends.resolve("mask_popcount", "triton", CPU, implemented=("reference", "cpu", "cuda"))
    with pytest.raises(backends.BackendUnavailableError, match="no backend can run"):
        backends.resolve("some_op", None, CPU, implemented=("triton",))


def test_available_lists_runnable_backends():
    names = backends.available()
    assert "reference" in names and set(names) <= set(backends.BACKENDS)
    on_cpu = backends.available(CPU)
    assert "reference" in on_cpu and "cuda" not in on_cpu
    for name in backends.BACKENDS:
        assert (name in on_cpu) == (backends.unavailable_reason(name, CPU) is None)


def test_auto_logs_its_fallback_once(no_env, extension_missing, caplog):
    with caplog.at_level(logging.WARNING, logger="regdrop_fast"):
        for _ in range(3):
            assert backends.resolve("fallback_probe_op", None, CPU) == "reference"
    records = [r for r in caplog.records if "fallback_probe_op" in r.getMessage()]
    assert len(records) == 1
    assert "'reference'" in records[0].getMessage() and "cpu:" in records[0].getMessage()


def test_missing_extension_error_says_how_to_build(no_env, extension_missing):
    with pytest.raises(backends.BackendUnavailableError, match="build_ext --inplace"):
        backends.extension()
    for name in ("cpu", "cuda"):
        assert "regdrop_fast._C is not built" in backends.unavailable_reason(name, None)
    assert "cpu" not in backends.available(CPU)
    with pytest.raises(backends.BackendUnavailableError, match="pip install"):
        rng.philox_words(9, torch.arange(8), backend="cpu")
    # auto still works, on the reference
    index = torch.arange(8)
    assert torch.equal(rng.philox_words(9, index), ref_words(9, index))


def test_package_imports_without_the_extension(tmp_path):
    """A fresh interpreter where `regdrop_fast._C` cannot be imported."""
    script = (
        "import sys; sys.modules['regdrop_fast._C'] = None\n"
        "import torch, regdrop_fast\n"
        "from regdrop_fast import backends\n"
        "assert 'cpu' not in backends.available(), backends.available()\n"
        "try:\n"
        "    regdrop_fast.philox_words(1, torch.arange(4), backend='cpu')\n"
        "except backends.BackendUnavailableError as exc:\n"
        "    print('ERROR:', exc)\n"
        "print('AUTO:', regdrop_fast.philox_words(1, torch.arange(4)).tolist())\n"
    )
    env = {**os.environ, "REGDROP_FAST_BACKEND": "auto", "TRITON_INTERPRET": "0",
           "REGDROP_FAST_JIT": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: philox_words: backend 'cpu' is unavailable" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    assert f"AUTO: {ref_words(1, torch.arange(4)).tolist()}" in proc.stdout


def test_every_table_row_names_real_backends():
    for op, info in backends.OPS.items():
        assert info.implemented and set(info.implemented) <= set(backends.BACKENDS), op
        for device_type, order in info.auto.items():
            assert set(order) <= set(backends.BACKENDS), (op, device_type)
        assert set(info.dtypes) <= set(info.implemented), op


def test_dtype_limits_route_auto_and_reject_a_named_backend(no_env, monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: None)
    # float64 is the reference's alone: auto routes it there, naming triton is a TypeError
    # that names the op and the caller's argument
    assert backends.resolve("rdrop_loss", None, CPU, torch.float64) == "reference"
    assert backends.resolve("rdrop_loss", None, torch.device("cuda"), torch.float32) == "triton"
    with pytest.raises(TypeError, match=r"fused_linear_rdrop_loss: hidden1 is torch.float64"):
        backends.resolve("fused_linear_rdrop_loss", "triton", CPU, torch.float64, arg="hidden1")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(TypeError, match=r"named by \$REGDROP_FAST_BACKEND"):
        backends.resolve("rdrop_loss", None, CPU, torch.float64, arg="logits1")


def test_auto_order_is_per_op(no_env, monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device=None: None)
    cuda = torch.device("cuda")
    assert backends.resolve("masked_adamw", None, cuda) == "cuda"
    assert backends.resolve("philox_words", None, cuda) == "triton"
    assert backends.resolve("masked_attention", None, CPU) == "reference"  # no cpu kernel
    # `implemented` narrows the row for one call
    assert backends.resolve("masked_adamw", None, cuda, implemented=("triton",)) == "triton"
