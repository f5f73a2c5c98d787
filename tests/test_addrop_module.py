"""addrop.SelfAttention: the drop-in self-attention module (torch.nn.MultiheadAttention's
conventions) and AD-DROP steps on a small model built from it, against an eager reference."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdrop_fast import addrop
from regdrop_fast.reference import addrop as ref
from utils.addrop import TinyEncoder, module_batch


def _eager_forward(maps, keeps):
    """An eager SelfAttention.forward that appends its attention map to `maps` and attends
    through keeps[layer] (dense bool [B,H,L,L]) when given."""
    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        batch, length, _ = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        allowed = ~torch.isneginf(key_padding_mask)[:, None, None, :]
        if self.is_causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
        keep = keeps.get(len(maps))
        if keep is not None:
            allowed = allowed & keep
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        maps.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(out), None
    return forward


def eager_run(model, batch, keeps=None):
    """(logits, attention maps per layer) of an eager copy of `model`."""
    eager = copy.deepcopy(model)
    maps = []
    for block in eager.blocks:
        attention = block.self_attn
        attention.__dict__.pop("_regdrop_addrop", None)
        attention.forward = types.MethodType(_eager_forward(maps, keeps or {}), attention)
    eager.train()
    out = eager(batch["input_ids"], batch["attention_mask"])
    return out.logits, maps


# -- the module against torch.nn.MultiheadAttention ---------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_multihead_attention(batch_first, causal):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    ours = addrop.SelfAttention(16, 4, batch_first=batch_first)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    x = x if batch_first else x.transpose(0, 1)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    hint = torch.ones(5, 5, dtype=torch.bool).triu(1) if causal else None  # True = masked
    theirs = mha(x, x, x, key_padding_mask=pad, attn_mask=hint, is_causal=causal,
                 need_weights=False)[0]
    mine = ours(x, x, x, key_padding_mask=pad, attn_mask=hint, is_causal=causal)[0]
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(mine)
    (g_mine,) = torch.autograd.grad(mine, x, grad)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)


def test_replaces_self_attn_of_a_transformer_encoder_layer():
    torch.manual_seed(2)
    reference = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
    layer = copy.deepcopy(reference)
    layer.self_attn = addrop.SelfAttention(16, 4, batch_first=True)
    layer.self_attn.load_state_dict(reference.self_attn.state_dict())
    x = torch.randn(2, 6, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for train in (True, False):  # eval + no_grad: the layer's fused fast path stays off
        layer.train(train), reference.train(train)
        with torch.no_grad():
            torch.testing.assert_close(layer(x, src_key_padding_mask=pad)[~pad],
                                       reference(x, src_key_padding_mask=pad)[~pad],
                                       rtol=1e-5, atol=1e-5)


# -- ADDrop drives a model built from it ---------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_addrop_on_a_model_of_self_attention_equals_eager_reference(causal):
    model = TinyEncoder(causal=causal, seed=3)
    batch = module_batch([7, 5, 2], 7, seed=3)
    step = addrop.ADDrop(model, layers=(0, 1), p=0.4, q=0.6, seed=8, backend="reference")
    assert [m.__dict__["_regdrop_addrop_layer"] for m in step.state.modules] == [0, 1]
    logits, maps = eager_run(model, batch)
    target = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
    grads = torch.autograd.grad(target, maps)
    ours = step.attributions(None, batch)
    for layer in (0, 1):
        scale = grads[layer].abs().max().item()
        torch.testing.assert_close(ours[layer], grads[layer], rtol=1e-5, atol=1e-5 * scale)
    pad = batch["attention_mask"].bool()
    expected = {layer: ref.keep_mask(grads[layer], 0.4, 0.6, key_padding_mask=pad, seed=8,
                                     step=0, stream=layer, is_causal=causal)
                for layer in (0, 1)}
    for backend in ("reference", "triton"):
        run = addrop.ADDrop(model, layers=(0, 1), p=0.4, q=0.6, seed=8, backend=backend)
        model.zero_grad(set_to_none=True)
        out = run.step(None, batch)
        for layer in (0, 1):
            assert torch.equal(out.masks[layer].unpack(), expected[layer])
        masked_logits, _ = eager_run(model, batch, expected)
        torch.testing.assert_close(out.logits, masked_logits.detach(), rtol=1e-5, atol=1e-5)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.grad is not None)
        assert model.blocks[0].self_attn.in_proj_weight.grad is not None


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        addrop.SelfAttention(10, 4)
    with pytest.raises(ValueError, match="dropout must be in"):
        addrop.SelfAttention(8, 2, dropout=1.0)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        addrop.SelfAttention(8, 2, batch_first="yes")
    attention = addrop.SelfAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="key and value must be None or the query"):
        attention(x, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        attention(x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask is only accepted as the causal hint"):
        attention(x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"query must be a tensor \[B, L, E\] with E = 8"):
        attention(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, L\]"):
        attention(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        attention(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))


def test_runs_without_transformers():
    """The drop-in module is for models outside transformers: AD-DROP on it must import and
    run where transformers is not installed (hidden here from a fresh interpreter)."""
    import os
    import subprocess
    import sys
    script = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformers":
            raise ImportError("transformers hidden")
sys.meta_path.insert(0, Hide())
from regdrop_fast import addrop
from utils.addrop import TinyEncoder, module_batch
out = addrop.apply_addrop(TinyEncoder(causal=True), layers=(0, 1)).step(
    None, module_batch([5, 3], 5))
assert "transformers" not in sys.modules and out.masks[0].density < 1.0
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
