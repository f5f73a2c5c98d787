"""The shortened host paths give the same results as the longer ones they replace: the eager
rdrop_loss path (no custom-op dispatch) against the custom op. (keep_mask's threshold ranks are
computed in its kernel now: tests/test_addrop_mask.py checks them against threshold_rank.)"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from regdrop_fast import rdrop_loss
from regdrop_fast.rdrop import loss as rdrop_module
from utils import require_backend
from utils.rdrop import make_inputs


class _Recorder(TorchFunctionMode):
    """A torch-function mode that records the names of the functions it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _loss_and_grads(z1, z2, labels, via_op, **kwargs):
    a = z1.clone().requires_grad_(True)
    b = z2.clone().requires_grad_(True)
    if via_op:  # a torch-function mode keeps the call on the custom op
        with _Recorder() as mode:
            loss = rdrop_loss(a, b, labels, 0.7, **kwargs)
        assert any("rdrop_loss" in name for name in mode.seen), mode.seen
    else:
        loss = rdrop_loss(a, b, labels, 0.7, **kwargs)
    loss.backward(torch.ones_like(loss) * 1.5)
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction,return_parts", [("mean", False), ("none", False),
                                                    ("mean", True)])
def test_rdrop_eager_path_matches_the_custom_op(device, backend, reduction, return_parts):
    require_backend(backend, device)
    z1, z2, labels = make_inputs((5, 11), device, seed=3)
    kwargs = dict(backend=backend, reduction=reduction)
    got = _loss_and_grads(z1, z2, labels, via_op=False, **kwargs)
    want = _loss_and_grads(z1, z2, labels, via_op=True, **kwargs)
    for name, x, y in zip(("loss", "grad1", "grad2"), got, want):
        assert torch.equal(x, y), name
    if return_parts:
        eager = rdrop_loss(z1, z2, labels, 0.7, return_parts=True, **kwargs)
        with _Recorder():
            op = rdrop_loss(z1, z2, labels, 0.7, return_parts=True, **kwargs)
        for x, y in zip(eager, op):
            assert torch.equal(x, y)


def test_rdrop_eager_path_is_taken_for_plain_tensors_only(device):
    z1, z2, labels = make_inputs((3, 4), device)
    assert rdrop_module._plain_eager(z1, z2, labels)
    assert not rdrop_module._plain_eager(torch.nn.Parameter(z1), z2, labels)
    assert not rdrop_module._plain_eager(z1.to("meta"), z2.to("meta"), None)
    with _Recorder():
        assert not rdrop_module._plain_eager(z1, z2, labels)


def test_rdrop_eager_backward_twice_is_refused(device):
    require_backend("triton", device)
    z1, z2, labels = make_inputs((4, 6), device)
    a = z1.clone().requires_grad_(True)
    loss = rdrop_loss(a, z2, labels, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()

