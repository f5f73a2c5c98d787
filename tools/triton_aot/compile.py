"""Compile every recorded Triton launch for an H100 (sm_90) without a GPU.

    python tools/triton_aot/compile.py launches.jsonl [more.jsonl ...] [--jobs 2]
        [--specializations all|main] [--autotune none|one|all] [--expect-kernels PACKAGE]
        [--gpu-records gpu.jsonl ...] [--allowlist tools/triton_aot/allowlist.py]

Reads the JSON lines that tools/triton_aot/record.py wrote during an interpreter test run,
imports each kernel with TRITON_INTERPRET unset (so the module attribute is a real
JITFunction) and builds each distinct specialization with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32), options=...)`: the front
end, the Hopper TTGIR/LLVM passes and the wheel's bundled ptxas. A kernel wrapped by an
autotuner in its module is also compiled with each of the autotuner's configs (the GPU path's
block sizes, warps and stages, which interpreter runs never launch): every GPU launch of it
(--gpu-records) at each config, a test's launch per --autotune.

Prints one line per kernel and specialization, then its registers, stack frame, spill stores
(from `ptxas -v`; every kernel is recompiled, not taken from Triton's cache, so the log exists),
shared memory and, for a kernel with a `tl.dot`, whether its PTX uses wgmma: OK; FAIL (the
compiler rejects it, or its shared memory exceeds sm_90's 227 KiB); WARN (an autotune config
over that limit, which the autotuner skips, or with --expect-kernels a kernel no test
launched); SKIP (a kernel defined inside a function). Then a table of every specialization and
the performance rules of policy.py: a bf16/fp16 specialization a GPU launches (from
--gpu-records, or an autotune config) fails on a spill or a dot without wgmma, unless the
allowlist names it with a reason; allowlist entries that match nothing are listed (no failure).
Exit status 1 on any FAIL, else 0; also 0, with a SKIP message, when the triton wheel has no
NVIDIA backend or ptxas (--check-backend then exits 3). At most 2 worker processes.
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import sys
import io
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# Do not let this script's own folder shadow modules named like its siblings.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
HERE = os.path.dirname(os.path.abspath(__file__))

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
TARGET = ("cuda", 90, 32)
MAX_JOBS = 2
NO_BACKEND_EXIT = 3  # --check-backend's status when there is no NVIDIA backend or ptxas


def _use_real_compiler():
    """Environment of a GPU compile; must run before this process first imports triton."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1; run this as a script")
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton 3.9 warns once per process that its fp-fusion default will change; the check
    # compiles with the installed triton's default, as a GPU launch would.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def backend_unavailable_reason():
    """None when this triton can compile for sm_90 here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if "nvidia" not in backends:
        return f"this triton wheel has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(TARGET[1])
        except TypeError:  # older triton: get_ptxas() takes no arch
            tool = get_ptxas()
        path = tool.path if hasattr(tool, "path") else tool[0]
    except Exception as exc:
        return f"no usable ptxas in the triton wheel ({type(exc).__name__}: {exc})"
    if not path or not os.path.exists(path):
        return f"ptxas not found (looked for {path!r})"
    return None


def load_entries(paths):
    """Unique records, in first-seen order."""
    seen, entries = set(), []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and line not in seen:
                    seen.add(line)
                    entries.append(json.loads(line))
    return entries


_MODULES: dict = {}


def import_module(entry):
    """The kernel's module, imported by name, else from the recorded file path."""
    name = entry["module"]
    if name in _MODULES:
        return _MODULES[name]
    try:
        module = importlib.import_module(name)
    except ImportError:
        path = entry.get("file")
        if not path or not os.path.exists(path):
            raise
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    _MODULES[name] = module
    return module


def unwrap_jit(obj):
    """The JITFunction under autotune/heuristics wrappers, or None."""
    from triton.runtime.jit import JITFunction

    while obj is not None and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj


