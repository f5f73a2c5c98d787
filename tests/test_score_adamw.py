"""MaskScoreAdamW's one-launch fused step (triton_kernels/score_adamw.py, issue 18) in the
interpreter: bit for bit the fp32 arithmetic of torch.optim.AdamW's update as the kernel orders
it (each operation rounded to fp32, as the interpreter computes), over mixed shapes with their
own step counts, both gradient forms and with or without W'; the table reused across steps and
rebuilt when a tensor is replaced; one launch per step and set of flags."""
import copy
import importlib.util
import json
import os
import sys

import pytest
import torch

from regdrop_fast.sparse import MaskTrainer
from utils import require_backend
from utils.sm90 import compile_script_for_sm90

SHAPES = [(33, 17), (16, 33), (40, 16), (3, 40)]  # one numel a multiple of 16, the rest not
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _kernels(device=torch.device("cpu")):
    require_backend("triton", device)
    from regdrop_fast.triton_kernels import score_adamw
    return score_adamw


def _f32(x: float) -> torch.Tensor:
    """A float as the kernel receives it: rounded to fp32."""
    return torch.tensor(x, dtype=torch.float32)


def _emulated(s, m, v, g, *, step_size, bc2_sqrt, decay):
    """The kernel's update in torch, one fp32 rounding per operation in its order (the square
    root through float64, which rounds it correctly as the interpreter does: torch's fp32 sqrt
    on CPU can be one ulp off)."""
    m1 = _f32(BETA1) * m + _f32(1.0 - BETA1) * g
    v1 = _f32(BETA2) * v + _f32(1.0 - BETA2) * g * g
    sqrt_v1 = torch.sqrt(v1.double()).float()
    s1 = s * _f32(decay) - _f32(step_size) * (m1 / (sqrt_v1 / _f32(bc2_sqrt) + _f32(EPS)))
    return s1, m1, v1


def _scalars(lr, t):
    return lr / (1.0 - BETA1 ** t), (1.0 - BETA2 ** t) ** 0.5


@pytest.mark.parametrize("ste", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_multi_launch_is_the_per_matrix_arithmetic(ste, out_dtype):
    """One launch over four shapes, each with its own step count: s, m, v and W' as the fp32
    emulation, bit for bit (bf16 W, so W' needs no rounding)."""
    sa = _kernels()
    gen = torch.Generator().manual_seed(0)
    w_dtype = torch.float32 if out_dtype is None else out_dtype
    s, m, v, w, phi, g = [], [], [], [], [], []
    for n, k in SHAPES:
        s.append(torch.randn(n, k, generator=gen))
        m.append(0.1 * torch.randn(n, k, generator=gen))
        v.append(0.01 * torch.rand(n, k, generator=gen))
        w.append(torch.randn(n, k, generator=gen).to(w_dtype))
        phi.append(torch.tensor([0.05 * len(phi)]))
        grad = torch.randn(n, k, generator=gen)
        g.append(grad.to(w_dtype) if ste else grad)
    want = []
    steps = [3, 1, 3, 7]
    lr, decay = 1e-2, 1.0 - 1e-2 * 0.1
    for j, t in enumerate(steps):
        grad = g[j].float() * w[j].float() if ste else g[j]
        step_size, bc2_sqrt = _scalars(lr, t)
        want.append(_emulated(s[j], m[j], v[j], grad, step_size=step_size, bc2_sqrt=bc2_sqrt,
                              decay=decay))
    write = out_dtype is not None
    table = sa.MatrixTable(s, m, v, w if (ste or write) else [None] * 4,
                           phi if write else [None] * 4)
    out = torch.full((table.out_numel,), 7.0, dtype=out_dtype) if write else None
    sa.score_adamw_multi(table, g, *zip(*(_scalars(lr, t) for t in steps)), out,
                         decay=decay, beta1=BETA1, beta2=BETA2, eps=EPS, ste=ste)
    views = table.out_views(out) if write else [None] * 4
    for j in range(len(SHAPES)):
        for got, expected in zip((s[j], m[j], v[j]), want[j]):
            assert torch.equal(got, expected)
        if write:
            assert views[j].data_ptr() % 16 == 0
            assert torch.equal(views[j], torch.where(want[j][0] > phi[j], w[j], 0))
    assert table.n_programs == len(SHAPES)  # every matrix here fits one 1024-element block



@pytest.mark.parametrize("ste", [False, True])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_multi_launch_steps_match_float64_reference(device, ste, out_dtype, weight_decay):
    """Three launches over the mixed shapes (and a 1 x 1 matrix) against the float64
    reference of torch.optim.AdamW's step: s, m and v within fp32 rounding; the W' written is W
    where the new scores exceed φ, the mask exactly."""
    sa = _kernels(device)
    from regdrop_fast.reference.masked_linear import score_adamw_step
    gen = torch.Generator().manual_seed(3)
    shapes = SHAPES + [(1, 1)]
    s = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
    m = [0.1 * torch.randn(shape, generator=gen).to(device) for shape in shapes]
    v = [0.01 * torch.rand(shape, generator=gen).to(device) for shape in shapes]
    w = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
    phi = [torch.tensor([0.05], device=device) for _ in shapes]
    ref = [tuple(t.double() for t in state) for state in zip(s, m, v)]
    table = sa.MatrixTable(s, m, v, w, phi)
    lr = 1e-2
    for t in range(1, 4):
        grads = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
        if ste:  # G = dW' in bf16, the gradient G ⊙ W formed in the kernel
            grads = [g.bfloat16() for g in grads]
        out = None if out_dtype is None else torch.empty(table.out_numel, dtype=out_dtype,
                                                          device=device)
        step_size, bc2_sqrt = _scalars(lr, t)
        sa.score_adamw_multi(table, grads, [step_size] * len(shapes), [bc2_sqrt] * len(shapes),
                             out, decay=1.0 - lr * weight_decay, beta1=BETA1, beta2=BETA2,
                             eps=EPS, ste=ste)
        ref = [score_adamw_step(*r, g, step=t, lr=lr, beta1=BETA1, beta2=BETA2, eps=EPS,
                                weight_decay=weight_decay, weight=wj if ste else None)
               for r, g, wj in zip(ref, grads, w)]
        for j in range(len(shapes)):
            for got, want in zip((s[j], m[j], v[j]), ref[j]):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
            if out is not None:
                masked = table.out_views(out)[j]
                assert torch.equal(s[j] > phi[j], ref[j][0] > phi[j].double())
                want = torch.where(s[j] > phi[j], w[j], 0.0)
                assert torch.equal(masked == 0, want == 0)
                if device.type == "cuda":
                    assert torch.equal(masked, want.to(out_dtype))
                else:  # the interpreter's fp32 -> bf16 cast may round the other way: one ulp
                    torch.testing.assert_close(masked.float(), want, atol=0,
                                               rtol=torch.finfo(out_dtype).eps)


def _model(dtype):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(k, n) for n, k in SHAPES]
    return torch.nn.Sequential(*layers).to(dtype).train()


