"""AD-DROP as a transformers attention implementation (regdrop_fast.addrop.integration)."""
import copy
import os

import pytest
import torch

from regdrop_fast import addrop
from regdrop_fast.addrop import integration
from utils import require_backend
from utils.addrop import batch_of, load_minilm, tiny_model


def _unpatched_and_enabled(model, **enable_kwargs):
    reference = copy.deepcopy(model).eval()
    addrop.enable(model, **enable_kwargs)
    return reference, model.eval()


# -- plain attention after enable ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "distilbert"])
def test_enable_plain_forward_equals_unpatched(kind):
    model = tiny_model(kind, dropout=0.1)
    reference, model = _unpatched_and_enabled(model, layers=(0, 1))
    assert model.config._attn_implementation == integration.IMPLEMENTATION_NAME
    batch = batch_of(model, [9, 5, 1, 0], 9, labels=False)  # full, padded, L=1 real, all-pad
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(**batch).logits
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_enable_plain_forward_equals_unpatched_minilm():
    model = load_minilm()
    reference, model = _unpatched_and_enabled(model, layers=(0, 5))
    batch = batch_of(model, [12, 7, 3], 12, labels=False, seed=3)
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = reference(**batch, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], rtol=1e-5,
                               atol=1e-5)


def _real_token_states(model, batch):
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden[batch["attention_mask"].bool()]


def test_padding_respected_in_plain_and_masked_passes():
    model = tiny_model("bert").eval()
    batch = batch_of(model, [8, 5, 3], 8, labels=False)
    other = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                              torch.full_like(batch["input_ids"], 17)))
    state = addrop.enable(model, layers=(0, 1), p=0.5, q=1.0)
    torch.testing.assert_close(_real_token_states(model, batch), _real_token_states(model, other),
                               rtol=0, atol=1e-6)
    # masked pass: the same keep masks for both inputs (q=0: nothing dropped but pad keys)
    shape = (3, 4, 8, 8)
    keep = addrop.keep_mask(torch.randn(shape), 0.5, 0.0,
                            key_padding_mask=batch["attention_mask"].bool())
    with state.masking({0: keep, 1: keep}, step=0):
        masked_a = _real_token_states(model, batch)
        masked_b = _real_token_states(model, other)
    torch.testing.assert_close(masked_a, masked_b, rtol=0, atol=1e-6)


def test_attention_function_alone_ignores_padding():
    """Why enable also registers a mask builder: with the function alone transformers passes
    attention_mask=None and pad tokens change the real tokens' outputs."""
    from transformers import AttentionInterface
    AttentionInterface.register("regdrop_test_function_only", integration._attention_function)
    model = tiny_model("bert").eval()
    seen = []
    original = integration._attention_function

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("regdrop_test_function_only", spy)
    model.set_attn_implementation("regdrop_test_function_only")
    batch = batch_of(model, [8, 4], 8, labels=False)
    other = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"],
                                              torch.full_like(batch["input_ids"], 17)))
    changed = (_real_token_states(model, batch) - _real_token_states(model, other)).abs().max()
    assert all(mask is None for mask in seen) and changed > 1e-3
    addrop.enable(model)  # function + builder
    seen.clear()
    assert (_real_token_states(model, batch) - _real_token_states(model, other)).abs().max() < 1e-6


def test_mask_builder_keeps_a_key_padding_view():
    model = tiny_model("bert").eval()
    state = addrop.enable(model, layers=(1,))
    batch = batch_of(model, [6, 2], 6, labels=False)
    with state.recording() as records, torch.no_grad():
        model(**batch)
    assert set(records) == {1}
    assert torch.equal(records[1].key_padding, batch["attention_mask"].bool())
    assert records[1].out.shape == (2, 4, 6, 8) and records[1].value.shape == (2, 4, 6, 8)
    # an all-real mask stays a view: skipping it would need a host sync (mask.all())
    unpadded = batch_of(model, [6, 6], 6, labels=False)
    with state.recording() as records, torch.no_grad():
        model(**unpadded)
    assert records[1].key_padding.all() and records[1].key_padding.shape == (2, 6)
    with state.recording() as records, torch.no_grad():
        model(input_ids=unpadded["input_ids"])
    assert records[1].key_padding is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_masked_pass_with_full_keep_equals_plain(backend, device):
    require_backend(backend, device)
    model = tiny_model("bert").to(device).eval()
    state = addrop.enable(model, layers=(0, 1), backend=backend)
    batch = {k: v.to(device) for k, v in batch_of(model, [7, 3, 0], 7, labels=False).items()}
    with torch.no_grad():
        plain = model(**batch).logits
        pad = batch["attention_mask"].bool()
        keep = addrop.keep_mask(torch.randn(3, 4, 7, 7, device=device), 0.3, 0.0,
                                key_padding_mask=pad, backend="reference")
        with state.masking({0: keep, 1: keep}, step=0):
            masked = model(**batch).logits
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)


