"""Does each raw extension op (torch.ops.regdrop_fast.*) raise a Python exception for a bad
argument, or does it crash the process?

On the H200 run of 2026-11-26 (benchmarks/results/nvidia-h200-2026-11-26.md) two such calls on
CUDA tensors crashed their pytest worker with SIGSEGV, while the same C++ checks raise cleanly
on CPU. Each case here runs in its own subprocess (with --batch: the cases one after another in
one subprocess, a fresh one after a crash), so a crash is reported (with its signal) instead of
ending the probe. Each case also runs with C++ stack traces on
(TORCH_SHOW_CPP_STACKTRACES=1), which changes what the c10::Error constructor does at the
throw, and a control case checks that a C++ error of torch itself raises on the same device.

    python tools/op_error_probe.py [--device cpu cuda] [--no-stacktrace-variant] [--jobs N]
                                   [--batch]

Prints one line per case and variant; exit status 1 if any case crashed, raised nothing, or
raised an error that does not name the bad argument.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys

# name -> (statement, text the error must contain: the argument it names); `op` is
# torch.ops.regdrop_fast, `d` the device, `adamw(...)` calls op.masked_adamw_ on one 40-element
# float32 tensor with valid arguments except those given as keywords (see RUNNER)
CASES = {
    "control: torch's own C++ error": ("torch.zeros(2, device=d).view(3)", "shape"),
    "philox_words: float index": ("op.philox_words(torch.arange(8.0, device=d), 0, 0, 0, 0)",
                                  "index"),
    "philox_words: seed_lo < 0": ("op.philox_words(torch.arange(8, device=d), -1, 0, 0, 0)",
                                  "seed_lo"),
    "philox_words: stream >= 2^32": (
        "op.philox_words(torch.arange(8, device=d), 0, 0, 0, 2**32)", "stream"),
    "philox_keep_: int32 out": (
        "op.philox_keep_(torch.zeros(8, dtype=torch.int32, device=d), 0, 0, 0, 0, 0, 1)", "out"),
    "philox_keep_: negative offset": (
        "op.philox_keep_(torch.zeros(8, dtype=torch.bool, device=d), -64, 0, 0, 0, 0, 1)",
        "offset"),
    "philox_keep_: offset + numel overflows": (
        "op.philox_keep_(torch.zeros(8, dtype=torch.bool, device=d), 2**63 - 5, 0, 0, 0, 0, 1)",
        "offset"),
    "philox_keep_: non-contiguous out": (
        "op.philox_keep_(torch.zeros(8, 2, dtype=torch.bool, device=d).t(), 0, 0, 0, 0, 0, 1)",
        "contiguous"),
    "philox_keep_: threshold > 2^32": (
        "op.philox_keep_(torch.zeros(8, dtype=torch.bool, device=d), 0, 0, 0, 0, 0, 2**32 + 1)",
        "threshold"),
    "pack_mask: uint8 mask": ("op.pack_mask(torch.zeros(2, 3, dtype=torch.uint8, device=d))",
                              "mask"),
    "pack_mask: 1-d mask": ("op.pack_mask(torch.zeros(6, dtype=torch.bool, device=d))", "mask"),
    "unpack_mask: int64 words": (
        "op.unpack_mask(torch.zeros(2, 1, dtype=torch.int64, device=d), 5)", "words"),
    "unpack_mask: negative n": (
        "op.unpack_mask(torch.zeros(2, 0, dtype=torch.int32, device=d), -1)", "n must"),
    "unpack_mask: too few words for n": (
        "op.unpack_mask(torch.zeros(2, 1, dtype=torch.int32, device=d), 33)", "words"),
    "mask_popcount: float words": ("op.mask_popcount(torch.zeros(2, device=d))", "words"),
    "masked_adamw_: grads list too short": ("adamw(grads=[])", "grads"),
    "masked_adamw_: steps list too long": ("adamw(steps=[1, 1])", "steps"),
    "masked_adamw_: bits, offset -64 (C1)": ("adamw(kinds=[2], offsets=[-64])", "index_offsets"),
    "masked_adamw_: bits, offset -2^40 (C1)": ("adamw(kinds=[2], offsets=[-2**40])",
                                               "index_offsets"),
    "masked_adamw_: bits, offset + numel overflows (C1)": (
        "adamw(kinds=[2], offsets=[2**63 - 8])", "index_offsets"),
    "masked_adamw_: philox, empty mask, offset -1 (C2)": (
        "adamw(kinds=[1], offsets=[-1], masks=[torch.zeros(0, dtype=torch.int32, device=d)])",
        "index_offsets"),
    "masked_adamw_: bits, bits up to 2^63 - 1": (
        "adamw(kinds=[2], offsets=[2**63 - 41])", "masks"),
    "masked_adamw_: bits, empty mask words": (
        "adamw(kinds=[2], masks=[torch.zeros(0, dtype=torch.int32, device=d)])", "masks"),
    "masked_adamw_: bits, words past the offset too few": (
        "adamw(kinds=[2], offsets=[64])", "masks"),
    "masked_adamw_: bits, int64 words": (
        "adamw(kinds=[2], masks=[torch.zeros(2, dtype=torch.int64, device=d)])", "masks"),
    "masked_adamw_: mask kind 3": ("adamw(kinds=[3])", "mask_kinds"),
    "masked_adamw_: exp_avg too short": (
        "adamw(exp_avgs=[torch.zeros(5, device=d)])", "exp_avgs"),
    "masked_adamw_: float64 exp_avg_sq": (
        "adamw(exp_avg_sqs=[torch.zeros(40, dtype=torch.float64, device=d)])", "exp_avg_sqs"),
    "masked_adamw_: grad of another dtype": (
        "adamw(grads=[torch.zeros(40, dtype=torch.float16, device=d)])", "grads"),
    "masked_adamw_: non-contiguous param": (
        "adamw(params=[torch.zeros(40, 2, device=d).t()[0]])", "params"),
    "masked_adamw_: int32 params": (
        "adamw(params=[torch.zeros(40, dtype=torch.int32, device=d)])", "params"),
    "masked_adamw_: step < 0": ("adamw(steps=[-1])", "steps"),
    "masked_adamw_: stream >= 2^32": ("adamw(streams=[2**32])", "streams"),
    "masked_adamw_: seed_hi >= 2^32": ("adamw(seed_hi=2**32)", "seed_hi"),
    "masked_adamw_: reserve_p 0": ("adamw(kinds=[1], reserve_p=0.0)", "reserve_p"),
    "masked_adamw_: reserve_p nan": ("adamw(kinds=[1], reserve_p=float('nan'))", "reserve_p"),
    "masked_adamw_: action 3": ("adamw(action=3)", "action"),
    "masked_adamw_capturable_: steps list too short": ("adamw_capturable(steps=[])", "steps"),
    "masked_adamw_capturable_: two-element step": (
        "adamw_capturable(steps=[torch.ones(2, device=d)])", "steps"),
    "masked_adamw_capturable_: two-element lr": (
        "adamw_capturable(lr=torch.ones(2, device=d))", "lr"),
    "masked_adamw_capturable_: bits, negative offset": (
        "adamw_capturable(kinds=[2], offsets=[-64])", "index_offsets"),
}

RUNNER = """
import json
import sys
import torch
from regdrop_fast import backends
backends.extension()
op = torch.ops.regdrop_fast
d = torch.device(sys.argv[1])


