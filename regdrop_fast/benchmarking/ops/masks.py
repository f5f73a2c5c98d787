"""Bit packing of attention-shaped bool masks: `pack_mask` and `unpack_mask`.

Shapes are BERT attention maps flattened to [batch * heads * L, L]: quick [16*12*128, 128];
full adds [64*12*512, 512] (201M elements). Baseline: `mask.clone()` of the bool tensor, the
cost of simply copying the mask a kernel would otherwise read. Ours, per backend: reference,
the C++ `cpu` backend when built, `triton`/`cuda` on CUDA (Triton under the interpreter is never
timed). Before timing, each backend's output is checked equal to the first one's, so a wrong
kernel cannot report a fast number.

bytes_moved: clone reads and writes 1 B/element; pack reads 1 B/element and writes the words
(1/8 B/element); unpack reads the words and writes 1 B/element. Every row also carries
bool_bytes and packed_bytes: the memory a bool mask and its PackedMask take.
On CPU the reference is timed only up to 2^25 elements (int64 temporaries, gigabytes).
"""
import torch

from regdrop_fast import backends, masks

KEEP_PROB = 0.9
CPU_REFERENCE_MAX = 2 ** 25
MIB = 1024 * 1024


def _shapes(quick):
    bert_base = [16 * 12 * 128, 128]
    return [bert_base] if quick else [bert_base, [64 * 12 * 512, 512]]


def _our_backends(device, numel):
    names = ["reference", "cpu"] if device.type == "cpu" else ["reference", "triton", "cuda"]
    names = [n for n in names if backends.unavailable_reason(n, device) is None]
    if device.type == "cpu" and numel > CPU_REFERENCE_MAX:
        names.remove("reference")
    return names


def _check(name, mask, packed):
    """The backend's pack equals `packed` and its unpack restores `mask` (bit-exact)."""
    words = masks.pack_mask(mask, backend=name).words
    if not torch.equal(words, packed.words):
        raise AssertionError(f"pack_mask[{name}] disagrees with the other backends")
    if not torch.equal(masks.unpack_mask(packed, backend=name), mask):
        raise AssertionError(f"unpack_mask[{name}] does not restore the mask")


def run(ctx):
    device = ctx.device
    generator = torch.Generator(device=device).manual_seed(0)
    for shape in _shapes(ctx.quick):
        numel = shape[0] * shape[1]
        ours = _our_backends(device, numel)
        if not ours:
            continue
        mask = torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(
            KEEP_PROB, generator=generator)
        packed = masks.pack_mask(mask, backend=ours[-1])
        for name in ours:
            _check(name, mask, packed)

        bool_bytes = numel
        packed_bytes = packed.nbytes()
        note = (f"bool {bool_bytes / MIB:.1f} MiB vs packed {packed_bytes / MIB:.2f} MiB "
                f"({bool_bytes / packed_bytes:.0f}x smaller)")
        case = f"[{shape[0]}, {shape[1]}]"
        common = dict(baseline="bool.clone()", case=case, dtype="bool", shape=shape,
                      bool_bytes=bool_bytes, packed_bytes=packed_bytes)
        # the CPU reference takes ~0.05 s per 3M elements: a few runs give a stable median
        slow = dict(warmup=1, repeat=5) if device.type == "cpu" else {}

        for op in ("pack_mask", "unpack_mask"):
            ctx.record(op=op, impl="bool.clone()", bytes_moved=2 * bool_bytes, note=note,
                       **common, **ctx.measure(mask.clone))
            for name in ours:
                if op == "pack_mask":
                    def fn(name=name):
                        return masks.pack_mask(mask, backend=name)
                else:
                    def fn(name=name):
                        return masks.unpack_mask(packed, backend=name)
                timing = slow if name == "reference" else {}
                ctx.record(op=op, impl=f"{op}[{name}]", bytes_moved=bool_bytes + packed_bytes,
                           **common, **ctx.measure(fn, **timing))
        del mask, packed
