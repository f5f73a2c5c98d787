"""ChildTuningAdamW and MaskedAdamW: AdamW whose step is one fused masked kernel.

ChildTuning (Xu et al., EMNLP 2021) updates a "child network" only:
  mode="F"  every step draws a fresh Bernoulli(reserve_p) keep mask per element and scales kept
            gradients by 1/reserve_p. The mask is never stored: the kernel draws it from the
            Philox contract, keep(i) = philox_words(seed, i, step, stream) < floor(reserve_p*2^32)
            with i the element's global flat index, step the parameter's step count after this
            step's increment (state["step"], 1 on the first step) and stream
            `optimizer.mask_stream(param)`. Zero bytes of mask memory, identical on every
            backend, rank and shard.
  mode="D"  a fixed mask per parameter (from `fisher_mask`), bit-packed (1 bit per element).
  mode=None plain AdamW through the same kernel.
semantics="paper" reproduces the official ChildTuningAdamW (mask g, Adam moments of the masked
g, HF bias correction lr*sqrt(bc2)/bc1 with sqrt(v)+eps, decay after the update);
semantics="torch" is torch.optim.AdamW's formula with the mask. drop="update" masks the
parameter change instead of the gradient (moments see every gradient). The official code also
overwrites p.grad with the masked gradient; here p.grad is left as it was (saves 4 B/param of
writes), the parameters and moments are the same.

Streams: a parameter's stream is crc32 of its name when the optimizer was given named
parameters (`model.named_parameters()`), else its position in param-group order (0, 1, ...).
Both are the same on every rank and after a resume; `mask_stream(param)` returns it.

NaN/inf gradients propagate, as in torch.optim.AdamW and the official code: the element's m,
v and weight become NaN/inf (a dropped element multiplies its gradient by 0, still NaN).
Skip such steps with torch.amp.GradScaler, or check the gradients before step(). Pruned
weights of MaskedAdamW stay exactly 0 whatever the gradient.

capturable=True follows torch.optim.AdamW(capturable=True): each parameter's state["step"] is a
0-d float32 tensor on its device (exact up to 2^24 steps), incremented on the device, and lr may
be a 0-d tensor (change it in place, `lr.fill_(x)`, or through an LR scheduler); the step reads
no host value on CUDA (the CUDA and Triton kernels read both through pointers), so
`optimizer.step()` can be captured in a torch.cuda.CUDAGraph and torch.compile does not
recompile when lr changes. On CPU the C++ kernel reads the two scalars on the host (no device
to synchronize with). A float lr is copied into a device tensor when it changes (captured as a
constant, as torch does). Masks and values equal the non-capturable step's.

Sharded parameters (DTensor, FSDP2 `fully_shard`): the kernel runs on the local shard with
global element indices, so masks do not depend on the sharding. Supported placements: Shard(0)
and Replicate.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from .._checks import UINT32_MAX, UINT64_MAX, check_int, check_prob
from ..masks import PackedMask, pack_mask, unpack_mask
from ..reference import masked_adamw as _ref
from .masked_step import IMPLEMENTED, masked_adamw_step

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without the public DTensor API
    DTensor = Replicate = Shard = None

__all__ = ["ChildTuningAdamW", "MaskedAdamW"]

_MODES = (None, "F", "D")
_DROPS = ("grad", "update")
_EXTRA_KEY = "regdrop_fast"
_MAX_FLOAT_STEP = 2 ** 24  # capturable steps are float32 tensors, as in torch.optim.AdamW


def _finite_nonneg(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0.0)


def _check_hparams(lr, betas, eps, weight_decay, capturable=False):
    if isinstance(lr, torch.Tensor):
        if not capturable:
            raise TypeError("lr may be a tensor only with capturable=True; pass a float")
        if lr.dim() != 0 or not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must be a 0-d floating-point tensor, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}")
        if lr.device.type != "meta" and not _finite_nonneg(float(lr)):
            raise ValueError(f"lr must be finite and >= 0, got {float(lr)!r}")
    elif not _finite_nonneg(lr):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_finite_nonneg(b) and b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not _finite_nonneg(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not _finite_nonneg(weight_decay):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")


def _param_number(key) -> Optional[int]:
    """A state-dict key as a parameter number (an int, as torch saves them), else None."""
    return key if isinstance(key, int) and not isinstance(key, bool) else None


def _host_step(step):
    """A saved step count as a Python int (a capturable optimizer saves a 0-d float tensor)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.device.type == "meta":
            return step  # check_int names it
        value = step.item()
        return int(value) if float(value).is_integer() else value
    return step


