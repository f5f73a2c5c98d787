"""Autotune sweep of the Triton kernels at the GPU benchmarks' main shapes (gpu_check.sh
--playbook): calls each public op once (forward + backward) on CUDA at those shapes, so every
autotuned kernel (triton.autotune, pruned config lists in triton_kernels/) tunes for them,
then writes the winning config per kernel and key, with its time when Triton kept it:

    python benchmarks/autotune_sweep.py OUTDIR     -> OUTDIR/autotune.jsonl, OUTDIR/autotune.md

Kernels with a fixed launch config (no autotuner) are listed as such. An op that fails is
reported and the sweep goes on; exit status 1 if any failed.
"""
import json
import sys
import traceback
from pathlib import Path

import torch


def _calls(device):
    """(name, fn) of public-op calls at the benchmarks' main shapes (bf16)."""
    from regdrop_fast import addrop, pack_mask, rdrop_loss
    from regdrop_fast.sparse import masked_linear

    bf16 = dict(device=device, dtype=torch.bfloat16)

    def attention(batch, heads, length, d):
        q, k, v = (torch.randn(batch, heads, length, d, **bf16, requires_grad=True)
                   for _ in range(3))
        pad = torch.ones(batch, length, dtype=torch.bool, device=device)
        keep = addrop.keep_mask(torch.randn(batch, heads, length, length, device=device), 0.3,
                                0.2, key_padding_mask=pad, seed=1)
        addrop.masked_attention(q, k, v, keep, attn_mask=pad, dropout_p=0.1).sum().backward()

    def linear(tokens, n, k):
        x = torch.randn(tokens, k, **bf16, requires_grad=True)
        w = torch.randn(n, k, **bf16, requires_grad=True)
        mask = pack_mask(torch.rand(n, k, device=device) < 0.3)
        masked_linear(x, w, mask, backend="triton").sum().backward()

    def rdrop(n, v):
        z1, z2 = (torch.randn(n, v, **bf16, requires_grad=True) for _ in range(2))
        labels = torch.randint(0, v, (n,), device=device)
        rdrop_loss(z1, z2, labels).backward()

    calls = [(f"masked_attention L={n}", lambda n=n: attention(16384 // n, 12, n, 64))
             for n in (512, 1024, 2048, 4096)]
    calls.append(("masked_attention L=2048 d=128", lambda: attention(8, 32, 2048, 128)))
    calls += [(f"masked_linear {n}x{k}", lambda n=n, k=k: linear(16384, n, k))
              for n, k in ((768, 768), (3072, 768), (768, 3072), (4096, 1024), (1024, 4096))]
    calls += [(f"rdrop_loss V={v}", lambda v=v: rdrop(8192, v))
              for v in (2, 32000, 50265, 128256, 151936)]
    return calls


def _tuners():
    """{module.name: Autotuner} and [module.name] of fixed-config @triton.jit *_kernel."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    package = importlib.import_module("regdrop_fast.triton_kernels")
    tuners, fixed, tuned_fns = {}, [], set()
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                tuners[f"{info.name}.{name}"] = obj
                tuned_fns.add(id(obj.fn))
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") \
                    and id(obj) not in tuned_fns and obj.fn.__module__ == info.name:
                fixed.append(f"{info.name}.{name}")
    return tuners, fixed


def main(argv):
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1])
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("autotune sweep: no CUDA device", file=sys.stderr)
        return 1
    failed = 0
    for name, call in _calls(torch.device("cuda")):
        try:
            call()
            torch.cuda.synchronize()
            print(f"ok   {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=-3)}", flush=True)
        torch.cuda.empty_cache()
    tuners, fixed = _tuners()
    rows = []
    for name, tuner in tuners.items():
        timings = getattr(tuner, "configs_timings", None) or {}
        for key, config in getattr(tuner, "cache", {}).items():
            ms = timings.get(config)
            rows.append({"kernel": name, "key": [str(k) for k in key], "config": str(config),
                         "ms": ms[0] if isinstance(ms, (list, tuple)) else ms,
                         "configs_tried": len(tuner.configs)})
    with open(out / "autotune.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = ["## Autotune sweep (winning config per kernel and key)", "",
             "| kernel | key | winning config | ms | configs |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ms = "n/a" if r["ms"] is None else f"{r['ms']:.4g}"
        lines.append(f"| {r['kernel']} | {', '.join(r['key'])} | {r['config']} | {ms} | "
                     f"{r['configs_tried']} |")
    lines += ["", "Fixed launch config (no autotuner): " + (", ".join(fixed) or "none"), ""]
    (out / "autotune.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
