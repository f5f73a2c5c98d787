"""Philox keep-mask generation: n Bernoulli(keep_prob) keep decisions as a bool tensor.

Baselines: `torch.rand(n) < p` (what dropout code usually builds) and `torch.bernoulli_` on a
bool tensor (torch's own RNG, no float intermediate). Ours: `regdrop_fast.rng.bernoulli_keep`,
counter-based and reproducible from (seed, step, stream, offset), per backend: reference
everywhere, the C++ `cpu` backend when the extension is built, and `triton`/`cuda` on CUDA.
Triton under the interpreter is never timed (not performance).

bytes_moved counts the useful traffic: the bool output (1 B/element) for every impl. The
kernel backends draw one Philox block per 4 elements straight into the output; the reference
builds arange(offset, offset + n) and int64 words first.

Sizes: quick 2^20; full 2^24 and 2^26. The CPU reference is timed only up to 2^24 elements
(above that one call takes minutes and gigabytes of int64 temporaries).
"""
import torch

from regdrop_fast import backends, rng

KEEP_PROB = 0.9
SEED = 1234
CPU_REFERENCE_MAX = 2 ** 24


def _our_backends(device):
    names = ["reference", "cpu"] if device.type == "cpu" else ["reference", "triton", "cuda"]
    return [n for n in names if backends.unavailable_reason(n, device) is None]


def run(ctx):
    device = ctx.device
    sizes = [2 ** 20] if ctx.quick else [2 ** 24, 2 ** 26]
    for n in sizes:
        case = f"n=2^{n.bit_length() - 1}"
        common = dict(op="philox_keep_mask", baseline="torch.rand<p", case=case, dtype="bool",
                      shape=[n], keep_prob=KEEP_PROB)

        def rand_lt():
            return torch.rand(n, device=device) < KEEP_PROB

        def bernoulli():
            return torch.empty(n, dtype=torch.bool, device=device).bernoulli_(KEEP_PROB)

        ctx.record(impl="torch.rand<p", bytes_moved=n, **common, **ctx.measure(rand_lt))
        ctx.record(impl="torch.bernoulli_", bytes_moved=n, **common, **ctx.measure(bernoulli))

        for name in _our_backends(device):
            if name == "reference" and device.type == "cpu" and n > CPU_REFERENCE_MAX:
                continue

            def ours(name=name):
                return rng.bernoulli_keep((n,), KEEP_PROB, SEED, device=device, backend=name)

            # the CPU reference is ~0.5 s per 2^20 elements: few runs are enough for a median
            slow = dict(warmup=0, repeat=3) if name == "reference" and device.type == "cpu" else {}
            ctx.record(impl=f"bernoulli_keep[{name}]", bytes_moved=n, **common,
                       **ctx.measure(ours, **slow))
