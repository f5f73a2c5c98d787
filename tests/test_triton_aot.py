"""tools/triton_aot: interpreter launches are recorded with Triton's own specialization, and
compile.py builds them for sm_90 in a fresh process, reporting kernels the real compiler
rejects even though the interpreter ran them."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TOOLS = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "triton_aot")
KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, alpha, big, opt_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if opt_ptr is not None:
            x += tl.load(opt_ptr + offs, mask=valid, other=0).to(tl.float32)
        y = x * alpha + (big >> 40).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
        b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
        tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))

    # An annotated module global is a plain int at run time: the interpreter reads it, the
    # compiler only accepts globals that are tl.constexpr objects.
    LIMIT: tl.constexpr = 3

    @triton.jit
    def annotated_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, offs * LIMIT, mask=offs < n)
''')


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_module():
    # the name tests/conftest.py uses, so a recorded test run and this test share one hook
    return _load("regdrop_triton_aot_record", os.path.join(TOOLS, "record.py"))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Run the demo kernels under the interpreter with the recorder on: (records path,
    list of records, kernel module)."""
    from triton.runtime.interpreter import InterpretedFunction

    folder = tmp_path_factory.mktemp("aot")
    (folder / "regdrop_aot_demo_kernels.py").write_text(KERNELS)
    kernels = _load("regdrop_aot_demo_kernels", str(folder / "regdrop_aot_demo_kernels.py"))
    if not isinstance(kernels.scale_kernel, InterpretedFunction):
        pytest.skip("the recorder records interpreter launches (TRITON_INTERPRET=1)")
    path = folder / "launches.jsonl"
    record = _record_module()
    record.install(str(path))
    try:
        x = torch.arange(40, dtype=torch.float32)
        y = torch.empty(40, dtype=torch.bfloat16)
        for _ in range(2):  # the same specialization twice: one record
            kernels.scale_kernel[(1,)](x, y, 40, 0.5, 3 << 40, None, BLOCK=64, num_warps=2)
        kernels.scale_kernel[(1,)](x, y, 1, 0.5, 3 << 40, None, BLOCK=64, num_warps=2)
        kernels.scale_kernel[(1,)](x, y, 1, 0.5, 0, torch.ones(40, dtype=torch.bool), BLOCK=64)
        torch.testing.assert_close(y[:1].float(), torch.tensor([0.5]))  # (0 + True) * 0.5
        torch.testing.assert_close(y[1:].float(), x[1:] * 0.5 + 3, rtol=1e-2, atol=0)
        a = torch.randn(16, 16).to(torch.bfloat16)
        kernels.dot_kernel[(1,)](a, a, torch.empty(16, 16), BLOCK=16, num_warps=4, num_stages=2)
        out = torch.zeros(8, dtype=torch.int32)
        kernels.annotated_global_kernel[(1,)](out, 8, BLOCK=8)
        assert out.tolist() == [3 * i for i in range(8)]  # the interpreter accepts it
    finally:
        record.uninstall(str(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return path, records, kernels


def test_meta_launches_are_recorded_not_run(launches, tmp_path):
    """A meta-device launch (gpu_launches.py's dry run) is recorded without running, and an
    autotuned one records each config."""
    import triton

    kernels = launches[2]
    tuned = triton.autotune([triton.Config({"BLOCK": 32}, num_warps=1),
                             triton.Config({"BLOCK": 128}, num_warps=4, num_stages=2)],
                            key=["n"])(kernels.scale_kernel)
    path = tmp_path / "meta.jsonl"
    record = _record_module()
    record.install(str(path))
    try:
        x = torch.empty(4096, dtype=torch.float16, device="meta")
        kernels.scale_kernel[(64,)](x, x, 4096, 2.0, 0, None, BLOCK=64)
        tuned[(1,)](x, x, 4096, 2.0, 0, None)
    finally:
        record.uninstall(str(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["constexprs"]["BLOCK"] for r in records] == [64, 32, 128]
    assert all(r["signature"]["x_ptr"] == "*fp16" and r["attrs"]["x_ptr"] == "D"
               for r in records)
    assert records[2]["options"] == {"num_ctas": 1, "num_stages": 2, "num_warps": 4}


def _by_kernel(records, name):
    return [r for r in records if r["qualname"] == name]


def test_records_triton_specialization_of_each_launch(launches):
    _, records, _ = launches
    scale = _by_kernel(records, "scale_kernel")
    assert len(scale) == 3 and len(records) == 5
    first = scale[0]
    assert first["module"] == "regdrop_aot_demo_kernels"
    assert first["signature"] == {"x_ptr": "*fp32", "y_ptr": "*bf16", "n": "i32", "alpha": "fp32",
                                  "big": "i64", "opt_ptr": "constexpr", "BLOCK": "constexpr"}
    assert first["constexprs"] == {"opt_ptr": None, "BLOCK": 64}
    assert first["options"] == {"num_warps": 2}
    assert first["attrs"]["big"] == "D" and "n" not in first["attrs"]  # 40 % 16 != 0
    # Triton turns an int equal to 1 into constexpr 1 and passes a bool tensor as *u1
    assert scale[1]["signature"]["n"] == "constexpr" and scale[1]["constexprs"]["n"] == 1
    assert scale[2]["signature"]["opt_ptr"] == "*u1" and scale[2]["signature"]["big"] == "i32"
    dot = _by_kernel(records, "dot_kernel")[0]
    assert dot["signature"]["a_ptr"] == "*bf16" and dot["signature"]["c_ptr"] == "*fp32"
    assert dot["options"] == {"num_stages": 2, "num_warps": 4}


def _compile(path, *flags):
    """compile.py over the recorded launches, in a fresh process: (exit status, output)."""
    compiler = _load("regdrop_triton_aot_compile", os.path.join(TOOLS, "compile.py"))
    reason = compiler.backend_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no sm_90 compile here: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "compile.py"), *flags, str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled(launches):
    return _compile(launches[0])


def _status_lines(output, kernel):
    return [line.split()[0] for line in output.splitlines()
            if line.split() and line.split()[0] in ("OK", "FAIL", "SKIP")
            and f"regdrop_aot_demo_kernels.{kernel}(" in line]


def test_recorded_kernels_compile_for_sm90(compiled):
    _, output = compiled
    assert _status_lines(output, "scale_kernel") == ["OK", "OK", "OK"], output
    assert "BLOCK=64, n=1, opt_ptr=None;" in output
    assert _status_lines(output, "dot_kernel") == ["OK"], output  # bf16 tl.dot, 2 stages
    assert "regs=" in output and "stack=" in output


def test_kernel_the_compiler_rejects_is_reported(compiled):
    status, output = compiled
    assert _status_lines(output, "annotated_global_kernel") == ["FAIL"], output
    assert "LIMIT" in output
    assert status == 1
    assert "4 OK, 0 WARN, 1 FAIL" in output


def test_main_specializations_merge_triton_value_specializations(launches):
    """--specializations main compiles n=40 and n=1 (constexpr 1) once, the general one."""
    status, output = _compile(launches[0], "--specializations", "main")
    assert status == 1 and _status_lines(output, "scale_kernel") == ["OK", "OK"], output
    assert "BLOCK=64, n=1, opt_ptr=None;" not in output
    assert "3 OK, 0 WARN, 1 FAIL" in output


def _policy():
    return _load("regdrop_triton_aot_policy", os.path.join(TOOLS, "policy.py"))


def _result(qualname, ptrs=("*bf16",), gpu=True, spill=0, dot=False, wgmma=False, **constexprs):
    return {"qualname": qualname, "ptrs": list(ptrs), "gpu": gpu, "spill_stores": spill,
            "dot": dot, "wgmma": wgmma, "constexprs": constexprs, "label": qualname}


def test_ptxas_log_gives_registers_stack_and_spills():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    152 bytes stack frame, 148 bytes spill stores, 140 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 152 bytes cumulative stack size")
    assert _policy().parse_ptxas_log(log) == {"stack": 152, "spill_stores": 148,
                                              "spill_loads": 140, "regs": 255}
    assert _policy().parse_ptxas_log("")["spill_stores"] is None


def test_policy_fails_half_gpu_spills_and_dots_without_wgmma_unless_allowlisted():
    policy = _policy()
    spilling = _result("attn_kernel", spill=4, BLOCK_D=128)
    mma_sync = _result("lin_kernel", dot=True, wgmma=False)
    results = [
        spilling, mma_sync,
        _result("attn_kernel", spill=0, dot=True, wgmma=True, BLOCK_D=64),  # fine
        _result("attn_kernel", ptrs=("*fp32",), spill=800, BLOCK_D=128),  # fp32: not checked
        _result("attn_kernel", gpu=False, spill=8, BLOCK_D=128),  # CPU-only tiles: not checked
        _result("lin_kernel", ptrs=("*fp16", "*i32"), dot=True, wgmma=False),
    ]
    judged = policy.judge(results, [])
    assert [(r["qualname"], p) for r, p in judged["violations"]] == [
        ("attn_kernel", "spill"), ("lin_kernel", "no-wgmma"), ("lin_kernel", "no-wgmma")]
    allow = [{"kernel": "attn_kernel", "problem": "spill", "dtype": "bf16",
              "where": {"BLOCK_D": 128}, "reason": "known"},
             {"kernel": "lin_kernel", "problem": "no-wgmma", "dtype": "bf16", "reason": "known"},
             {"kernel": "gone_kernel", "problem": "spill", "reason": "fixed since"}]
    judged = policy.judge(results, allow)
    # the fp16 dot is not covered by the bf16 entry; the entry that matches nothing is stale
    assert [(r["ptrs"], p) for r, p in judged["violations"]] == [(["*fp16", "*i32"],
                                                                  "no-wgmma")]
    assert [(r["qualname"], p, why) for r, p, why in judged["allowed"]] == [
        ("attn_kernel", "spill", "known"), ("lin_kernel", "no-wgmma", "known")]
    assert [e["kernel"] for e in judged["stale"]] == ["gone_kernel"]
    assert policy.verdict(spilling, judged) == "allowed(spill)"
    assert policy.verdict(results[2], judged) == "ok" and policy.verdict(results[3], judged) == "-"
    assert policy.verdict(results[5], judged) == "FAIL(no-wgmma)"


@pytest.mark.parametrize("entry, word", [({"kernel": "k", "problem": "spill"}, "reason"),
                                         ({"kernel": "k", "problem": "slow", "reason": "r"},
                                          "problem"),
                                         ({"kernel": "k", "problem": "spill", "reason": "r",
                                           "dtyp": "bf16"}, "unknown")])
def test_malformed_allowlist_entry_is_rejected(entry, word):
    with pytest.raises(ValueError, match=word):
        _policy().judge([], [entry])


def test_repository_allowlist_is_well_formed():
    allowlist = _load("regdrop_triton_aot_allowlist", os.path.join(TOOLS, "allowlist.py"))
    _policy().check_allowlist(allowlist.ALLOWLIST)
    assert all(e["reason"].strip() for e in allowlist.ALLOWLIST)


def test_gpu_dry_run_covers_the_mask_training_passes(tmp_path, monkeypatch):
    """gpu_launches.py records the default masked linear's elementwise kernels (issue 18) as a
    GPU launches them: bf16 W ⊙ M from fp32 (autocast) and bf16 weights, scores or bits, and
    the STE pass with dScore only (frozen W), both grads, and dW only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after: gpu_launches.py sets it
    gpu_launches = _load("regdrop_triton_aot_gpu_launches", os.path.join(TOOLS,
                                                                         "gpu_launches.py"))
    assert gpu_launches.mask_training in gpu_launches.LAUNCHERS
    out = tmp_path / "gpu.jsonl"
    record = _record_module()
    record.install(str(out))
    try:
        gpu_launches.mask_training()
    finally:
        record.uninstall(str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    mat = _by_kernel(records, "materialize_kernel")
    assert {(r["signature"]["w_ptr"], r["constexprs"]["FROM_SCORES"]) for r in mat} == {
        (w, s) for w in ("*fp32", "*bf16") for s in (True, False)}
    assert {r["signature"]["out_ptr"] for r in mat} == {"*bf16"}
    ste = _by_kernel(records, "ste_grads_kernel")
    assert {(r["constexprs"]["WANT_DSCORE"], r["constexprs"]["WANT_DW"]) for r in ste} == {
        (True, False), (True, True), (False, True)}
    assert {r["signature"]["g_ptr"] for r in ste} == {"*bf16"}


def _gpu_dry_run(tmp_path, monkeypatch, *groups):
    """The records of gpu_launches.py's launcher groups (named), as a GPU would launch them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after: gpu_launches.py sets it
    gpu_launches = _load("regdrop_triton_aot_gpu_launches", os.path.join(TOOLS,
                                                                         "gpu_launches.py"))
    out = tmp_path / "gpu.jsonl"
    record = _record_module()
    record.install(str(out))
    try:
        for group in groups:
            assert getattr(gpu_launches, group) in gpu_launches.LAUNCHERS
            getattr(gpu_launches, group)()
    finally:
        record.uninstall(str(out))
    return [json.loads(line) for line in out.read_text().splitlines()]


def _tile(record):
    c, o = record["constexprs"], record["options"]
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], o["num_warps"],
            o["num_stages"])


