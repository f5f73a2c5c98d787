"""The random models the training-step benches time: built locally, nothing downloaded (not a
bench: a leading underscore keeps it out of `regdrop-fast bench`)."""
import torch


def random_bert(device, small: bool):
    """A seeded BertForSequenceClassification in train mode: BERT-base shapes, or a 2-layer,
    64-wide model for CPU and --quick runs."""
    from transformers import BertConfig, BertForSequenceClassification
    if small:
        config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128, num_labels=2)
    else:
        config = BertConfig(num_labels=2)  # bert-base shapes
    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(device).train()
