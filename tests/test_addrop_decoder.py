"""AD-DROP on decoder-only transformers (Llama, Qwen2, Mistral, GPT-2: causal, grouped-query,
rotary) against an eager reference of the procedure: tiny random configs built locally."""
import copy

import pytest
import torch
import torch.nn.functional as F

from regdrop_fast import addrop
from regdrop_fast.addrop import integration
from regdrop_fast.reference import addrop as ref
from utils.addrop import lm_batch, tiny_decoder


def eager_next_token_target(logits, labels):
    """−CE(logits[t], argmax logits[t]) over the positions whose next label is counted."""
    logits = logits.float()[:, :-1]
    counted = labels[:, 1:] != -100
    return -F.cross_entropy(logits[counted], logits.argmax(-1)[counted])


def eager_attributions(model, batch, layers):
    """The official GA procedure on an eager copy: autograd.grad(target, attention maps)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    eager.train()
    out = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_attentions=True)
    maps = [out.attentions[layer] for layer in layers]
    grads = torch.autograd.grad(eager_next_token_target(out.logits, batch["labels"]), maps)
    return dict(zip(layers, grads))


def _eager_keep_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    """Eager softmax attention over the keys allowed by the causal mask, the padding and the
    module's dense keep mask (test attribute `dense_keep`, [B,H,Lq,Lk] bool)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    lq, lk = query.shape[2], key.shape[2]
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask
    keep = getattr(module, "dense_keep", None)
    if keep is not None:
        allowed = allowed & keep
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), probs


def eager_masked_logits(model, batch, dense_masks):
    """Pass 2 of the procedure, eagerly: layer i attends with keep mask i."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register("regdrop_test_eager_keep", _eager_keep_attention)
    AttentionMaskInterface.register("regdrop_test_eager_keep", sdpa_mask)
    eager = copy.deepcopy(model)
    integration.disable(eager)
    eager.set_attn_implementation("regdrop_test_eager_keep")
    for layer, module in enumerate(integration.attention_modules(eager)):
        module.dense_keep = dense_masks.get(layer)
    eager.train()
    with torch.no_grad():
        return eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- plain attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_forward_equals_unpatched(kind, side):
    model = tiny_decoder(kind).eval()
    reference = copy.deepcopy(model)
    addrop.enable(model, layers=(0, 1))
    batch = lm_batch([7, 4, 1], 7, side=side)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        for inputs in ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                       {"input_ids": batch["input_ids"]}):
            ours, theirs = model(**inputs).logits, reference(**inputs).logits
            rows = real if "attention_mask" in inputs else torch.ones_like(real)
            torch.testing.assert_close(ours[rows], theirs[rows], rtol=0, atol=0)


# -- pass 1 against the eager procedure, masks across backends ---------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_token_attributions_and_masks_equal_eager_reference(kind, side):
    model = tiny_decoder(kind, seed=3)
    # left padding: a pad query predicts the first real token; its row has no allowed key,
    # where eager attention (uniform) and SDPA (zeros) differ, so that label is left out
    first_real = [(1, 2), (2, 5)] if side == "left" else []
    batch = lm_batch([8, 6, 3], 8, seed=3, side=side, ignored=[(0, 4), (1, 2)] + first_real)
    layers = (0, 1)
    step = addrop.ADDrop(model, layers=layers, p=0.3, q=0.5, task="token", seed=9,
                         backend="reference")
    ours = step.attributions(None, batch)
    theirs = eager_attributions(model, batch, layers)
    pad = batch["attention_mask"].bool()
    # on pad keys the attribution reads V of pad tokens, which fully masked pad rows of the
    # layer below made differ (eager vs SDPA); pad keys are never kept, so compare real keys
    real_keys = pad[:, None, None, :].expand_as(theirs[0])
    for layer in layers:
        scale = theirs[layer].abs().max().item()
        torch.testing.assert_close(ours[layer][real_keys], theirs[layer].float()[real_keys],
                                   rtol=1e-5, atol=1e-5 * scale)
    masks = {backend: addrop.ADDrop(model, layers=layers, p=0.3, q=0.5, task="token", seed=9,
                                    backend=backend).compute_masks(None, batch, step=4)
             for backend in ("reference", "triton")}
    for layer in layers:
        expected = ref.keep_mask(theirs[layer], 0.3, 0.5, key_padding_mask=pad, seed=9, step=4,
                                 stream=layer, is_causal=True)
        assert torch.equal(masks["reference"][layer].unpack(), expected)
        assert torch.equal(masks["triton"][layer].unpack(), expected)
        # causal rows: nothing above the diagonal, nothing on pad keys
        dense = expected
        assert not (dense & ~torch.ones(8, 8, dtype=torch.bool).tril()).any()
        assert not dense[~pad[:, None, None, :].expand_as(dense)].any()


def test_ignored_positions_do_not_shape_the_masks():
    """Positions whose next label is −100 are out of the target: changing the logits there
    (via a different next label being ignored) changes nothing else."""
    model = tiny_decoder("llama", seed=4)
    base = lm_batch([6, 6], 6, seed=4)
    step = addrop.ADDrop(model, layers=(1,), task="token", backend="reference")
    all_counted = step.attributions(None, base)[1]
    ignored = dict(base, labels=base["labels"].clone())
    ignored["labels"][:, 1:] = -100  # nothing counted: a zero target, zero attributions
    assert not step.attributions(None, ignored)[1].any()
    assert all_counted.abs().max() > 0


# -- the step against the eager procedure ------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_step_pass_two_equals_eager_masked_model(kind, backend):
    model = tiny_decoder(kind, seed=5)
    batch = lm_batch([7, 5, 2], 7, seed=5)
    step = addrop.ADDrop(model, layers=(0, 1), p=0.5, q=0.8, task="token", seed=2,
                         backend=backend)
    out = step.step(None, batch)
    dense = {layer: mask.unpack() for layer, mask in out.masks.items()}
    assert all(mask.density < 1.0 for mask in out.masks.values())
    expected = eager_masked_logits(model, batch, dense)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], expected[real], rtol=1e-5, atol=1e-5)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_causal_random_and_attention_kinds_stay_causal():
    model = tiny_decoder("qwen2", seed=6)
    batch = lm_batch([6, 4], 6, seed=6)
    upper = ~torch.ones(6, 6, dtype=torch.bool).tril()
    for kind in ("random", "attention", "integrated_gradients"):
        out = addrop.ADDrop(model, layers=(1,), attribution=kind, task="token", ig_steps=2,
                            p=0.5, q=0.5).step(None, batch)
        keep = out.masks[1].unpack()
        assert not keep[..., upper].any() and torch.isfinite(out.loss)


# -- bad input ---------------------------------------------------------------------------------
def test_masks_beyond_causal_padding_are_refused_not_ignored():
    model = tiny_decoder("llama", seed=7)
    batch = lm_batch([5, 5], 5, seed=7)
    step = addrop.ADDrop(model, layers=(0,), task="token")
    custom = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    custom[:, :, 4, 0] = False  # a structure the keep mask cannot express
    with pytest.raises(ValueError, match="causal layer 0 takes the causal mask with key padding"):
        step.compute_masks(None, {"input_ids": batch["input_ids"], "attention_mask": custom})
    # packed sequences (position ids restarting, no attention_mask): a block-diagonal mask
    packed = {"input_ids": batch["input_ids"], "use_cache": False,
              "position_ids": torch.tensor([[0, 1, 2, 0, 1]] * 2)}
    with pytest.raises(ValueError, match="packed sequences"):
        step.compute_masks(None, packed)
    assert step.state.mode == "plain"