def test_gpu_dry_run_records_every_masked_linear_autotune_config(tmp_path, monkeypatch):
    """On meta tensors the masked linear launchers take their GPU branch: each of the three
    GEMM kernels is recorded with every _GPU_CONFIGS tile (never the interpreter's 32-wide
    one), at every flag set of the bench (bias; bits or scores; dScore only, dW only, both)."""
    from regdrop_fast.triton_kernels import masked_linear as K

    records = _gpu_dry_run(tmp_path, monkeypatch, "masked_linear")
    gpu_tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                  c.kwargs["GROUP_M"], c.num_warps, c.num_stages) for c in K._GPU_CONFIGS}
    flags = {"masked_linear_fwd_kernel": ("HAS_BIAS", "FROM_SCORES"),
             "masked_linear_bwd_input_kernel": ("FROM_SCORES",),
             "masked_linear_bwd_weight_kernel": ("FROM_SCORES", "WANT_DSCORE", "WANT_DW")}
    expected_sets = {"masked_linear_fwd_kernel": 4, "masked_linear_bwd_input_kernel": 2,
                     "masked_linear_bwd_weight_kernel": 3}
    for name, names in flags.items():
        found = _by_kernel(records, name)
        by_flags = {}
        for r in found:
            by_flags.setdefault(tuple(r["constexprs"][f] for f in names), set()).add(_tile(r))
        assert len(by_flags) == expected_sets[name], (name, sorted(by_flags))
        assert all(tiles == gpu_tiles for tiles in by_flags.values()), (name, by_flags)
        assert {r["signature"]["w_ptr"] for r in found} == {"*bf16"}