def resolve_kernel(entry):
    if "<locals>" in entry["qualname"]:
        raise LookupError("defined inside a function: not importable (move it to module level)")
    obj = import_module(entry)
    for part in entry["qualname"].split("."):
        obj = getattr(obj, part)
    kernel = unwrap_jit(obj)
    if kernel is None:
        raise LookupError(f"{entry['module']}.{entry['qualname']} is a {type(obj).__name__}, "
                          "not a @triton.jit function, outside the interpreter")
    return kernel


def decode_value(value):
    """Inverse of record.encode_value."""
    import triton.language as tl

    if isinstance(value, dict):
        if "dtype" in value:
            return getattr(tl, value["dtype"]) if hasattr(tl, value["dtype"]) \
                else tl.dtype(value["dtype"])
        if "tuple" in value:
            return tuple(decode_value(v) for v in value["tuple"])
        if "jit" in value:
            module, qualname = value["jit"].split(":")
            return resolve_kernel({"module": module, "qualname": qualname})
    return value


def _general_key(entry):
    """(group key, rank): the entry's kernel, types, declared constexprs and options, with
    Triton's value specializations (ints equal to 1 made constexpr 1, divisibility-by-16
    attrs) taken out; rank orders a group's members from the most general (fewest ints fixed
    to 1, then most divisibility hints, as aligned tensors give)."""
    try:
        if "unsupported" in entry:
            raise LookupError(entry["unsupported"])
        kernel = resolve_kernel(entry)
    except Exception:  # cannot be compiled: one SKIP/FAIL line per kernel is enough
        return json.dumps([entry["module"], entry["qualname"], entry.get("unsupported")]), (0, 0)
    declared = {p.name for p in kernel.params if p.is_constexpr}
    sig, ones = {}, 0
    for arg, ty in entry["signature"].items():
        if arg not in declared and ty == "constexpr" and entry["constexprs"][arg] == 1:
            ty, ones = "i32", ones + 1
        sig[arg] = ty
    key = json.dumps([entry["module"], entry["qualname"], sig,
                      {a: v for a, v in entry["constexprs"].items() if a in declared},
                      entry["options"]], sort_keys=True)
    return key, (ones, -len(entry["attrs"]))


def main_specializations(entries):
    """One entry per kernel, pointer/int types, declared constexprs and launch options: the
    most general of the launches that differ only in Triton's value specializations."""
    best, gpu = {}, set()
    for entry in entries:
        key, rank = _general_key(entry)
        if entry.get("gpu"):
            gpu.add(key)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, entry)
    return [dict(entry, gpu=True) if key in gpu else entry for key, (_, entry) in best.items()]


def autotune_variants(entry):
    """`entry` with each config of every autotuner in its module that wraps the same kernel."""
    from triton.runtime.autotuner import Autotuner

    try:
        kernel = resolve_kernel(entry)
        module = import_module(entry)
    except Exception:
        return []
    variants = []
    for obj in vars(module).values():
        if not isinstance(obj, Autotuner) or unwrap_jit(obj) is not kernel:
            continue
        for config in obj.configs:
            v = json.loads(json.dumps(entry))
            for key, value in config.kwargs.items():
                if key in v["signature"]:
                    v["signature"][key] = "constexpr"
                    v["constexprs"][key] = value
                    v["attrs"].pop(key, None)
            for key in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
                value = getattr(config, key, None)
                if value is not None:
                    v["options"][key] = value
            v["origin"] = "autotune config"
            v["gpu"] = True  # an autotuner's configs are what a GPU launch picks from
            variants.append(v)
    return variants


def _launch_key(entry):
    """What makes two records the same compile: everything but how they were found."""
    return json.dumps({k: x for k, x in entry.items() if k not in ("origin", "gpu", "tested")},
                      sort_keys=True)


def gpu_launch_variants(entries):
    """`entries` with each GPU launch (gpu: True) of an autotuned kernel replaced by one launch
    per config of its autotuner, imported as a GPU imports it: those configs are all a GPU
    launches, and a dry run under the interpreter may record other tiles (a config list made
    for the interpreter, or a launcher's CPU branch). Duplicates merge; a merged record is a
    GPU launch if any of its sources is. A launch a test made too stays, as a CPU launch."""
    merged = {}
    for entry in entries:
        variants = (autotune_variants(entry) if entry.get("gpu") and "unsupported" not in entry
                    else [])
        if variants and not entry.get("tested"):
            found = variants
        elif variants:
            found = [dict(entry, gpu=False), *variants]
        else:
            found = [entry]
        for e in found:
            key = _launch_key(e)
            if key in merged:
                merged[key]["gpu"] = bool(merged[key].get("gpu") or e.get("gpu"))
            else:
                merged[key] = e
    return [{k: x for k, x in e.items() if k != "tested"} for e in merged.values()]


