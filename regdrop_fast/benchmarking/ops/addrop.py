"""AD-DROP: keep mask, masked attention, and the whole training step.

(a) addrop_keep_mask: keep mask of one layer from (dO, V), [B,H,L,D] -> bits [B,H,L,L/32].
    Baseline "official(sort)": the official algorithm in torch ops, as TaoYang225/AD-DROP runs
    it: the attribution map dO·Vᵀ materialized, pad keys +100, a full row sort, the threshold at
    floor((1−p)·len), a float Bernoulli(1−q) map from torch's RNG, a long [B,H,L,L] mask.
    Ours: keep_mask((dO, V), ...) per backend (reference = sort + Philox; triton = no L² tensor).
    bytes_moved: dO and V read once plus the bit mask written (what the fused kernel must move).
(b) addrop_masked_attention: forward + backward, d=64 (bf16 on CUDA), keep mask with p=0.3,
    q=0.2 and 10% key padding. Baselines: SDPA without a mask (flash on CUDA: the speed of
    light), SDPA with the dense bool mask, eager softmax attention with an additive mask.
    flops: 3.5 × the forward's 4·B·H·L²·D (FlashAttention's accounting).
(c) addrop_train_step: one optimizer-free training step (forward + backward) of a
    BERT-base-shaped random BertForSequenceClassification (12 layers, 768 hidden, 12 heads,
    bf16 autocast on CUDA), L=128: plain step (SDPA), ADDrop.step (AD-DROP on layer 0 and on
    all 12 layers), and the official procedure (eager attention with output_attentions,
    autograd.grad on the maps, sort-based masks, a second eager pass with additive per-layer
    masks). Peak memory is recorded on CUDA.
On CPU (ctx.quick or not) only reference paths run at small shapes: the Triton interpreter is
never timed.
"""
import copy
import math

import torch
import torch.nn.functional as F

from regdrop_fast import addrop, backends

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


def bench_masked_attention(ctx):
    device = ctx.device
    if ctx.quick:
        cases = [(1, 2, 32)]
    elif device.type == "cuda":
        cases = [(32, HEADS, 128), (8, HEADS, 512), (2, HEADS, 2048)]
    else:
        cases = [(2, 4, 128)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for batch, heads, length in cases:
        gen = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype,
                               generator=gen).requires_grad_() for _ in range(3))
        grad_out = torch.randn(batch, heads, length, HEAD_DIM, device=device, dtype=dtype,
                               generator=gen)
        pad = _padding(batch, length, device)
        keep = addrop.keep_mask(torch.randn(batch, heads, length, length, device=device,
                                            generator=gen), P, Q, key_padding_mask=pad,
                                seed=SEED, backend="reference")
        dense = keep.unpack(backend="reference")
        additive = torch.zeros(dense.shape, device=device, dtype=dtype).masked_fill(
            ~dense, torch.finfo(dtype).min)
        common = dict(op="addrop_masked_attention", baseline="sdpa(no mask)",
                      case=f"L={length}", dtype=str(dtype).replace("torch.", ""),
                      shape=[batch, heads, length, HEAD_DIM])
        flops = 3.5 * 4 * batch * heads * length * length * HEAD_DIM

        def fwd_bwd(fn):
            def run():
                q.grad = k.grad = v.grad = None
                fn().backward(grad_out)
            return run

        impls = {
            "sdpa(no mask)": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa(bool mask)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
            "eager+mask": lambda: torch.matmul(torch.softmax(
                torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM ** -0.5 + additive, -1), v),
        }
        for name in _ours(device):
            impls[f"masked_attention[{name}]"] = (
                lambda name=name: addrop.masked_attention(q, k, v, keep, attn_mask=pad,
                                                          backend=name))
        for impl, fn in impls.items():
            ctx.record(impl=impl, flops=flops, **common, **ctx.measure(fwd_bwd(fn)))


def _bert(device, quick):
    from transformers import BertConfig, BertForSequenceClassification
    if quick or device.type == "cpu":
        config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128, num_labels=2)
    else:
        config = BertConfig(num_labels=2)  # bert-base shapes
    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(device).train()


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
    device = ctx.device
    quick_shapes = ctx.quick or device.type == "cpu"
    batch_size, length = (2, 16) if quick_shapes else (32, 128)
    base = _bert(device, ctx.quick)
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
    for case, layers in case_layers.items():
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
    bench_masked_attention(ctx)
    bench_train_step(ctx)
