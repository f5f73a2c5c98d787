"""`SelfAttention`: a drop-in multi-head self-attention module for models outside transformers.

It takes torch.nn.MultiheadAttention's constructor arguments and conventions (embed_dim,
num_heads, dropout on the attention probabilities, bias, batch_first; one packed in_proj_weight
[3E,E] and in_proj_bias [3E], out_proj; key_padding_mask True = ignore, as bool or as the 0/−inf
float mask nn.TransformerEncoderLayer makes of it; returns (output, None)), so it can replace the
`self_attn` of an nn.TransformerEncoderLayer or serve a model of one's own. Self-attention only
(key and value are the query), no attention weights returned (the fused path never forms them);
optional causal attention (is_causal at construction or per call; attn_mask only as MHA's causal
hint, ignored in favour of the exact causal structure).

Outside AD-DROP passes it computes softmax(QKᵀ/√d + masks)·V with SDPA. Once `addrop.enable`
(or `ADDrop`) has found it in a model, its layer index i in the model's module order is the
layer index of the method, and the passes run as for a transformers model: pass 1 records O and
V of the chosen layers, pass 2 attends through `masked_attention` with keep mask i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_prob
from .integration import _LAYER_ATTR, _STATE_ATTR, _dense_mask

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention on `masked_attention` (see the module docstring).

    embed_dim: model width E; num_heads: H dividing E; dropout: attention-probability dropout
    in [0, 1); bias: projection biases; batch_first: inputs [B,L,E] (else [L,B,E]);
    is_causal: every call is causal (row i sees keys 0..i)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, is_causal: bool = False, device=None, dtype=None):
        super().__init__()
        self.embed_dim = check_int("embed_dim", embed_dim, 1, 2**31)
        self.num_heads = check_int("num_heads", num_heads, 1, 2**31)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads}")
        self.head_dim = embed_dim // num_heads
        self.dropout = check_prob("dropout", dropout, low_open=False, high_open=True)
        for name, flag in (("bias", bias), ("batch_first", batch_first), ("is_causal", is_causal)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.batch_first = batch_first
        self.is_causal = is_causal
        # False keeps nn.TransformerEncoder(Layer) off their fused inference fast path, which
        # would compute attention from these weights without calling this module
        self._qkv_same_embed_dim = False
        factory = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MultiheadAttention's initialization."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None,
                need_weights: bool = False, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """(output shaped like query, None). key/value: None or the query tensor itself."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention is self-attention: key and value must be None or the "
                             "query tensor itself")
        if need_weights:
            raise ValueError("need_weights=True is not supported: the fused attention never forms "
                             "the attention map (pass need_weights=False)")
        causal = self.is_causal or bool(is_causal)
        if attn_mask is not None and not causal:
            raise ValueError("attn_mask is only accepted as the causal hint (is_causal=True); "
                             "SelfAttention supports key_padding_mask and causal attention")
        if not isinstance(query, torch.Tensor) or query.dim() != 3 \
                or query.shape[-1] != self.embed_dim:
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            layout = "[B, L, E]" if self.batch_first else "[L, B, E]"
            raise ValueError(f"query must be a tensor {layout} with E = {self.embed_dim}, got "
                             f"{shape}")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, _ = x.shape
        real = _real_keys(key_padding_mask, batch, length, x.device)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        state = self.__dict__.get(_STATE_ATTR)
        layer = self.__dict__.get(_LAYER_ATTR)
        if state is not None and state.intercepts(layer):
            out, _ = state.attend(layer, q, k, v, real, real, causal, scale, dropout)
        else:
            mask = _dense_mask(real, causal, length, length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 scale=scale, is_causal=causal and mask is None)
            out = out.transpose(1, 2)
        out = self.out_proj(out.reshape(batch, length, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"is_causal={self.is_causal}")


def _real_keys(key_padding_mask, batch: int, length: int, device):
    """bool [B,L], True = real key, of MHA's key_padding_mask (True / −inf = ignore); None."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a tensor [B, L] or None, got "
                        f"{type(key_padding_mask).__name__}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(f"key_padding_mask must have shape [B, L] = {(batch, length)}, got "
                         f"{tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask
    if key_padding_mask.is_floating_point():
        # nn.TransformerEncoderLayer turns a bool mask into 0 / −inf; other additive values
        # (biases) are not key padding and cannot be expressed here
        return ~torch.isneginf(key_padding_mask)
    raise TypeError(f"key_padding_mask must be bool (True = ignore) or a float 0/−inf mask, got "
                    f"{key_padding_mask.dtype}")
