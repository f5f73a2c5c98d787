"""AD-DROP on decoders: causal keep masks (our extension: the rule over each row's causal,
non-pad prefix) and causal / grouped-query masked attention, Triton vs the references."""
import pytest
import torch
import torch.nn.functional as F

from regdrop_fast.addrop.attention import masked_attention
from regdrop_fast.addrop.mask import keep_mask
from regdrop_fast.masks import unpack_mask
from regdrop_fast.reference import masked_attention as ref
from utils import require_backend

SHAPES = [  # (batch, heads, kv heads, lq, lk)
    (2, 4, 2, 33, 33),
    (1, 4, 1, 20, 45),  # Lq < Lk: bottom-right aligned
    (2, 2, 2, 40, 17),  # Lq > Lk: the first 23 rows see no key
    (2, 6, 3, 19, 19),
]


def _padding(batch, lk, device):
    kpm = torch.ones(batch, lk, dtype=torch.bool)
    kpm[-1, lk // 2:] = False
    return kpm.to(device)


@pytest.mark.parametrize("drop", ["high", "low"])
@pytest.mark.parametrize("lq,lk", [(33, 33), (20, 45), (40, 17)])
def test_causal_mask_follows_the_rule_per_row(device, lq, lk, drop):
    """q = 1 with distinct attributions: row i keeps exactly the official count over its n_i
    visible real keys, only among them, and the kept ones are the lowest ("high") or highest
    ("low") of them. Reference and triton bit-identical."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lq + lk)
    attr = torch.randn(2, 2, lq, lk, generator=gen).to(device)
    kpm = _padding(2, lk, device)
    args = dict(p=0.3, q=1.0, key_padding_mask=kpm, drop=drop, is_causal=True)
    got = keep_mask(attr, backend="triton", **args)
    want = keep_mask(attr, backend="reference", **args)
    assert torch.equal(got.words, want.words)
    keep = unpack_mask(got, backend="reference").cpu()
    visible = (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq)
    allowed = visible[None, None] & kpm.cpu()[:, None, None, :]
    n = allowed.sum(-1)
    frac = 0.7 if drop == "high" else 0.3
    index = torch.minimum((n.float() * torch.tensor(frac, dtype=torch.float32)).long(),
                          (n - 1).clamp_min(0))
    want_counts = index if drop == "high" else n - index
    assert torch.equal(keep.sum(-1), want_counts.expand(2, 2, lq))
    assert not (keep & ~allowed).any()
    a = attr.cpu() if drop == "high" else -attr.cpu()
    kept_max = a.masked_fill(~keep, float("-inf")).amax(-1)
    dropped_min = a.masked_fill(keep | ~allowed, float("inf")).amin(-1)
    assert bool((kept_max < dropped_min).all())


def test_causal_mask_from_gqa_pair_and_streamed_path(device):
    """(dO, v) with v of Hkv = H/2 heads (exact small-integer products), resident and streamed
    kernel paths, against the reference."""
    require_backend("triton", device)
    from regdrop_fast.addrop.mask import _fraction
    from regdrop_fast.triton_kernels import addrop_mask as tk
    gen = torch.Generator().manual_seed(5)
    lq, lk = 20, 70
    dO = torch.randint(-3, 4, (1, 2, lq, 16), generator=gen).float().to(device)
    v = torch.randint(-3, 4, (1, 1, lk, 16), generator=gen).float().to(device)
    kpm = _padding(1, lk, device)
    for drop in ("high", "low"):
        args = dict(p=0.4, q=0.5, key_padding_mask=kpm, seed=9, step=2, stream=1, drop=drop,
                    is_causal=True)
        want = keep_mask((dO, v), backend="reference", **args)
        assert torch.equal(keep_mask((dO, v), backend="triton", **args).words, want.words)
        words = tk.keep_mask_bits(dO, v, kpm, _fraction(0.4, drop), int(0.5 * 2**32), 9, 2, 1,
                                  drop == "low", True, block_n=32)
        assert torch.equal(words, want.words)


def _run(fn, q, k, v, grad, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("batch,heads,kv_heads,lq,lk", SHAPES)
def test_causal_gqa_attention_matches_reference(device, batch, heads, kv_heads, lq, lk):
    """fp32 kernel vs the fp64 reference (values and gradients 1e-5), with a causal keep mask,
    key padding and attention dropout."""
    require_backend("triton", device)
    gen = torch.Generator().manual_seed(lq * lk)
    q = torch.randn(batch, heads, lq, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, lk, 16, generator=gen, dtype=torch.float64)
            for _ in range(2))
    grad = torch.randn(batch, heads, lq, 16, generator=gen, dtype=torch.float64)
    kpm = _padding(batch, lk, device)
    keep = keep_mask(torch.randn(batch, heads, lq, lk, generator=gen).to(device), 0.3, 0.5, kpm,
                     seed=1, is_causal=True, backend="reference")
    args = dict(attn_mask=kpm, dropout_p=0.2, seed=3, step=1, stream=2, is_causal=True)
    got = _run(masked_attention, q.float().to(device), k.float().to(device),
               v.float().to(device), grad.to(device), keep=keep, backend="triton", **args)
    want = _run(ref.masked_attention, q.to(device), k.to(device), v.to(device), grad.to(device),
                keep=unpack_mask(keep, backend="reference"), **args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    if lq > lk:  # rows that see no key give zeros
        assert torch.count_nonzero(got[0][:, :, : lq - lk]) == 0


@pytest.mark.parametrize("lq,lk", [(24, 24), (9, 24)])
def test_reference_is_sdpa_causal_gqa(lq, lk):
    """The reference against torch's SDPA (causal bottom-right via an explicit bool mask, GQA via
    enable_gqa): an independent check of the semantics the kernels are compared with."""
    gen = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 6, lq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, lk, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    got = ref.masked_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want)
    if lq == lk:
        torch.testing.assert_close(got, F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True))


def test_causal_kernel_skips_blocks_above_the_diagonal(device):
    """NaN in V at keys 64.. and in Q/dO at rows 0..15: with the interpreter's 16x32 tiles, query
    rows 0..47 never load a key block past 63 and key blocks from 32 on never load query rows
    0..31, so their outputs stay finite only if those blocks are skipped (merely masking a
    loaded block would give 0·NaN = NaN)."""
    require_backend("triton", device)
    if device.type != "cpu":
        pytest.skip("the block boundaries are the interpreter's tile config")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 96, 16, generator=gen) for _ in range(3))
    v[:, :, 64:] = float("nan")
    out = masked_attention(q, k, v, backend="triton", is_causal=True)
    assert torch.isfinite(out[:, :, :48]).all()
    q[:, :, :16] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    v_ok = leaves[2].detach().nan_to_num(0.0).requires_grad_()
    out = masked_attention(leaves[0], leaves[1], v_ok, backend="triton", is_causal=True)
    grad = torch.randn(out.shape, generator=gen)
    grad[:, :, :16] = float("nan")
    out.backward(grad)
    assert torch.isfinite(leaves[1].grad[:, :, 32:]).all()
    assert torch.isfinite(v_ok.grad[:, :, 32:]).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16)), ValueError, "divide"),
    (dict(is_causal=1), TypeError, "is_causal"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=-0.5), ValueError, "scale"),
    (dict(scale="0.1"), TypeError, "scale"),
])
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(1, 4, 4, 16), k=torch.randn(1, 2, 5, 16),
                v=torch.randn(1, 2, 5, 16), backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        masked_attention(**args)


def test_keep_mask_bad_gqa_pair():
    with pytest.raises(ValueError, match="divide"):
        keep_mask((torch.randn(1, 4, 3, 8), torch.randn(1, 3, 5, 8)), 0.3, 0.2)
    with pytest.raises(TypeError, match="is_causal"):
        keep_mask(torch.randn(1, 1, 3, 3), 0.3, 0.2, is_causal="yes")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scale_zero_is_uniform_attention(device, backend):
    """scale = 0 (documented): every allowed key gets the same weight."""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(device) for _ in range(3))
    out = masked_attention(q, k, v, scale=0.0, backend=backend, is_causal=True)
    want = v.cumsum(2) / torch.arange(1, 7, device=device).view(1, 1, 6, 1)
    torch.testing.assert_close(out, want)
