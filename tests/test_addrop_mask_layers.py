"""keep_mask_layers: the keep masks of several layers from one launch, bit for bit the
per-layer keep_mask calls (layer l: stream streams[l]); ADDrop.step makes one launch a step."""
import numpy as np
import pytest
import torch

from regdrop_fast import addrop
from regdrop_fast.addrop.mask import keep_mask, keep_mask_layers
from regdrop_fast.triton_kernels import addrop_mask as tk
from utils import require_backend
from utils.addrop import SHAPE, batch_of, lm_batch, tiny_model

N, B, H, LQ, LK, D = 3, 2, 4, 9, 40, 16


def _inputs(device, gen, heads=H, heads_kv=H, lq=LQ, lk=LK):
    """Small-integer dO [N,B,H,Lq,D] and v [N,B,Hkv,Lk,D] (every dot exact in fp32, so the
    kernel's B equals the reference's), and per-layer padding [N,B,Lk] (real keys first)."""
    dO = torch.randint(-3, 4, (N, B, heads, lq, D), generator=gen).float().to(device)
    v = torch.randint(-3, 4, (N, B, heads_kv, lk, D), generator=gen).float().to(device)
    lengths = torch.randint(1, lk + 1, (N, B), generator=gen)
    kpm = (torch.arange(lk) < lengths[..., None]).to(device)
    return dO, v, kpm


def _single(attr_of, kpm_of, streams, backend, **args):
    return [keep_mask(attr_of(i), key_padding_mask=kpm_of(i), stream=s, backend=backend, **args)
            for i, s in enumerate(streams)]


def _assert_layers_equal(got, want):
    assert len(got) == len(want)
    for layer, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, layer
        assert torch.equal(g.words, w.words), f"layer {layer}: {(g.words != w.words).sum()}"


