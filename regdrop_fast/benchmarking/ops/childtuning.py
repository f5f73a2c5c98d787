"""ChildTuning: one optimizer step over BERT-shaped parameter sets.

Cases: the parameter shapes of BERT-base (110M) and BERT-large (335M) with a classifier head,
and on CUDA a 1.3B model of the same layout (hidden 2048, 24 layers, FFN 8192); quick mode:
the 12 encoder layers of a BERT-base at a quarter of the width (~10M, the same tensor count
and aspect ratios). fp32 params, grads and moments.
Implementations, all stepping the same parameter tensors (each with its own moments):
  torch-fused     torch.optim.AdamW(fused=True), no mask: the baseline
  torch-foreach   torch.optim.AdamW(foreach=True), no mask
  official-F      the official ChildTuningAdamW step in torch ops (Bernoulli mask per tensor,
                  g *= mask/p, HF AdamW update), the path the method's code runs
  ours-F / ours-D / ours-none   ChildTuningAdamW(mode=F | D | None) on the fused kernel: the
                  C++ kernel on CPU, the multi-tensor CUDA kernel and Triton on CUDA.
Timing: torch-fused and ours are built side by side and measured in alternating rounds (12 on
CPU, 3 on CUDA; median of the round medians), so drift on a shared machine hits them alike;
the notes give each impl's per-round speedup (torch-fused ms / impl ms of the same round:
median, p20–p80), the tighter estimate on a noisy machine. foreach and official-F are
measured once.
bytes_moved = numel * (28 B: read p, g, m, v; write p, m, v) + 1/8 B per element for D; the
official path moves more (the mask is materialized) but is charged the same 28 B so its GB/s
is comparable as "useful" bandwidth. bytes/param is recorded per row.
"""
import math

import torch

from regdrop_fast import ChildTuningAdamW, backends, pack_mask

RESERVE_P = 0.3
SEED = 1234
# every impl steps with the same hyperparameters (torch's AdamW defaults would differ from
# ChildTuningAdamW's in eps and weight decay)
HPARAMS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def bert_shapes(hidden, layers, intermediate, vocab=30522, positions=512, labels=2):
    shapes = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # q, k, v, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,), (labels, hidden), (labels,)]  # pooler, classifier
    return shapes


def cases(quick, device_type="cpu"):
    if quick:
        encoder = bert_shapes(192, 12, 768)[5:-4]
        return [("bert-base-encoder-quarter-width", encoder)]
    found = [("bert-base-110M", bert_shapes(768, 12, 3072)),
             ("bert-large-335M", bert_shapes(1024, 24, 4096))]
    if device_type == "cuda":  # ~1.27B parameters: 5 GB per fp32 tensor set
        found.append(("1.3B", bert_shapes(2048, 24, 8192)))
    return found


