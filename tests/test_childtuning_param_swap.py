"""ChildTuningAdamW / MaskedAdamW keep working when the tensors in their param_groups are
replaced in place (accelerate's FSDP2 `prepare` swaps every parameter of an existing optimizer
for its sharded DTensor): the replacement inherits the name, Philox stream, mask and state."""
from __future__ import annotations

import pytest
import torch

from regdrop_fast import ChildTuningAdamW, MaskedAdamW


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (33,))]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=g) for shape in ((7, 5), (33,))]


def _make(kind, params):
    named = [(f"w{i}", p) for i, p in enumerate(params)]
    if kind == "F":
        return ChildTuningAdamW(named, lr=1e-2, mode="F", reserve_p=0.4, seed=3,
                                backend="reference")
    masks = {"w0": torch.arange(35).reshape(7, 5) % 3 == 0, "w1": torch.arange(33) % 2 == 0}
    if kind == "D":
        return ChildTuningAdamW(named, lr=1e-2, mode="D", reserve_p=0.4, seed=3, masks=masks,
                                backend="reference")
    return MaskedAdamW(named, masks, lr=1e-2, backend="reference")


def _step(opt, params, step):
    for p, g in zip(params, _grads(step)):
        p.grad = g.clone()
    opt.step()


def _swap(opt):
    """Replace every parameter of `opt` by a copy, as accelerate's FSDP2 prepare does."""
    fresh = []
    for group in opt.param_groups:
        group["params"] = [torch.nn.Parameter(p.detach().clone()) for p in group["params"]]
        fresh += group["params"]
    return fresh


@pytest.mark.parametrize("kind", ["F", "D", "masked"])
@pytest.mark.parametrize("swap_at", [0, 2])
def test_swapped_params_step_like_the_originals(kind, swap_at):
    reference, swapped = _params(), _params()
    ref_opt, opt = _make(kind, reference), _make(kind, swapped)
    for step in range(4):
        if step == swap_at:
            swapped = _swap(opt)
        _step(ref_opt, reference, step)
        _step(opt, swapped, step)
    for a, b in zip(reference, swapped):
        assert torch.equal(a, b)
    ref_sd, sd = ref_opt.state_dict(), opt.state_dict()
    for key in ref_sd["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_sd["state"][key][name], sd["state"][key][name])
    assert opt.mask_stream(swapped[1]) == ref_opt.mask_stream(reference[1])


def test_replacement_of_another_shape_is_refused():
    params = _params()
    opt = _make("F", params)
    opt.param_groups[0]["params"][0] = torch.nn.Parameter(torch.zeros(5, 7))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"parameter w0 was replaced by a tensor of shape \(5, 7\)"):
        opt.step()
