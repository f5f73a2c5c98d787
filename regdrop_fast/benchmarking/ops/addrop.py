"""AD-DROP: keep mask, masked attention, and the whole training step.

(a) addrop_keep_mask: keep mask of one layer from (dO, V), [B,H,L,D] -> bits [B,H,L,L/32].
    Baseline "official(sort)": the official algorithm in torch ops, as TaoYang225/AD-DROP runs
    it: the attribution map dO·Vᵀ materialized, pad keys +100, a full row sort, the threshold at
    floor((1−p)·len), a float Bernoulli(1−q) map from torch's RNG, a long [B,H,L,L] mask.
    Ours: keep_mask((dO, V), ...) per backend (reference = sort + Philox; triton = no L² tensor).
    bytes_moved: dO and V read once plus the bit mask written (what the fused kernel must move).
(a') addrop_keep_mask_layers (CUDA, triton): one training step's masks for all 12 layers of
    BERT-base at the train-step shapes (L=128 B=32, L=512 B=8), keep_mask_layers over the
    stacked dO and V (one launch) against 12 keep_mask calls (one launch per layer).
(a'') addrop_random_mask: one training step's masks of attribution="random" (the official RD
    variant) for 12 layers at the train-step shapes. Baseline "official(rand)": per layer a
    float Bernoulli(p) candidate map and a Bernoulli(1−q) map from torch's RNG combined into a
    long [B,H,L,L] mask, as the official code builds it. Ours: random_keep_mask_layers per
    backend (one launch for all layers on triton; the C++ Philox on cpu).
    bytes_moved: the key padding read plus the bit masks written.
(b) addrop_masked_attention: forward + backward (bf16 on CUDA), keep mask with p=0.3, q=0.2
    and 10% key padding; on CUDA 16k tokens at d=64, H=12, L=512..4096 and d=128, H=32,
    L=2048 (plus the small L=128 row), causal rows when the op has is_causal. Baselines: each
    fused SDPA backend without a mask (the fastest is the reference), SDPA with the dense bool
    mask (and dropout), FlexAttention reading the keep bits, eager softmax attention.
    flops: 3.5 × the forward's 4·B·H·L²·D (FlashAttention's accounting), halved when causal.
(c) addrop_train_step: one optimizer-free training step (forward + backward) of a
    BERT-base-shaped random BertForSequenceClassification (12 layers, 768 hidden, 12 heads,
    bf16 autocast on CUDA), L=128 B=32 and L=512 B=8: plain step (SDPA), ADDrop.step (AD-DROP
    on layer 0 and on all 12 layers), and the official procedure (eager attention with
    output_attentions, autograd.grad on the maps, sort-based masks, a second eager pass with
    additive per-layer masks). Peak memory is recorded on CUDA.
On CPU (ctx.quick or not) only reference paths run at small shapes: the Triton interpreter is
never timed.
"""
import copy
import inspect
import math

import torch
import torch.nn.functional as F

from regdrop_fast import addrop, backends
from regdrop_fast.addrop.integration import RANDOM_STREAM

from ._models import random_bert

P, Q, SEED = 0.3, 0.2, 1234
HEADS, HEAD_DIM = 12, 64


def _ours(device):
    names = ["reference"] if device.type == "cpu" else ["reference", "triton"]
    return [n for n in names if backends.unavailable_reason(n, device) is None]


