"""Per-element cost of the CPU masked AdamW op with the tensors in cache: the arithmetic alone.

Calls torch.ops.regdrop_fast.masked_adamw_ directly on one fp32 tensor small enough to stay
in L2/L3 (no memory-bandwidth limit), for each mask kind: unmasked, ChildTuning-F (Philox
keep words made in the kernel) and -D (a packed mask). The cost of one call on a 32-element
tensor (the fixed per-call work) is subtracted. The README's "F mode on one core" paragraph
quotes this: on the CI VM's Zen 4 core F costs about the unmasked step plus the Philox words.

    .venv/bin/python benchmarks/cpu/masked_adamw_in_cache.py [--ghz 3.65] [--threads 1]
"""
import argparse
import time

import torch

from regdrop_fast import backends, pack_mask

KINDS = {"none": 0, "F": 1, "D": 2}  # csrc/masked_adamw.h: kMaskNone, kMaskPhilox, kMaskBits


def seconds_per_call(n: int, kind: int, reps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    p, g, m, v = (torch.rand(n, generator=gen) for _ in range(4))
    words = (pack_mask(torch.rand(n, generator=gen) < 0.3).words.reshape(-1) if kind == 2
             else torch.empty(0, dtype=torch.int32))
    op = torch.ops.regdrop_fast.masked_adamw_

    def call():
        op([p], [g], [m], [v], [words], [kind], [5], [0], [3], [1e-3], [1.0], 0.9, 0.999, 1e-6,
           1e-5, 1, 0, 0.3, 0, True)

    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(5):  # the best of 5 batches: the least disturbed by other work on the machine
        start = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ghz", type=float, default=3.65, help="core clock, for cycles")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends.extension()
    print(f"threads={args.threads}; ns and cycles per element, the 32-element call subtracted")
    for name, kind in KINDS.items():
        fixed = seconds_per_call(32, kind, 2000)
        for n in (1 << 16, 1 << 18, 1 << 20):
            per_element = (seconds_per_call(n, kind, max(20, (1 << 26) // n // 16)) - fixed) / n
            print(f"{name:>4} n={n:>8}: {per_element * 1e9:.3f} ns  "
                  f"{per_element * args.ghz * 1e9:.2f} cycles")


if __name__ == "__main__":
    main()
