"""The CUDA masked AdamW step at the boundaries of its multi-tensor launcher
(csrc/multi_tensor_apply.h): a list longer than one kernel-argument struct holds, a tensor whose
chunks fill one launch and continue in the next (from slot 0), empty tensors in between, every
mask kind; plain and capturable steps against the reference. Needs a GPU."""
import pytest
import torch

from utils import require_backend
from regdrop_fast import pack_mask
from regdrop_fast.childtuning.masked_step import masked_adamw_step
from regdrop_fast.reference import masked_adamw as ref

CHUNK = 65536  # elements per thread block (csrc/masked_adamw_cuda.cu)
MAX_BLOCKS = 320  # chunks per launch (csrc/multi_tensor_apply.h)
SMALL = [0, 1, 33, 4096, 4097, CHUNK + 3]
# 61 tensors (a struct holds 26); the long one starts mid-struct and needs 321 chunks
SIZES = SMALL * 5 + [MAX_BLOCKS * CHUNK + 1000] + SMALL * 5
KINDS = [(ref.MASK_PHILOX, ref.MASK_BITS, ref.MASK_NONE)[i % 3] for i in range(len(SIZES))]
OFFSETS = [37 * i for i in range(len(SIZES))]


def step_twice(backend, device, capturable):
    """(params, exp_avgs, exp_avg_sqs) after two steps of `backend` from fixed inputs."""
    gen = torch.Generator().manual_seed(5)

    def make(scale=1.0):
        return [(torch.randn(n, generator=gen) * scale).to(device) for n in SIZES]

    params, m, v = make(), [x.abs() for x in make(0.1)], [x.abs() for x in make(0.01)]
    grads = [make(), make()]
    masks = [pack_mask(torch.rand(off + n, generator=gen) < 0.5).words.to(device)
             if kind == ref.MASK_BITS else None
             for n, kind, off in zip(SIZES, KINDS, OFFSETS)]
    lr = torch.full((), 1e-2, dtype=torch.float64, device=device) if capturable else 1e-2
    for t in (1, 2):
        steps = ([torch.full((), float(t), device=device) for _ in SIZES] if capturable
                 else [t] * len(SIZES))
        masked_adamw_step(params, grads[t - 1], m, v, masks=masks, mask_kinds=KINDS,
                          steps=steps, index_offsets=OFFSETS, streams=list(range(len(SIZES))),
                          lr=lr, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                          seed=0xDEADBEEF, reserve_p=0.3, action="grad", semantics="torch",
                          backend=backend, capturable=capturable)
    return params, m, v


@pytest.mark.cuda
@pytest.mark.parametrize("capturable", (False, True))
def test_launch_struct_boundaries_match_the_reference(capturable):
    device = torch.device("cuda")
    require_backend("cuda", device)
    expected = step_twice("reference", device, capturable)
    got = step_twice("cuda", device, capturable)
    for exp_list, got_list in zip(expected, got):
        for e, g in zip(exp_list, got_list):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
