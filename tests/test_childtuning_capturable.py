"""ChildTuningAdamW / MaskedAdamW with capturable=True (torch.optim.AdamW's semantics): step
counts and lr in device tensors, the same masks and values as the non-capturable step, checkpoint
round trips in both directions, CUDA graph capture (GPU only) and bad input."""
import copy
import io

import pytest
import torch

from utils import require_backend
from regdrop_fast import ChildTuningAdamW, MaskedAdamW, pack_mask
from regdrop_fast.reference import masked_adamw as ref

SEED = 20240521
LRS = [1e-2, 5e-3, 2.5e-3, 4e-3, 1e-3]  # a schedule that also goes back up


def _model(device):
    # odd widths: rows that are not multiples of 32 bits or of the Philox block of 4
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(),
                               torch.nn.Linear(37, 5)).to(device)


def _batches(device, steps):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 13, generator=gen).to(device) for _ in range(steps)]


def _masks(model):
    gen = torch.Generator().manual_seed(2)
    return {p: None if i == 3 else pack_mask((torch.rand(p.shape, generator=gen) < 0.4)
                                             .to(p.device))
            for i, p in enumerate(model.parameters())}


def _build(device, backend, capturable, lr, mode="F", semantics="paper", drop="grad",
           cls=ChildTuningAdamW):
    model = _model(device)
    if cls is MaskedAdamW:
        opt = MaskedAdamW(model.parameters(), masks=_masks(model), lr=lr, semantics=semantics,
                          backend=backend, capturable=capturable)
    else:
        opt = ChildTuningAdamW(model.parameters(), lr=lr, mode=mode, drop=drop,
                               semantics=semantics, weight_decay=0.1, seed=SEED,
                               masks=_masks(model) if mode == "D" else None, backend=backend,
                               capturable=capturable)
    return model, opt