class OfficialChildTuningF:
    """The official ChildTuningAdamW.step (F mode) in torch ops, for timing."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.state = {}

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        for p in self.params:
            grad = p.grad.clone()  # the official code masks p.grad in place; keep it reusable
            sample = torch.bernoulli(torch.full_like(grad, RESERVE_P))
            grad *= sample / RESERVE_P
            st = self.state.setdefault(p, [0, torch.zeros_like(p), torch.zeros_like(p)])
            st[0] += 1
            exp_avg, exp_avg_sq = st[1], st[2]
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1.0 - beta2 ** st[0]) / (1.0 - beta1 ** st[0])
            p.addcdiv_(exp_avg, denom, value=-step_size)
            if self.wd > 0.0:
                p.add_(p, alpha=-self.lr * self.wd)


def _our_backends(device):
    names = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    return [n for n in names if backends.unavailable_reason(n, device) is None]


def run(ctx):
    device = ctx.device
    for case, shapes in cases(ctx.quick, device.type):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        numel = sum(p.numel() for p in params)
        masks = {p: pack_mask(torch.rand(p.shape, generator=gen).to(device) < RESERVE_P)
                 for p in params}
        impls = [
            ("torch-fused", 28.0, lambda: torch.optim.AdamW(params, **HPARAMS, fused=True)),
            ("torch-foreach", 28.0, lambda: torch.optim.AdamW(params, **HPARAMS, foreach=True)),
            ("official-F", 28.0, lambda: OfficialChildTuningF(params, **HPARAMS)),
        ]
        for backend in _our_backends(device):
            for mode, extra in (("F", 0.0), ("D", 0.125), (None, 0.0)):
                impls.append((f"ours-{mode or 'none'}[{backend}]", 28.0 + extra,
                              lambda mode=mode, backend=backend: ChildTuningAdamW(
                                  params, **HPARAMS, mode=mode, reserve_p=RESERVE_P, seed=SEED,
                                  masks=masks if mode == "D" else None, backend=backend)))
        default_threads = torch.get_num_threads()
        # CPU: one thread (a clean per-core comparison) and all threads; torch's fused step
        # opens one parallel region per tensor, ours one per step, so a loaded machine
        # penalizes torch's many regions at >1 thread
        thread_counts = sorted({1, default_threads}) if device.type == "cpu" else [None]
        try:
            for threads in thread_counts:
                if threads is not None:
                    torch.set_num_threads(threads)
                label = case if threads is None else f"{case} threads={threads}"
                timings = _interleaved(ctx, impls, device)
                for impl, bytes_per_param, _ in impls:
                    timing = timings[impl]
                    note = None if impl == "torch-fused" else _paired_note(timing)
                    ctx.record(op="childtuning_step", impl=impl, baseline="torch-fused",
                               case=label, dtype="float32", ms=timing["ms"],
                               bytes_moved=numel * bytes_per_param,
                               peak_mem_bytes=timing["peak_mem_bytes"], p20_ms=timing["p20_ms"],
                               p80_ms=timing["p80_ms"], numel=numel,
                               bytes_per_param=bytes_per_param,
                               graph_ms=timing.get("graph_ms"), host_ms=timing.get("host_ms"),
                               threads=torch.get_num_threads(), rounds=timing["rounds"],
                               note=note,
                               **{key: timing[key] for key in PAIRED if key in timing})
        finally:
            torch.set_num_threads(default_threads)
            del params, masks, impls
            if device.type == "cuda":
                torch.cuda.empty_cache()


# impls timed in alternating rounds (a shared, noisy machine drifts between back-to-back
# measurements); the slow Python paths are timed once
SLOW = ("torch-foreach", "official-F")
ROUNDS = {"cpu": 12, "cuda": 3}  # GPU timings drift little: few rounds keep the playbook short
PAIRED = ("paired_speedup", "paired_p20", "paired_p80")


def _interleaved(ctx, impls, device):
    """{impl: timing}: the fast impls (torch-fused first) through ctx.measure_rounds, the slow
    ones measured once."""
    timings = {}
    for impl, _, build in impls:
        if impl in SLOW:
            opt = build()
            repeat = 3 if impl == "official-F" and device.type == "cpu" else None
            timings[impl] = dict(ctx.measure(opt.step, warmup=2, repeat=repeat), rounds=1)
            del opt
    opts = {impl: build() for impl, _, build in impls if impl not in SLOW}
    for opt in opts.values():
        opt.step()
    steps = {impl: opt.step for impl, opt in opts.items()}
    timings.update(ctx.measure_rounds(steps, baseline="torch-fused", rounds=ROUNDS[device.type],
                                      warmup=1, repeat=5))
    return timings


def _paired_note(timing):
    if "paired_speedup" not in timing:
        return None
    return (f"per-round speedup {timing['paired_speedup']:.3g}x "
            f"({timing['paired_p20']:.3g}–{timing['paired_p80']:.3g}) over "
            f"{timing['rounds']} rounds")
