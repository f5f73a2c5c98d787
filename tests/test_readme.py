"""The README's API examples run as written (on a tiny random BERT), so they cannot rot."""
import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The API in short"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


def _batch(n=4, length=9):
    input_ids = torch.randint(5, 64, (n, length))
    attention_mask = torch.ones(n, length, dtype=torch.long)
    attention_mask[0, 6:] = 0  # one padded sample
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.randint(0, 2, (n,))}


def test_readme_api_example_runs():
    model = _tiny_bert()
    batch = _batch()
    namespace = {"model": model, "batch": batch, "train_loader": [_batch(), _batch()]}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    exec(compile(_api_example(), str(README), "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["logits1"].grad is not None
    assert torch.isfinite(namespace["out"].loss)
    # the AD-DROP step's backward reached the parameters and the optimizer moved them
    params = dict(model.named_parameters())
    changed = [n for n in before if n in params and not torch.equal(params[n], before[n])]
    assert changed
    # MaskTrainer attached trainable scores to the masked matrices (weights frozen)
    assert any(n.endswith("mask_scores") for n in params)
    assert namespace["report"], "sparsity_report returned nothing"