def test_gpu_dry_run_sizes_the_rdrop_grid_for_an_sm90_part(tmp_path, monkeypatch):
    """The R-Drop forward's persistent grid (V over one tile) sets the PROGRAMS_P2 constexpr
    from the device's SM count and L2: the meta dry run uses an H100's, at least one program
    per SM, not the interpreter's 4-SM stand-in."""
    records = _gpu_dry_run(tmp_path, monkeypatch, "rdrop")
    persistent = [r for r in _by_kernel(records, "rdrop_fwd_kernel")
                  if not r["constexprs"]["ONE_BLOCK"]]
    assert persistent and all(r["constexprs"]["PROGRAMS_P2"] >= 132 for r in persistent)


_GPU_CONFIG_SCRIPT = textwrap.dedent('''
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("aot_compile", sys.argv[1])
    compile_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compile_py)
    compile_py._use_real_compiler()
    from triton.runtime.autotuner import Autotuner
    entries = [dict(e, gpu=True) for e in compile_py.load_entries([sys.argv[2]])]
    tuned = {}
    for e in entries:
        module, kernel = compile_py.import_module(e), compile_py.resolve_kernel(e)
        for obj in vars(module).values():
            if isinstance(obj, Autotuner) and compile_py.unwrap_jit(obj) is kernel:
                tuned[e["qualname"]] = [[c.kwargs, c.num_warps, c.num_stages]
                                        for c in obj.configs]
    judged = [[e["qualname"], e["constexprs"], e["options"].get("num_warps"),
               e["options"].get("num_stages")]
              for e in compile_py.gpu_launch_variants(entries) if e["gpu"]]
    print(json.dumps({"tuned": tuned, "judged": judged}))
''')