def _run(model, opt, batches, lrs, lr_tensor=None):
    """One step per batch; lr follows `lrs`, set in place on `lr_tensor` when given."""
    for x, lr in zip(batches, lrs):
        if lr_tensor is not None:
            lr_tensor.fill_(lr)
        else:
            opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _kept(before, after):
    """Elements whose exp_avg changed: with drop="grad" a dropped element's m only decays."""
    return [a != b for a, b in zip(before, after)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("mode,semantics,drop", [("F", "paper", "grad"), ("F", "torch", "update"),
                                                 ("D", "paper", "update"),
                                                 ("D", "torch", "grad")])
def test_capturable_matches_the_host_step(device, backend, mode, semantics, drop):
    require_backend(backend, device)
    batches = _batches(device, len(LRS))
    model, opt = _build(device, backend, False, LRS[0], mode, semantics, drop)
    _run(model, opt, batches, LRS)
    lr = torch.tensor(LRS[0], dtype=torch.float32, device=device)
    cap_model, cap_opt = _build(device, backend, True, lr, mode, semantics, drop)
    _run(cap_model, cap_opt, batches, LRS, lr_tensor=lr)
    for p, q in zip(model.parameters(), cap_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(cap_opt.state[q][key], opt.state[p][key], rtol=1e-6,
                                       atol=1e-9)
        step = cap_opt.state[q]["step"]
        assert step.dtype == torch.float32 and step.device == q.device and step.dim() == 0
        assert int(step) == len(LRS) == opt.state[p]["step"]
    assert cap_opt.param_groups[0]["lr"] is lr  # the caller's tensor, changed in place


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("semantics", ["paper", "torch"])
def test_capturable_f_masks_are_the_host_masks(device, backend, semantics):
    """Mode F with drop="grad": an element's m changes by more than its decay exactly when it is
    kept, so equal "kept" sets after each step mean equal Philox masks."""
    require_backend(backend, device)
    batches = _batches(device, 3)
    runs = []
    for capturable in (False, True):
        # float64: the two runs' values stay bit-identical, so "kept" is read the same way
        lr = torch.tensor(LRS[0], dtype=torch.float64, device=device) if capturable else LRS[0]
        model, opt = _build(device, backend, capturable, lr, "F", semantics)
        kept = []
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            before = [opt.state[p]["exp_avg"].clone() if opt.state[p] else torch.zeros_like(p)
                      for p in model.parameters()]
            opt.step()
            after = [opt.state[p]["exp_avg"] for p in model.parameters()]
            # m1 = b1*m + (1-b1)*g*k/p: a kept element with a nonzero gradient moves off b1*m
            kept.append([((a - 0.9 * b).abs() > 0) & (g != 0)
                         for a, b, g in zip(after, before, grads)])
        runs.append(kept)
    for host, cap in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(host, cap))
    assert any(bool(k.any()) and not bool(k.all()) for k in runs[0][0])  # a real mask


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_masked_adamw_capturable(device, backend):
    require_backend(backend, device)
    batches = _batches(device, len(LRS))
    model, opt = _build(device, backend, False, LRS[0], cls=MaskedAdamW)
    _run(model, opt, batches, LRS)
    lr = torch.tensor(LRS[0], device=device)
    cap_model, cap_opt = _build(device, backend, True, lr, cls=MaskedAdamW)
    _run(cap_model, cap_opt, batches, LRS, lr_tensor=lr)
    for p, q in zip(model.parameters(), cap_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
    pruned = ~ref.keep_bits(ref.MASK_BITS, 37 * 13, 0, seed=0, step=0, stream=0, reserve_p=1.0,
                            words=cap_opt._mask_words[cap_model[0].weight], device=device)
    assert bool(pruned.any()) and not bool(cap_model[0].weight.reshape(-1)[pruned].any())


def test_float_lr_with_capturable_follows_the_group(device):
    """A float lr (e.g. from a scheduler that assigns floats) is copied to the device."""
    batches = _batches(device, len(LRS))
    model, opt = _build(device, "reference", False, LRS[0])
    _run(model, opt, batches, LRS)
    cap_model, cap_opt = _build(device, "reference", True, LRS[0])
    _run(cap_model, cap_opt, batches, LRS)
    for p, q in zip(model.parameters(), cap_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("save_capturable,load_capturable", [(True, True), (False, True),
                                                             (True, False)])
def test_state_dict_round_trip(device, save_capturable, load_capturable):
    backend = "cpu" if device.type == "cpu" else "triton"
    require_backend(backend, device)
    batches = _batches(device, 6)

    def lr_for(capturable):
        return torch.tensor(LRS[0], device=device) if capturable else LRS[0]

    model, opt = _build(device, backend, False, LRS[0], "F")
    _run(model, opt, batches, LRS[:1] * 6)
    first_lr = lr_for(save_capturable)
    first, first_opt = _build(device, backend, save_capturable, first_lr, "F")
    _run(first, first_opt, batches[:3], LRS[:1] * 3)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed_lr = lr_for(load_capturable)
    if load_capturable:
        resumed_lr.fill_(0.5)  # the saved lr must win, in the same tensor
    resumed, resumed_opt = _build(device, backend, load_capturable, resumed_lr, "F")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(copy.deepcopy(saved["opt"]))
    group = resumed_opt.param_groups[0]
    assert group["capturable"] is load_capturable
    if load_capturable:
        assert group["lr"] is resumed_lr and float(resumed_lr) == pytest.approx(LRS[0])
    else:
        assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(LRS[0])
    for p in resumed.parameters():
        step = resumed_opt.state[p]["step"]
        if load_capturable:
            assert isinstance(step, torch.Tensor) and step.dtype == torch.float32
            assert step.device == p.device and int(step) == 3
        else:
            assert step == 3 and isinstance(step, int)
    _run(resumed, resumed_opt, batches[3:], LRS[:1] * 3,
         lr_tensor=resumed_lr if load_capturable else None)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_load_rejects_a_step_past_float32_range(device):
    model, opt = _build(device, "reference", False, LRS[0])
    _run(model, opt, _batches(device, 1), LRS)
    sd = opt.state_dict()
    for value in sd["state"].values():
        value["step"] = 2 ** 24 + 1
    _, cap_opt = _build(device, "reference", True, LRS[0])
    with pytest.raises(ValueError, match="exact up to 2\\^24"):
        cap_opt.load_state_dict(sd)
    assert not any(cap_opt.state.values())


def test_capturable_bad_input(device):
    model = _model(device)
    with pytest.raises(TypeError, match="capturable"):
        ChildTuningAdamW(model.parameters(), capturable=1)
    with pytest.raises(TypeError, match="lr may be a tensor only with capturable=True"):
        ChildTuningAdamW(model.parameters(), lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="lr as a tensor must be a 0-d"):
        ChildTuningAdamW(model.parameters(), lr=torch.tensor([1e-3]), capturable=True)
    with pytest.raises(ValueError, match="lr must be finite"):
        ChildTuningAdamW(model.parameters(), lr=torch.tensor(float("nan")), capturable=True)
    opt = ChildTuningAdamW(model.parameters(), lr=torch.tensor(1e-3, device="meta"),
                           capturable=True, seed=1, backend="reference")
    model(_batches(device, 1)[0]).sum().backward()
    with pytest.raises(ValueError, match="lr is a tensor on meta"):
        opt.step()
    assert not any(opt.state.values())  # nothing changed


def test_capturable_on_a_device_without_a_capturable_backend():
    params = [torch.nn.Parameter(torch.zeros(4, device="meta"))]
    params[0].grad = torch.zeros(4, device="meta")
    opt = ChildTuningAdamW(params, capturable=True, seed=1, backend="reference")
    with pytest.raises(ValueError, match="capturable=True needs parameters on cpu or cuda"):
        opt.step()


def test_compiled_step_does_not_recompile_when_lr_changes(device):
    backend = "cpu" if device.type == "cpu" else "cuda"
    require_backend(backend, device)
    batches = _batches(device, len(LRS))
    lr = torch.tensor(LRS[0], device=device)
    model, opt = _build(device, backend, True, lr)
    _run(model, opt, batches, LRS, lr_tensor=lr)
    lr_c = torch.tensor(LRS[0], device=device)
    compiled_model, compiled_opt = _build(device, backend, True, lr_c)
    _run(compiled_model, compiled_opt, batches[:1], LRS[:1], lr_tensor=lr_c)  # creates state
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_opt.step = torch.compile(compiled_opt.step)
            _run(compiled_model, compiled_opt, batches[1:], LRS[1:], lr_tensor=lr_c)
    finally:
        torch._dynamo.reset()
    for p, q in zip(model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def _raw_args(device, lr_dtype=torch.float64):
    sizes = [37, 70]
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).to(device) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    words = pack_mask(torch.rand(70, generator=gen) < 0.5).words.reshape(-1).to(device)
    return [params, grads, [torch.zeros(n, device=device) for n in sizes],
            [torch.zeros(n, device=device) for n in sizes],
            [torch.zeros(0, dtype=torch.int32, device=device), words], [ref.MASK_PHILOX,
                                                                      ref.MASK_BITS],
            [torch.tensor(3.0, device=device) for _ in sizes], [5, 0], [0, 1],
            torch.tensor(1e-3, dtype=lr_dtype, device=device), 0.9, 0.999, 1e-6, 0.01, 7, 1,
            0.3, 0, True]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_raw_capturable_op(device, backend):
    require_backend(backend, device)
    op = torch.ops.regdrop_fast.masked_adamw_capturable_
    torch.library.opcheck(op, _raw_args(device))
    args = _raw_args(device, torch.float32)
    params = [p.clone() for p in args[0]]
    exp_avgs, exp_avg_sqs = [m.clone() for m in args[2]], [v.clone() for v in args[3]]
    op(*args)
    ref.masked_adamw_step(params, args[1], exp_avgs, exp_avg_sqs, masks=args[4],
                          mask_kinds=args[5], steps=[3, 3], index_offsets=args[7],
                          streams=args[8], lr=float(args[9]), beta1=0.9, beta2=0.999, eps=1e-6,
                          weight_decay=0.01, seed=7 + (1 << 32), reserve_p=0.3, action="grad",
                          semantics="paper")
    for a, b in zip(args[0], params):
        torch.testing.assert_close(a, b.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("index,value,error,match", [
    (6, "int_steps", TypeError, r"steps\[0\] must be float32"),
    (6, "one_step", ValueError, "steps must have 2 entries"),
    (9, "two_lrs", ValueError, "lr must be a one-element tensor"),
    (9, "half_lr", TypeError, "lr must be float32 or float64"),
])
def test_raw_capturable_op_bad_arguments(device, index, value, error, match):
    args = _raw_args(device)
    args[index] = {"int_steps": [torch.tensor(1, dtype=torch.int32, device=device)] * 2,
                   "one_step": [torch.tensor(1.0, device=device)],
                   "two_lrs": torch.ones(2, device=device),
                   "half_lr": torch.tensor(1.0, dtype=torch.half, device=device)}[value]
    for where in (device, "meta"):  # the C++ check and the fake
        moved = [[t.to(where) for t in a] if isinstance(a, list) and a
                 and isinstance(a[0], torch.Tensor) else
                 a.to(where) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(error, match=match):
            torch.ops.regdrop_fast.masked_adamw_capturable_(*moved)
    if device.type == "cpu":
        args = _raw_args(device)
        args[6] = [torch.tensor(1.5), torch.tensor(1.0)]
        with pytest.raises(ValueError, match=r"steps\[0\] must hold an integer"):
            torch.ops.regdrop_fast.masked_adamw_capturable_(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["F", "D"])
def test_cuda_graph_capture_and_replay(mode):
    """optimizer.step() captured once in a CUDA graph and replayed with lr changed in place
    equals eager steps."""
    device = torch.device("cuda")
    batches = _batches(device, len(LRS))
    model, opt = _build(device, None, False, LRS[0], mode)
    _run(model, opt, batches, LRS)
    lr = torch.tensor(LRS[0], device=device)
    cap_model, cap_opt = _build(device, None, True, lr, mode)
    static_x = batches[0].clone()

    def loss_and_grads():
        cap_opt.zero_grad(set_to_none=False)
        cap_model(static_x).square().mean().backward()

    # the first step (state creation, plan, cached tables) runs eagerly; then it is undone so
    # the graph replays every step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss_and_grads()
    torch.cuda.current_stream().wait_stream(side)
    initial = [p.detach().clone() for p in cap_model.parameters()]
    cap_opt.step()
    for p, p0 in zip(cap_model.parameters(), initial):
        p.data.copy_(p0)
        state = cap_opt.state[p]
        state["step"].zero_()
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap_opt.step()
    for x, value in zip(batches, LRS):
        static_x.copy_(x)
        lr.fill_(value)
        loss_and_grads()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), cap_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert all(int(cap_opt.state[q]["step"]) == len(LRS) for q in cap_model.parameters())