def test_masked_pass_uses_each_layers_mask():
    """Layer i attends through mask i: dropping everything in layer 1 only changes the output
    exactly as the reference masked attention predicts at that layer."""
    model = tiny_model("bert").eval()
    state = addrop.enable(model, layers=(0, 1))
    batch = batch_of(model, [5, 5], 5, labels=False)
    pad = batch["attention_mask"].bool()
    full = addrop.keep_mask(torch.randn(2, 4, 5, 5), 0.3, 0.0, key_padding_mask=pad)
    from regdrop_fast.masks import pack_mask
    none = pack_mask(torch.zeros(2, 4, 5, 5, dtype=torch.bool))
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        with state.masking({0: full, 1: none}, step=0):
            masked = model(**batch, output_hidden_states=True).hidden_states
        with state.masking({0: none, 1: full}, step=0):
            masked_first = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(masked[1], plain[1], rtol=1e-5, atol=1e-6)
    assert (masked[2] - plain[2]).abs().max() > 1e-3
    assert (masked_first[1] - plain[1]).abs().max() > 1e-3


def test_layer_mask_reads_masks_as_sdpa_does():
    assert integration._layer_mask(None, True, 0) == (True, None, None)
    assert integration._layer_mask(None, False, 0) == (False, None, None)
    pad = torch.tensor([[True, True, False], [True, False, False]])
    view = pad[:, None, None, :].expand(2, 1, 1, 3)
    causal, key_padding, attn_mask = integration._layer_mask(view, True, 0)
    assert not causal and torch.equal(key_padding, pad) and torch.equal(attn_mask, pad)
    built = integration._mask_builder(2, 3, 3, mask_function=_causal_mask_function(),
                                      attention_mask=pad)
    causal, key_padding, attn_mask = integration._layer_mask(built, True, 0)
    assert causal and torch.equal(key_padding, pad) and torch.equal(attn_mask, pad)
    banded = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril() & pad[:, None, None, :]
    causal, key_padding, attn_mask = integration._layer_mask(banded, False, 0)
    assert not causal and torch.equal(key_padding, pad) and attn_mask is banded
    with pytest.raises(ValueError, match="causal layer 3 takes the causal mask"):
        integration._layer_mask(banded, True, 3)  # equal values, but not our causal mask
    with pytest.raises(TypeError, match="bool masks"):
        integration._layer_mask(torch.zeros(2, 1, 1, 3), False, 0)


def _causal_mask_function():
    from transformers.masking_utils import causal_mask_function
    return causal_mask_function


def test_disable_restores_previous_implementation():
    model = tiny_model("bert").eval()
    model.set_attn_implementation("eager")
    addrop.enable(model, layers=(1,))
    addrop.enable(model, layers=(0,))  # re-enabling keeps the original to restore
    addrop.disable(model)
    assert model.config._attn_implementation == "eager"
    assert not hasattr(model, integration._STATE_ATTR)
    with pytest.raises(ValueError, match="not enabled"):
        addrop.disable(model)


def test_passes_do_not_nest():
    model = tiny_model("bert")
    state = addrop.enable(model)
    with state.recording():
        with pytest.raises(RuntimeError, match="cannot nest"):
            with state.recording():
                pass
    assert state.mode == "plain"
    with pytest.raises(ValueError, match="missing"):
        with state.masking({}, step=0):
            pass


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_enable_rejects_p_outside_open_unit_interval(p):
    with pytest.raises(ValueError, match="p must be in"):
        addrop.enable(tiny_model("bert"), p=p)


