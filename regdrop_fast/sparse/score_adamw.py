"""MaskScoreAdamW: torch.optim.AdamW on mask-training scores, fused with the elementwise work
of mask training (issue 18).

Besides cuBLAS's GEMMs, a mask-training step works over every masked weight: W' = W ⊙ M in
the compute dtype (forward), dScore = G ⊙ W from G = dW' (backward), the AdamW step of the
scores, and, where MaskTrainer resets it, φ = kthvalue of the updated scores. φ of step t+1
depends on every updated score, so the pass that updates the scores can threshold them only
with a φ that stays. With fused=True (the default on CUDA; the Triton interpreter on request)
a step is:
  - one kernel launch for all score matrices (triton_kernels/score_adamw.py; one per set of
    flags and dtypes where the matrices differ): AdamW on the scores, m and v in place, each
    matrix with its own step count, its gradient read as dScore, or with
    defer_ste_grad=True computed as G ⊙ W from G and W (no dScore tensor written or read);
    after a step that MaskTrainer.step() will not follow with a φ reset, the same kernel
    writes W' = W ⊙ (s_new > φ) for the next forward (all matrices' W' in one buffer), which
    then materializes nothing. The launch's table of addresses is built once and reused while
    the scores, their state and the weights keep their storage;
  - where φ is reset: torch's kthvalue (MaskTrainer.step), then the forward's one W' pass.
Elementwise passes per matrix and step (unfused: 3, W', dScore, AdamW): φ kept 2, or 1 with
defer_ste_grad; φ reset 3, or 2 with defer_ste_grad, plus the kthvalue. The fused step reads
s, m, v (12 B/weight) and dScore (4 B) or G and W (2 + 4 B: bf16 G, fp32 W), and writes s, m,
v (12 B) and, where φ stays, W' (2 B in bf16).
Unfused (CPU), the step is torch.optim.adamw.adamw on the same gradients. Both follow
torch.optim.AdamW's math (decay first, bias corrections, fp32 state); the state_dict has its
keys (step, exp_avg, exp_avg_sq), so checkpoints move between the two. Fused, the step counts
of one launch's matrices are 0-d views of one CPU tensor (one add per step, not one per
matrix); a loaded or replaced count is taken in again at the next step.

defer_ste_grad=True leaves the scores' .grad None (the gradient lives with the layer until
the step), so only this optimizer sees it: no gradient clipping, GradScaler unscaling, DDP
all-reduce or grad hooks apply to the scores. It is therefore off by default; the Trainer's
default max_grad_norm clips gradients.
"""
from __future__ import annotations

import math
from operator import attrgetter
from typing import Optional

import torch
from torch.optim.adamw import adamw as _torch_adamw

from .. import backends

__all__ = ["MaskScoreAdamW"]

_MAX_TABLES = 8  # lists of matrices a MaskScoreAdamW keeps launch tables for
_F32, _F32_SET, _ONE = torch.float32, {torch.float32}, {1}
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")


