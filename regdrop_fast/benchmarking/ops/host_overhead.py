"""Host overhead of each public GPU op: its Python path alone, without a GPU (issue 13, item 8).

Each op is called with backend="triton" on small CPU tensors in a child process that has
TRITON_INTERPRET=1 and every Triton launch replaced by a no-op (the interpreter's
`InterpretedFunction.run` and the autotuner's run), so what is timed is the work a GPU call
does on the host before its kernels run: argument checks, backend dispatch, autograd, output
allocation and the launcher's argument preparation. The fwd+bwd rows come with a floor row:
the same inputs through an autograd.Function that computes nothing, i.e. what torch's autograd
costs any op there; the notes give ours above it. Not timed: Triton's own launch (binder,
cache lookup, driver call), and on CPU allocations are host memory, not the caching CUDA
allocator. Goal: at most 30 us per call (FlashAttention's Python wrapper is in that range).

Also ChildTuningAdamW.step (triton backend, launches no-op) over the 201 parameter tensors of
BERT-base against torch.optim.AdamW(fused=True).step on the same list: every tensor shrunk to
at most 16 elements, so torch's CPU kernel computes next to nothing and both rows are host
work over 201 tensors. Goal: ChildTuningAdamW.step at most torch's time.

    python -m regdrop_fast.benchmarking.ops.host_overhead [--quick]   (prints JSON rows)
"""
import json
import os
import subprocess
import sys

import torch

from .childtuning import bert_shapes

OP = "host_overhead"
CASE = "python path, launches no-op"
FLOOR = "torch autograd floor:"
LAYERS = 12  # BERT-base: AD-DROP on every layer
MASK_LAYERS = f"addrop.keep_mask_layers (dO, V), {LAYERS} layers"
MASK_SINGLES = f"{LAYERS} x addrop.keep_mask (dO, V)"


def _no_launches():
    """Replace Triton's interpreter launches (plain and autotuned) by no-ops."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, **kwargs: None
    Autotuner.run = lambda self, *args, **kwargs: None


def _calls():
    """{name: (dtype, fn)} of the public GPU ops at small shapes."""
    from regdrop_fast import addrop, pack_mask, rdrop_loss, rng, unpack_mask
    from regdrop_fast.sparse import masked_linear

    gen = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16

    def randn(*shape, dtype=bf16, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    mask = torch.rand(64, 256, generator=gen) < 0.5
    packed = pack_mask(mask, backend="reference")
    z1, z2 = randn(64, 128, grad=True), randn(64, 128, grad=True)
    labels = torch.randint(0, 128, (64,), generator=gen)
    q, k, v = (randn(2, 4, 64, 64, grad=True) for _ in range(3))
    do = randn(2, 4, 64, 64)
    pad = torch.ones(2, 64, dtype=torch.bool)
    keep = addrop.keep_mask(torch.randn(2, 4, 64, 64, generator=gen), 0.3, 0.2,
                            key_padding_mask=pad, seed=1, backend="reference")
    x, w = randn(64, 256, grad=True), randn(128, 256, grad=True)
    w_mask = pack_mask(torch.rand(128, 256, generator=gen) < 0.5, backend="reference")
    dy = randn(64, 128)
    triton = {"backend": "triton"}
    # one AD-DROP step's masks: the layers' dO and V stacked (as ADDrop.step passes them)
    do_layers, v_layers = randn(LAYERS, *do.shape), randn(LAYERS, *v.shape)

    def single_masks():
        for layer in range(LAYERS):
            addrop.keep_mask((do_layers[layer], v_layers[layer]), 0.3, 0.2, key_padding_mask=pad,
                             seed=1, stream=layer, **triton)

    leaves = (z1, z2, q, k, v, x, w)

    def backward(out, grad=None):
        for leaf in leaves:  # no .grad accumulation: that is an add, not host work
            leaf.grad = None
        out.backward(grad)

    def floor(*inputs, out_shape):
        """torch's own fwd+bwd cost: a no-op autograd.Function over the same tensors."""
        return _NoOpFunction.apply(out_shape, *inputs)

    return {
        "bernoulli_keep": ("bool", lambda: rng.bernoulli_keep((4096,), 0.9, 1, **triton)),
        "pack_mask": ("bool", lambda: pack_mask(mask, **triton)),
        "unpack_mask": ("bool", lambda: unpack_mask(packed, **triton)),
        "rdrop_loss fwd": ("bfloat16", lambda: rdrop_loss(z1.detach(), z2.detach(), labels,
                                                          **triton)),
        "rdrop_loss fwd+bwd": ("bfloat16", lambda: backward(rdrop_loss(z1, z2, labels,
                                                                       **triton))),
        "addrop.keep_mask (dO, V)": ("bfloat16", lambda: addrop.keep_mask(
            (do, v.detach()), 0.3, 0.2, key_padding_mask=pad, seed=1, **triton)),
        MASK_LAYERS: ("bfloat16", lambda: addrop.keep_mask_layers(
            (do_layers, v_layers), 0.3, 0.2, key_padding_mask=pad, seed=1, **triton)),
        MASK_SINGLES: ("bfloat16", single_masks),
        # forward only (inference, evaluation): no autograd Function on this path
        "masked_attention fwd": ("bfloat16", lambda: addrop.masked_attention(
            q.detach(), k.detach(), v.detach(), keep, attn_mask=pad, **triton)),
        # the forward of a training step: q, k, v require grad, so it records the graph node
        "masked_attention fwd, grad tracked": ("bfloat16", lambda: addrop.masked_attention(
            q, k, v, keep, attn_mask=pad, dropout_p=0.1, **triton)),
        "masked_attention fwd+bwd": ("bfloat16", lambda: backward(addrop.masked_attention(
            q, k, v, keep, attn_mask=pad, dropout_p=0.1, **triton), do)),
        "masked_linear fwd+bwd": ("bfloat16", lambda: backward(masked_linear(
            x, w, w_mask, **triton), dy)),
        # the floor under the fwd+bwd rows: autograd with a Function that does nothing
        f"{FLOOR} rdrop_loss fwd+bwd": ("bfloat16", lambda: backward(floor(
            z1, z2, out_shape=()))),
        f"{FLOOR} masked_attention fwd+bwd": ("bfloat16", lambda: backward(floor(
            q, k, v, out_shape=q.shape), do)),
        f"{FLOOR} masked_linear fwd+bwd": ("bfloat16", lambda: backward(floor(
            x, w, out_shape=dy.shape), dy)),
    }