@pytest.mark.parametrize("q", [-0.1, 1.01])
def test_enable_rejects_q_outside_unit_interval(q):
    with pytest.raises(ValueError, match="q must be in"):
        addrop.enable(tiny_model("bert"), q=q)


@pytest.mark.parametrize("layers", [(2,), (-1,), (0, 5), ()])
def test_enable_rejects_layers_out_of_range(layers):
    with pytest.raises(ValueError, match="layers must"):
        addrop.enable(tiny_model("bert"), layers=layers)


def test_enable_rejects_bad_kinds_and_types():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="attribution must be one of"):
        addrop.enable(model, attribution="saliency")
    with pytest.raises(ValueError, match="drop must be one of"):
        addrop.enable(model, drop="middle")
    with pytest.raises(TypeError, match="layers must hold ints"):
        addrop.enable(model, layers=(0.5,))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        addrop.enable(torch.nn.Linear(2, 2))


def _refusal(model):
    with pytest.raises(ValueError, match="Supported: encoders: BERT, RoBERTa") as info:
        addrop.enable(model)
    assert type(model).__name__ in str(info.value)
    assert not hasattr(model, integration._STATE_ATTR)
    return str(info.value)


def test_enable_refuses_unservable_models_with_the_true_reason():
    import transformers as tf
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=31, d_model=16, d_kv=4, d_ff=24,
                                                   num_layers=1, num_heads=2))
    assert "encoder-decoder" in _refusal(t5)
    cross = tiny_model("bert", is_decoder=True, add_cross_attention=True)
    assert "cross-attend" in _refusal(cross)
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=31, hidden_size=16, n_layer=1,
                                               n_head=2))
    assert "does not call transformers' AttentionInterface" in _refusal(bloom)
    mistral = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    assert "sliding-window attention (sliding_window=4096)" in _refusal(mistral)
    qwen = tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
        max_window_layers=1))
    addrop.enable(qwen, layers=(0,))  # layer 0 is full attention, layer 1 slides
    with pytest.raises(ValueError, match="layer 1 uses sliding-window attention"):
        addrop.enable(qwen, layers=(0, 1))


def test_decoders_that_were_refused_are_served():
    """GPT-2 and a causal BERT were refused ("no encoder layer list", "decoder"): both are
    causal self-attention through AttentionInterface, now AD-DROP's causal rows."""
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=31,
                                      n_positions=16, bos_token_id=1, eos_token_id=2))
    decoder_bert = tiny_model("bert", head="token", is_decoder=True)
    for model in (gpt2, decoder_bert):
        state = addrop.enable(model, layers=(1,))
        assert len(state.modules) == 2 and all(mod.is_causal for mod in state.modules)


def test_registered_on_import_for_from_pretrained(tmp_path):
    """A fresh interpreter: `import regdrop_fast.addrop`, then from_pretrained with the name."""
    import subprocess
    import sys
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "tiny")
    script = f"""
import torch, regdrop_fast.addrop as addrop
from transformers import AutoModelForSequenceClassification as Auto
path = {str(tmp_path / "tiny")!r}
ours = Auto.from_pretrained(path, attn_implementation="regdrop_addrop").eval()
sdpa = Auto.from_pretrained(path, attn_implementation="sdpa").eval()
assert ours.config._attn_implementation == "regdrop_addrop"
ids = torch.randint(5, 61, (2, 6)); mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
with torch.no_grad():
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits,
                       sdpa(input_ids=ids, attention_mask=mask).logits)
step = addrop.apply_addrop(ours, layers=(0,))
assert step.state.modules[0]._regdrop_addrop is step.state
print("ok")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_registration_is_idempotent():
    from transformers import AttentionInterface, AttentionMaskInterface
    integration._register()
    integration._register()
    assert AttentionInterface._global_mapping["regdrop_addrop"] is integration._attention_function
    assert AttentionMaskInterface._global_mapping["regdrop_addrop"] is integration._mask_builder