def _local(t: torch.Tensor) -> torch.Tensor:
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def _global_offset(p: torch.Tensor) -> int:
    """Global flat index of the first local element of `p` (0 unless p is a sharded DTensor)."""
    if DTensor is None or not isinstance(p, DTensor):
        return 0
    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard)
                                                     and placement.dim == 0)):
            raise ValueError(f"params: DTensor placements must be Shard(0) or Replicate for "
                             f"masks keyed on global indices, got {p.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                p.placements)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return int(offset[0]) * row if p.dim() > 0 else 0


def _flat_words(mask, param: torch.Tensor, label: str) -> torch.Tensor:
    """int32 words of `mask` as one flat bit stream over the parameter's elements."""
    shape = tuple(param.shape)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{label}] must be a PackedMask or a bool tensor, got dtype "
                            f"{mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"masks[{label}] has shape {tuple(mask.shape)}, the parameter has "
                             f"shape {shape}")
        return pack_mask(mask.reshape(-1)).words
    if not isinstance(mask, PackedMask):
        raise TypeError(f"masks[{label}] must be a PackedMask, a bool tensor or None, got "
                        f"{type(mask).__name__}")
    if tuple(mask.shape) != (shape if shape else (1,)):
        raise ValueError(f"masks[{label}] has shape {tuple(mask.shape)}, the parameter has "
                         f"shape {shape}")
    if mask.shape[-1] % 32 == 0:  # rows fill whole words: the packed rows are the flat stream
        return mask.words.reshape(-1).contiguous()
    return pack_mask(unpack_mask(mask).reshape(-1)).words


@dataclass
class _Bucket:
    """The parameters of one dtype in a param group: one fused launch."""
    indices: List[int]  # positions in the plan's params
    params: List[torch.Tensor]  # local tensors
    masks: List[Optional[torch.Tensor]]
    kinds: List[int]
    offsets: List[int]
    streams: List[int]


@dataclass
class _GroupPlan:
    """What one param group's step keeps between steps (ChildTuningAdamW._make_plan)."""
    params: List[torch.Tensor]
    mode: Optional[str]
    state: dict  # the optimizer's state mapping the plan was made from
    dtypes: List[torch.dtype]
    devices: List[torch.device]
    shapes: List[torch.Size]
    states: List[dict]
    buckets: List[_Bucket]
    sharded: bool  # any DTensor parameter: planned again every step