def _padding(batch, length, device, frac=0.1):
    """bool [B,L] key padding: every other sample has its last `frac` of tokens padded."""
    lengths = torch.full((batch,), length, device=device)
    lengths[1::2] = max(1, int(length * (1 - frac)))
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def official_keep_mask(dO, v, key_padding, p, q):
    """The official generate_mask_high in torch ops (long mask, torch RNG)."""
    grad = torch.matmul(dO.float(), v.float().transpose(-1, -2))
    batch, heads, lq, lk = grad.shape
    extend = key_padding[:, None, None, :].long().expand(batch, heads, lq, lk)
    drop_index = ((1 - p) * key_padding.sum(-1)).long()
    grad_p = grad + (1 - extend) * 100
    sorted_grad = torch.sort(grad_p, dim=-1)[0]
    threshold = sorted_grad.gather(-1, drop_index.clamp_max(lk - 1).view(batch, 1, 1, 1)
                                   .expand(batch, heads, lq, 1))
    grad_masks = (1 - torch.ge(grad_p, threshold).long()) * extend
    sampler = torch.bernoulli((1 - q) * torch.ones_like(grad_p))
    return ((grad_masks + sampler) >= 1).long() * extend


def bench_keep_mask(ctx):
    device = ctx.device
    cases = [(1, 2, 32)] if ctx.quick else ([(16, HEADS, 128), (4, HEADS, 512), (1, HEADS, 2048)]
                                            if device.type == "cuda" else [(2, 4, 128)])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for batch, heads, length in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        dO = torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        v = torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        pad = _padding(batch, length, device)
        common = dict(op="addrop_keep_mask", baseline="official(sort)", case=f"L={length}",
                      dtype=str(dtype).replace("torch.", ""),
                      shape=[batch, heads, length, HEAD_DIM])
        moved = 2 * dO.numel() * dO.element_size() + batch * heads * length * math.ceil(
            length / 32) * 4
        ctx.record(impl="official(sort)", bytes_moved=moved, **common,
                   **ctx.measure(lambda: official_keep_mask(dO, v, pad, P, Q)))
        for name in _ours(device):
            def ours(name=name):
                return addrop.keep_mask((dO, v), P, Q, key_padding_mask=pad, seed=SEED,
                                        backend=name)
            ctx.record(impl=f"keep_mask[{name}]", bytes_moved=moved, **common,
                       **ctx.measure(ours))


def bench_keep_mask_layers(ctx, layers=12):
    device = ctx.device
    if device.type != "cuda" or backends.unavailable_reason("triton", device) is not None:
        return  # the interpreter is never timed; the reference form is a loop of keep_mask
    for batch, length in [(32, 128)] if ctx.quick else [(32, 128), (8, 512)]:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (layers, batch, HEADS, length, HEAD_DIM)
        dO, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
                 for _ in range(2))
        pad = _padding(batch, length, device)
        singles = f"{layers} x keep_mask[triton]"
        common = dict(op="addrop_keep_mask_layers", baseline=singles,
                      case=f"L={length} B={batch}, {layers} layers", dtype="bfloat16",
                      shape=list(shape), bytes_moved=2 * dO.numel() * dO.element_size()
                      + layers * batch * HEADS * length * math.ceil(length / 32) * 4)

        def per_layer():
            for layer in range(layers):
                addrop.keep_mask((dO[layer], v[layer]), P, Q, key_padding_mask=pad, seed=SEED,
                                 stream=layer, backend="triton")

        ctx.record(impl=singles, **common, **ctx.measure(per_layer))
        ctx.record(impl="keep_mask_layers[triton]", **common, **ctx.measure(
            lambda: addrop.keep_mask_layers((dO, v), P, Q, key_padding_mask=pad, seed=SEED,
                                            backend="triton")))


def official_random_mask(shape, key_padding, p, q):
    """The RD keep mask in torch ops (long mask, torch RNG): candidates with probability p,
    dropped with probability q, pad keys masked."""
    extend = key_padding[:, None, None, :].long().expand(shape)
    candidates = torch.bernoulli(p * torch.ones(shape, device=key_padding.device))
    sampler = torch.bernoulli((1 - q) * torch.ones(shape, device=key_padding.device))
    return ((1 - candidates + sampler) >= 1).long() * extend