@pytest.mark.parametrize("streams", [(0, 1, 2), (0, 2, 5), (7, 3, 2**32 - 1)])
@pytest.mark.parametrize("padding", ["shared", "per_layer", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_pair_layers_equal_per_layer_calls(device, streams, padding, causal):
    """(dO, v) stacks with grouped-query v (Hkv = H/2), causal rows, padding shared by the
    layers, per layer or absent, non-contiguous layer sets: each layer's words equal the
    single-layer call with its stream, on the triton and reference backends."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(sum(streams) % 1000 + 7 * causal)
    dO, v, kpm = _inputs(device, gen, heads_kv=H // 2)
    layer_kpm = {"shared": lambda i: kpm[0], "per_layer": lambda i: kpm[i],
                 "none": lambda i: None}[padding]
    stacked_kpm = {"shared": kpm[0], "per_layer": kpm, "none": None}[padding]
    args = dict(p=0.35, q=0.45, seed=2**35 + 3, step=11, drop="high", is_causal=causal)
    want = _single(lambda i: (dO[i], v[i]), layer_kpm, streams, "reference", **args)
    for backend in ("triton", "reference"):
        got = keep_mask_layers((dO, v), key_padding_mask=stacked_kpm, streams=streams,
                               backend=backend, **args)
        _assert_layers_equal(got, want)


@pytest.mark.parametrize("drop", ["high", "low"])
def test_attribution_layers_non_contiguous_stack(device, drop):
    """Attribution stacks whose layer axis is not the outermost in memory, bf16 and fp32."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        attr = torch.randn(B, N, H, LQ, LK, generator=gen).to(device, dtype).transpose(0, 1)
        kpm = _inputs(device, gen)[2]
        args = dict(p=0.6, q=0.3, seed=5, step=2, drop=drop)
        got = keep_mask_layers(attr, key_padding_mask=kpm, streams=(4, 1, 9), backend="triton",
                               **args)
        # attribution tensors: the single-layer triton calls equal the reference bit for bit
        _assert_layers_equal(got, _single(lambda i: attr[i], lambda i: kpm[i], (4, 1, 9),
                                          "reference", **args))


@pytest.mark.parametrize("causal", [False, True])
def test_streamed_path_with_a_stream_table(device, causal):
    """Rows longer than the key tile (the streamed path, forced by block_n) over stacked layers
    with a device stream table equal the single-layer masks."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(4)
    dO, v, kpm = _inputs(device, gen, heads=1, heads_kv=1, lq=5, lk=45)
    streams = (6, 0, 3)
    frac, drop_threshold = np.float32(1 - 0.45).item(), int(0.6 * 2**32)
    table = torch.tensor(streams, dtype=torch.int64, device=device)
    words = tk.keep_mask_bits(dO, v, kpm, frac, drop_threshold, 9, 4, table, False, causal,
                              block_n=32)
    assert words.shape == (N, B, 1, 5, 2)
    for i, stream in enumerate(streams):
        want = keep_mask((dO[i], v[i]), 0.45, 0.6, kpm[i], seed=9, step=4, stream=stream,
                         is_causal=causal, backend="reference")
        assert torch.equal(words[i], want.words), i


def test_default_streams_and_one_layer(device):
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(5)
    dO, v, kpm = _inputs(device, gen)
    args = dict(p=0.3, q=0.5, seed=1, step=0)
    got = keep_mask_layers((dO, v), key_padding_mask=kpm[0], backend="triton", **args)
    _assert_layers_equal(got, _single(lambda i: (dO[i], v[i]), lambda i: kpm[0], (0, 1, 2),
                                      "triton", **args))
    one = keep_mask_layers((dO[1:2], v[1:2]), key_padding_mask=kpm[1:2], streams=[8],
                           backend="triton", **args)
    _assert_layers_equal(one, [keep_mask((dO[1], v[1]), key_padding_mask=kpm[1], stream=8,
                                         backend="triton", **args)])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(streams=(0, 1)), ValueError, "one stream per layer"),
    (dict(streams=(0, -1, 2)), ValueError, r"streams\[1\]"),
    (dict(streams=(0, 1.5, 2)), TypeError, r"streams\[1\]"),
    (dict(streams=torch.arange(3)), TypeError, "streams must be a sequence"),
    (dict(attr=torch.randn(B, H, LQ, LK)), ValueError, "attr must have 5 dimensions"),
    (dict(attr=torch.randn(0, B, H, LQ, LK)), ValueError, "empty layer"),
    (dict(attr=(torch.randn(N, B, H, LQ, D), torch.randn(N + 1, B, H, LK, D))), ValueError,
     r"v must be \[n,B,Hkv,Lk,D\]"),
    (dict(key_padding_mask=torch.ones(N + 1, B, LK, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[n, B, Lk\]"),
    (dict(key_padding_mask=torch.ones(B, LK + 1, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B, Lk\]"),
    (dict(key_padding_mask=torch.ones(1, N, B, LK, dtype=torch.bool)), ValueError,
     "key_padding_mask must have"),
    (dict(q=2.0), ValueError, "q must be in"),
])
def test_bad_input(kwargs, error, match):
    args = dict(attr=torch.randn(N, B, H, LQ, LK), p=0.3, q=0.2, backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        keep_mask_layers(**args)


# -- ADDrop.step: one launch for every chosen layer ----------------------------------------------
def _count_launches(monkeypatch):
    calls = []
    launcher = tk.keep_mask_bits

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(tk, "keep_mask_bits", counting)
    return calls


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_step_makes_one_mask_launch_for_all_layers(kind, monkeypatch):
    """Layers (0, 2) of a 3-layer encoder / causal GQA decoder: one launch with both layers
    stacked; the masks equal keep_mask per layer on the same pass-1 dO and V."""
    require_backend("triton", "cpu")
    if kind == "bert":
        model = tiny_model("bert", seed=3, num_hidden_layers=3)
        batch, task = batch_of(model, [6, 4, 5], 6, seed=3), "classification"
    else:
        import transformers as tf
        torch.manual_seed(3)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**SHAPE, "num_hidden_layers": 3}))
        batch, task = lm_batch([6, 4, 5], 6, seed=3), "token"
    step = addrop.ADDrop(model, layers=(0, 2), task=task, p=0.4, q=0.5, seed=4,
                         backend="triton")
    calls = _count_launches(monkeypatch)
    torch.manual_seed(0)
    masks = step.compute_masks(None, batch, step=5)
    assert len(calls) == 1 and calls[0][0] == 2
    torch.manual_seed(0)
    grads = step._gradients(model, batch)
    for layer, (dO, record) in grads.items():
        want = keep_mask((dO, record.value), 0.4, 0.5, key_padding_mask=record.key_padding,
                         seed=4, step=5, stream=layer, is_causal=record.causal,
                         backend="reference")
        assert torch.equal(masks[layer].words, want.words), layer


@pytest.mark.cuda
@pytest.mark.parametrize("lk", [128, 512, 3000])
def test_cuda_bf16_layers_equal_per_layer_calls(lk):
    """bf16 on the GPU (tensor-core dots; resident rows, streamed beyond 2048 keys), 12 layers:
    each layer's words equal the single-layer launch and, for exact integer inputs, the
    reference."""
    gen = torch.Generator().manual_seed(lk)
    dO = torch.randint(-3, 4, (12, 2, 4, 64, 64), generator=gen).to("cuda", torch.bfloat16)
    v = torch.randint(-3, 4, (12, 2, 4, lk, 64), generator=gen).to("cuda", torch.bfloat16)
    kpm = (torch.arange(lk) < torch.tensor([[lk], [lk // 2]])).to("cuda")
    args = dict(p=0.3, q=0.2, key_padding_mask=kpm, seed=3, step=2)
    got = keep_mask_layers((dO, v), backend="triton", **args)
    for layer in range(12):
        single = keep_mask((dO[layer], v[layer]), stream=layer, backend="triton", **args)
        assert torch.equal(got[layer].words, single.words), layer
    want = keep_mask((dO[5], v[5]), stream=5, backend="reference", **args)
    assert torch.equal(got[5].words, want.words)