class _Launches:
    """Counts the launches of the multi-tensor kernel and the matrices of each."""

    def __init__(self, kernel):
        self.kernel, self.sizes = kernel, []

    def __getitem__(self, grid):
        def launch(table, *args, **kwargs):
            self.sizes.append(table.shape[0])
            return self.kernel[grid](table, *args, **kwargs)
        return launch


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_score_adamw_one_launch_per_step(defer, dtype, monkeypatch):
    """MaskScoreAdamW(fused=True) on four mixed-shape layers over eight steps, φ kept after
    odd steps and reset after even ones (interval 2), as the fp32 emulation applied matrix by
    matrix, bit for bit: the first matrix has no gradient at step 1, so its step count lags;
    at step 3 a second matrix also has a .grad (its gradient then dScore + G ⊙ W; with defer,
    another launch); the W' after a step keeping φ is W where the new scores exceed φ. Step 4
    follows a replaced state and step 5 replaced scores storage: their tables are rebuilt (a
    stale one would update the old tensors); steps 7 and 8 change nothing and reuse them."""
    sa = _kernels()
    launches = _Launches(sa.score_adamw_multi_kernel)
    monkeypatch.setattr(sa, "score_adamw_multi_kernel", launches)
    builds = []

    class CountedTable(sa.MatrixTable):
        def __init__(self, *args):
            builds.append(1)
            super().__init__(*args)

    monkeypatch.setattr(sa, "MatrixTable", CountedTable)
    model = _model(dtype)
    trainer = MaskTrainer(model, 0.5, targets=["*"], init="soft", interval=2)
    layers = list(trainer.modules.values())
    lr = 1e-2
    opt = trainer.optimizer(lr, weight_decay=0.01, fused=True, defer_ste_grad=defer)
    ref = [dict(s=layer.mask_scores.detach().clone(), m=torch.zeros_like(layer.mask_scores),
                v=torch.zeros_like(layer.mask_scores), t=0) for layer in layers]
    gen = torch.Generator().manual_seed(1)
    built = []
    for step in range(1, 9):
        x = torch.randn(4, SHAPES[0][1], generator=gen).to(dtype)
        model(x).float().square().sum().backward()
        if step == 1:  # no gradient for the first matrix
            layers[0].mask_scores.grad = None
            layers[0].take_score_grad()
        if step == 3:
            layers[1].mask_scores.grad = torch.randn(SHAPES[1], generator=gen)
        if step == 4:  # new state tensors, same values
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if step == 5:  # the scores get new storage
            for layer in layers:
                layer.mask_scores.data = layer.mask_scores.data.clone()
        keep_phi = not trainer.resets_at(trainer.t + 1)
        want = []
        for layer, r in zip(layers, ref):
            g_ste, grad = layer._score_state.g, layer.mask_scores.grad
            if g_ste is None and grad is None:
                want.append(None)
                continue
            if g_ste is not None:
                dscore = g_ste.float() * layer.weight.detach().float()
                grad = dscore if grad is None else grad + dscore
            r["t"] += 1
            step_size, bc2_sqrt = _scalars(lr, r["t"])
            r["s"], r["m"], r["v"] = _emulated(r["s"], r["m"], r["v"], grad,
                                               step_size=step_size, bc2_sqrt=bc2_sqrt,
                                               decay=1.0 - lr * 0.01)
            had_masked = layer._score_state.masked is not None
            want.append(torch.where(r["s"] > layer.mask_threshold, layer.weight.detach(), 0)
                        if keep_phi and had_masked else None)
        launches.sizes.clear()
        builds.clear()
        opt.step()
        mixed = defer and step == 3
        assert sorted(launches.sizes) == ([1, 3] if mixed else [3 if step == 1 else 4])
        built.append(len(builds))
        for layer, r, masked in zip(layers, ref, want):
            state = opt.state[layer.mask_scores]
            assert torch.equal(layer.mask_scores.detach(), r["s"])
            if r["t"] == 0:  # never stepped yet
                assert not state
                continue
            assert torch.equal(state["exp_avg"], r["m"])
            assert torch.equal(state["exp_avg_sq"], r["v"])
            assert state["step"].item() == r["t"]
            if masked is None:
                assert layer._score_state.masked is None
            else:
                assert layer._score_state.masked.dtype == dtype
                assert torch.equal(layer._score_state.masked, masked)
        opt.zero_grad()
        trainer.step()
    assert [r["t"] for r in ref] == [7, 8, 8, 8]
    # one table per list of storages, whether the step writes W' or not: step 2 has all
    # matrices, step 3 with defer two launches, 4 a new state, 5 new scores
    assert built == [1, 1, 2 if defer else 0, 1, 1, 0, 0, 0]



