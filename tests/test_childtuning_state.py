"""ChildTuningAdamW / MaskedAdamW given bad state or resized parameters, on every backend
(reference, cpu, triton under the interpreter): load_state_dict checks every saved value before
loading any (moments of the wrong size or dtype, a scalar, a state dict of another model, steps,
seeds and mask words out of range) and leaves the optimizer as it was; a parameter resized after
the first step raises instead of stepping out of bounds; non-finite hyperparameters raise."""
import copy

import pytest
import torch

from utils import require_backend
from regdrop_fast import ChildTuningAdamW, MaskedAdamW, pack_mask

BACKENDS = ["reference", "cpu", "triton"]


def _model(device, shape=(13, 37)):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(*shape), torch.nn.Tanh(),
                               torch.nn.Linear(shape[1], 5)).to(device)


def _masks(model):
    gen = torch.Generator().manual_seed(2)
    return {p: pack_mask((torch.rand(p.shape, generator=gen) < 0.4).to(p.device))
            for p in model.parameters()}


def _stepped(device, backend, steps=1, mode="D", shape=(13, 37)):
    model = _model(device, shape)
    opt = ChildTuningAdamW(model.named_parameters(), mode=mode, seed=7, backend=backend,
                           masks=_masks(model) if mode == "D" else None)
    _run(model, opt, device, steps)
    return model, opt


def _run(model, opt, device, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 13, generator=gen).to(device)).square().mean().backward()
        opt.step()


def _corrupt(sd, edit):
    sd = copy.deepcopy(sd)
    edit(sd)
    return sd


def _set_state(key, field, value):
    return lambda sd: sd["state"][key].__setitem__(field, value)