def bench_random_mask(ctx, layers=12):
    device = ctx.device
    cases = [(2, 32)] if ctx.quick else ([(32, 128), (8, 512)] if device.type == "cuda"
                                         else [(4, 128)])
    names = ["cpu", "reference"] if device.type == "cpu" else ["reference", "triton"]
    for batch, length in cases:
        shape = (batch, HEADS, length, length)
        pad = _padding(batch, length, device)
        common = dict(op="addrop_random_mask", baseline="official(rand)",
                      case=f"L={length} B={batch}, {layers} layers", dtype="bool",
                      shape=[layers, *shape], bytes_moved=pad.numel()
                      + layers * batch * HEADS * length * math.ceil(length / 32) * 4)

        def official():
            for _ in range(layers):
                official_random_mask(shape, pad, P, Q)

        ctx.record(impl="official(rand)", **common, **ctx.measure(official))
        for name in names:
            if backends.unavailable_reason(name, device) is not None:
                continue

            def ours(name=name):
                return addrop.random_keep_mask_layers(
                    shape, P, Q, streams=range(layers), candidate_streams=range(
                        RANDOM_STREAM, RANDOM_STREAM + layers), key_padding_mask=pad,
                    seed=SEED, backend=name)
            ctx.record(impl=f"random_keep_mask_layers[{name}]", **common, **ctx.measure(ours))


