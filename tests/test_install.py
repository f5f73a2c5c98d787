"""Installation: what each pip command builds, and dependencies that match use.

The install matrix (slow) installs a copy of this source tree into a fresh venv holding only the
torch that runs these tests: the default isolated `pip install` (no extension; the JIT builds
it with `regdrop-fast build-ext`), `--no-build-isolation` (extension built against that torch;
the benchmarks run from the installed package) and `--no-build-isolation` without a working
compiler (installs anyway; the reason is reported). The fast tests check the CUDA-arch rule of
the build, that requirements.txt covers every declared requirement, and that the kernels run
with the Hugging Face extras hidden.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from regdrop_fast import _extension

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
HF_EXTRAS = ("transformers", "accelerate", "safetensors", "tqdm", "matplotlib")


def _fake_torch(cuda_version, gpu):
    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda_version),
                                 cuda=types.SimpleNamespace(is_available=lambda: gpu))


def test_no_cuda_build_without_an_arch_to_target(monkeypatch):
    """torch's arch detection raises IndexError with no GPU and no TORCH_CUDA_ARCH_LIST: the
    build must then stay CPU-only instead of reaching it."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv(_extension.NO_CUDA_ENV, raising=False)
    with_cuda, reason = _extension.cuda_decision(_fake_torch("12.8", gpu=False))
    assert not with_cuda and "TORCH_CUDA_ARCH_LIST" in reason
    assert _extension.cuda_decision(_fake_torch("12.8", gpu=True))[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _extension.cuda_decision(_fake_torch("12.8", gpu=False))[0]
    assert not _extension.cuda_decision(_fake_torch(None, gpu=False))[0]
    monkeypatch.setenv(_extension.NO_CUDA_ENV, "1")
    assert not _extension.cuda_decision(_fake_torch("12.8", gpu=True))[0]
    monkeypatch.delenv(_extension.NO_CUDA_ENV)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert not _extension.cuda_decision(_fake_torch("12.8", gpu=True))[0]
    config = _extension.build_config(str(ROOT / "csrc"))
    assert not config["with_cuda"] and not any(s.endswith(".cu") for s in config["sources"])


def _declared_requirements(tmp_path):
    """(requirements, extras) of setup.py as written now (not as last installed)."""
    env = {**os.environ, "REGDROP_FAST_BUILD_EXT": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "-q", "egg_info",
                           "--egg-base", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    dist = importlib.metadata.PathDistribution(tmp_path / "regdrop_fast.egg-info")
    return dist.requires or [], dist.metadata.get_all("Provides-Extra") or []


def test_requirements_txt_installs_every_declared_requirement(tmp_path):
    """`make` installs requirements.txt, then the package with --no-deps: it must hold the
    package's requirements and all its extras, or `make test` would miss what users get."""
    declared, extras = _declared_requirements(tmp_path)
    name = re.compile(r"^\s*([A-Za-z0-9_.-]+)")
    listed = {name.match(line).group(1).lower() for line in
              (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    wanted = {name.match(req).group(1).lower() for req in declared}
    assert {"torch", "triton", *HF_EXTRAS, "pytest", "hypothesis"} <= wanted
    assert wanted <= listed, f"missing from requirements.txt: {sorted(wanted - listed)}"
    assert {"hf", "test", "all"} <= set(extras)
    # only torch, triton and ninja (the JIT build) come without an extra
    required = {name.match(req).group(1).lower() for req in declared if "extra ==" not in req}
    assert required == {"torch", "triton", "ninja"}, required


def test_kernels_run_without_the_hf_extras(tmp_path):
    """A user who installed only the kernels: transformers & co. cannot be imported."""
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {HF_EXTRAS!r}
        for name in BLOCKED:  # None in sys.modules: imports fail, find_spec says "absent"
            sys.modules[name] = None
        import torch
        import regdrop_fast as rf
        from regdrop_fast import addrop, sparse, cli
        logits1 = torch.randn(4, 5, requires_grad=True)
        loss = rf.rdrop_loss(logits1, torch.randn(4, 5), torch.randint(0, 5, (4,)))
        loss.backward()
        w = torch.nn.Parameter(torch.randn(16, 8))
        w.grad = torch.randn(16, 8)
        rf.ChildTuningAdamW([w], lr=1e-3, mode="F", reserve_p=0.3, seed=0).step()
        scores = torch.randn(2, 2, 6, 6)
        addrop.keep_mask(scores, p=0.3, q=0.2, seed=0)
        out = sparse.masked_linear(torch.randn(3, 8), w, rf.pack_mask(torch.rand(16, 8) > 0.5))
        cli.build_parser()
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
        print("OK", float(loss), tuple(out.shape), loaded)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and proc.stdout.strip().endswith("[]"), proc.stdout


def test_without_extension_or_compiler_the_reason_is_one_line(tmp_path):
    """No installed regdrop_fast._C and no working compiler: the JIT is not attempted blindly,
    the cpu backend says why in one line, and the reference still runs."""
    script = textwrap.dedent("""
        import sys
        sys.modules["regdrop_fast._C"] = None  # as if never built
        import torch
        from regdrop_fast import _extension, backends, rng
        module, error = _extension.load()
        assert module is None
        print("ERROR", error)
        print("CPU", backends.unavailable_reason("cpu", torch.device("cpu")))
        print("AUTO", rng.philox_words(1, torch.arange(4), backend="reference").tolist())
    """)
    env = {**os.environ, "CXX": "/bin/false", "REGDROP_FAST_CACHE_DIR": str(tmp_path / "cache"),
           "REGDROP_FAST_JIT": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = proc.stdout.split("ERROR ", 1)[1].split("\n", 1)[0]
    assert "no working C++ compiler" in error and "regdrop-fast build-ext" in error, error
    assert "no working C++ compiler" in proc.stdout.split("CPU ", 1)[1]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
    env["REGDROP_FAST_JIT"] = "0"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "REGDROP_FAST_JIT=0" in proc.stdout, proc.stderr[-3000:]


def _source_copy(dest: Path) -> Path:
    """The files git would hand a clone (tracked and not ignored), without builds or venvs."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _run(cmd, env, cwd, timeout=1200):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


PROBE = textwrap.dedent("""
    import glob, os, sys, torch, regdrop_fast
    from regdrop_fast import backends, rng
    from regdrop_fast.reference.philox import philox_words as ref
    pkg = os.path.dirname(regdrop_fast.__file__)
    print("FILE", regdrop_fast.__file__)
    print("PREBUILT", bool(glob.glob(os.path.join(pkg, "_C*.so"))))
    print("CSRC", sorted(os.listdir(os.path.join(pkg, "csrc"))))
    reason = backends.unavailable_reason("cpu", torch.device("cpu"))
    print("CPU", reason)
    if reason is None:
        idx = torch.arange(37)
        assert torch.equal(rng.philox_words(5, idx, backend="cpu"), ref(5, idx))
        print("CPU-MATCHES-REFERENCE")
""")


@pytest.mark.slow
def test_install_matrix(tmp_path):
    src = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "REGDROP_FAST_BUILD_EXT", "TRITON_INTERPRET",
                        "REGDROP_FAST_JIT", "CC", "CXX")}
    env["REGDROP_FAST_CACHE_DIR"] = str(tmp_path / "jit-cache")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    rc, out = _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)
    assert rc == 0, out
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip"]
    rc, out = _run([*pip, "install", "-q", TORCH_PIN], env, tmp_path)
    assert rc == 0, out

    def probe(extra_env=None):
        rc, out = _run([py, "-c", PROBE], {**env, **(extra_env or {})}, elsewhere)
        assert rc == 0, out
        assert f"FILE {venv}" in out, out  # the installed copy, not the source tree
        assert "'philox_words.cpp'" in out and "'masks_cuda.cu'" in out, out  # csrc shipped
        return out

    # 1. default flags: isolated build, pure Python + Triton, no extension and no HF extras
    rc, out = _run([*pip, "install", str(src)], env, tmp_path)
    assert rc == 0, out
    assert "torch-" not in out.split("Successfully installed")[-1], out  # torch left as it was
    installed = _run([*pip, "list"], env, tmp_path)[1].lower()
    assert "triton" in installed and "transformers" not in installed, installed
    out = probe({"REGDROP_FAST_JIT": "0"})
    assert "PREBUILT False" in out and "REGDROP_FAST_JIT=0" in out, out
    rc, out = _run([str(venv / "bin" / "regdrop-fast"), "build-ext"], env, elsewhere)
    assert rc == 0 and "extension ready" in out and str(tmp_path / "jit-cache") in out, out
    out = probe()
    assert "CPU-MATCHES-REFERENCE" in out and "compiling" not in out, out  # cached: no rebuild

    # 2. --no-build-isolation: the extension is built against the venv's torch
    assert _run([*pip, "uninstall", "-y", "regdrop_fast"], env, tmp_path)[0] == 0
    rc, out = _run([*pip, "install", "-v", "--no-build-isolation", str(src)], env, tmp_path)
    assert rc == 0, out
    assert f"against torch {torch.__version__}" in out, out
    out = probe({"REGDROP_FAST_JIT": "0"})
    assert "PREBUILT True" in out and "CPU-MATCHES-REFERENCE" in out, out
    # the benchmarks ship with the installed package: no source tree needed
    rc, out = _run([str(venv / "bin" / "regdrop-fast"), "bench", "--quick", "--ops", "philox",
                    "--device", "cpu", "--out", "bench"], env, elsewhere)
    assert rc == 0 and "philox" in (elsewhere / "bench" / "results.md").read_text(), out

    # 3. --no-build-isolation without a working compiler: installs, and says why there is no C++
    assert _run([*pip, "uninstall", "-y", "regdrop_fast"], env, tmp_path)[0] == 0
    no_cc = {**env, "CC": "/bin/false", "CXX": "/bin/false",
             "REGDROP_FAST_CACHE_DIR": str(tmp_path / "empty-cache")}
    rc, out = _run([*pip, "install", "-v", "--no-build-isolation", str(src)], no_cc, tmp_path)
    assert rc == 0, out
    assert "no working C++ compiler" in out, out
    out = probe({"CC": "/bin/false", "CXX": "/bin/false",
                 "REGDROP_FAST_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert "PREBUILT False" in out and "no working C++ compiler" in out, out
    assert "regdrop-fast build-ext" in out, out
