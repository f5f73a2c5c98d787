"""random_keep_mask_layers (the official RD kind): the masks of several layers from one launch,
bit for bit the per-layer procedure ADDrop used before (an index map, two philox_words draws,
padding and causal ANDs, pack_mask); ADDrop with attribution="random" makes one launch a step."""
import pytest
import torch

from regdrop_fast import addrop, backends, rng
from regdrop_fast._checks import keep_threshold
from regdrop_fast.addrop.integration import RANDOM_STREAM
from regdrop_fast.addrop.mask import random_keep_mask_layers
from regdrop_fast.masks import pack_mask
from regdrop_fast.reference import addrop as ref
from regdrop_fast.triton_kernels import addrop_mask as tk
from utils import require_backend
from utils.addrop import SHAPE, batch_of, lm_batch, tiny_model

ARGS = dict(p=0.4, q=0.6, seed=2**40 + 3, step=9)


def _per_layer(shape, p, q, key_padding_mask, seed, step, stream, candidate_stream, causal,
               device):
    """The per-layer procedure of ADDrop before the fused launch (the words to keep)."""
    batch, heads, lq, lk = shape
    index = torch.arange(batch * heads * lq * lk, dtype=torch.int64, device=device)
    index = index.view(batch, heads, lq, lk)
    candidate = rng.philox_words(seed, index, step, candidate_stream) < keep_threshold(p)
    spared = rng.philox_words(seed, index, step, stream) >= keep_threshold(q)
    keep = ~candidate | spared
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if causal:
        keep = keep & torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
    return pack_mask(keep)


def _padding(device, n, batch, lk, gen):
    lengths = torch.randint(0, lk + 1, (n, batch), generator=gen)
    return (torch.arange(lk) < lengths[..., None]).to(device)


def _assert_equal_per_layer(got, shape, kpm_of, streams, candidates, causal, device, args=ARGS):
    assert len(got) == len(streams)
    for i, (stream, candidate) in enumerate(zip(streams, candidates)):
        want = _per_layer(shape, args["p"], args["q"], kpm_of(i), args["seed"], args["step"],
                          stream, candidate, causal, device)
        assert got[i].shape == want.shape, i
        assert torch.equal(got[i].words, want.words), \
            f"layer {i}: {(got[i].words != want.words).sum().item()} words differ"


# lk 40: one Philox call per 4 keys; 37: per key; 130: two key tiles in the interpreter
@pytest.mark.parametrize("lq,lk,causal", [(9, 40, False), (9, 37, False), (40, 40, True),
                                          (37, 37, True), (5, 12, True), (12, 5, True),
                                          (3, 130, False)])
