"""R-Drop loss, forward + backward: CE of both passes + alpha/2 * symmetric KL, gradients to both
logits, mean over non-ignored rows (5% of labels are ignore_index).

Impls, all measured in the same run:
  eager              the official recipe in PyTorch: log_softmax in fp32, F.nll_loss and
                     F.kl_div both ways (the baseline)
  torch.compile      the same function through torch.compile (dynamic shapes, one compile per
                     dtype); skipped with a printed reason if compiling fails
  liger              what a Liger-Kernel user writes: two LigerCrossEntropyLoss and two
                     LigerKLDIVLoss calls, only when liger_kernel is importable (its kl_div
                     sends no gradient to the target side: a timing peer, not the same gradient)
  rdrop_loss[...]    ours, with the public defaults: triton on CUDA; reference on CPU (Triton
                     under the interpreter is not timed)

bytes_moved is the floor of the fused op: read both logits and write both gradients in their
dtype, 4 * N * V * itemsize (the "4 B/element" floor per element of each tensor, in bf16).
Sizes: full (GPU) N=8192 bf16 x V in {2, 32000, 50265, 128256, 151936} (main), secondary fp32
N=8192 x V in {2, 32000, 128256} and bf16 N=4096 x V=32000; quick / CPU: small.
"""
import torch
import torch.nn.functional as F

from regdrop_fast import backends, rdrop_loss

ALPHA = 0.7
IGNORE = -100


def eager_rdrop(z1, z2, labels):
    lp1 = F.log_softmax(z1.float(), dim=-1)
    lp2 = F.log_softmax(z2.float(), dim=-1)
    valid = labels != IGNORE
    count = valid.sum().clamp_min(1)
    ce = (F.nll_loss(lp1, labels, ignore_index=IGNORE, reduction="sum")
          + F.nll_loss(lp2, labels, ignore_index=IGNORE, reduction="sum"))
    kl = (F.kl_div(lp1, lp2, reduction="none", log_target=True).sum(-1)
          + F.kl_div(lp2, lp1, reduction="none", log_target=True).sum(-1))
    return (ce + 0.5 * ALPHA * (kl * valid).sum()) / count


def _liger_rdrop():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception:
        return None
    ce = LigerCrossEntropyLoss(ignore_index=IGNORE)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger(z1, z2, labels):
        lp1 = F.log_softmax(z1.float(), dim=-1)
        lp2 = F.log_softmax(z2.float(), dim=-1)
        return ce(z1, labels) + ce(z2, labels) + 0.5 * ALPHA * (kl(lp1, lp2) + kl(lp2, lp1))
    return liger


def _cases(ctx):
    if ctx.device.type == "cuda" and not ctx.quick:
        return ([(8192, v, torch.bfloat16) for v in (2, 32000, 50265, 128256, 151936)]
                + [(8192, v, torch.float32) for v in (2, 32000, 128256)]
                + [(4096, 32000, torch.bfloat16)])
    if ctx.device.type == "cuda":
        return [(8192, v, torch.bfloat16) for v in (2, 32000)]
    if ctx.quick:
        return [(256, 2, torch.float32), (256, 1024, torch.float32)]
    return [(n, v, torch.float32) for n in (1024, 4096) for v in (2, 8192)]


def _inputs(n, v, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, v, generator=gen, device=device).to(dtype)
    z2 = (z1.float() + 0.1 * torch.randn(n, v, generator=gen, device=device)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[torch.rand(n, generator=gen, device=device) < 0.05] = IGNORE
    return z1.requires_grad_(True), z2.requires_grad_(True), labels


def _step(fn, z1, z2, labels):
    def step():
        z1.grad = None
        z2.grad = None
        fn(z1, z2, labels).backward()
    return step


def _compiled(dtype, cache):
    if dtype not in cache:
        try:
            fn = torch.compile(eager_rdrop, dynamic=True)
            cache[dtype] = fn
        except Exception as exc:  # compile errors surface at the first call, checked there
            print(f"bench_rdrop: torch.compile unavailable: {exc!r}")
            cache[dtype] = None
    return cache[dtype]


def run(ctx):
    device = ctx.device
    ours = "triton" if device.type == "cuda" else "reference"
    if backends.unavailable_reason(ours, device) is not None or \
            (device.type == "cpu" and backends.interpreter_enabled() and ours == "triton"):
        return
    liger = _liger_rdrop() if device.type == "cuda" else None
    compiled_cache = {}
    compile_broken = False
    for n, v, dtype in _cases(ctx):
        z1, z2, labels = _inputs(n, v, dtype, device)
        dname = str(dtype).replace("torch.", "")
        # main: the bf16 N=8192 vocabularies; V=2 is a latency case (issue 20: <= 10 us)
        common = dict(op="rdrop_loss_fwd_bwd", baseline="eager", case=f"N={n},V={v}",
                      dtype=dname, bytes_moved=4 * n * v * z1.element_size(), shape=[n, v],
                      alpha=ALPHA,
                      main_case=n == 8192 and dtype == torch.bfloat16 and v != 2)
        with torch.no_grad():
            expected = eager_rdrop(z1, z2, labels).item()
            got = rdrop_loss(z1, z2, labels, ALPHA, backend=ours).item()
        rel_err = abs(got - expected) / max(abs(expected), 1e-12)

        def run_ours(a, b, y):
            return rdrop_loss(a, b, y, ALPHA, backend=ours)

        ctx.record(impl="eager", **common, **ctx.measure(_step(eager_rdrop, z1, z2, labels)))
        compiled = None if compile_broken else _compiled(dtype, compiled_cache)
        if compiled is not None:
            try:
                compiled(z1, z2, labels).backward()
                ctx.record(impl="torch.compile", **common,
                           **ctx.measure(_step(compiled, z1, z2, labels)))
            except Exception as exc:
                print(f"bench_rdrop: torch.compile failed, skipped: {type(exc).__name__}: {exc}")
                compile_broken = True
        if liger is not None:
            ctx.record(impl="liger", note="no target-side KL gradient", **common,
                       **ctx.measure(_step(liger, z1, z2, labels)))
        ctx.record(impl=f"rdrop_loss[{ours}]", loss_rel_err_vs_eager=rel_err, **common,
                   **ctx.measure(_step(run_ours, z1, z2, labels)))
        del z1, z2, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()