def adamw(params=None, grads=None, exp_avgs=None, exp_avg_sqs=None, masks=None, kinds=(0,),
          steps=(1,), offsets=(0,), streams=(0,), seed_hi=0, reserve_p=1.0, action=0):
    def fresh():
        return [torch.zeros(40, device=d)]
    op.masked_adamw_(params or fresh(), fresh() if grads is None else grads,
                     exp_avgs or fresh(), exp_avg_sqs or fresh(),
                     masks or [torch.full((2,), -1, dtype=torch.int32, device=d)], list(kinds),
                     list(steps), list(offsets), list(streams), [1e-3], [1.0], 0.9, 0.999, 1e-8,
                     0.0, 0, seed_hi, reserve_p, action, True)


def adamw_capturable(steps=None, lr=None, kinds=(0,), offsets=(0,)):
    def fresh():
        return [torch.zeros(40, device=d)]
    op.masked_adamw_capturable_(
        fresh(), fresh(), fresh(), fresh(), [torch.full((2,), -1, dtype=torch.int32, device=d)],
        list(kinds), [torch.ones((), device=d)] if steps is None else steps, list(offsets), [0],
        torch.full((), 1e-3, device=d) if lr is None else lr, 0.9, 0.999, 1e-8, 0.0, 0, 0, 1.0,
        0, True)