@pytest.mark.parametrize("padding", ["shared", "per_layer", "none"])
def test_layers_equal_the_per_layer_procedure(device, lq, lk, causal, padding):
    """BERT-like (padding) and decoder-like (causal, bottom-right aligned when Lq < Lk) maps of
    a non-contiguous layer set, on the triton, reference and (C++ built) cpu backends."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lk + 3 * lq)
    shape, layers = (2, 3, lq, lk), (0, 2, 5)
    kpm = _padding(device, 3, 2, lk, gen)
    kpm_of = {"shared": lambda i: kpm[0], "per_layer": lambda i: kpm[i],
              "none": lambda i: None}[padding]
    stacked = {"shared": kpm[0], "per_layer": kpm, "none": None}[padding]
    candidates = tuple(RANDOM_STREAM + layer for layer in layers)
    for backend in ("triton", "reference", "cpu"):
        if backends.unavailable_reason(backend, device) is not None:
            continue
        got = random_keep_mask_layers(shape, streams=layers, candidate_streams=candidates,
                                      key_padding_mask=stacked, device=device, backend=backend,
                                      is_causal=causal, **ARGS)
        _assert_equal_per_layer(got, shape, kpm_of, layers, candidates, causal, device)


@pytest.mark.cuda
@pytest.mark.parametrize("lk", [128, 129])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_bert_base_layers(lk, causal):
    """The GPU tiles (128 keys, 4 Philox words per call when Lk % 4 == 0) at BERT-base shapes,
    all 12 layers in one launch."""
    shape, layers = (32, 12, lk, lk), tuple(range(12))
    kpm = (torch.arange(lk) < torch.randint(1, lk + 1, (32, 1))).cuda()
    candidates = tuple(RANDOM_STREAM + layer for layer in layers)
    got = random_keep_mask_layers(shape, streams=layers, candidate_streams=candidates,
                                  key_padding_mask=kpm, backend="triton", is_causal=causal,
                                  **ARGS)
    _assert_equal_per_layer(got, shape, lambda i: kpm, layers, candidates, causal, "cuda")


@pytest.mark.cuda
def test_cuda_device_without_index_names_the_current_one(monkeypatch):
    """device="cuda" without a padding mask: the masks and the cached stream table are on the
    current cuda:i, and the table's cache key names it (a table cached under "cuda" would stay
    on the device that was current when it was made)."""
    from regdrop_fast.addrop import mask as mask_module
    seen = []
    cached = mask_module._stream_table

    def recording(streams, device):
        seen.append(device)
        return cached(streams, device)

    monkeypatch.setattr(mask_module, "_stream_table", recording)
    shape, current = (2, 3, 9, 40), torch.device("cuda", torch.cuda.current_device())
    got = random_keep_mask_layers(shape, streams=(0, 1), candidate_streams=(7, 8),
                                  device="cuda", backend="triton", **ARGS)
    assert seen == [current] and all(mask.device == current for mask in got)
    _assert_equal_per_layer(got, shape, lambda i: None, (0, 1), (7, 8), False, current)


def test_extreme_streams_seeds_and_rates(device):
    """Streams at 2^32 − 1, a seed above 2^63, q = 0 and q = 1, one layer."""
    require_backend("triton", device)
    shape = (1, 2, 4, 64)
    for q in (0.0, 1.0):
        args = dict(p=0.9, q=q, seed=2**64 - 1, step=2**32 - 1)
        got = random_keep_mask_layers(shape, streams=[2**32 - 1], candidate_streams=[0],
                                      device=device, backend="triton", **args)
        _assert_equal_per_layer(got, shape, lambda i: None, [2**32 - 1], [0], False, device,
                                args)
        assert (got[0].density == 1.0) == (q == 0.0)


def test_rates_follow_p_and_q(device):
    require_backend("triton", device)
    (mask,) = random_keep_mask_layers((4, 4, 32, 64), 0.5, 0.6, streams=[1], candidate_streams=[2],
                                      device=device, backend="triton")
    assert abs((1 - mask.density) - 0.5 * 0.6) < 0.02


def test_reference_backend_is_the_reference_function():
    kpm = torch.arange(20) < torch.tensor([[20], [7]])
    got = random_keep_mask_layers((2, 2, 20, 20), streams=[3], candidate_streams=[4],
                                  key_padding_mask=kpm, backend="reference", is_causal=True,
                                  **ARGS)
    want = ref.random_keep_mask((2, 2, 20, 20), ARGS["p"], ARGS["q"], kpm, ARGS["seed"],
                                ARGS["step"], 3, 4, True)
    assert torch.equal(got[0].unpack(), want)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shape=(2, 3, 4)), ValueError, r"shape must be \(B, H, Lq, Lk\)"),
    (dict(shape=torch.Size([2, 3, 4, 0])), ValueError, r"shape\[3\]"),
    (dict(shape=(2, 3.0, 4, 5)), TypeError, r"shape\[1\]"),
    (dict(shape=torch.ones(4)), TypeError, "shape must be a sequence"),
    (dict(streams=()), ValueError, "streams must name at least one"),
    (dict(candidate_streams=(1,)), ValueError, "candidate_streams must name one stream per"),
    (dict(candidate_streams=(1, -2)), ValueError, r"candidate_streams\[1\]"),
    (dict(streams=(0, 2**32)), ValueError, r"streams\[1\]"),
    (dict(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[B, Lk\]"),
    (dict(key_padding_mask=torch.ones(3, 2, 6, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[n, B, Lk\]"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool), device="meta"), ValueError,
     "key_padding_mask must be on meta"),
    (dict(device="nowhere"), ValueError, "device must name a torch device"),
    (dict(device=0.5), TypeError, "device must be"),
    (dict(p=0.0), ValueError, "p must be in"),
    (dict(q=1.5), ValueError, "q must be in"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(step=-1), ValueError, "step must be in"),
])
def test_bad_input(kwargs, error, match):
    args = dict(shape=(2, 3, 4, 6), p=0.3, q=0.2, streams=(0, 1), candidate_streams=(5, 6),
                backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        random_keep_mask_layers(**args)


# -- ADDrop: one launch for every chosen layer -----------------------------------------------------
def _count_launches(monkeypatch):
    calls = []
    for name in ("random_mask_bits", "keep_mask_bits"):
        launcher = getattr(tk, name)

        def counting(*args, _name=name, _launcher=launcher, **kwargs):
            calls.append((_name, args[1] if _name == "random_mask_bits" else args[0].shape[0]))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(tk, name, counting)
    return calls


def _model_and_batch(kind):
    if kind == "bert":
        model = tiny_model("bert", seed=3, num_hidden_layers=3)
        return model, batch_of(model, [6, 4, 5], 6, seed=3), "classification"
    if kind == "bert_unpadded":
        model = tiny_model("bert", seed=3, num_hidden_layers=3)
        batch = batch_of(model, [6, 6], 6, seed=3)
        return model, {k: v for k, v in batch.items() if k != "attention_mask"}, "classification"
    import transformers as tf
    torch.manual_seed(3)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**SHAPE, "num_hidden_layers": 3}))
    return model, lm_batch([6, 4, 5], 6, seed=3), "token"


@pytest.mark.parametrize("kind", ["bert", "bert_unpadded", "llama"])
def test_step_makes_one_mask_launch_for_all_layers(kind, monkeypatch):
    """Layers (0, 2) of a 3-layer encoder (padded or not) / causal GQA decoder: ADDrop.step
    makes one launch with both layers, and its masks equal the per-layer procedure on pass 1's
    records; the reference backend gives the same masks."""
    require_backend("triton", "cpu")
    model, batch, task = _model_and_batch(kind)
    step = addrop.ADDrop(model, layers=(0, 2), task=task, p=0.4, q=0.5, seed=4,
                         attribution="random", backend="triton")
    calls = _count_launches(monkeypatch)
    out = step.step(None, batch)
    assert calls == [("random_mask_bits", 2)]
    _, records = step._forward_records(model, batch, grad=False)
    reference = addrop.ADDrop(model, layers=(0, 2), task=task, p=0.4, q=0.5, seed=4,
                              attribution="random", backend="reference")
    reference_masks = reference.compute_masks(None, batch, step=0)
    for layer in (0, 2):
        record = records[layer]
        assert (record.key_padding is None) == (kind == "bert_unpadded")
        shape = (*record.out.shape[:3], record.value.shape[-2])
        want = _per_layer(shape, 0.4, 0.5, record.key_padding, 4, 0, layer,
                          RANDOM_STREAM + layer, record.causal, "cpu")
        assert torch.equal(out.masks[layer].words, want.words), layer
        assert torch.equal(reference_masks[layer].words, want.words), layer
    assert records[0].causal == (kind == "llama")
