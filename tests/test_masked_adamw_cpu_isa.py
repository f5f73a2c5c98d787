"""The CPU masked AdamW op on each instruction-set path (REGDROP_FAST_CPU_ISA caps the path the
op picks: the AVX-512 one-pass fp32 kernel, the AVX2 and the baseline block kernels; bf16/fp16
take the AVX2 block kernel at the AVX-512 level) against the fp32 reference: unaligned global offsets, Philox counters whose low word wraps, tensors longer
than one parallel chunk, partial 32-element groups."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import require_backend
from regdrop_fast.childtuning.masked_step import masked_adamw_step
from regdrop_fast.reference import masked_adamw as ref

ISAS = ("avx512", "avx2", "default")
# (numel, index offset, mask kind); 40000 spans two 32768-element chunks; the Philox offset
# 2^34 - 40 makes counter index/4 cross 2^32 inside the tensor
TENSORS = [(1, 0, ref.MASK_PHILOX), (31, 5, ref.MASK_PHILOX), (100, 2 ** 34 - 40, ref.MASK_PHILOX),
           (40000, 37, ref.MASK_PHILOX), (33, 0, ref.MASK_BITS), (1000, 19, ref.MASK_BITS),
           (40000, 64, ref.MASK_BITS), (77, 3, ref.MASK_NONE), (4096, 0, ref.MASK_NONE)]
SEED = 0x1234_5678_9ABC


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    params, grads, ms, vs, masks = [], [], [], [], []
    for n, offset, kind in TENSORS:
        params.append(torch.randn(n, generator=gen).to(dtype))
        grads.append(torch.randn(n, generator=gen).to(dtype))
        ms.append(torch.randn(n, generator=gen) * 0.1)
        vs.append(torch.rand(n, generator=gen) * 0.1)
        words = (offset + n + 31) // 32
        masks.append(torch.randint(-2 ** 31, 2 ** 31, (words,), generator=gen, dtype=torch.int64)
                     .to(torch.int32) if kind == ref.MASK_BITS else None)
    return params, grads, ms, vs, masks


def _step(backend, dtype, action, semantics, reserve_p):
    params, grads, ms, vs, masks = _inputs(dtype)
    kwargs = dict(masks=masks, mask_kinds=[t[2] for t in TENSORS], steps=[3] * len(TENSORS),
                  index_offsets=[t[1] for t in TENSORS], streams=list(range(len(TENSORS))),
                  lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, seed=SEED,
                  reserve_p=reserve_p, action=action, semantics=semantics)
    if backend == "reference":
        ref.masked_adamw_step(params, grads, ms, vs, upcast=False, **kwargs)
    else:
        masked_adamw_step(params, grads, ms, vs, backend=backend, **kwargs)
    return params, ms, vs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("action", ref.ACTIONS)
@pytest.mark.parametrize("semantics", ref.SEMANTICS)
def test_every_isa_path_matches_the_reference(monkeypatch, isa, action, semantics):
    require_backend("cpu", torch.device("cpu"))
    monkeypatch.setenv("REGDROP_FAST_CPU_ISA", isa)
    expected = _step("reference", torch.float32, action, semantics, 0.3)
    got = _step("cpu", torch.float32, action, semantics, 0.3)
    for exp_list, got_list in zip(expected, got):
        for e, g in zip(exp_list, got_list):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    if action == "prune":
        # keep decisions exactly: pruned weights are exactly 0, their moments untouched
        for e, g in zip(expected[0], got[0]):
            assert torch.equal(e == 0, g == 0)


@pytest.mark.parametrize("isa", ISAS)
def test_keep_everything_and_half_precision(monkeypatch, isa):
    require_backend("cpu", torch.device("cpu"))
    monkeypatch.setenv("REGDROP_FAST_CPU_ISA", isa)
    for dtype, reserve_p, tol in ((torch.float32, 1.0, 1e-6), (torch.bfloat16, 0.3, 1e-2),
                                  (torch.float16, 0.3, 1e-3)):
        expected = _step("reference", dtype, "grad", "torch", reserve_p)
        got = _step("cpu", dtype, "grad", "torch", reserve_p)
        for exp_list, got_list in zip(expected, got):
            for e, g in zip(exp_list, got_list):
                torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol)


def test_unknown_isa_is_rejected(monkeypatch):
    require_backend("cpu", torch.device("cpu"))
    monkeypatch.setenv("REGDROP_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="REGDROP_FAST_CPU_ISA"):
        _step("cpu", torch.float32, "grad", "paper", 0.3)


# Property test of the keep decisions alone, on every path and over arbitrary sizes, global
# offsets (Philox counters well past 2^32) and keys: with action "prune" a dropped element's
# parameter becomes exactly 0 and a kept one (parameter 1, tiny update) stays nonzero, so the
# zero pattern is the kernel's keep mask. Exercises the AVX-512 kernel's look-ahead Philox
# batches and the AVX2 words of the block path at every alignment.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(numel=st.integers(1, 5000), offset=st.integers(0, 2 ** 36),
       seed=st.integers(0, 2 ** 64 - 1), step=st.integers(1, 2 ** 32 - 1),
       stream=st.integers(0, 2 ** 32 - 1), reserve_p=st.sampled_from((0.1, 0.3, 0.5, 0.9)))
def test_philox_keep_decisions_match_the_reference(monkeypatch, isa, dtype, numel, offset, seed,
                                                  step, stream, reserve_p):
    require_backend("cpu", torch.device("cpu"))
    monkeypatch.setenv("REGDROP_FAST_CPU_ISA", isa)
    p = torch.ones(numel, dtype=dtype)
    masked_adamw_step([p], [torch.full((numel,), 0.5, dtype=dtype)], [torch.zeros(numel)],
                      [torch.zeros(numel)], masks=[None], mask_kinds=[ref.MASK_PHILOX],
                      steps=[step], index_offsets=[offset], streams=[stream], lr=1e-3,
                      beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, seed=seed,
                      reserve_p=reserve_p, action="prune", semantics="paper", backend="cpu")
    keep = ref.keep_bits(ref.MASK_PHILOX, numel, offset, seed=seed, step=step, stream=stream,
                         reserve_p=reserve_p, words=None, device="cpu")
    assert torch.equal(p != 0, keep)