for i, statement in enumerate(json.loads(sys.argv[2])):
    print(f"case {i}", flush=True)
    try:
        exec(statement)
    except Exception as exc:
        print(f"result {i} raised " + type(exc).__name__ + ": "
              + " ".join(str(exc).split())[:200], flush=True)
    else:
        print(f"result {i} raised nothing", flush=True)
"""


def run_cases(cases, device: str, stacktraces: bool, timeout: float = 300.0):
    """[(ok, description)] of (statement, must_name) cases run in order in one interpreter;
    ok when the statement raised a Python exception whose message contains must_name. A case
    that kills the interpreter is reported with its signal and the rest go on in a fresh one."""
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1" if stacktraces else "0")
    results = []
    while len(results) < len(cases):
        rest = cases[len(results):]
        proc = subprocess.run([sys.executable, "-c", RUNNER, device,
                               json.dumps([statement for statement, _ in rest])],
                              env=env, capture_output=True, text=True, timeout=timeout)
        texts = {}
        for line in proc.stdout.splitlines():
            if line.startswith("result "):
                index, text = line[len("result "):].split(" ", 1)
                texts[int(index)] = text
        for i, (_, must_name) in enumerate(rest):
            if i not in texts:
                break
            text = texts[i]
            if text == "raised nothing":
                results.append((False, text))
            elif must_name not in text:
                results.append((False, f"the error does not name {must_name!r}: {text}"))
            else:
                results.append((True, text))
        else:
            continue
        tail = proc.stderr.strip()[-300:]
        if proc.returncode < 0:
            why = f"CRASHED ({signal.Signals(-proc.returncode).name})"
        else:
            why = f"the interpreter exited with status {proc.returncode} and no result"
        results.append((False, f"{why}; stderr tail: {tail!r}"))
    return results


def run_case(statement: str, device: str, stacktraces: bool, must_name: str = ""):
    """(ok, description) of one case in a fresh interpreter."""
    return run_cases([(statement, must_name)], device, stacktraces)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", nargs="+", default=["cpu"], choices=("cpu", "cuda"))
    parser.add_argument("--no-stacktrace-variant", action="store_true",
                        help="skip the TORCH_SHOW_CPP_STACKTRACES=1 run of each case")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="interpreters run at once")
    parser.add_argument("--batch", action="store_true",
                        help="run the cases of a device one after another in one interpreter "
                             "(a fresh one after a crash) instead of one interpreter per case")
    args = parser.parse_args(argv)
    variants = [False] if args.no_stacktrace_variant else [False, True]
    import torch  # only to see whether a CUDA device exists: the cases run in subprocesses

    devices = []
    for device in dict.fromkeys(args.device):
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped, no CUDA device here (torch.cuda.is_available() is False)")
        else:
            devices.append(device)
    names = list(CASES)
    if args.batch:
        groups = [(device, stacktraces, names) for device in devices for stacktraces in variants]
    else:
        groups = [(device, stacktraces, [name]) for device in devices
                  for name in names for stacktraces in variants]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = pool.map(lambda g: run_cases([CASES[n] for n in g[2]], g[0], g[1]), groups)
        runs = [((device, name, stacktraces), result) for (device, stacktraces, group), results
                in zip(groups, outcomes) for name, result in zip(group, results)]
    failed = 0
    for (device, name, stacktraces), (ok, text) in runs:
        failed += not ok
        label = f"{device:4s} {name}" + (" [cpp stacktraces]" if stacktraces else "")
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {text}", flush=True)
    print(f"op error probe: {failed} case(s) crashed or raised nothing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
