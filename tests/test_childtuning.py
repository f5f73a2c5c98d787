"""ChildTuningAdamW / MaskedAdamW: backends against the reference, the official update rule,
torch.optim.AdamW, the Philox keep contract, checkpoints and bad input."""
import copy
import io
import math
import zlib

import pytest
import torch

from utils import require_backend
from regdrop_fast import ChildTuningAdamW, MaskedAdamW, pack_mask
from regdrop_fast.reference import masked_adamw as ref
from regdrop_fast.reference.philox import philox_words

SEED = 20240521


def _model(device, dtype=torch.float32):
    # odd widths: rows that are not multiples of 32 bits or of the Philox block of 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))
    return model.to(device=device, dtype=dtype)


def _data(device, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 13, generator=gen).to(device, dtype) for _ in range(steps)]


def _d_masks(model):
    gen = torch.Generator().manual_seed(2)
    masks = {}
    for i, p in enumerate(model.parameters()):
        # the last bias stays unmasked (None): updated fully, as embeddings in ChildTuning-D
        masks[p] = None if i == 3 else pack_mask(
            (torch.rand(p.shape, generator=gen) < 0.4).to(p.device))
    return masks


def _train(device, backend, steps=10, dtype=torch.float32, **kwargs):
    model = _model(device, dtype)
    if kwargs.get("mode") == "D":
        kwargs["masks"] = _d_masks(model)
    opt = ChildTuningAdamW(model.parameters(), seed=SEED, backend=backend, **kwargs)
    for x in _data(device, steps, dtype):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().float().clone() for p in model.parameters()], opt


def _max_err(a, b):
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


CONFIGS = [(mode, drop, sem) for mode in ("F", "D") for drop in ("grad", "update")
           for sem in ("paper", "torch")]


