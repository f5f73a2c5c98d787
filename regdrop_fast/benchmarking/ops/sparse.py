"""Sparse subnetworks: (a) the masked linear alone, (b) whole training steps (issue 18).

(a) Masked linear forward + backward: y = x·(W ⊙ M)ᵀ + b, then dx and the mask/weight grads.

Two training modes, each at sparsity 50/70/90%:
  scores  mask training: W frozen, M = scores > φ, grads dx and dScore (straight-through)
  packed  IMP / fixed subnetwork: M from bits, grads dx and masked dW
Baselines, measured in the same run:
  F.linear(x, W*M)  a dense float mask multiplied into W every call (what movement pruning
                    and mask-training code do: W ⊙ M materialized, forward and backward)
  torch.nn.utils.prune  custom_from_mask: a forward pre-hook computes weight_orig * weight_mask
                    (packed mode only: prune has no trainable scores)
Ours: `regdrop_fast.sparse.masked_linear` with its default (backend=None: W ⊙ M written
once, torch's GEMMs, the straight-through grads in one elementwise pass), and by name
reference (F.linear(x, W * M) under autograd) and, on CUDA, triton (the fused masked GEMM,
M built inside the GEMM tiles, kept pending this comparison). The interpreter is never timed.
flops = 3 GEMMs of 2·M·N·K (forward, dx, dW/dScore).

Mask memory per weight matrix (extra fields on every row): packed bits N·ceil(K/32)·4 B,
bool N·K B, float N·K·4 B; `mask_bytes` is what the row's implementation keeps.

Shapes (weights out×in): on CUDA 16k tokens through BERT-base (Q/K/V/attention output 768×768,
FFN in 3072×768, FFN out 768×3072) and BERT-large (1024×1024, 4096×1024, 1024×4096) at each
sparsity, plus the earlier 2048-token BERT-base rows at 70% as small secondary rows; on CPU
2048 tokens through BERT-base. Quick: 256 tokens, a 512×192 weight.

(b) sparse_train_step: one training step (zero_grad, forward, backward, optimizer step) of a
random BertForSequenceClassification, BERT-base-shaped with 16k tokens (B=32, L=512) and bf16
autocast on CUDA, a 2-layer 64-wide one with B=2, L=16 in fp32 on CPU or quick. Rows, each
on a fresh copy of the same model (built, measured, freed in turn, so each peak is its own):
  dense step (AdamW)   fine-tuning every parameter with torch.optim.AdamW (fused on CUDA)
  mask training (fwd+bwd+AdamW on scores)   MaskTrainer(model, 0.7) defaults (frozen weights,
                       scores trained through masked_linear's default path) and its optimizer
                       (MaskScoreAdamW, weight decay 0: on CUDA one fused launch over every matrix
                       for the AdamW step and the next W'); φ kept (the issue's step definition)
  mask training, deferred STE   the same with defer_ste_grad=True (the step forms dScore = G ⊙ W
                       itself: no dScore tensor; scores' .grad stays None)
  mask training, unfused   the same model and schedule with torch.optim.AdamW (fused on CUDA) on
                       the dScore the backward writes, W' made by every forward: the comparison
  mask training + φ reset every step   the default row plus trainer.step() at its default
                       interval=1 (a per-matrix kthvalue of the scores every step)
  IMP fixed masks (MaskedAdamW)   IterativeMagnitudePruner(model, 0.7, rate=0.7) after its one
                       prune(): pruned weights held at 0, plain F.linear, MaskedAdamW's step
Times are eager only (no CUDA-graph replay: a whole step with an optimizer and a φ reset is
not capturable, and at these sizes the host's launch work is small next to the GPU's).
peak_total_bytes: the device's peak allocation during one step including the resident model,
optimizer state and batch (CUDA only); the mask-training rows carry peak_allowance_bytes, one
bf16 copy of the masked matrices, which issue 18 allows above the dense step's peak.
"""
import copy

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from regdrop_fast import backends
from regdrop_fast.benchmarking import peak_memory_bytes, time_fn
from regdrop_fast.childtuning import MaskedAdamW
from regdrop_fast.masks import num_words, pack_mask
from regdrop_fast.reference.masked_linear import scores_mask
from regdrop_fast.sparse import (IterativeMagnitudePruner, MaskTrainer, masked_linear,
                                 masked_modules)