def unlaunched_kernels(package, entries):
    """`module.name` of each @triton.jit `*_kernel` defined in `package`'s modules that no
    record launches (helpers called from kernels are not named *_kernel)."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(package)
    launched = {(e["module"], e["qualname"]) for e in entries}
    missing = []
    for info in pkgutil.iter_modules(pkg.__path__, package + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == info.name and (info.name, name) not in launched):
                missing.append(f"{info.name}.{name}")
    return missing


def label(entry):
    """Short name of a specialization: pointer dtypes, constexprs, launch options."""
    sig = entry.get("signature", {})
    ptrs = sorted({t for t in sig.values() if t.startswith("*")})
    consts = ", ".join(f"{k}={entry['constexprs'][k]}" for k in sorted(entry.get("constexprs", {})))
    opts = " ".join(f"{k}={v}" for k, v in sorted(entry.get("options", {}).items()))
    origin = f" [{entry['origin']}]" if entry.get("origin") else ""
    return (f"{entry['module']}.{entry['qualname']}({'/'.join(ptrs)}; {consts}; {opts})"
            f"{origin}")


def _load_sibling(name):
    spec = importlib.util.spec_from_file_location(f"regdrop_triton_aot_{name}",
                                                  os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


policy = _load_sibling("policy")


def _result(entry, status, detail, **facts):
    """compile_entry's answer: the status line and the facts policy.py judges."""
    sig = entry.get("signature", {})
    return {"status": status, "label": label(entry), "detail": detail,
            "module": entry.get("module"), "qualname": entry.get("qualname"),
            "constexprs": entry.get("constexprs", {}), "options": entry.get("options", {}),
            "ptrs": sorted({t for t in sig.values() if t.startswith("*")}),
            "gpu": bool(entry.get("gpu")), **facts}