def test_fused_checkpoint_resumes_bit_for_bit(tmp_path):
    """The fused optimizer's state (its step counts views of one CPU tensor) saved with
    torch.save after two steps and loaded into a new model, trainer and optimizer: two more
    steps give the scores and Adam state of four uninterrupted steps, bit for bit."""
    _kernels()

    def setup():
        model = _model(torch.float32)
        trainer = MaskTrainer(model, 0.5, targets=["*"], init="soft", interval=2)
        return model, trainer, trainer.optimizer(1e-2, fused=True, defer_ste_grad=True)

    def steps(model, trainer, opt, first, last):
        for step in range(first, last):
            x = torch.randn(4, SHAPES[0][1], generator=torch.Generator().manual_seed(step))
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            trainer.step()

    model, trainer, opt = setup()
    steps(model, trainer, opt, 0, 4)
    want = [(p.detach().clone(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"],
             opt.state[p]["step"]) for p in trainer.parameters()]
    model, trainer, opt = setup()
    steps(model, trainer, opt, 0, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model, trainer, opt = setup()
    saved = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    trainer.t = 2
    steps(model, trainer, opt, 2, 4)
    for p, (s, m, v, t) in zip(trainer.parameters(), want):
        state = opt.state[p]
        assert torch.equal(p, s) and torch.equal(state["exp_avg"], m)
        assert torch.equal(state["exp_avg_sq"], v) and state["step"].item() == t.item() == 4


_SM90_COMPILE = r"""
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from regdrop_fast.triton_kernels import score_adamw as K

target = GPUTarget("cuda", 90, 32)
sig = dict(table_ptr="*i64", program_ptr="*i32", step_ptr="*i64", out_ptr="*bf16",
           n_matrices="i32", **{n: "fp32" for n in ("decay", "beta1", "beta2",
                                                    "one_minus_beta1", "one_minus_beta2", "eps")})
for ste in (True, False):
    for write in (True, False):
        for aligned in (True, False):
            flags = dict(GRAD_DTYPE=tl.bfloat16 if ste else tl.float32, W_DTYPE=tl.float32,
                         STE=ste, WRITE_MASKED=write, ALIGNED=aligned, BLOCK=K.BLOCK, COLS=K.COLS)
            full = {**sig, **{n: "constexpr" for n in flags}}
            src = ASTSource(fn=K.score_adamw_multi_kernel, constexprs=flags,
                            signature={n: full[n] for n in K.score_adamw_multi_kernel.arg_names})
            ptx = triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]
            wide = re.search(r"ld\.global(\.\w+)*\.v4", ptx) is not None
            assert wide == aligned, (ste, write, aligned)
print("compiled")
"""


def test_score_adamw_kernels_compile_for_sm90():
    """Every flag set compiles for sm_90 (no GPU needed); the ALIGNED hints are what give
    16-byte loads (the compiler cannot know a loaded address's alignment)."""
    compile_script_for_sm90(_SM90_COMPILE, timeout=600)


def _tool(name):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "triton_aot", f"{name}.py")
    module_name = f"regdrop_triton_aot_{name}"  # the names tests/conftest.py and others use
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        sys.modules[module_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def test_gpu_dry_run_covers_every_score_adamw_launch(tmp_path, monkeypatch):
    """gpu_launches.py records the one-launch step as a GPU launches it at BERT-base's 72
    matrices, for the sm_90 check: both gradient forms, with and without W', fp32 and bf16
    weights, aligned and not."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after: gpu_launches.py sets it
    gpu_launches = _tool("gpu_launches")
    assert gpu_launches.score_adamw in gpu_launches.LAUNCHERS
    record, out = _tool("record"), tmp_path / "gpu.jsonl"
    record.install(str(out))
    try:
        gpu_launches.score_adamw()
    finally:
        record.uninstall(str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    flags = {tuple(r["constexprs"][n] if n != "W_DTYPE" else r["constexprs"][n]["dtype"]
                   for n in ("STE", "WRITE_MASKED", "ALIGNED", "W_DTYPE")) for r in records}
    assert flags == {(ste, write, aligned, w) for ste in (True, False) for write in (True, False)
                     for aligned in (True, False) for w in ("fp32", "bf16")
                     if ste or write or w == "fp32"}  # W unread: its dtype does not matter
    assert {r["qualname"] for r in records} == {"score_adamw_multi_kernel"}


def _trained(steps=2):
    """A fused MaskScoreAdamW after `steps` steps (its launch table built) and a step function."""
    model = _model(torch.float32)
    trainer = MaskTrainer(model, 0.5, targets=["*"], init="soft", interval=2)
    opt = trainer.optimizer(1e-2, fused=True)

    def step(i, dtype=torch.float32):
        x = torch.randn(4, SHAPES[0][1], generator=torch.Generator().manual_seed(i)).to(dtype)
        model(x).float().square().sum().backward()
        opt.step()

    for i in range(steps):
        step(i)
        opt.zero_grad()
        trainer.step()
    return model, trainer, opt, step


def test_weights_of_another_dtype_at_the_same_address_get_a_new_table():
    """The weights become bf16 at their fp32 storage's address (as a caching allocator may
    hand it back): the next step keeping φ writes W' = W ⊙ (s > φ) from the bf16 values, not
    from a cached table that reads the weights as fp32."""
    _kernels()
    model, trainer, opt, step = _trained()
    layers = list(trainer.modules.values())
    for layer in layers:
        for w in (layer.weight, layer.bias):
            values = w.detach().bfloat16()
            same = torch.empty(0, dtype=torch.bfloat16).set_(w.untyped_storage(), 0, w.shape)
            w.data = same.copy_(values)
    step(2, torch.bfloat16)
    for layer in layers:
        masked = layer._score_state.masked
        assert masked is not None and masked.dtype == torch.bfloat16
        want = torch.where(layer.mask_scores.detach() > layer.mask_threshold,
                           layer.weight.detach(), 0)
        assert torch.equal(masked, want)


def _half(model, trainer, opt):
    model.half()


def _non_contiguous_scores(model, trainer, opt):
    for p in trainer.parameters():
        p.data = p.data.t().contiguous().t()  # same shape and values, column-major


def _state_of_other_shapes(model, trainer, opt):
    state = opt.state_dict()
    for s in state["state"].values():
        s["exp_avg"], s["exp_avg_sq"] = s["exp_avg"][:2].clone(), s["exp_avg_sq"][:2].clone()
    opt.load_state_dict(state)


def _non_contiguous_state(model, trainer, opt):
    for p in trainer.parameters():
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].t().contiguous().t()


def _state_on_meta(model, trainer, opt):
    for p in trainer.parameters():
        opt.state[p]["exp_avg_sq"] = torch.zeros(p.shape, device="meta")


def _half_threshold(model, trainer, opt):
    for layer in trainer.modules.values():
        layer.mask_threshold.data = layer.mask_threshold.data.half()


@pytest.mark.parametrize("change, error, words", [
    (_half, TypeError, "mask_scores of 0 must be contiguous float32"),
    (_non_contiguous_scores, TypeError, "mask_scores of 0 must be contiguous float32"),
    (_state_of_other_shapes, ValueError, "exp_avg of 0 must be contiguous float32"),
    (_non_contiguous_state, ValueError, "exp_avg of 0 must be contiguous float32"),
    (_state_on_meta, ValueError, "exp_avg_sq of 0 must be on cpu"),
    (_half_threshold, TypeError, "mask_threshold of 0 must be a float32 [1]"),
])
def test_fused_step_rejects_what_its_kernel_cannot_read(change, error, words):
    """After steps that built the launch table, a change the table's addresses need not show
    (scores or threshold of another dtype, state of other shapes, strides or device) raises a
    clear error at the next step instead of a launch reading memory wrongly (or past the end)."""
    _kernels()
    model, trainer, opt, step = _trained()
    scores = [p.detach().clone() for p in trainer.parameters()]
    change(model, trainer, opt)
    with pytest.raises(error, match=words.replace("[", r"\[")):
        step(2, next(model.parameters()).dtype)
    for p, s in zip(trainer.parameters(), scores):
        assert torch.equal(p.detach(), s.to(p.dtype))  # nothing stepped


def _deepcopy(opt, tmp_path):
    return copy.deepcopy(opt)


def _saved_and_loaded(opt, tmp_path):
    torch.save(opt, tmp_path / "opt.pt")
    return torch.load(tmp_path / "opt.pt", weights_only=False)


@pytest.mark.parametrize("duplicate", [_deepcopy, _saved_and_loaded])
def test_copied_optimizer_steps_its_own_copies(duplicate, tmp_path):
    """A fused MaskScoreAdamW copied after two steps (copy.deepcopy, or torch.save of the
    object and torch.load) steps: it trains its copies of the layers as the original trains
    its own, bit for bit, and neither's step counts move with the other's steps."""
    _kernels()
    model, trainer, opt, step = _trained()
    twin = duplicate(opt, tmp_path)

    def twin_step(i):
        x = torch.randn(4, SHAPES[0][1], generator=torch.Generator().manual_seed(i))
        for layer in twin.trainer.modules.values():
            x = layer(x)
        x.square().sum().backward()
        twin.step()

    for i in (2, 3):
        step(i)
        twin_step(i)
        for o, t in ((opt, trainer), (twin, twin.trainer)):
            o.zero_grad()
            t.step()
    for p, q in zip(trainer.parameters(), twin.trainer.parameters()):
        assert p is not q and torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][name], twin.state[q][name])
    twin_step(4)
    for p, q in zip(trainer.parameters(), twin.trainer.parameters()):
        assert opt.state[p]["step"].item() == 4 and twin.state[q]["step"].item() == 5
        assert not torch.equal(p, q)  # the twin's fifth step moved its scores only


def test_a_bad_matrix_stops_every_launch_of_the_step():
    """With two launches in a step (defer_ste_grad, one matrix also with a .grad), a state of
    another shape in the second launch's matrices raises before the first launch runs: no
    matrix is stepped."""
    _kernels()
    model = _model(torch.float32)
    trainer = MaskTrainer(model, 0.5, targets=["*"], init="soft", interval=2)
    opt = trainer.optimizer(1e-2, fused=True, defer_ste_grad=True)
    params = list(trainer.parameters())
    for i in range(3):
        model(torch.randn(4, SHAPES[0][1], generator=torch.Generator().manual_seed(i))
              ).square().sum().backward()
        if i == 2:
            params[0].grad = torch.ones_like(params[0])
            opt.state[params[-1]]["exp_avg"] = torch.zeros(2, 3)
            before = [p.detach().clone() for p in params]
            with pytest.raises(ValueError, match="exp_avg of 3 must be contiguous float32"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
        else:
            opt.step()
            opt.zero_grad()
            trainer.step()
