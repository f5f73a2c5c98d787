"""Does each raw extension op (torch.ops.regdrop_fast.*) raise a Python exception for a bad
argument, or does it crash the process?

On the H200 run of 2026-11-26 (benchmarks/results/nvidia-h200-2026-11-26.md) two such calls on
CUDA tensors crashed their pytest worker with SIGSEGV, while the same C++ checks raise cleanly
on CPU. Each case here runs in its own subprocess, so a crash is reported (with its signal)
instead of ending the probe. Each case also runs with C++ stack traces on
(TORCH_SHOW_CPP_STACKTRACES=1), which changes what the c10::Error constructor does at the
throw, and a control case checks that a C++ error of torch itself raises on the same device.

    python tools/op_error_probe.py [--device cpu cuda] [--no-stacktrace-variant] [--jobs N]

Prints one line per case and variant; exit status 1 if any case crashed or raised nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys

# statement per case; `op` is torch.ops.regdrop_fast, `d` the device
CASES = {
    "control: torch's own C++ error": "torch.zeros(2, device=d).view(3)",
    "philox_words: float index": "op.philox_words(torch.arange(8.0, device=d), 0, 0, 0, 0)",
    "philox_words: seed_lo < 0": "op.philox_words(torch.arange(8, device=d), -1, 0, 0, 0)",
    "philox_keep_: int32 out":
        "op.philox_keep_(torch.zeros(8, dtype=torch.int32, device=d), 0, 0, 0, 0, 0, 1)",
    "pack_mask: uint8 mask": "op.pack_mask(torch.zeros(2, 3, dtype=torch.uint8, device=d))",
    "unpack_mask: int64 words":
        "op.unpack_mask(torch.zeros(2, 1, dtype=torch.int64, device=d), 5)",
    "mask_popcount: float words": "op.mask_popcount(torch.zeros(2, device=d))",
    "masked_adamw_: grads list too short":
        "p = [torch.zeros(4, device=d)]; op.masked_adamw_(p, [], p, p, [p[0]], [0], [1], [0], "
        "[0], [1.0], [1.0], 0.9, 0.99, 1e-8, 0.0, 0, 0, 1.0, 0, True)",
}

RUNNER = """
import sys
import torch
from regdrop_fast import backends
backends.extension()
op = torch.ops.regdrop_fast
d = torch.device(sys.argv[1])
try:
    exec(sys.argv[2])
except Exception as exc:
    print("raised " + type(exc).__name__ + ": " + (str(exc).splitlines() or [""])[0][:120])
    sys.exit(0)
print("raised nothing")
sys.exit(3)
"""


def run_case(statement: str, device: str, stacktraces: bool, timeout: float = 120.0):
    """(ok, description) of one case in a fresh interpreter."""
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1" if stacktraces else "0")
    proc = subprocess.run([sys.executable, "-c", RUNNER, device, statement], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return False, f"CRASHED ({name}); stderr tail: {proc.stderr.strip()[-300:]!r}"
    out = proc.stdout.strip().splitlines()
    text = out[-1] if out else f"no output; stderr tail: {proc.stderr.strip()[-300:]!r}"
    return proc.returncode == 0, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", nargs="+", default=["cpu"], choices=("cpu", "cuda"))
    parser.add_argument("--no-stacktrace-variant", action="store_true",
                        help="skip the TORCH_SHOW_CPP_STACKTRACES=1 run of each case")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="cases run at once (each is a fresh interpreter importing torch)")
    args = parser.parse_args(argv)
    variants = [False] if args.no_stacktrace_variant else [False, True]
    import torch  # only to see whether a CUDA device exists: the cases run in subprocesses

    devices = []
    for device in dict.fromkeys(args.device):
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped, no CUDA device here (torch.cuda.is_available() is False)")
        else:
            devices.append(device)
    runs = [(device, name, statement, stacktraces) for device in devices
            for name, statement in CASES.items() for stacktraces in variants]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda r: run_case(r[2], r[0], r[3]), runs))
    failed = 0
    for (device, name, _, stacktraces), (ok, text) in zip(runs, results):
        failed += not ok
        label = f"{device:4s} {name}" + (" [cpp stacktraces]" if stacktraces else "")
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {text}", flush=True)
    print(f"op error probe: {failed} case(s) crashed or raised nothing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