def test_compile_check_judges_each_autotuned_gpu_launch_at_every_gpu_config(tmp_path):
    """compile.py holds every GPU launch of an autotuned kernel (masked linear, masked
    attention) to the policy at each config of its autotuner as a GPU imports it, whatever
    tile the interpreter-side dry run recorded (masked attention's config list is the
    interpreter's one small tile there), and judges no other tile of it as a GPU launch."""
    out = tmp_path / "gpu.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, os.path.join(TOOLS, "gpu_launches.py"), str(out)],
                   env=env, check=True, capture_output=True, timeout=600)
    env.pop("TRITON_INTERPRET")
    script = tmp_path / "configs.py"
    script.write_text(_GPU_CONFIG_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), os.path.join(TOOLS, "compile.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    tuned = found["tuned"]
    assert {"masked_linear_fwd_kernel", "masked_linear_bwd_input_kernel",
            "masked_linear_bwd_weight_kernel", "masked_attention_fwd_kernel",
            "masked_attention_bwd_dq_kernel", "masked_attention_bwd_dkdv_kernel"} <= set(tuned)
    assert len(tuned["masked_attention_fwd_kernel"]) > 1  # the GPU list, not the interpreter's
    for name, configs in tuned.items():
        keys = set(configs[0][0])
        want = {(json.dumps(kwargs, sort_keys=True), warps, stages)
                for kwargs, warps, stages in configs}
        groups = {}  # the launch's other constexprs -> the tiles judged with them
        for qualname, constexprs, warps, stages in found["judged"]:
            if qualname == name:
                rest = json.dumps({k: v for k, v in constexprs.items() if k not in keys},
                                  sort_keys=True)
                tile = json.dumps({k: constexprs[k] for k in keys}, sort_keys=True)
                groups.setdefault(rest, set()).add((tile, warps, stages))
        assert groups, name
        assert all(tiles == want for tiles in groups.values()), name


def test_policy_judges_a_table_kernel_by_its_dtype_constexpr():
    """A kernel that reads its tensors' addresses from an int64 table (masked_adamw,
    score_adamw) has no bf16 pointer: its tl.dtype constexpr makes it half precision."""
    policy = _policy()
    bf16 = _result("adamw_kernel", ptrs=("*i64", "*fp32"), spill=8, DTYPE={"dtype": "bf16"})
    fp32 = _result("adamw_kernel", ptrs=("*i64", "*fp32"), spill=8, DTYPE={"dtype": "fp32"})
    judged = policy.judge([bf16, fp32], [])
    assert [(r["constexprs"]["DTYPE"]["dtype"], p) for r, p in judged["violations"]] == [
        ("bf16", "spill")]
    allow = [{"kernel": "adamw_kernel", "problem": "spill", "dtype": "bf16", "reason": "known"}]
    assert policy.judge([bf16, fp32], allow)["violations"] == []


def test_gpu_dry_run_covers_the_childtuning_triton_step(tmp_path, monkeypatch):
    """masked_adamw's one launch is dry-run on meta (its host tables made on meta, not in
    pinned memory) at every dtype, action, update order and capturable flag."""
    records = _by_kernel(_gpu_dry_run(tmp_path, monkeypatch, "masked_adamw"),
                         "masked_adamw_multi_kernel")
    found = {(r["constexprs"]["DTYPE"]["dtype"], r["constexprs"]["ACTION"],
              r["constexprs"]["PAPER"], r["constexprs"]["CAPTURABLE"]) for r in records}
    assert found == {(d, a, p, c) for d in ("fp32", "bf16", "fp16") for a in (0, 1, 2)
                     for p in (False, True) for c in (False, True)}


def test_gpu_records_option_leaves_the_test_records_positional():
    # run.sh passes `--gpu-records GPU.jsonl ... TESTS.jsonl`: the test launches must stay
    # records of tests, not become GPU launches judged by the performance rules
    compiler = _load("regdrop_triton_aot_compile", os.path.join(TOOLS, "compile.py"))
    args = compiler.build_parser().parse_args(
        ["--gpu-records", "gpu.jsonl", "--jobs", "2", "tests.jsonl", "more.jsonl"])
    assert args.gpu_records == ["gpu.jsonl"]
    assert args.records == ["tests.jsonl", "more.jsonl"]
    args = compiler.build_parser().parse_args(
        ["--gpu-records", "a.jsonl", "--gpu-records", "b.jsonl", "tests.jsonl"])
    assert args.gpu_records == ["a.jsonl", "b.jsonl"] and args.records == ["tests.jsonl"]