@pytest.mark.parametrize("mode,drop,semantics", CONFIGS)
def test_backends_match_reference_after_10_steps(device, kernel_backends, mode, drop, semantics):
    kw = dict(mode=mode, drop=drop, semantics=semantics, reserve_p=0.3, weight_decay=0.01)
    want, _ = _train(device, "reference", **kw)
    assert kernel_backends, "no kernel backend to test"
    for backend in kernel_backends:
        got, _ = _train(device, backend, **kw)
        assert _max_err(got, want) <= 1e-6, (backend, _max_err(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_reference(device, kernel_backends, dtype):
    kw = dict(mode="F", reserve_p=0.5, weight_decay=0.01, dtype=dtype, steps=4)
    want, _ = _train(device, "reference", **kw)
    for backend in kernel_backends:
        got, opt = _train(device, backend, **kw)
        assert _max_err(got, want) <= 1e-2, backend
        state = next(iter(opt.state.values()))
        assert state["exp_avg"].dtype == torch.float32


def _single_step_keep(device, backend, mode, reserve_p=0.3):
    """Which elements one drop='update' step changed: exactly the kept ones."""
    model = _model(device)
    masks = _d_masks(model) if mode == "D" else None
    opt = ChildTuningAdamW(model.parameters(), mode=mode, reserve_p=reserve_p, drop="update",
                           seed=SEED, masks=masks, backend=backend, lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    model(_data(device, 1)[0]).square().mean().backward()
    for p in model.parameters():
        p.grad.add_(1e-3)  # no exact-zero gradient: a kept element always moves
    opt.step()
    return [p.detach() != b for p, b in zip(model.parameters(), before)], model, opt, masks


@pytest.mark.parametrize("mode", ["F", "D"])
def test_masks_identical_on_every_backend(device, kernel_backends, mode):
    want, model, opt, masks = _single_step_keep(device, "reference", mode)
    for i, p in enumerate(model.parameters()):
        if mode == "F":  # the acceptance contract, element i of each parameter
            index = torch.arange(p.numel(), device=device)
            words = philox_words(SEED, index, opt.state[p]["step"], opt.mask_stream(p))
            keep = (words < math.floor(0.3 * 2**32)).view(p.shape)
        elif masks[p] is None:
            keep = torch.ones_like(p, dtype=torch.bool)
        else:
            keep = masks[p].unpack()
        assert torch.equal(want[i], keep)
    for backend in kernel_backends:
        got = _single_step_keep(device, backend, mode)[0]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), backend


def test_f_mask_density_and_fresh_mask_every_step(device):
    p = torch.nn.Parameter(torch.zeros(20000, device=device))
    opt = ChildTuningAdamW([p], mode="F", reserve_p=0.3, drop="update", seed=3, lr=1.0)
    keeps = []
    for _ in range(2):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        opt.step()
        keeps.append(p.detach() != before)
    for keep in keeps:
        assert abs(keep.float().mean().item() - 0.3) < 0.02
    assert not torch.equal(keeps[0], keeps[1])


def test_streams_by_position_and_by_name(device):
    model = _model(device)
    opt = ChildTuningAdamW(model.parameters(), seed=1)
    assert [opt.mask_stream(p) for p in model.parameters()] == [0, 1, 2, 3]
    named = ChildTuningAdamW(model.named_parameters(), seed=1)
    for name, p in model.named_parameters():
        assert named.mask_stream(p) == zlib.crc32(name.encode())
    with pytest.raises(ValueError, match="not a parameter"):
        opt.mask_stream(torch.nn.Parameter(torch.zeros(2)))


def _official_step(params, state, masks, *, lr, betas, eps, wd, reserve_p, mode, seed):
    """The official ChildTuningAdamW.step (AliceMind/ChildTuning) re-written here, with the
    Bernoulli sample replaced by the Philox keep bits so the draws are comparable."""
    for i, p in enumerate(params):
        grad = p.grad.clone()
        st = state.setdefault(i, {"step": 0, "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)})
        if mode == "D":
            if masks[i] is not None:
                grad *= masks[i]
        else:
            index = torch.arange(p.numel(), device=p.device)
            words = philox_words(seed, index, st["step"] + 1, i)
            sample = (words < math.floor(reserve_p * 2**32)).view(p.shape).float()
            grad *= sample / reserve_p
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        beta1, beta2 = betas
        st["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        step_size = lr * math.sqrt(1.0 - beta2 ** st["step"]) / (1.0 - beta1 ** st["step"])
        p.data.addcdiv_(exp_avg, denom, value=-step_size)
        p.data.add_(p.data, alpha=-lr * wd)


@pytest.mark.parametrize("mode", ["F", "D"])
def test_paper_semantics_match_the_official_update(device, kernel_backends, mode):
    hp = dict(lr=2e-3, betas=(0.9, 0.98), eps=1e-6, wd=0.01, reserve_p=0.4)
    official = _model(device)
    masks = _d_masks(official)
    bool_masks = [None if m is None else m.unpack() for m in masks.values()]
    state = {}
    for x in _data(device, 6):
        official.zero_grad()
        official(x).square().mean().backward()
        _official_step(list(official.parameters()), state, bool_masks, mode=mode, seed=SEED, **hp)
    want = [p.detach() for p in official.parameters()]
    for backend in ["reference"] + kernel_backends:
        model = _model(device)
        ours = {q: masks[p] for q, p in zip(model.parameters(), official.parameters())}
        opt = ChildTuningAdamW(model.parameters(), lr=hp["lr"], betas=hp["betas"],
                               eps=hp["eps"], weight_decay=hp["wd"], mode=mode,
                               reserve_p=hp["reserve_p"], semantics="paper", seed=SEED,
                               masks=ours if mode == "D" else None, backend=backend)
        for x in _data(device, 6):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert _max_err(model.parameters(), want) <= 1e-6, backend


@pytest.mark.parametrize("mode,reserve_p", [(None, 0.3), ("F", 1.0)])
def test_torch_semantics_without_mask_is_torch_adamw(device, kernel_backends, mode, reserve_p):
    base = _model(device)
    torch_opt = torch.optim.AdamW(base.parameters(), lr=1e-3, weight_decay=0.05, eps=1e-8)
    for x in _data(device, 5):
        torch_opt.zero_grad()
        base(x).square().mean().backward()
        torch_opt.step()
    for backend in ["reference"] + kernel_backends:
        got, _ = _train(device, backend, steps=5, mode=mode, reserve_p=reserve_p,
                        semantics="torch", weight_decay=0.05, eps=1e-8)
        assert _max_err(got, list(base.parameters())) <= 1e-6, backend


def test_reference_float64_matches_float32(device):
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(301, generator=gen).to(device) for _ in range(4)]
    outs = []
    for upcast in (True, False):
        p, g, m, v = (t.clone() for t in tensors)
        v = v.abs()
        ref.masked_adamw_step([p], [g], [m], [v], masks=[None], mask_kinds=[ref.MASK_PHILOX],
                              steps=[2], index_offsets=[5], streams=[1], lr=1e-3, beta1=0.9,
                              beta2=0.999, eps=1e-6, weight_decay=0.01, seed=9, reserve_p=0.5,
                              action="grad", semantics="paper", upcast=upcast)
        outs.append((p, m, v))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("semantics", ["torch", "paper"])
def test_masked_adamw_keeps_pruned_weights_zero(device, kernel_backends, semantics):
    gen = torch.Generator().manual_seed(5)
    shapes = [(37, 13), (70,), (5, 64)]
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(4)]
    keeps = [(torch.rand(s, generator=gen) < 0.6).to(device) for s in shapes]
    for backend in ["reference"] + kernel_backends:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        dense = [torch.nn.Parameter(t.clone()) for t in init]
        # the last tensor has no mask: updated densely
        masks = {params[0]: pack_mask(keeps[0]), params[1]: keeps[1]}
        opt = MaskedAdamW(params, masks, lr=1e-2, semantics=semantics, backend=backend)
        opt.apply_masks_()
        dense_opt = ChildTuningAdamW(dense, mode=None, lr=1e-2, eps=1e-8, weight_decay=1e-2,
                                     semantics=semantics, backend="reference")
        for step_grads in grads:
            for p, q, g in zip(params, dense, step_grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            dense_opt.step()
        for i, (p, q) in enumerate(zip(params, dense)):
            keep = keeps[i] if i < 2 else torch.ones_like(p, dtype=torch.bool)
            assert (p[~keep] == 0).all(), backend
            st = opt.state[p]
            # pruned moments never touched: still their initial 0
            assert (st["exp_avg"][~keep] == 0).all() and (st["exp_avg_sq"][~keep] == 0).all()
            assert float((p[keep] - q[keep]).abs().max().detach()) <= 1e-6, (backend, i)


def test_mask_formats_are_equivalent(device):
    results = []
    for fmt in ("packed", "bool", "list", "names"):
        model = _model(device)
        packed = _d_masks(model)
        if fmt == "bool":
            masks = {p: None if m is None else m.unpack() for p, m in packed.items()}
        elif fmt == "list":
            masks = list(packed.values())
        elif fmt == "names":
            names = dict(zip(model.parameters(), (n for n, _ in model.named_parameters())))
            masks = {names[p]: m for p, m in packed.items()}
        else:
            masks = packed
        params = model.named_parameters() if fmt == "names" else model.parameters()
        opt = ChildTuningAdamW(params, mode="D", masks=masks, seed=1)
        model(_data(device, 1)[0]).sum().backward()
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_nan_gradients_propagate(device):
    for backend in ["reference", "cpu"] if device.type == "cpu" else ["reference"]:
        if backend != "reference":
            require_backend(backend, device)
        p = torch.nn.Parameter(torch.ones(64, device=device))
        q = torch.nn.Parameter(torch.ones(64, device=device))
        keep = torch.zeros(64, dtype=torch.bool, device=device)
        keep[::2] = True
        opt = ChildTuningAdamW([p], mode="F", reserve_p=0.5, seed=1, backend=backend)
        pruned = MaskedAdamW([q], {q: pack_mask(keep)}, backend=backend)
        grad = torch.ones(64, device=device)
        grad[:8] = float("nan")
        grad[8] = float("inf")
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        pruned.step()
        # NaN reaches the element whether it was kept or dropped (NaN * 0), like the official
        # code; inf * 0 is NaN too; the other elements are unaffected
        assert torch.isnan(p[:9]).all() and torch.isfinite(p[9:]).all()
        assert torch.isnan(q[:9][keep[:9]]).all() and (q[:9][~keep[:9]] == 0).all()
        assert torch.isfinite(q[9:]).all()


@pytest.mark.parametrize("mode", ["F", "D"])
def test_resume_is_bit_identical(device, kernel_backends, mode):
    backend = kernel_backends[0] if kernel_backends else "reference"
    data = _data(device, 6)

    def build():
        model = _model(device)
        opt = ChildTuningAdamW(model.parameters(), mode=mode, masks=_d_masks(model)
                               if mode == "D" else None, seed=None, backend=backend)
        return model, opt

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    torch.manual_seed(11)
    model, opt = build()
    run(model, opt, data)
    torch.manual_seed(11)
    first, first_opt = build()
    run(first, first_opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    torch.manual_seed(999)  # a different seed=None draw: the checkpoint's seed must win
    resumed, resumed_opt = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(copy.deepcopy(saved["opt"]))
    assert resumed_opt.seed == opt.seed
    run(resumed, resumed_opt, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))
    sd = resumed_opt.state_dict()["regdrop_fast"]
    assert sd["seed"] == opt.seed and len(sd["masks"]) == (3 if mode == "D" else 0)


def test_load_state_dict_of_another_layout_is_rejected(device):
    model = _model(device)
    opt = ChildTuningAdamW(model.named_parameters(), seed=1)
    other = ChildTuningAdamW(model.parameters(), seed=1)
    with pytest.raises(ValueError, match="streams"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="regdrop_fast"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_bad_input(device):
    model = _model(device)
    params = list(model.parameters())
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reserve_p"):
            ChildTuningAdamW(params, reserve_p=bad)
    with pytest.raises(ValueError, match="mode"):
        ChildTuningAdamW(params, mode="E")
    with pytest.raises(ValueError, match="drop"):
        ChildTuningAdamW(params, drop="weights")
    with pytest.raises(ValueError, match="semantics"):
        ChildTuningAdamW(params, semantics="hf")
    with pytest.raises(ValueError, match="backend"):
        ChildTuningAdamW(params, backend="gpu")
    with pytest.raises(ValueError, match="needs masks"):
        ChildTuningAdamW(params, mode="D")
    masks = {p: m for (n, p), m in zip(model.named_parameters(), _d_masks(model).values())
             if n != "2.weight"}
    with pytest.raises(ValueError, match=r"2\.weight has no entry"):
        ChildTuningAdamW(model.named_parameters(), mode="D", masks=masks)
    with pytest.raises(ValueError, match="another model"):
        ChildTuningAdamW(params, mode="D", masks=_d_masks(_model(device)))
    with pytest.raises(ValueError, match="shape"):
        ChildTuningAdamW([params[0]], mode="D", masks={params[0]: pack_mask(
            torch.ones(3, 3, dtype=torch.bool, device=device))})
    with pytest.raises(ValueError, match="seed"):
        ChildTuningAdamW(params, seed=-1)

    emb = torch.nn.Embedding(10, 4, sparse=True).to(device)
    opt = ChildTuningAdamW(emb.named_parameters(), seed=1)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients.*weight"):
        opt.step()

    a = torch.nn.Parameter(torch.zeros(3, device=device))
    b = torch.nn.Parameter(torch.zeros(3, device="meta"))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt = ChildTuningAdamW([a, b], seed=1)
    with pytest.raises(ValueError, match="one device"):
        opt.step()
    assert opt.state[a] == {}  # nothing was stepped
    c = torch.nn.Parameter(torch.zeros(3, device=device, dtype=torch.float64))
    c.grad = torch.ones_like(c)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ChildTuningAdamW([c], seed=1).step()


# ---- the step's plan (ChildTuningAdamW._make_plan / _planned_grads) --------------------------
def _stepped(device, steps=2, **kwargs):
    """A model and its optimizer after `steps` steps (the later ones through the fast path)."""
    model = _model(device)
    opt = ChildTuningAdamW(model.named_parameters(), seed=SEED, backend="reference", **kwargs)
    for x in _data(device, steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def _grads(model, device, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(device)


@pytest.mark.parametrize("mode", ["F", None])
def test_fast_path_equals_the_general_step(device, mode):
    model, opt = _stepped(device, mode=mode)
    twin = copy.deepcopy(model)
    twin_opt = ChildTuningAdamW(twin.named_parameters(), seed=SEED, backend="reference",
                                mode=mode)
    twin_opt.load_state_dict(opt.state_dict())  # drops the plan: the general step runs next
    assert opt._plans and not twin_opt._plans
    _grads(model, device, 7)
    _grads(twin, device, 7)
    opt.step()
    twin_opt.step()
    assert _max_err(list(model.parameters()), list(twin.parameters())) == 0.0
    assert [s["step"] for s in opt.state.values()] == [3] * 4


def test_fast_path_follows_a_missing_grad_and_a_mode_change(device):
    model, opt = _stepped(device)
    _grads(model, device, 3)
    model[0].bias.grad = None
    before = model[0].bias.detach().clone()
    opt.step()
    assert torch.equal(model[0].bias.detach(), before)  # no grad: not stepped
    assert opt.state[model[0].bias]["step"] == 2 and opt.state[model[0].weight]["step"] == 3
    opt.param_groups[0]["mode"] = None  # plain AdamW from here on: every element moves
    _grads(model, device, 4)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(bool((p.detach() != b).all()) for p, b in zip(model.parameters(), before))


def test_fast_path_bad_gradient_names_the_parameter_and_changes_nothing(device):
    model, opt = _stepped(device)
    _grads(model, device, 5)
    weight = model[2].weight
    weight.data = weight.data.t().contiguous().t()  # same values and shape, not contiguous
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"2\.weight must be contiguous"):
        opt.step()
    assert _max_err(params, list(model.parameters())) == 0.0
    assert [s["step"] for s in opt.state_dict()["state"].values()] == [
        s["step"] for s in before["state"].values()]


@pytest.mark.parametrize("action,semantics", [("grad", "paper"), ("update", "torch"),
                                              ("prune", "torch")])
def test_multi_tensor_launch_over_chunks_kinds_and_empty_tensors(device, kernel_backends,
                                                                  action, semantics):
    """One launch over tensors of every size class: empty, one element, several programs'
    chunks (triton: 4096 elements each), with Philox, bit and no masks mixed in one list,
    per-tensor steps and global offsets (a shard's); equal to the reference after 3 steps."""
    from regdrop_fast.childtuning.masked_step import masked_adamw_step

    sizes = [0, 1, 4096, 4097, 9000, 33]
    kinds = [ref.MASK_PHILOX, ref.MASK_BITS, ref.MASK_PHILOX, ref.MASK_NONE, ref.MASK_BITS,
             ref.MASK_PHILOX]
    if action == "prune":  # sparse subnetworks: bit masks or none
        kinds = [ref.MASK_BITS if k == ref.MASK_PHILOX else k for k in kinds]
    gen = torch.Generator().manual_seed(11)

    def make():
        return [torch.randn(n, generator=gen).to(device) for n in sizes]

    params, moments_m = make(), [m.abs() * 0.1 for m in make()]
    moments_v = [v.abs() * 0.01 for v in make()]
    grads = [make() for _ in range(3)]
    # a Philox tensor far into a huge sharded parameter; bit masks are built over
    # [0, offset + n), so their offsets stay small
    offsets = [0, 7, 64, 100_000, 31, 2**33 if kinds[5] == ref.MASK_PHILOX else 40]
    # the bit masks index bits from the global offset: build them over [0, offset + n)
    masks = [pack_mask(torch.rand(off + n, generator=gen) < 0.5).words.to(device)
             if k == ref.MASK_BITS else None for n, k, off in zip(sizes, kinds, offsets)]
    results = {}
    for backend in ["reference", *kernel_backends]:
        p = [x.clone() for x in params]
        m = [x.clone() for x in moments_m]
        v = [x.clone() for x in moments_v]
        for t in range(3):
            masked_adamw_step(p, grads[t], m, v, masks=masks, mask_kinds=kinds,
                              steps=[t + 1 + i % 2 for i in range(len(sizes))],
                              index_offsets=offsets, streams=list(range(5, 5 + len(sizes))),
                              lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01,
                              seed=SEED, reserve_p=0.3, action=action, semantics=semantics,
                              backend=backend)
        results[backend] = (p, m, v)
    for backend in kernel_backends:
        for ours, expected in zip(results[backend], results["reference"]):
            for x, y in zip(ours, expected):
                assert x.shape == y.shape
                assert x.numel() == 0 or float((x - y).abs().max()) < 1e-6, backend


@pytest.mark.parametrize("mode", ["F", "D", "sparse"])
def test_optimizer_object_survives_deepcopy_and_torch_save(mode):
    # torch's Optimizer pickles only defaults, state and param_groups: the copy must also carry
    # the streams, names and masks its step reads, and then train exactly like the original
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    params = list(model.parameters())
    if mode == "sparse":
        opt = MaskedAdamW(params, masks=[torch.rand(p.shape) < 0.5 for p in params], lr=1e-2)
    elif mode == "D":
        opt = ChildTuningAdamW(params, lr=1e-2, mode="D",
                               masks={p: torch.rand(p.shape) < 0.5 for p in params})
    else:
        opt = ChildTuningAdamW(params, lr=1e-2, mode="F", seed=3)
    x = torch.randn(4, 8)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()

    train(model, opt, 2)
    copied = copy.deepcopy({"model": model, "opt": opt})
    buffer = io.BytesIO()
    torch.save({"model": model, "opt": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    train(model, opt, 3)
    for other in (copied, loaded):
        train(other["model"], other["opt"], 3)
        for a, b in zip(model.parameters(), other["model"].parameters()):
            assert torch.equal(a, b)