def _attention_cases(ctx):
    """(batch, heads, length, head dim, main): GPU-filling main cases (16k tokens at d=64,
    H=12; d=128, H=32 at L=2048) and the earlier small case as a secondary row."""
    device = ctx.device
    if ctx.quick:
        return [(1, 2, 32, HEAD_DIM, False)] if device.type == "cpu" else \
            [(32, HEADS, 512, HEAD_DIM, True)]
    if device.type == "cuda":
        return ([(16384 // n, HEADS, n, HEAD_DIM, True) for n in (512, 1024, 2048, 4096)]
                + [(8, 32, 2048, 128, True), (32, HEADS, 128, HEAD_DIM, False)])
    return [(2, 4, 128, HEAD_DIM, False)]


def _sdpa_backends(device):
    """{name: SDPBackend} of the fused SDPA backends to try on this device (CUDA only)."""
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _flex(keep, pad, causal):
    """FlexAttention (compiled) with a mask_mod reading the same packed keep bits and key
    padding; None with the reason printed when flex_attention is unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:
        print(f"bench_addrop: flex_attention unavailable, skipped: {exc!r}")
        return None
    words, batch, heads, length = keep.words, *keep.shape[:3]

    def mask_mod(b, h, q_idx, kv_idx):
        bit = (words[b, h, q_idx, kv_idx // 32] >> (kv_idx % 32)) & 1
        allowed = (bit == 1) & pad[b, kv_idx]
        return allowed & (kv_idx <= q_idx) if causal else allowed

    block_mask = create_block_mask(mask_mod, batch, heads, length, length,
                                   device=words.device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def bench_masked_attention(ctx):
    """Forward + backward. Baselines: every fused SDPA backend available (no mask: the speed of
    light; the fastest is the reference the speedups use), SDPA with the dense bool mask (and
    with dropout 0.1), FlexAttention reading the keep bits, eager softmax attention (L <= 2048).
    Causal rows when masked_attention has is_causal."""
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    has_causal = "is_causal" in inspect.signature(addrop.masked_attention).parameters
    if not has_causal:
        print("bench_addrop: masked_attention has no is_causal yet: causal rows skipped")
    for batch, heads, length, head_dim, main in _attention_cases(ctx):
        for causal in ((False, True) if has_causal else (False,)):
            _attention_case(ctx, batch, heads, length, head_dim, main, causal, dtype)


def _attention_case(ctx, batch, heads, length, head_dim, main, causal, dtype):
    device = ctx.device
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype,
                           generator=gen).requires_grad_() for _ in range(3))
    grad_out = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype,
                           generator=gen)
    pad = _padding(batch, length, device)
    extra = {"is_causal": True} if causal else {}
    keep = addrop.keep_mask(torch.randn(batch, heads, length, length, device=device,
                                        generator=gen), P, Q, key_padding_mask=pad, seed=SEED,
                            **extra)
    dense = keep.unpack() & pad[:, None, None, :]
    if causal:
        dense &= torch.ones(length, length, dtype=torch.bool, device=device).tril()
    case = f"L={length},H={heads},d={head_dim}{',causal' if causal else ''}" + (
        "" if main else " (small)")
    flops = 3.5 * 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)

    def fwd_bwd(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(grad_out)
        return run

    def sdpa(**kw):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)

    timings = {}
    for name, sdp_backend in _sdpa_backends(device).items():
        from torch.nn.attention import sdpa_kernel

        def pinned(sdp_backend=sdp_backend):
            with sdpa_kernel([sdp_backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            pinned()  # raises when this backend cannot run these inputs
        except RuntimeError as exc:
            print(f"bench_addrop: sdpa[{name}] cannot run {case}: {str(exc).splitlines()[0]}")
            continue
        timings[f"sdpa[{name}](no mask)"] = ctx.measure(fwd_bwd(pinned))
    if not timings:  # CPU: the default SDPA
        timings["sdpa(no mask)"] = ctx.measure(fwd_bwd(sdpa()))
    baseline = min(timings, key=lambda n: timings[n]["ms"])
    # a bool mask and is_causal together are refused by SDPA: the causal rule is in `dense`
    timings["sdpa(bool mask)"] = ctx.measure(fwd_bwd(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)))
    timings["sdpa(bool mask, dropout 0.1)"] = ctx.measure(fwd_bwd(
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=0.1)))
    if device.type == "cuda":
        flex = _flex(keep, pad, causal)
        if flex is not None:
            timings["flex_attention(keep bits)"] = ctx.measure(fwd_bwd(lambda: flex(q, k, v)))
    if length <= 2048:
        additive = torch.zeros(dense.shape, device=device, dtype=dtype).masked_fill(
            ~dense, torch.finfo(dtype).min)
        timings["eager+mask"] = ctx.measure(fwd_bwd(lambda: torch.matmul(torch.softmax(
            torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5 + additive, -1), v)))
        del additive
    for name in _ours(device):
        timings[f"masked_attention[{name}]"] = ctx.measure(fwd_bwd(
            lambda name=name: addrop.masked_attention(q, k, v, keep, attn_mask=pad,
                                                      backend=name, **extra)))
        timings[f"masked_attention[{name}], dropout 0.1"] = ctx.measure(fwd_bwd(
            lambda name=name: addrop.masked_attention(q, k, v, keep, attn_mask=pad,
                                                      dropout_p=0.1, backend=name, **extra)))
    common = dict(op="addrop_masked_attention", baseline=baseline, case=case,
                  dtype=str(dtype).replace("torch.", ""),
                  shape=[batch, heads, length, head_dim], main_case=main)
    for impl, timing in timings.items():
        ctx.record(impl=impl, flops=flops, **common, **timing)


def _register_official_attention():
    """Eager attention that also adds the per-layer additive AD-DROP masks of the official
    (modified BERT) code; returns the maps so output_attentions can give them."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    def official_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        layer_mask = module.__dict__.get("_bench_official_mask")
        if layer_mask is not None:
            scores = scores + layer_mask
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("bench_official_addrop", official_attention)
    AttentionMaskInterface.register("bench_official_addrop", eager_mask)


def official_step(model, batch, layers):
    """TaoYang225/AD-DROP's training step (GA, drop high) on transformers' BERT."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    attention = [model.bert.encoder.layer[i].attention.self for i in range(len(
        model.bert.encoder.layer))]
    out = model(**inputs, output_attentions=True)
    logits = out.logits
    target = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
    grads = torch.autograd.grad(target, [out.attentions[i] for i in layers])
    pad = batch["attention_mask"].bool()
    extend = pad[:, None, None, :].long()
    for i, grad in zip(layers, grads):
        lk = grad.shape[-1]
        grad_p = grad.float() + (1 - extend) * 100
        sorted_grad = torch.sort(grad_p, dim=-1)[0]
        index = ((1 - P) * pad.sum(-1)).long().clamp_max(lk - 1).view(-1, 1, 1, 1)
        threshold = sorted_grad.gather(-1, index.expand(*grad.shape[:-1], 1))
        keep = ((1 - torch.ge(grad_p, threshold).long()) * extend
                + torch.bernoulli((1 - Q) * torch.ones_like(grad_p))) >= 1
        keep = keep & pad[:, None, None, :]
        attention[i].__dict__["_bench_official_mask"] = torch.zeros(
            keep.shape, device=keep.device, dtype=grad.dtype).masked_fill(
                ~keep, torch.finfo(grad.dtype).min)
    try:
        loss = model(**batch).loss
        loss.backward()
    finally:
        for module in attention:
            module.__dict__.pop("_bench_official_mask", None)
    return loss


def bench_train_step(ctx):
    quick_shapes = ctx.quick or ctx.device.type == "cpu"
    base = random_bert(ctx.device, ctx.quick or ctx.device.type == "cpu")
    for batch_size, length in [(2, 16)] if quick_shapes else [(32, 128), (8, 512)]:
        _train_step_case(ctx, base, batch_size, length)


def _train_step_case(ctx, base, batch_size, length):
    device = ctx.device
    gen = torch.Generator(device=device).manual_seed(2)
    pad = _padding(batch_size, length, device)
    batch = {"input_ids": torch.randint(5, base.config.vocab_size, (batch_size, length),
                                        device=device, generator=gen),
             "attention_mask": pad.long(),
             "labels": torch.randint(0, 2, (batch_size,), device=device, generator=gen)}
    num_layers = base.config.num_hidden_layers
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    dtype = "bf16-autocast" if device.type == "cuda" else "float32"
    common = dict(op="addrop_train_step", baseline="plain", dtype=dtype,
                  shape=[batch_size, length, base.config.hidden_size])
    backend = "reference" if device.type == "cpu" else "triton"
    # whole steps take long on CPU: a few runs give the median without exceeding the budget
    timing = dict(warmup=1, repeat=3) if device.type == "cpu" else {}

    plain_model = copy.deepcopy(base)

    def plain():
        plain_model.zero_grad(set_to_none=True)
        with autocast:
            loss = plain_model(**batch).loss
        loss.backward()

    official_model = copy.deepcopy(base)
    _register_official_attention()
    official_model.set_attn_implementation("bench_official_addrop")
    case_layers = {"layer 0": (0,), f"all {num_layers} layers": tuple(range(num_layers))}
    for layer_case, layers in case_layers.items():
        case = f"L={length},B={batch_size},{layer_case}"
        ctx.record(impl="plain", case=case, **common, **ctx.measure(plain, **timing))

        def official(layers=layers):
            official_model.zero_grad(set_to_none=True)
            with autocast:
                official_step(official_model, batch, layers)

        ctx.record(impl="official(eager+autograd maps)", case=case, **common,
                   **ctx.measure(official, **timing))
        model = copy.deepcopy(base)
        ours = addrop.ADDrop(model, p=P, q=Q, layers=layers, seed=SEED, backend=backend)

        def step(ours=ours, model=model):
            model.zero_grad(set_to_none=True)
            with autocast:
                ours.step(model, batch)

        ctx.record(impl=f"ADDrop.step[{backend}]", case=case, **common,
                   **ctx.measure(step, **timing))


def run(ctx):
    bench_keep_mask(ctx)
    bench_keep_mask_layers(ctx)
    bench_random_mask(ctx)
    bench_masked_attention(ctx)
    bench_train_step(ctx)