from ._models import random_bert

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
    """backend= values timed: None (the default path, always available) and the named ones."""
    names = ["reference"] if device.type == "cpu" else ["reference", "triton"]
    return [None] + [n for n in names if backends.unavailable_reason(n, device) is None]


def _impl(backend):
    return f"masked_linear[{backend or 'default'}]"


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


def bench_masked_linear(ctx):
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
                ctx.record(op="masked_linear_scores", impl=_impl(name),
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
                ctx.record(op="masked_linear_packed", impl=_impl(name),
                           baseline=base, mask_bytes=memory["packed_bytes"], **common,
                           **ctx.measure(_step(
                               lambda name=name: masked_linear(x, w, packed, b, backend=name),
                               (x, w), dy)))


TRAIN_SPARSITY = 0.7
LR = 1e-4


def _total_peak(fn, device):
    """Peak bytes allocated on the device while fn() runs, resident tensors included."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _train_step(model, optimizer, batch, autocast, after=None):
    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if after is not None:
            after()
    return run


def _dense(model, device):
    return torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda"), None


def _mask_training(reset, optimizer="default"):
    """optimizer: "default" (MaskTrainer.optimizer: MaskScoreAdamW, fused on CUDA), "defer"
    (the same with the STE product formed in the step) or "torch" (torch's AdamW on dScore)."""
    def setup(model, device):
        trainer = MaskTrainer(model, TRAIN_SPARSITY, **({} if reset else {"interval": 2**62}))
        if optimizer == "torch":
            opt = torch.optim.AdamW(trainer.parameters(), lr=LR, weight_decay=0.0,
                                    fused=device.type == "cuda")
        else:
            opt = trainer.optimizer(LR, defer_ste_grad=optimizer == "defer")
        return opt, trainer.step
    return setup


def _imp(model, device):
    imp = IterativeMagnitudePruner(model, TRAIN_SPARSITY, rate=TRAIN_SPARSITY)
    imp.prune()
    return MaskedAdamW(list(model.parameters()), imp.masks(), lr=LR), None


def bench_train_step(ctx):
    device = ctx.device
    small = ctx.quick or device.type != "cuda"
    batch_size, length = (2, 16) if small else (32, 512)
    base = random_bert(device, small)
    gen = torch.Generator(device=device).manual_seed(3)
    batch = {"input_ids": torch.randint(5, base.config.vocab_size, (batch_size, length),
                                        device=device, generator=gen),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (batch_size,), device=device, generator=gen)}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    common = dict(op="sparse_train_step", baseline="dense step (AdamW)",
                  case=f"{'tiny' if small else 'bert-base'} L={length},B={batch_size}",
                  dtype="bf16-autocast" if device.type == "cuda" else "float32",
                  shape=[batch_size, length, base.config.hidden_size],
                  sparsity=TRAIN_SPARSITY)
    # whole steps take long: a few runs on CPU; on CUDA ~1 s of steps (10+ at BERT-base)
    timing = dict(warmup=1, repeat=3) if device.type == "cpu" else dict(rep_ms=1000)
    setups = {"dense step (AdamW)": _dense,
              "mask training (fwd+bwd+AdamW on scores)": _mask_training(reset=False),
              "mask training, deferred STE (defer_ste_grad=True)":
                  _mask_training(reset=False, optimizer="defer"),
              "mask training, unfused (torch AdamW on dScore)":
                  _mask_training(reset=False, optimizer="torch"),
              "mask training + φ reset every step (MaskTrainer default interval=1)":
                  _mask_training(reset=True),
              "IMP fixed masks (MaskedAdamW)": _imp}
    for impl, setup in setups.items():
        model = copy.deepcopy(base)
        optimizer, after = setup(model, device)
        step = _train_step(model, optimizer, batch, autocast, after)
        extra = {}
        if "mask training" in impl:
            extra["peak_allowance_bytes"] = 2 * sum(m.weight.numel()
                                                    for m in masked_modules(model).values())
        timed = time_fn(step, device, **timing)
        ctx.record(impl=impl, **common, **timed, **extra,
                   peak_mem_bytes=peak_memory_bytes(step, device),
                   peak_total_bytes=_total_peak(step, device))
        del model, optimizer, after, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(ctx):
    bench_masked_linear(ctx)
    bench_train_step(ctx)