class _NoOpFunction(torch.autograd.Function):
    """Allocates the output and one gradient per input, computes nothing."""

    @staticmethod
    def forward(ctx, out_shape, *inputs):
        ctx.save_for_backward(*inputs)
        return inputs[0].new_empty(out_shape)

    @staticmethod
    def backward(ctx, grad):
        return (None,) + tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def _optimizers():
    """{name: step} of ChildTuningAdamW (F, D) and torch's fused AdamW over BERT-base's 201
    tensors, each shrunk to at most 16 elements."""
    from regdrop_fast import ChildTuningAdamW

    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(min(d, 4) for d in s) for s in bert_shapes(768, 12, 3072)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    masks = {p: torch.rand(p.shape, generator=gen) < 0.3 for p in params}
    hp = dict(lr=1e-3, eps=1e-6, weight_decay=0.01)
    n = len(params)
    opts = {
        f"torch AdamW(fused=True).step ({n} tensors)": torch.optim.AdamW(params, **hp,
                                                                          fused=True),
        f"ChildTuningAdamW.step F ({n} tensors)": ChildTuningAdamW(
            params, **hp, mode="F", seed=1, backend="triton"),
        f"ChildTuningAdamW.step D ({n} tensors)": ChildTuningAdamW(
            params, **hp, mode="D", masks=masks, backend="triton"),
    }
    return {name: ("float32", opt.step) for name, opt in opts.items()}


def measure(quick: bool) -> list:
    """Rows {impl, dtype, ms, p20_ms, p80_ms}; must run with TRITON_INTERPRET=1."""
    from regdrop_fast.benchmarking import time_fn

    _no_launches()
    cpu = torch.device("cpu")
    rows = []
    budget = 0.05 if quick else 0.5
    for name, (dtype, fn) in {**_calls(), **_optimizers()}.items():
        timing = time_fn(fn, cpu, warmup=3, budget_s=budget)
        rows.append({"impl": name, "dtype": dtype, **timing})
    return rows


def run(ctx):
    """Measured in a child process (the interpreter must be on before triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", __name__] + (["--quick"] if ctx.quick else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"host overhead probe failed:\n{proc.stderr[-3000:]}")
    torch_fused = next(r["impl"] for r in json.loads(proc.stdout) if r["impl"].startswith(
        "torch AdamW"))
    rows = json.loads(proc.stdout)
    ms = {row["impl"]: row["ms"] for row in rows}
    for row in rows:
        impl = row["impl"]
        baseline = torch_fused if "AdamW" in impl else impl
        if "AdamW" in impl:
            note = None
        elif impl == MASK_LAYERS:
            baseline = MASK_SINGLES
            note = f"one AD-DROP step's masks ({LAYERS} layers, one launch); goal <= 0.03 ms"
        elif impl == MASK_SINGLES:
            note = f"the same masks as {LAYERS} launches, one keep_mask call per layer"
        elif impl.startswith(FLOOR):
            note = "what torch's autograd costs any op with these inputs and outputs"
        elif f"{FLOOR} {impl}" in ms:
            ours = (row["ms"] - ms[f"{FLOOR} {impl}"]) * 1e3
            note = (f"{ours:.0f} us above the autograd floor for two calls (fwd, bwd); "
                    f"goal <= 0.03 ms per call")
        else:
            note = "goal <= 0.03 ms"
        ctx.record(op=OP, case=CASE, baseline=baseline, host_device="cpu", note=note, **row)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (see the module docstring)")
    print(json.dumps(measure("--quick" in sys.argv[1:])))