def _compile_with_usage(src, options):
    """(compiled kernel, ptxas usage). The usage of a kernel Triton took from its cache (no
    ptxas run, no log) comes from a side file written when it was built; else it is rebuilt."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    for always in (False, True):
        knobs.compilation.always_compile = always
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget(*TARGET), options=options)
        side = os.path.join(knobs.cache.dir, "regdrop_aot_ptxas", f"{compiled.hash}.json")
        usage = policy.parse_ptxas_log(log.getvalue())
        if usage["spill_stores"] is not None:
            os.makedirs(os.path.dirname(side), exist_ok=True)
            with open(side, "w", encoding="utf-8") as f:
                json.dump(usage, f)
            return compiled, usage
        if os.path.exists(side):
            with open(side, encoding="utf-8") as f:
                return compiled, json.load(f)
    return compiled, usage


def compile_entry(entry):
    """The result dict (see policy.py) of one specialization."""
    from triton import knobs
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    if "unsupported" in entry:
        return _result(entry, "FAIL", f"launch could not be recorded: {entry['unsupported']}")
    start = time.time()
    knobs.nvidia.dump_ptxas_log = True  # printed to stdout by the compile that runs ptxas
    try:
        kernel = resolve_kernel(entry)
    except LookupError as exc:
        return _result(entry, "SKIP", str(exc))
    changed = sorted(set(kernel.arg_names) ^ set(entry["signature"]))
    if changed:  # the kernel was edited after the launch was recorded
        return _result(entry, "FAIL", f"the recorded launch does not match the kernel's "
                       f"current arguments (differ: {', '.join(changed)}): record it again")
    try:
        signature = {arg: entry["signature"][arg] for arg in kernel.arg_names}
        constexprs = {arg: decode_value(v) for arg, v in entry["constexprs"].items()}
        attrs = {(kernel.arg_names.index(arg),): BaseBackend.parse_attr(a)
                 for arg, a in entry["attrs"].items()}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled, usage = _compile_with_usage(src, dict(entry["options"]))
    except Exception as exc:
        return _result(entry, "FAIL", _short_error(exc))
    shared = getattr(compiled.metadata, "shared", 0) or 0
    dot = "tt.dot" in compiled.asm.get("ttir", "")
    wgmma = "wgmma.mma_async" in compiled.asm.get("ptx", "")
    facts = dict(usage, smem=shared, dot=dot, wgmma=wgmma)
    info = [f"{time.time() - start:.1f}s", f"smem={shared}B", f"regs={usage['regs']}",
            f"stack={usage['stack']}B", f"spill_stores={usage['spill_stores']}B"]
    if dot:
        info.append("dot=wgmma" if wgmma else "dot=mma.sync (no wgmma)")
    if shared > SM90_MAX_SHARED:
        # a launch would raise OutOfResources; an autotuner skips such a config instead
        status = "WARN" if entry.get("origin") == "autotune config" else "FAIL"
        return _result(entry, status,
                       f"needs {shared} B of shared memory, sm_90 has {SM90_MAX_SHARED}"
                       f"{' (the autotuner skips this config)' if status == 'WARN' else ''}"
                       f"; {' '.join(info)}", **facts)
    return _result(entry, "OK", " ".join(info), **facts)


def _cell(value):
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_table(results, judged) -> None:
    """One row per compiled specialization (# = its position in the lines above)."""
    head = ("#", "kernel", "pointers", "warps", "stages", "regs", "spill", "stack", "smem",
            "dot", "wgmma", "gpu", "verdict")
    rows = []
    for i, r in enumerate(results, 1):
        if r["status"] not in ("OK", "WARN"):
            continue
        opts = r["options"]
        rows.append((str(i), r["qualname"], "/".join(p[1:] for p in r["ptrs"]),
                     _cell(opts.get("num_warps")), _cell(opts.get("num_stages")),
                     _cell(r.get("regs")), _cell(r.get("spill_stores")), _cell(r.get("stack")),
                     _cell(r.get("smem")), _cell(r.get("dot")),
                     _cell(r.get("wgmma")) if r.get("dot") else "-", _cell(r["gpu"]),
                     policy.verdict(r, judged)))
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    print("sm_90 resources (spill/stack/smem in bytes; gpu: launched by a GPU; verdict: the "
          "bf16/fp16 GPU rules of policy.py)")
    for row in [head, *rows]:
        print("  " + " ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r, problem, reason in judged["allowed"]:
        print(f"ALLOWED {problem}: {r['label']}\n      {reason}")
    for entry in judged["stale"]:
        print(f"NOTE allowlist entry matches nothing in this run (fixed? remove it): {entry}")
    for r, problem in judged["violations"]:
        print(f"FAIL {problem}: {r['label']}\n      {r['detail']}\n      fix it, or add an "
              f"entry with a reason to {os.path.join(HERE, 'allowlist.py')}")


def load_allowlist(path):
    spec = importlib.util.spec_from_file_location("regdrop_triton_aot_allowlist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ALLOWLIST


def _short_error(exc, max_lines=25):
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = text.splitlines()
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n      ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="*", help="JSON-lines files written by record.py")
    parser.add_argument("--check-backend", action="store_true",
                        help="only check that this triton can compile for sm_90: exit 0 if so, "
                             f"else print why and exit {NO_BACKEND_EXIT}")
    parser.add_argument("--jobs", type=int, default=MAX_JOBS,
                        help=f"worker processes (1..{MAX_JOBS})")
    parser.add_argument("--specializations", choices=("all", "main"), default="all",
                        help="all: every recorded specialization; main: one per kernel, types, "
                             "constexprs and options (launches differing only in Triton's "
                             "divisibility-by-16 and ==1 value specializations compile once)")
    parser.add_argument("--expect-kernels", metavar="PACKAGE",
                        help="also list (as WARN) each @triton.jit *_kernel of PACKAGE's modules "
                             "that no recorded launch covers")
    # one file per flag: a list-taking option would swallow the positional records after it,
    # which would then all count as GPU launches
    parser.add_argument("--gpu-records", action="append", default=[], metavar="JSONL",
                        help="launches a GPU makes (gpu_launches.py): their bf16/fp16 "
                             "specializations are held to the performance rules (repeatable)")
    parser.add_argument("--allowlist", default=os.path.join(HERE, "allowlist.py"),
                        help="Python file defining ALLOWLIST (default: %(default)s)")
    parser.add_argument("--autotune", choices=("none", "one", "all"), default="one",
                        help="also compile the configs of an autotuner wrapping a kernel: on "
                             "one recorded specialization per kernel (default), on every one, "
                             "or none")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    _use_real_compiler()

    reason = backend_unavailable_reason()
    if reason is not None:
        print(f"SKIP triton sm_90 compile check: {reason}")
        return NO_BACKEND_EXIT if args.check_backend else 0
    if args.check_backend:
        return 0
    if not args.records and not args.gpu_records:
        parser.error("give the JSON-lines files that record.py wrote")
    allowlist = load_allowlist(args.allowlist)
    policy.check_allowlist(allowlist)
    entries = [dict(e, tested=True) for e in load_entries(args.records)]
    seen = {_launch_key(e) for e in entries}
    gpu_lines = {_launch_key(e) for e in load_entries(args.gpu_records)}
    for entry in entries:
        if _launch_key(entry) in gpu_lines:
            entry["gpu"] = True
    entries += [dict(json.loads(line), gpu=True) for line in sorted(gpu_lines - seen)]
    entries = gpu_launch_variants(entries)
    if not entries:
        print(f"FAIL no kernel launches recorded in {', '.join(args.records)}")
        return 1
    if args.specializations == "main":
        entries = main_specializations(entries)
    if args.autotune != "none":
        seen = {_launch_key(e) for e in entries}
        # "one": the most general recorded specialization of each kernel, except a kernel
        # with GPU records: gpu_launch_variants already compiles those at every config of its
        # autotuner, at the shapes a GPU launches; a test's launch expanded too would be
        # judged as a GPU launch at the test's odd shapes
        on_gpu = ({(e["module"], e["qualname"]) for e in entries if e.get("gpu")}
                  if args.autotune == "one" else set())
        candidates = sorted((e for e in entries if "unsupported" not in e
                             and (e["module"], e["qualname"]) not in on_gpu),
                            key=lambda e: _general_key(e)[1])
        expanded = set()
        for entry in candidates:
            kernel = (entry["module"], entry["qualname"])
            if args.autotune == "one" and kernel in expanded:
                continue
            variants = autotune_variants(entry)
            if variants:
                expanded.add(kernel)
            for v in variants:
                key = _launch_key(v)
                if key not in seen:
                    seen.add(key)
                    entries.append(v)
    jobs = max(1, min(args.jobs, MAX_JOBS))
    start = time.time()
    counts = {"OK": 0, "WARN": 0, "FAIL": 0, "SKIP": 0}
    if args.expect_kernels:
        for name in unlaunched_kernels(args.expect_kernels, entries):
            counts["WARN"] += 1
            print(f"WARN {name}\n      no test launched it: not compiled", flush=True)
    # fork: the workers inherit the imported triton and kernel modules (no CUDA state exists)
    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context("fork")) as pool:
        results = []
        for i, r in enumerate(pool.map(compile_entry, entries), 1):
            counts[r["status"]] += 1
            results.append(r)
            print(f"{r['status']:4} #{i} {r['label']}\n      {r['detail']}", flush=True)
    judged = policy.judge([r for r in results if r["status"] in ("OK", "WARN")], allowlist)
    print_table(results, judged)
    print(f"sm_90 compile check: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL, "
          f"{counts['SKIP']} SKIP; {len(judged['violations'])} performance violation(s), "
          f"{len(judged['allowed'])} allowed, {len(judged['stale'])} stale allowlist entries "
          f"({len(entries)} specializations, {time.time() - start:.0f}s, {jobs} jobs)")
    return 1 if counts["FAIL"] or judged["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
