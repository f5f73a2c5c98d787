"""ChildTuningAdamW across processes: 2 CPU ranks on gloo.

DDP: every rank sees different data, the seed is drawn on rank 0 and broadcast, and the
parameters stay identical on both ranks (same F masks everywhere). A checkpoint taken mid-run
resumes bit-identically. FSDP2 (`fully_shard`, which runs on CPU with gloo) shards every
parameter on dim 0, unevenly for odd row counts: the sharded run matches an unsharded one
because masks are keyed on global element indices.
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))


def _batches(rank, n):
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(6, 13, generator=gen) for _ in range(n)]


def _gathered_equal(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out[1:])


def _ddp_checks(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from regdrop_fast import ChildTuningAdamW

    def build(mode):
        model = DDP(_model())
        masks = None
        if mode == "D":
            gen = torch.Generator().manual_seed(3)
            masks = {p: (torch.rand(p.shape, generator=gen) < 0.5) for p in model.parameters()}
        torch.manual_seed(1000 + rank)  # seed=None must still agree: drawn on rank 0
        return model, ChildTuningAdamW(model.parameters(), mode=mode, masks=masks,
                                       weight_decay=0.01)

    def run(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    for mode in ("F", "D"):
        model, opt = build(mode)
        seeds = [None] * WORLD
        dist.all_gather_object(seeds, opt.seed)
        assert seeds[0] == seeds[1]
        run(model, opt, _batches(rank, 4))
        assert _gathered_equal(model.parameters()), mode
        checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
        run(model, opt, _batches(rank + 10, 2))
        resumed, resumed_opt = build(mode)
        resumed.load_state_dict(checkpoint[0])
        resumed_opt.load_state_dict(checkpoint[1])
        run(resumed, resumed_opt, _batches(rank + 10, 2))
        assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))


def _fsdp_checks(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from regdrop_fast import ChildTuningAdamW

    mesh = init_device_mesh("cpu", (WORLD,))
    plain = _model()
    sharded = _model()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    rows = [None] * WORLD
    dist.all_gather_object(rows, [p.to_local().shape[0] for p in sharded.parameters()])
    assert rows[0] != rows[1]  # 37 and 5 rows: uneven shards, offsets not multiples of 4 or 32
    opts = [ChildTuningAdamW(m.parameters(), mode="F", reserve_p=0.3, seed=77, lr=1e-2)
            for m in (plain, sharded)]
    for x in _batches(0, 3):  # the same batch on both ranks: the mean gradient is the batch's
        for m, opt in zip((plain, sharded), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(plain.parameters(), sharded.parameters()):
        full = q.full_tensor().detach()
        assert float((full - p.detach()).abs().max()) <= 1e-6


def _worker(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _ddp_checks(rank)
        _fsdp_checks(rank)
        # both ranks done before either tears gloo down: one clean-clone CI run had rank 1 abort
        # ("terminate called without an active exception") during teardown
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_and_fsdp2_on_gloo():
    # a failing rank raises ProcessRaisedException here, with that rank's traceback
    mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, join=True,
                       start_method="spawn")
