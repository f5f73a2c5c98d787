"""Test configuration: the Triton interpreter for CPU tensors, markers, device selection.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any
test module imports regdrop_fast's kernels. Set REGDROP_TEST_DEVICE=cuda (gpu_check.sh does)
to run the whole suite on CUDA tensors."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("REGDROP_TEST_DEVICE") == "cuda"
                      else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from regdrop_fast import backends  # noqa: E402

# The shared helpers assert like the tests do: rewrite their asserts for pytest's messages
# (register before the first import of utils).
pytest.register_assert_rewrite("utils")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long sweeps, excluded from `make test` by -m")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "the same logic runs on CPU through the interpreter/C++ tests")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Device of the tensors under test: cpu (interpreter + C++), or cuda in gpu_check.sh."""
    return torch.device(os.environ.get("REGDROP_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def kernel_backends(device):
    """Non-reference backends that can run tensors of `device` here (triton, cpu, cuda)."""
    return [name for name in backends.available(device) if name != "reference"]


# Opt-in: REGDROP_AOT_RECORD=path.jsonl records every Triton launch of this run for the sm_90
# compile check (tools/triton_aot/run.sh); nothing changes without the variable.
if os.environ.get("REGDROP_AOT_RECORD"):
    import importlib.util  # noqa: E402
    import sys  # noqa: E402

    _aot_spec = importlib.util.spec_from_file_location(
        "regdrop_triton_aot_record",
        os.path.join(os.path.dirname(__file__), os.pardir, "tools", "triton_aot", "record.py"))
    _aot_record = sys.modules[_aot_spec.name] = importlib.util.module_from_spec(_aot_spec)
    _aot_spec.loader.exec_module(_aot_record)
    _aot_record.install(os.environ["REGDROP_AOT_RECORD"])
