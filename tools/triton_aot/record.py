"""Record every Triton kernel launch made under the interpreter, for an sm_90 compile check.

The interpreter (TRITON_INTERPRET=1) accepts code that the real compiler rejects, so CPU CI
alone cannot tell that a kernel builds for a GPU. `install(path)` wraps
`InterpretedFunction.run` (the target of `kernel[grid](...)` and of autotuner launches) and
appends one JSON line per distinct specialization to `path` (launches on meta-device tensors
are recorded without running: see install and gpu_launches.py):

    {"module", "qualname", "file",            where the real JITFunction lives
     "signature": {arg: "*bf16" | "i32" | "constexpr" | ...},
     "constexprs": {arg: encoded value},      constexpr args and Triton's own specializations
     "attrs": {arg: "D"},                     Triton's divisibility-by-16 hints
     "options": {"num_warps": 8, ...},        launch options (num_warps, num_stages, maxnreg...)
     "unsupported": reason}                   only for launches compile.py cannot rebuild

Signatures come from the same binder the real JITFunction uses (Triton's
`create_function_from_signature` + `native_specialize_impl`), so ints equal to 1 become
constexpr 1, ints are i32/i64 by range, bool tensors `*u1`, floats fp32, None constexpr.
tools/triton_aot/compile.py compiles the file for GPUTarget("cuda", 90, 32).
Enabled in tests by REGDROP_AOT_RECORD=path.jsonl (see the end of tests/conftest.py).
"""
import inspect
import json
import os
import threading

_LOCK = threading.Lock()
_SINKS: dict = {}  # path -> JSON lines already written there by this process
_ORIGINAL_RUN = []


def encode_value(value):
    """JSON form of a constexpr value; compile.py's decode_value inverts it.
    Raises TypeError for values with no portable form."""
    import triton.language as tl

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.constexpr):
        return encode_value(value.value)
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if isinstance(value, (tuple, list)):
        return {"tuple": [encode_value(v) for v in value]}
    fn = getattr(value, "fn", None)
    if callable(fn) and hasattr(value, "run"):  # a @triton.jit function passed as constexpr
        return {"jit": f"{fn.__module__}:{fn.__qualname__}"}
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}")


def _binder(interp_fn):
    """Triton's own argument binder for this kernel (cached on the InterpretedFunction)."""
    binder = interp_fn.__dict__.get("_regdrop_aot_binder")
    if binder is None:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import KernelParam, create_function_from_signature

        sig = inspect.signature(interp_fn.fn)
        dns = interp_fn.kwargs.get("do_not_specialize") or []
        dns_oa = interp_fn.kwargs.get("do_not_specialize_on_alignment") or []
        params = [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
                  for i, p in enumerate(sig.parameters.values())]
        binder = create_function_from_signature(sig, params, BaseBackend)
        interp_fn.__dict__["_regdrop_aot_binder"] = binder
    return binder


def describe_launch(interp_fn, args, kwargs) -> dict:
    """The record (see the module docstring) of `interp_fn[grid](*args, **kwargs)`."""
    fn = interp_fn.fn
    entry = {"module": fn.__module__, "qualname": fn.__qualname__,
             "file": os.path.abspath(inspect.getsourcefile(fn) or "")}
    try:
        bound, specialization, options = _binder(interp_fn)(*args, **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for (name, value), spec in zip(bound.items(), specialization):
            if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)):
                raise TypeError(f"argument {name!r}: tuple arguments are not recorded")
            ty, attr = spec
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = encode_value(value)
            elif isinstance(attr, str) and attr:
                attrs[name] = attr
        entry.update(signature=signature, constexprs=constexprs, attrs=attrs,
                     options={k: encode_value(v) for k, v in sorted(options.items())})
    except Exception as exc:  # recorded, and reported by compile.py, never breaks the test run
        entry["unsupported"] = f"{type(exc).__name__}: {exc}"
    return entry


def record_launch(interp_fn, args, kwargs) -> None:
    if not _SINKS:
        return
    line = json.dumps(describe_launch(interp_fn, args, kwargs), sort_keys=True)
    with _LOCK:
        for path, seen in _SINKS.items():
            if line not in seen:
                seen.add(line)
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")


def _on_meta(args, kwargs) -> bool:
    return any(getattr(getattr(a, "device", None), "type", None) == "meta"
               for a in (*args, *kwargs.values()))


def install(path: str) -> None:
    """Also record interpreter launches into `path` (appended, deduplicated per process).
    Several paths may record at once (a test's own file inside a recorded test run).

    A launch with a tensor on the meta device is a dry run: recorded, not executed. A
    launcher then takes its GPU branch (it sees device.type != "cpu"), which records the tile
    sizes a GPU would compile; an autotuned launch records each of its configs."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    with _LOCK:
        _SINKS.setdefault(os.path.abspath(path), set())
    if _ORIGINAL_RUN:
        return
    original_run, original_tuned = InterpretedFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            record_launch(self, args, kwargs)
        if _on_meta(args, kwargs):
            return None
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def tuned_run(self, *args, **kwargs):
        if not _on_meta(args, kwargs):
            return original_tuned(self, *args, **kwargs)
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        return None

    _ORIGINAL_RUN.extend([original_run, original_tuned])
    InterpretedFunction.run, Autotuner.run = run, tuned_run


def uninstall(path: str) -> None:
    """Stop recording into `path`; the last one out restores the wrapped methods."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    with _LOCK:
        _SINKS.pop(os.path.abspath(path), None)
        if not _SINKS and _ORIGINAL_RUN:
            InterpretedFunction.run, Autotuner.run = _ORIGINAL_RUN
            _ORIGINAL_RUN.clear()