class ChildTuningAdamW(torch.optim.Optimizer):
    """AdamW with ChildTuning's gradient mask, one fused kernel per step.

    Args:
        params: parameters, param groups, or named parameters (`model.named_parameters()`;
            names set the Philox streams and name parameters in errors).
        lr, betas, eps, weight_decay: AdamW hyperparameters (defaults of the official code).
        mode: "F" (task-free, random mask each step), "D" (task-driven, fixed `masks`) or None.
        reserve_p: keep probability of mode F, in (0, 1]; the F gradient is scaled by 1/p.
        drop: "grad" (the paper) or "update" (mask the parameter change).
        semantics: "paper" (the official update order) or "torch" (torch.optim.AdamW's).
        seed: Philox seed in [0, 2^64); None draws one from torch's generator (broadcast from
            rank 0 when torch.distributed is initialized).
        masks: mode D: {parameter or name: PackedMask | bool tensor | None} covering every
            parameter (None = always fully updated, e.g. embeddings and classifier; this is
            what `fisher_mask` returns), or a list aligned with the parameters.
        backend: "reference" | "cpu" | "cuda" | "triton" | None (auto).
        capturable: torch.optim.AdamW's capturable=True: step counts (and lr, which may then be
            a 0-d tensor) live in device tensors and the step reads no host value on CUDA
            (CUDA, Triton or reference backend); on CPU the C++ kernel reads them on the host.
            See the module docstring.
    """

    _mode_choices = _MODES

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, mode: Optional[str] = "F", reserve_p: float = 0.3,
                 drop: str = "grad", semantics: str = "paper", seed: Optional[int] = None,
                 masks=None, backend: Optional[str] = None, capturable: bool = False):
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")
        _check_hparams(lr, betas, eps, weight_decay, capturable)
        self._check_mode(mode, reserve_p, drop, semantics)
        if backend is not None and backend not in ("auto",) + IMPLEMENTED:
            raise ValueError(f"backend must be one of {IMPLEMENTED}, 'auto' or None, got "
                             f"{backend!r}")
        self.backend = backend
        self.seed = self._resolve_seed(seed)
        self._streams = {}
        self._names = {}
        self._mask_words = {}
        self._known = []  # the parameters the dicts above are keyed on, in param-group order
        self._plans = {}  # param-group index -> _GroupPlan, the step's fast path
        self._lr_tensors = {}  # capturable group with a float lr -> (value, device tensor)
        self._constructed = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        mode=mode, reserve_p=reserve_p, drop=drop, semantics=semantics,
                        capturable=capturable)
        super().__init__(params, defaults)
        self._attach_masks(masks)
        self._constructed = True

    def __getstate__(self):
        # torch's Optimizer pickles (and deep-copies) only defaults, state and param_groups; a
        # copy also needs the backend, seed and the per-parameter streams, names and masks
        # (keyed on the parameters, which one copy or pickle maps consistently)
        state = super().__getstate__()
        state.update(backend=self.backend, seed=self.seed, _streams=self._streams,
                     _names=self._names, _mask_words=self._mask_words, _known=self._known,
                     _constructed=self._constructed)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # the step plans and capturable lr tensors hold the original's tensors: a copy makes
        # its own
        self._plans, self._lr_tensors = {}, {}

    # ---- configuration -------------------------------------------------------------------
    def _check_mode(self, mode, reserve_p, drop, semantics):
        if mode not in self._mode_choices:
            raise ValueError(f"mode must be one of {self._mode_choices}, got {mode!r}")
        check_prob("reserve_p", reserve_p, low_open=True, high_open=False)
        if drop not in _DROPS:
            raise ValueError(f"drop must be one of {_DROPS}, got {drop!r}")
        if semantics not in _ref.SEMANTICS:
            raise ValueError(f"semantics must be one of {_ref.SEMANTICS}, got {semantics!r}")

    @staticmethod
    def _resolve_seed(seed) -> int:
        if seed is not None:
            return check_int("seed", seed, 0, UINT64_MAX)
        drawn = int(torch.randint(0, 2**62, (1,)).item())
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            box = [drawn]
            dist.broadcast_object_list(box, src=0)
            drawn = int(box[0])
        return drawn

    def add_param_group(self, param_group: dict) -> None:
        for key in ("lr", "betas", "eps", "weight_decay", "mode", "reserve_p", "drop",
                    "semantics", "capturable"):
            param_group.setdefault(key, self.defaults[key])
        if not isinstance(param_group["capturable"], bool):
            raise TypeError(f"capturable must be a bool, got "
                            f"{type(param_group['capturable']).__name__}")
        _check_hparams(param_group["lr"], param_group["betas"], param_group["eps"],
                       param_group["weight_decay"], param_group["capturable"])
        self._check_mode(param_group["mode"], param_group["reserve_p"], param_group["drop"],
                         param_group["semantics"])
        super().add_param_group(param_group)
        self._plans.clear()
        group = self.param_groups[-1]
        names = group.get("param_names")
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        for i, p in enumerate(group["params"]):
            name = names[i] if names is not None else None
            self._names[p] = name if name is not None else (
                f"param_groups[{len(self.param_groups) - 1}]['params'][{i}] "
                f"(shape {tuple(p.shape)})")
            self._streams[p] = (zlib.crc32(name.encode()) if name is not None else first + i)
            self._known.append(p)
        if self._constructed and group["mode"] == "D":
            raise ValueError("a mode='D' param group cannot be added after construction: "
                             "pass all groups and their masks to the constructor")

    def _adopt_replaced_params(self) -> None:
        """Re-key the per-parameter tables when `param_groups` now hold other tensors at the
        same positions: accelerate's FSDP2 `prepare` swaps each parameter for its sharded
        DTensor inside an existing optimizer. A replacement keeps its name, stream, mask and
        state; one of another (global) shape is refused."""
        params = self._flat_params()
        if len(params) == len(self._known) and all(p is q for p, q in zip(params, self._known)):
            return
        if len(params) != len(self._known):
            raise ValueError(f"param_groups now hold {len(params)} parameters, the optimizer "
                             f"was built over {len(self._known)}")
        for new, old in zip(params, self._known):
            if new is old:
                continue
            name = self._names[old]
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"parameter {name} was replaced by a tensor of shape "
                                 f"{tuple(new.shape)}, it had shape {tuple(old.shape)}")
            self._names[new] = self._names.pop(old)
            self._streams[new] = self._streams.pop(old)
            if old in self._mask_words:
                self._mask_words[new] = self._mask_words.pop(old).to(_local(new).device)
            if old in self.state:
                self.state[new] = self.state.pop(old)
        self._known = list(params)
        self._plans.clear()

    def mask_stream(self, param: torch.Tensor) -> int:
        """The Philox stream of `param` (see the module docstring)."""
        self._adopt_replaced_params()
        if param not in self._streams:
            raise ValueError("param is not a parameter of this optimizer")
        return self._streams[param]

    def _flat_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _attach_masks(self, masks) -> None:
        self._plans.clear()
        params = self._flat_params()
        needs = {p for g in self.param_groups if g["mode"] == "D" for p in g["params"]}
        if masks is None:
            if needs:
                raise ValueError("mode='D' needs masks= (e.g. from regdrop_fast.fisher_mask): "
                                 "one entry per parameter, None for a parameter updated fully")
            return
        by_param = self._masks_by_param(masks, params)
        for p in needs:
            if p not in by_param:
                raise ValueError(f"mode='D': parameter {self._names[p]} has no entry in masks; "
                                 f"give it a mask, or None to update it fully")
        for p, mask in by_param.items():
            if mask is not None:
                words = _flat_words(mask, p, self._names[p])
                self._mask_words[p] = words.to(_local(p).device)

    def _masks_by_param(self, masks, params) -> dict:
        if isinstance(masks, dict):
            by_name = {name: p for p, name in self._names.items()}
            ids = {id(p): p for p in params}
            out = {}
            for key, mask in masks.items():
                if isinstance(key, str):
                    if key not in by_name and mask is None:
                        continue
                    if key not in by_name:
                        raise ValueError(f"masks has an entry for {key!r}, which is not a "
                                         f"parameter name of this optimizer")
                    out[by_name[key]] = mask
                elif isinstance(key, torch.Tensor) and id(key) in ids:
                    out[ids[id(key)]] = mask
                elif mask is None:  # "always update" for a parameter this optimizer lacks
                    continue
                else:
                    raise ValueError(f"masks has a key that is not a parameter of this "
                                     f"optimizer (a {type(key).__name__}"
                                     + (f" of shape {tuple(key.shape)})" if isinstance(
                                         key, torch.Tensor) else ")")
                                     + "; were the masks computed on another model instance?")
            return out
        if isinstance(masks, (list, tuple)):
            if len(masks) != len(params):
                raise ValueError(f"masks as a list must have one entry per parameter "
                                 f"({len(params)}), got {len(masks)}")
            return dict(zip(params, masks))
        raise TypeError(f"masks must be a dict, a list or None, got {type(masks).__name__}")

    # ---- the step ------------------------------------------------------------------------
    def _mask_kind(self, group, p) -> int:
        if group["mode"] == "F":
            return _ref.MASK_PHILOX
        if group["mode"] is not None and p in self._mask_words:
            return _ref.MASK_BITS
        return _ref.MASK_NONE

    def _action(self, group) -> str:
        return group["drop"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            plan = self._plans.get(index)
            grads = None if plan is None else self._planned_grads(group, plan)
            if grads is None:  # first step, or the plan no longer fits: check everything
                live, grads = self._check_group(group)
                plan = self._make_plan(group, live)
                complete = len(live) == len(group["params"]) and not plan.sharded
                self._plans[index] = plan if complete else None
            self._run_plan(group, plan, grads)
        return loss

    # Checking every parameter and building the per-dtype lists costs about 4 µs of Python
    # per parameter, as long as the whole fused kernel of a BERT-base step on a GPU. So a plan
    # keeps what stays fixed between steps (buckets, offsets, streams, mask kinds and words),
    # and the next steps check only what can change (each gradient, the parameter's dtype and
    # device); anything else sends the step back through _check_group, which names the culprit.
    # Groups with missing gradients or sharded (DTensor) parameters are planned every step.
    def _check_group(self, group):
        """(live params, their local contiguous grads): every parameter with a gradient is
        checked before any state is touched, so a bad input changes nothing; then missing
        state is created."""
        self._adopt_replaced_params()
        live = [p for p in group["params"] if p.grad is not None]
        device = None
        for p in live:
            name = self._names[p]
            if p.grad.is_sparse or _local(p.grad).is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients "
                                 f"(parameter {name})")
            local_p, local_g = _local(p), _local(p.grad)
            device = local_p.device if device is None else device
            if local_p.device != device:
                raise ValueError(f"all parameters of a param group must be on one device: "
                                 f"{name} is on {local_p.device}, others on {device}")
            if local_g.device != device:
                raise ValueError(f"the gradient of {name} is on {local_g.device}, the "
                                 f"parameter on {device}")
            if local_p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"parameter {name} must be float32, bfloat16 or float16, got "
                                f"{local_p.dtype}")
            if local_g.dtype != local_p.dtype:
                raise TypeError(f"the gradient of {name} has dtype {local_g.dtype}, the "
                                f"parameter {local_p.dtype}; they must match")
            if local_g.shape != local_p.shape:
                raise ValueError(f"the gradient of {name} has shape {tuple(local_g.shape)}, the "
                                 f"parameter {tuple(local_p.shape)}; they must match")
            if not local_p.is_contiguous():
                raise ValueError(f"parameter {name} must be contiguous")
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self.state[p].get(key)
                if moment is not None and moment.shape != p.shape:
                    raise ValueError(
                        f"parameter {name} has shape {tuple(p.shape)} but its optimizer state "
                        f"{key!r} has shape {tuple(moment.shape)}: was it resized after the "
                        f"first step? Create a new optimizer (or drop its state) for the new shape")
        if group["capturable"] and device is not None:
            self._check_capturable(group, device)
        for p in live:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=_local(p).device)
                                 if group["capturable"] else 0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                    memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                       memory_format=torch.contiguous_format)
        return live, [_local(p.grad).contiguous() for p in live]

    @staticmethod
    def _check_capturable(group, device) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"capturable=True needs parameters on cpu or cuda (the backends "
                             f"that read the step and lr from tensors), got {device}")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != device:
            raise ValueError(f"lr is a tensor on {lr.device}, the parameters are on {device}: "
                             f"with capturable=True it must be on the parameters' device")

    def _make_plan(self, group, params) -> "_GroupPlan":
        """The plan of a step over `params` (checked, with state)."""
        plan = _GroupPlan(params=list(params), mode=group["mode"], state=self.state,
                          dtypes=[p.dtype for p in params], devices=[p.device for p in params],
                          shapes=[p.shape for p in params],
                          states=[self.state[p] for p in params], buckets=[],
                          sharded=any(_local(p) is not p for p in params))
        by_dtype = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for indices in by_dtype.values():
            kinds = [self._mask_kind(group, params[i]) for i in indices]
            bucket = _Bucket(
                indices=indices, params=[_local(params[i]) for i in indices],
                masks=[self._mask_words.get(params[i]) if k == _ref.MASK_BITS else None
                       for i, k in zip(indices, kinds)],
                kinds=kinds, offsets=[_global_offset(params[i]) for i in indices],
                streams=[self._streams[params[i]] for i in indices])
            for i, local, words, offset in zip(indices, bucket.params, bucket.masks,
                                               bucket.offsets):
                if words is not None:
                    self._check_words(params[i], words, offset + local.numel(), local.device)
            plan.buckets.append(bucket)
        return plan

    def _check_words(self, p, words, bits: int, device) -> None:
        """The mask words of `p` cover its first `bits` bits (every backend indexes them
        unchecked on the step's fast path)."""
        name = self._names[p]
        if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
            raise TypeError(f"the mask of {name} must be int32 words, got "
                            + (str(words.dtype) if isinstance(words, torch.Tensor)
                               else type(words).__name__))
        if words.dim() != 1 or not words.is_contiguous() or words.device != device:
            raise ValueError(f"the mask words of {name} must be a contiguous 1-d tensor on "
                             f"{device}, got shape {tuple(words.shape)} on {words.device}")
        if words.numel() * 32 < bits:
            raise ValueError(f"the mask of {name} has {words.numel()} int32 words, it needs "
                             f"{(bits + 31) // 32} for its {bits} elements")

    def _planned_grads(self, group, plan: "_GroupPlan"):
        """The gradients of a step through `plan`, or None when the plan no longer fits."""
        params = group["params"]
        if (len(params) != len(plan.params) or group["mode"] != plan.mode
                or self.state is not plan.state):
            return None
        grads = []
        for p, planned, dtype, device, shape in zip(params, plan.params, plan.dtypes,
                                                    plan.devices, plan.shapes):
            g = p.grad
            if (p is not planned or g is None or p.dtype is not dtype or g.dtype is not dtype
                    or g.is_sparse or p.device != device or g.device != device
                    or p.shape != shape or g.shape != shape or not p.is_contiguous()):
                return None
            grads.append(g if g.is_contiguous() else g.contiguous())
        return grads

    def _run_plan(self, group, plan: "_GroupPlan", grads) -> None:
        lr = group["lr"]
        if group["capturable"]:
            steps = [st["step"] for st in plan.states]
            if steps:
                torch._foreach_add_(steps, 1.0)
                lr = self._device_lr(group, plan.buckets[0].params[0].device)
        else:
            steps = []
            for st in plan.states:
                st["step"] += 1
                steps.append(int(st["step"]))
        beta1, beta2 = group["betas"]
        for bucket in plan.buckets:
            idx = bucket.indices
            masked_adamw_step(
                bucket.params, [grads[i] for i in idx],
                [_local(plan.states[i]["exp_avg"]) for i in idx],
                [_local(plan.states[i]["exp_avg_sq"]) for i in idx],
                masks=bucket.masks, mask_kinds=bucket.kinds, steps=[steps[i] for i in idx],
                index_offsets=bucket.offsets, streams=bucket.streams, lr=lr,
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                seed=self.seed, reserve_p=group["reserve_p"], action=self._action(group),
                semantics=group["semantics"], backend=self.backend,
                capturable=group["capturable"])

    def _device_lr(self, group, device) -> torch.Tensor:
        """The group's lr as a 0-d tensor on `device`: the user's tensor, else a float lr copied
        into a cached tensor when it changes (no host read either way)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != device:
                raise ValueError(f"lr is a tensor on {lr.device}, the parameters are on "
                                 f"{device}: with capturable=True it must be on their device")
            return lr
        key = id(group)
        cached = self._lr_tensors.get(key)
        if cached is None or cached[1].device != device:
            cached = [None, torch.empty((), dtype=torch.float64, device=device)]
            self._lr_tensors[key] = cached
        if cached[0] != lr:
            cached[1].fill_(lr)
            cached[0] = lr
        return cached[1]

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's optimizer state plus the seed, the streams and the packed masks (flat
        int32 words keyed by the parameter's index in param-group order)."""
        self._adopt_replaced_params()
        sd = super().state_dict()
        params = self._flat_params()
        sd[_EXTRA_KEY] = {
            "seed": self.seed,
            "streams": [self._streams[p] for p in params],
            "masks": {i: self._mask_words[p].clone() for i, p in enumerate(params)
                      if p in self._mask_words},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of state_dict(); the moments stay float32 whatever the parameter dtype, so a
        resumed run is bit-identical to an uninterrupted one. Everything is checked before
        anything is loaded: a state dict of another model (other shapes), a truncated or scalar
        moment, a step, seed or mask word count out of range raise an error naming the
        parameter and the key."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_KEY, None)
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict has no {_EXTRA_KEY!r} entry (seed, streams, masks): "
                             f"it was not saved by {type(self).__name__}")
        self._adopt_replaced_params()
        params = self._flat_params()
        if list(extra.get("streams", ())) != [self._streams[p] for p in params]:
            raise ValueError("state_dict: the saved Philox streams differ from this "
                             "optimizer's (different parameters, names or order)")
        seed = check_int(f"state_dict[{_EXTRA_KEY!r}]['seed']", extra.get("seed"), 0,
                         UINT64_MAX)
        mask_words = self._loaded_mask_words(extra.get("masks", {}), params)
        moments = {}
        state = {}
        capturable = {p: g["capturable"] for g in self.param_groups for p in g["params"]}
        for key, value in state_dict.get("state", {}).items():
            p = self._loaded_param(key, params)
            value = dict(value)
            moments[key] = self._loaded_moments(key, p, value)
            if "step" in value:
                value["step"] = check_int(
                    f"state_dict['state'][{key!r}]['step'] (parameter {self._names[p]})",
                    _host_step(value["step"]), 0, UINT32_MAX)
                if capturable[p] and value["step"] > _MAX_FLOAT_STEP:
                    raise ValueError(
                        f"state_dict['state'][{key!r}]['step'] (parameter {self._names[p]}) is "
                        f"{value['step']}: a capturable optimizer counts steps in float32, "
                        f"exact up to 2^24; load it with capturable=False")
            state[key] = value
        state_dict["state"] = state
        self._plans.clear()
        self._lr_tensors.clear()
        own = [(g["capturable"], g["lr"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        # capturable is how this optimizer was built, not a saved hyperparameter (as `backend`);
        # a tensor lr stays the same tensor (a captured graph reads it), with the saved value
        for group, (capturable, lr) in zip(self.param_groups, own):
            group["capturable"] = capturable
            saved = group["lr"]
            if isinstance(lr, torch.Tensor):
                if isinstance(saved, torch.Tensor):
                    lr.copy_(saved)
                else:
                    lr.fill_(saved)
                group["lr"] = lr
            elif isinstance(saved, torch.Tensor):
                group["lr"] = float(saved)
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    step = _host_step(st["step"])
                    st["step"] = (torch.tensor(float(step), dtype=torch.float32,
                                               device=_local(p).device) if capturable else step)
        for key, saved in moments.items():
            p = params[_param_number(key)]
            for k, value in saved.items():
                target = torch.zeros_like(p, dtype=torch.float32,
                                          memory_format=torch.contiguous_format)
                _local(target).copy_(_local(value))
                self.state[p][k] = target
        self.seed = seed
        self._mask_words = mask_words

    def _loaded_param(self, key, params) -> torch.Tensor:
        index = _param_number(key)
        if index is None or not 0 <= index < len(params):
            raise ValueError(f"state_dict['state'] has the key {key!r}; this optimizer's "
                             f"parameters are numbered 0..{len(params) - 1}")
        return params[index]

    def _loaded_moments(self, key, p, value: dict) -> dict:
        """The exp_avg / exp_avg_sq of state `key`, popped from `value` once checked."""
        name = self._names[p]
        present = [k for k in ("exp_avg", "exp_avg_sq") if k in value]
        if value and len(present) != 2:
            raise ValueError(f"state_dict['state'][{key!r}] (parameter {name}) must hold both "
                             f"'exp_avg' and 'exp_avg_sq', got keys {sorted(value)}")
        out = {}
        for k in present:
            moment = value.pop(k)
            where = f"state_dict['state'][{key!r}][{k!r}] (parameter {name})"
            if not isinstance(moment, torch.Tensor) or not moment.is_floating_point():
                raise TypeError(f"{where} must be a floating-point tensor, got "
                                + (str(moment.dtype) if isinstance(moment, torch.Tensor)
                                   else type(moment).__name__))
            if tuple(moment.shape) != tuple(p.shape):
                raise ValueError(f"{where} has shape {tuple(moment.shape)}, the parameter "
                                 f"{tuple(p.shape)}: was the state saved from another model?")
            if moment.device.type == "meta":  # any other device is copied to the parameter's
                raise ValueError(f"{where} is a meta tensor: it holds no values to load")
            out[k] = moment
        return out

    def _loaded_mask_words(self, masks, params) -> dict:
        if not isinstance(masks, dict):
            raise TypeError(f"state_dict[{_EXTRA_KEY!r}]['masks'] must be a dict, got "
                            f"{type(masks).__name__}")
        out = {}
        for key, words in masks.items():
            where = f"state_dict[{_EXTRA_KEY!r}]['masks'][{key!r}]"
            index = _param_number(key)
            if index is None or not 0 <= index < len(params):
                raise ValueError(f"{where}: the key must be a parameter number in "
                                 f"0..{len(params) - 1}")
            p = params[index]
            if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
                raise TypeError(f"{where} (parameter {self._names[p]}) must be int32 words, "
                                "got " + (str(words.dtype) if isinstance(words, torch.Tensor)
                                          else type(words).__name__))
            needed = (p.numel() + 31) // 32
            if words.numel() != needed:
                raise ValueError(f"{where} (parameter {self._names[p]}) has {words.numel()} "
                                 f"words; its {p.numel()} elements need {needed}")
            out[p] = words.reshape(-1).to(_local(p).device).clone()
        return out


class MaskedAdamW(ChildTuningAdamW):
    """AdamW on a sparse subnetwork: pruned weights (mask bit 0) are set to exactly 0 by every
    step and their m, v are left untouched; kept weights follow AdamW.

    Args:
        params: parameters, param groups or named parameters.
        masks: {parameter or name: PackedMask | bool tensor | None} or a list aligned with the
            parameters (None entries). Parameters without a mask are updated densely (biases,
            LayerNorm, ...). 1 = keep, as in regdrop_fast.masks.
        lr, betas, eps, weight_decay: torch.optim.AdamW's defaults.
        semantics: "torch" (default, torch.optim.AdamW) or "paper" (HF/official order).
        capturable: as ChildTuningAdamW's.
    """

    _mode_choices = ("sparse",)

    def __init__(self, params, masks, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, semantics: str = "torch", seed: Optional[int] = 0,
                 backend: Optional[str] = None, capturable: bool = False):
        if masks is None:
            raise ValueError("MaskedAdamW needs masks= (dict or list of PackedMask/bool/None)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         mode="sparse", reserve_p=1.0, drop="grad", semantics=semantics,
                         seed=seed, masks=masks, backend=backend, capturable=capturable)

    def _attach_masks(self, masks) -> None:
        params = self._flat_params()
        for p, mask in self._masks_by_param(masks, params).items():
            if mask is not None:
                self._mask_words[p] = _flat_words(mask, p, self._names[p]).to(_local(p).device)

    def _action(self, group) -> str:
        return "prune"

    def reset_masks(self, masks) -> None:
        """Start over with `masks` (the constructor's forms): the Adam moments and step counts
        are cleared, as a new optimizer's would be (IMP after each prune, without rebuilding
        an optimizer a Trainer or accelerate holds)."""
        self._adopt_replaced_params()
        self.state.clear()
        self._mask_words = {}
        self._plans.clear()
        self._attach_masks(masks)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Set the pruned weights to 0 now (step() does it for parameters with a gradient)."""
        self._adopt_replaced_params()
        for p, words in self._mask_words.items():
            local = _local(p)
            keep = _ref.keep_bits(_ref.MASK_BITS, local.numel(), _global_offset(p), seed=0,
                                  step=0, stream=0, reserve_p=1.0, words=words,
                                  device=local.device)
            local.mul_(keep.view(local.shape).to(local.dtype))

