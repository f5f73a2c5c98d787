"""Helpers the test modules share, one module per topic (fixtures stay in conftest.py):

  utils            require_backend: skip when a backend cannot run on the device under test
  utils.sm90       compile a script's Triton kernels for sm_90 with the real compiler
  utils.rdrop      the normwise relative-error assert, R-Drop inputs, the official BERT formula
  utils.addrop     tiny transformers encoders/decoders, MiniLM, a SelfAttention model, their
                   batches, and the official AD-DROP attribution procedure
  utils.finetune   a tiny BERT + CSV task for the CLI, run comparison, checkpoint kill points

Test modules import from here, never from each other or from conftest.py."""
import pytest

from regdrop_fast import backends


def require_backend(name: str, device) -> None:
    """Skip (with the reason) when backend `name` cannot run on `device`."""
    reason = backends.unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