BAD_STATES = {
    "truncated exp_avg": (_set_state(0, "exp_avg", torch.zeros(5)), ValueError,
                          r"\['exp_avg'\].*0\.weight.*shape \(5,\)"),
    "scalar exp_avg_sq": (_set_state(2, "exp_avg_sq", torch.tensor(1.0)), ValueError,
                          r"\['exp_avg_sq'\].*2\.weight"),
    "int exp_avg": (_set_state(1, "exp_avg", torch.zeros(37, dtype=torch.int64)), TypeError,
                    r"\['exp_avg'\].*0\.bias"),
    "exp_avg not a tensor": (_set_state(1, "exp_avg", 0.5), TypeError, "exp_avg"),
    "meta exp_avg": (_set_state(1, "exp_avg", torch.zeros(37, device="meta")), ValueError,
                     r"\['exp_avg'\].*0\.bias.*meta"),
    "missing exp_avg_sq": (lambda sd: sd["state"][3].pop("exp_avg_sq"), ValueError,
                           "exp_avg_sq"),
    "negative step": (_set_state(0, "step", -1), ValueError, r"\['step'\].*0\.weight"),
    "step past 2^32": (_set_state(0, "step", 2**32), ValueError, "step"),
    "seed -1": (lambda sd: sd["regdrop_fast"].__setitem__("seed", -1), ValueError, "seed"),
    "seed 2^70": (lambda sd: sd["regdrop_fast"].__setitem__("seed", 2**70), ValueError, "seed"),
    "empty mask words": (lambda sd: sd["regdrop_fast"]["masks"].__setitem__(
        0, torch.zeros(0, dtype=torch.int32)), ValueError, r"masks'\]\[0\].*0\.weight"),
    "short mask words": (lambda sd: sd["regdrop_fast"]["masks"].__setitem__(
        2, torch.zeros(3, dtype=torch.int32)), ValueError, "masks"),
    "int64 mask words": (lambda sd: sd["regdrop_fast"]["masks"].__setitem__(
        1, torch.zeros(2, dtype=torch.int64)), TypeError, "masks"),
    "mask of no parameter": (lambda sd: sd["regdrop_fast"]["masks"].__setitem__(
        9, torch.zeros(2, dtype=torch.int32)), ValueError, "masks"),
    "state of no parameter": (lambda sd: sd["state"].__setitem__(9, sd["state"][0]), ValueError,
                              "key 9"),
    "state keyed by a string": (lambda sd: sd["state"].__setitem__("0", sd["state"].pop(0)),
                                ValueError, "key '0'"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_state_is_rejected_before_anything_loads(device, backend, case):
    require_backend(backend, device)
    edit, error, match = BAD_STATES[case]
    model, opt = _stepped(device, backend)
    twin_model, twin = _stepped(device, backend)
    bad = _corrupt(opt.state_dict(), edit)
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    # nothing was loaded: the next steps equal those of an optimizer that never saw it
    _run(model, opt, device, 1, seed=3)
    _run(twin_model, twin, device, 1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_a_model_with_other_shapes_names_the_parameter(device, backend):
    require_backend(backend, device)
    # same number of tensors, same streams (by name), other shapes
    _, other = _stepped(device, backend, mode="F", shape=(13, 41))
    _, opt = _stepped(device, backend, mode="F")
    with pytest.raises(ValueError, match=r"0\.weight.*shape \(41, 13\).*\(37, 13\)"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_state_round_trips(device, backend):
    require_backend(backend, device)
    model, opt = _stepped(device, backend)
    twin_model, twin = _stepped(device, backend)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(model, opt, device, 1, seed=3)
    _run(twin_model, twin, device, 1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["F", "D"])
def test_parameter_resized_after_the_first_step_raises(device, backend, mode):
    require_backend(backend, device)
    model, opt = _stepped(device, backend, mode=mode)
    weight = model[0].weight
    weight.data = torch.zeros(4096, device=device)
    weight.grad = torch.ones(4096, device=device)
    with pytest.raises(ValueError, match=r"0\.weight.*resized"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_left_from_before_a_resize_raises(device, backend):
    require_backend(backend, device)
    model, opt = _stepped(device, backend, mode="F")
    model[0].bias.data = torch.zeros(36, device=device)  # its .grad keeps shape (37,)
    with pytest.raises(ValueError, match=r"gradient of 0\.bias has shape \(37,\)"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adamw_state_checks(device, backend):
    require_backend(backend, device)
    model = _model(device)
    opt = MaskedAdamW(model.parameters(), masks=_masks(model), backend=backend)
    _run(model, opt, device, 1)
    bad = _corrupt(opt.state_dict(), lambda sd: sd["regdrop_fast"]["masks"].__setitem__(
        0, torch.zeros(0, dtype=torch.int32)))
    with pytest.raises(ValueError, match="masks"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("name,value", [("lr", float("inf")), ("lr", float("nan")),
                                        ("eps", float("inf")), ("weight_decay", float("nan")),
                                        ("lr", True)])
def test_non_finite_hyperparameters_raise(device, name, value):
    with pytest.raises(ValueError, match=name):
        ChildTuningAdamW(_model(device).parameters(), mode=None, seed=0, **{name: value})


def test_masked_adamw_reset_masks_equals_a_new_optimizer():
    """reset_masks (IMP after a prune) leaves the optimizer as a new MaskedAdamW over the same
    parameters and masks would be: moments and steps cleared, the new masks applied."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(6, 40)), torch.nn.Parameter(torch.randn(40))]
    first = {weights[0]: torch.rand(6, 40) > 0.3, weights[1]: None}
    second = {weights[0]: torch.rand(6, 40) > 0.6, weights[1]: torch.rand(40) > 0.5}
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]

    def run(opt, params, steps):
        for g in steps:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    opt = MaskedAdamW(weights, first, lr=1e-2, backend="reference")
    run(opt, weights, grads[:3])
    opt.reset_masks(second)
    assert not opt.state
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fresh = MaskedAdamW(twins, {twins[0]: second[weights[0]], twins[1]: second[weights[1]]},
                        lr=1e-2, backend="reference")
    run(opt, weights, grads[3:])
    run(fresh, twins, grads[3:])
    for a, b in zip(weights, twins):
        assert torch.equal(a, b)
    assert not weights[0][~second[weights[0]]].any()
