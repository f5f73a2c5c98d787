"""Masked linear forward + backward: y = x·(W ⊙ M)ᵀ + b, then dx and the mask/weight grads.

Two training modes, each at sparsity 50/70/90%:
  scores  mask training: W frozen, M = scores > φ, grads dx and dScore (straight-through)
  packed  IMP / fixed subnetwork: M from bits, grads dx and masked dW
Baselines, measured in the same run:
  F.linear(x, W*M)  a dense float mask multiplied into W every call (what movement pruning
                    and mask-training code do: W ⊙ M materialized, forward and backward)
  torch.nn.utils.prune  custom_from_mask: a forward pre-hook computes weight_orig * weight_mask
                    (packed mode only: prune has no trainable scores)
Ours: `regdrop_fast.sparse.masked_linear` per backend: reference everywhere (it materializes
W ⊙ M too), triton on CUDA (fused: M built inside the GEMM tiles). The interpreter is never
timed. flops = 3 GEMMs of 2·M·N·K (forward, dx, dW/dScore).

Mask memory per weight matrix (extra fields on every row): packed bits N·ceil(K/32)·4 B,
bool N·K B, float N·K·4 B; `mask_bytes` is what the row's implementation keeps.

Shapes (weights out×in): on CUDA 16k tokens through BERT-base (Q/K/V/attention output 768×768,
FFN in 3072×768, FFN out 768×3072) and BERT-large (1024×1024, 4096×1024, 1024×4096) at each
sparsity, plus the earlier 2048-token BERT-base rows at 70% as small secondary rows; on CPU
2048 tokens through BERT-base. Quick: 256 tokens, a 512×192 weight.
"""
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from regdrop_fast import backends
from regdrop_fast.masks import num_words, pack_mask
from regdrop_fast.reference.masked_linear import scores_mask
from regdrop_fast.sparse import masked_linear

SPARSITIES = (0.5, 0.7, 0.9)
PHI = 0.0


def _cases(quick, device_type):
    """(label, tokens, out, in, sparsities)."""
    if quick:
        return [("ffn_in", 256, 512, 192, SPARSITIES)]
    base = [("qkvo", 768, 768), ("ffn_in", 3072, 768), ("ffn_out", 768, 3072)]
    if device_type != "cuda":
        return [(label, 2048, n, k, SPARSITIES) for label, n, k in base]
    large = [("large qkvo", 1024, 1024), ("large ffn_in", 4096, 1024),
             ("large ffn_out", 1024, 4096)]
    return ([(label, 16384, n, k, SPARSITIES) for label, n, k in base + large]
            + [(f"{label} (small)", 2048, n, k, (0.7,)) for label, n, k in base])


def _ours(device):
    names = ["reference"] if device.type == "cpu" else ["reference", "triton"]
    return [n for n in names if backends.unavailable_reason(n, device) is None]


def _scores_with_sparsity(n, k, sparsity, device, generator):
    scores = torch.randn(n, k, device=device, generator=generator)
    cut = scores.reshape(-1).kthvalue(max(1, int(sparsity * n * k))).values
    return scores - cut  # keep iff score > 0: a fraction `sparsity` pruned


def _step(fn, leaves, dy):
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(dy)
    return run


def run(ctx):
    device = ctx.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    for label, tokens, n, k, sparsities in _cases(ctx.quick, device.type):
        x = torch.randn(tokens, k, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        w0 = (torch.randn(n, k, device=device, generator=gen) / k ** 0.5).to(dtype)
        b = torch.zeros(n, device=device, dtype=dtype)
        dy = torch.randn(tokens, n, device=device, dtype=dtype, generator=gen)
        memory = {"packed_bytes": n * num_words(k) * 4, "bool_bytes": n * k,
                  "float_bytes": n * k * 4}
        flops = 3 * 2 * tokens * n * k
        for sparsity in sparsities:
            scores = _scores_with_sparsity(n, k, sparsity, device, gen).requires_grad_(True)
            keep = scores.detach() > PHI
            packed = pack_mask(keep, backend="reference" if device.type == "cpu" else None)
            dense = keep.to(dtype)
            case = f"{label} [{tokens}x{k}]->[{n}] s={sparsity:.0%}"
            common = dict(case=case, dtype=str(dtype).replace("torch.", ""), flops=flops,
                          shape=[tokens, n, k], sparsity=sparsity, **memory)

            # mask training: W frozen, scores train by the straight-through estimator
            w = w0.clone()
            base = "F.linear(x, W*M(scores))"
            ctx.record(op="masked_linear_scores", impl=base, baseline=base,
                       mask_bytes=memory["float_bytes"], **common, **ctx.measure(_step(
                           lambda: F.linear(x, w * scores_mask(scores, PHI).to(dtype), b),
                           (x, scores), dy)))
            for name in _ours(device):
                ctx.record(op="masked_linear_scores", impl=f"masked_linear[{name}]",
                           baseline=base, mask_bytes=memory["float_bytes"], **common,
                           **ctx.measure(_step(
                               lambda name=name: masked_linear(x, w, scores, b, threshold=PHI,
                                                               backend=name),
                               (x, scores), dy)))

            # IMP / fixed subnetwork: W trains with a fixed mask
            w = w0.clone().requires_grad_(True)
            base = "F.linear(x, W*M)"
            ctx.record(op="masked_linear_packed", impl=base, baseline=base,
                       mask_bytes=memory["float_bytes"], **common,
                       **ctx.measure(_step(lambda: F.linear(x, w * dense, b), (x, w), dy)))
            layer = torch.nn.Linear(k, n, device=device, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(w0)
            prune.custom_from_mask(layer, "weight", dense)
            ctx.record(op="masked_linear_packed", impl="torch.nn.utils.prune", baseline=base,
                       mask_bytes=memory["float_bytes"], **common,
                       **ctx.measure(_step(lambda: layer(x), (x, layer.weight_orig), dy)))
            for name in _ours(device):
                ctx.record(op="masked_linear_packed", impl=f"masked_linear[{name}]",
                           baseline=base, mask_bytes=memory["packed_bytes"], **common,
                           **ctx.measure(_step(
                               lambda name=name: masked_linear(x, w, packed, b, backend=name),
                               (x, w), dy)))