class MaskScoreAdamW(torch.optim.Optimizer):
    """AdamW over the scores of a `MaskTrainer` (see the module docstring).

    trainer: the MaskTrainer whose scores train (its `parameters()`); its schedule tells the
    fused step whether φ stays after this step. lr, betas, eps, weight_decay: as
    torch.optim.AdamW (weight decay 0 officially). fused: None (backends "mask_score_adamw":
    Triton on CUDA, else torch; REGDROP_FAST_BACKEND applies), True (Triton; needs CUDA or
    TRITON_INTERPRET=1) or False. defer_ste_grad: hand G = dW' from the backward to the step
    instead of writing dScore (the scores' .grad stays None).
    Call `step()` after the backward and before `trainer.step()`.
    """

    def __init__(self, trainer, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, fused: Optional[bool] = None,
                 defer_ste_grad: bool = False):
        if isinstance(lr, torch.Tensor) or not lr >= 0.0:
            raise ValueError(f"lr must be a float >= 0, got {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self._layers = {m.mask_scores: m for m in trainer.modules.values()}
        if not self._layers:
            raise ValueError("trainer has no score matrices to optimize")
        for name, module in trainer.modules.items():
            scores = module.mask_scores
            if scores.dtype != torch.float32 or not scores.is_contiguous():
                raise TypeError(f"mask_scores of {name} must be contiguous float32, got "
                                f"{scores.dtype} with strides {scores.stride()}")
        devices = {p.device for p in self._layers}
        if len(devices) != 1:
            raise ValueError(f"the trainer's scores must be on one device, got "
                             f"{sorted(str(d) for d in devices)}")
        # fused=None: auto (Triton on CUDA) unless REGDROP_FAST_BACKEND names a backend
        backend = None if fused is None else ("triton" if fused else "reference")
        fused = backends.resolve("mask_score_adamw", backend, devices.pop()) == "triton"
        super().__init__(list(self._layers), dict(lr=float(lr), betas=tuple(betas),
                                                  eps=float(eps),
                                                  weight_decay=float(weight_decay)))
        self.trainer = trainer
        self.fused = bool(fused)
        self.defer_ste_grad = bool(defer_ste_grad)
        self._group_ids = None
        # the fused launches' MatrixTables by the addresses they hold, with the step-count
        # tensor their matrices' counts are views of and those views' addresses
        self._tables = {}
        self._check_groups()

    def _state(self, p):
        state = self.state[p]
        if not state:
            # torch.optim.AdamW's layout: a float32 step count on the CPU
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        # the official order: optimizer step, then MaskTrainer.step() (t + 1) may reset φ
        keep_phi = not self.trainer.resets_at(self.trainer.t + 1)
        for group in self.param_groups:
            fused, plain = [], []  # (scores, layer or None, deferred G or None, state)
            for p in group["params"]:
                layer = self._layers.get(p)
                g_ste = None if layer is None else layer.take_score_grad()
                if p.grad is not None or g_ste is not None:
                    work = fused if self.fused and layer is not None else plain
                    work.append((p, layer, g_ste, self._state(p)))
            if fused:
                self._fused_steps(fused, group, keep_phi)
            if plain:
                beta1, beta2 = group["betas"]
                _torch_adamw([p for p, *_ in plain],
                             [p.grad if g is None else _ste_product(p, layer, g)
                              for p, layer, g, _ in plain],
                             [s["exp_avg"] for *_, s in plain],
                             [s["exp_avg_sq"] for *_, s in plain], [],
                             [s["step"] for *_, s in plain], amsgrad=False, beta1=beta1,
                             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                             eps=group["eps"], maximize=False)
        return loss

    def _check_groups(self) -> None:
        """Scores replaced in param_groups (accelerate's FSDP2 prepare swaps each for its
        DTensor shard, DeepSpeed ZeRO for flat partitions) train by torch's AdamW; their layers
        then neither keep W' nor defer G, since this step no longer updates what they read."""
        ids = tuple(id(p) for group in self.param_groups for p in group["params"])
        if ids == self._group_ids:
            return
        present = set(ids)
        for scores, layer in self._layers.items():
            own = id(scores) in present
            if not own and self.defer_ste_grad:
                raise ValueError("defer_ste_grad=True needs the scores themselves in "
                                 "param_groups, but they were replaced (FSDP or DeepSpeed "
                                 "sharding): use defer_ste_grad=False")
            layer.cache_masked_weight = self.fused and own
            layer.defer_score_grad = self.defer_ste_grad and own
        self._group_ids = ids

    def _fused_steps(self, work, group, keep_phi) -> None:
        _sa = backends.triton_kernels("score_adamw")
        launches = {}  # by the launch's flags and dtypes: its matrices
        for p, layer, g_ste, state in work:
            ste = g_ste is not None and p.grad is None
            grad = g_ste if ste else (p.grad if g_ste is None else _ste_product(p, layer, g_ste))
            if not grad.is_contiguous():
                grad = grad.contiguous()
            # the last training forward's W' gives the compute dtype of the next one
            dtype = layer._drop_masked_weight()
            out_dtype = dtype if keep_phi else None
            weight = layer.weight
            if (ste or out_dtype is not None) and not weight.is_contiguous():
                weight = weight.detach().contiguous()
            key = (ste, grad.dtype, weight.dtype, out_dtype)
            rows = launches.get(key)
            if rows is None:
                rows = launches[key] = []
            rows.append((p, state["exp_avg"], state["exp_avg_sq"], weight, layer.mask_threshold,
                         grad, state, layer))
        # every launch's matrices checked before the first launch (no partial step)
        checked = []
        for key, rows in launches.items():
            columns = tuple(zip(*rows))
            static = columns[:5]
            self._check_readable(static, columns[5], key[3] is not None)
            # a table holds addresses only: one per list of storages (the flags are the
            # launch's, so steps that keep φ and steps that reset it share it); new when a
            # tensor is replaced or moved
            where = _sa.table_key(*static)
            if where not in self._tables:
                # the devices are facts of the key's addresses (one virtual address space),
                # so checked when a table is made
                self._check_devices(static)
            checked.append((key, columns, where))
        for key, columns, where in checked:
            self._launch(_sa, key, columns, where, group)

    def _name(self, p) -> str:
        return next((n for n, m in self.trainer.modules.items() if m.mask_scores is p),
                    "a layer")

    def _check_readable(self, static, grads, write) -> None:
        """The kernel reads each tensor as a flat, contiguous array of its scores' numel:
        checked every step, since p.data = ..., model.half() or a loaded state of other shapes
        change these without a new table address (devices: see _fused_steps). Column by
        column, by C-level maps."""
        scores, exp_avgs, exp_avg_sqs, weights, phis = static
        shapes = list(map(_SHAPE, scores))
        if (shapes == list(map(_SHAPE, exp_avgs)) == list(map(_SHAPE, exp_avg_sqs))
                == list(map(_SHAPE, grads)) == list(map(_SHAPE, weights))
                and set(map(_DTYPE, scores + exp_avgs + exp_avg_sqs)) == _F32_SET
                and all(map(torch.Tensor.is_contiguous, scores + exp_avgs + exp_avg_sqs))
                and (not write or (set(map(_DTYPE, phis)) == _F32_SET
                                   and set(map(torch.Tensor.numel, phis)) == _ONE))):
            return
        for p, m, v, weight, phi, grad in zip(*static, grads):
            self._reject(p, m, v, grad, weight, phi if write else None)

    def _reject(self, p, m, v, grad, weight, phi) -> None:
        """Raise the error naming what the fused step cannot read, if any (_check_readable)."""
        name = self._name(p)
        if p.dtype is not _F32 or not p.is_contiguous():
            raise TypeError(f"mask_scores of {name} must be contiguous float32, got {p.dtype} "
                            f"with strides {p.stride()}")
        for what, t in (("exp_avg", m), ("exp_avg_sq", v)):
            if t.dtype is not _F32 or t.shape != p.shape or not t.is_contiguous():
                raise ValueError(f"optimizer state {what} of {name} must be contiguous float32 "
                                 f"of the scores' shape {tuple(p.shape)}, got {t.dtype} "
                                 f"{tuple(t.shape)} with strides {t.stride()}")
        for what, t in (("the gradient", grad), ("weight", weight)):
            if t.shape != p.shape:
                raise ValueError(f"{what} of {name} must have the scores' shape "
                                 f"{tuple(p.shape)}, got {tuple(t.shape)}")
        if phi is not None and (phi.dtype is not _F32 or phi.numel() != 1):
            raise TypeError(f"mask_threshold of {name} must be a float32 [1] tensor, got "
                            f"{phi.dtype} {tuple(phi.shape)}")

    def _check_devices(self, static) -> None:
        device = static[0][0].device
        for what, tensors in zip(("mask_scores", "exp_avg", "exp_avg_sq", "weight",
                                  "mask_threshold"), static):
            for p, t in zip(static[0], tensors):
                if t.device != device:
                    raise ValueError(f"{what} of {self._name(p)} must be on {device} (the "
                                     f"scores' device), got {t.device}")

    def _launch(self, _sa, key, columns, where, group) -> None:
        """One kernel over the matrices whose rows (see _fused_steps) `columns` holds, which
        share the flags and dtypes `key`; `where`: their table key."""
        ste, _, _, out_dtype = key
        static, (grads, states, layers) = columns[:5], columns[5:]
        found = self._tables.get(where)
        if found is None:
            if len(self._tables) >= _MAX_TABLES:
                self._tables.pop(next(iter(self._tables)))
            found = self._tables[where] = [_sa.MatrixTable(*static), None, None]
        table, counts, count_addresses = found
        steps = tuple(state["step"] for state in states)
        if count_addresses != tuple(map(torch.Tensor.data_ptr, steps)):
            # the step counts become views of one CPU tensor: one add and one read per step
            counts = found[1] = torch.stack(steps)
            for state, count in zip(states, counts.unbind()):
                state["step"] = count
            found[2] = tuple(state["step"].data_ptr() for state in states)
        counts.add_(1)
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        ts = counts.tolist()
        # by step count: the matrices normally share one
        scalars = {t: (lr / (1.0 - beta1 ** int(t)), math.sqrt(1.0 - beta2 ** int(t)))
                   for t in set(ts)}
        step_sizes, bc2_sqrts = zip(*map(scalars.__getitem__, ts))
        out = (None if out_dtype is None else
               torch.empty(table.out_numel, dtype=out_dtype, device=table.device))
        _sa.score_adamw_multi(table, grads, step_sizes, bc2_sqrts, out,
                              decay=1.0 - lr * group["weight_decay"], beta1=beta1, beta2=beta2,
                              eps=group["eps"], ste=ste)
        # as torch's in-place update would: autograd then sees the scores changed
        torch.autograd.graph.increment_version(static[0])
        if out is not None:
            for layer, masked in zip(layers, table.out_views(out)):
                layer._store_masked_weight(masked, always=True)

    def __getstate__(self):
        # torch's Optimizer pickles (and deep-copies) only defaults, state and param_groups;
        # a copy also needs the trainer, layers and flags the step reads
        state = super().__getstate__()
        state.update(trainer=self.trainer, _layers=self._layers, fused=self.fused,
                     defer_ste_grad=self.defer_ste_grad)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # launch tables hold the original's addresses: a copy builds its own
        self._tables, self._group_ids = {}, None

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "step" in state:  # torch's fused or capturable AdamW keeps it on the device
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).cpu()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers.values():
            layer.take_score_grad()


def _ste_product(p, layer, g_ste) -> torch.Tensor:
    """dScore = G ⊙ W in fp32 (ste_grads' rounding), plus any .grad the scores also got."""
    dscore = g_ste.float() * layer.weight.detach().float()
    return dscore if p.grad is None else p.grad + dscore

