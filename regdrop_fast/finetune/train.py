"""The fine-tuning loop: one `Job` per run, single process or one per DDP rank.

Order of a run: read data -> load model -> methods change the model -> (resume: restore
weights and method state | fresh: methods' pre-training pass, e.g. Fisher) -> optimizer and LR
schedule -> epochs of steps with a progress bar -> evaluation, metrics line, checkpoint per
epoch -> markdown summary and curves. Everything random is seeded or checkpointed, so
`--resume` continues bit-identically.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup, set_seed

from . import batches as B
from . import checkpoint as ckpt
from . import distributed as D
from . import report
from .config import FinetuneConfig
from .data import LabelSet, default_split, load_table
from .errors import FinetuneError
from .methods import build_methods
from .methods.debias import make_loss
from .model import check_model_folder, default_model_path, load_model, position_limit
from .param_groups import decay_groups

# fields that must match between a checkpoint and the run resuming it
RESUME_KEYS = ("method", "model", "train", "epochs", "batch_size", "lr", "weight_decay",
               "warmup_ratio", "max_length", "seed", "max_train_samples", "debias")


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FinetuneError(f"output folder {folder} is not writable: "
                            f"{exc.strerror or exc}") from None


def peak_memory(device) -> tuple:
    """(MB, kind): CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS"


def _validate(config: FinetuneConfig) -> None:
    positive = {"epochs": config.epochs, "batch_size": config.batch_size,
                "max_length": config.max_length, "rdrop_every": config.rdrop_every}
    for name, value in positive.items():
        if value < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("max_train_samples", "max_eval_samples", "fisher_batches"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= config.seed < 2**32:
        raise FinetuneError(f"--seed must be in [0, 2**32), got {config.seed}")
    if config.lr <= 0:
        raise FinetuneError(f"--lr must be > 0, got {config.lr}")
    if not 0 <= config.warmup_ratio < 1:
        raise FinetuneError(f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}")
    for name in ("save_steps", "logging_steps"):
        if getattr(config, name) < 0:
            raise FinetuneError(f"--{name.replace('_', '-')} must be >= 0, "
                                f"got {getattr(config, name)}")
    if (config.train is None) != (config.eval is None):
        raise FinetuneError("--train and --eval go together (neither: the embedded demo data)")
    if config.resume and config.no_save:
        raise FinetuneError("--resume needs checkpoints; it cannot be combined with --no-save")


class Job:
    """One fine-tuning run; `run()` returns the summary dict (also written as summary.json)."""

    def __init__(self, config: FinetuneConfig, progress: bool = True):
        _validate(config)
        self.config = config
        self.progress = progress
        self.info = D.launched_env()
        self.device = D.resolve_device(config.device, self.info)
        self.output_dir = Path(config.output_dir)
        self.methods = build_methods(config.method, config)
        self.global_step = 0
        self.epoch = 0
        self.batch_indices = None  # dataset positions of the current training batch

    # -- data -----------------------------------------------------------------------------------
    def _load_data(self) -> None:
        c = self.config
        if c.train is None:
            train_path, eval_path = default_split()
        else:
            train_path, eval_path = c.train, c.eval
        self.train_path, self.eval_path = str(train_path), str(eval_path)
        train = load_table(train_path, c.text_cols, c.label_col, c.max_train_samples, "training file")
        self.label_set = LabelSet(train.labels)
        if len(self.label_set) < 2:
            raise FinetuneError(f"training file {train_path} has a single label "
                                f"{self.label_set.names[0]!r}; classification needs at least two")
        evaluation = load_table(eval_path, c.text_cols or list(train.text_cols),
                                c.label_col or train.label_col, c.max_eval_samples,
                                "evaluation file")
        self.train_table, self.eval_table = train, evaluation
        self.train_labels = self.label_set.encode(train.labels, f"training file {train_path}")
        self.eval_labels = self.label_set.encode(evaluation.labels, f"evaluation file {eval_path}")
        self.ood = None
        if c.ood_eval:
            from .ood import load_ood
            self.ood = load_ood(c.ood_eval, train, self.label_set)

    # -- model, methods, optimizer ----------------------------------------------------------------
    def _build(self) -> None:
        c = self.config
        self.model_path = str(check_model_folder(c.model) if c.model else default_model_path())
        set_seed(c.seed)
        self.model, self.tokenizer = load_model(self.model_path, self.label_set.names, c.seed)
        limit = position_limit(self.model, self.tokenizer)
        if limit is not None and c.max_length > limit:
            raise FinetuneError(f"--max-length {c.max_length} is beyond the {limit} positions of "
                                f"the model in {self.model_path}; pass --max-length {limit} "
                                "or less")
        self.features = B.tokenize(self.tokenizer, self.train_table.texts, c.max_length)
        self.eval_features = B.tokenize(self.tokenizer, self.eval_table.texts, c.max_length)
        self.collate = B.Collator(self.tokenizer)
        if c.batch_size % self.info.world_size:
            raise FinetuneError(f"--batch-size {c.batch_size} (global) must be divisible by the "
                                f"{self.info.world_size} processes")
        self.local_batch = c.batch_size // self.info.world_size
        self.train_batches = B.TrainBatches(len(self.features), self.local_batch, c.seed,
                                            self.info.rank, self.info.world_size)
        self.steps_per_epoch = len(self.train_batches)
        self.total_steps = self.steps_per_epoch * c.epochs
        self.loss_fn = make_loss(c, self)
        for method in self.methods:
            method.prepare_model(self)
        self.model.to(self.device)
        self.forward_model = D.wrap_model(self.model, self.info, self.device)

    def train_loader(self, max_batches=None):
        """The training set in a fixed order on this process (the Fisher pass)."""
        rows = list(range(len(self.features)))
        chunks = [rows[i:i + self.local_batch] for i in range(0, len(rows), self.local_batch)]
        return B.ExampleLoader(self.features, self.train_labels, self.collate,
                               chunks[:max_batches] if max_batches else chunks, self.device)

    def _param_groups(self) -> list:
        named = None
        for method in self.methods:
            named = method.trainable_parameters(self) or named
        if named is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return decay_groups(self.model, named, self.config.weight_decay)

    def _make_optimizer(self) -> None:
        groups = self._param_groups()
        owner = [m for m in self.methods if "optimizer" in m.roles]
        if owner:
            self.optimizer = owner[0].make_optimizer(self, groups)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=self.config.lr)
        # linear warmup over --warmup-ratio of the steps, then linear decay to 0
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(self.config.warmup_ratio * self.total_steps), self.total_steps)

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer (and schedule, at the current step) after a method changed the
        parameter set or masks (IMP prunes)."""
        self._make_optimizer()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.scheduler.lr_lambdas[0](self.global_step)
        self.scheduler.last_epoch = self.global_step

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, batch: dict, model=None) -> torch.Tensor:
        """Logits of the (DDP-wrapped) model for a padded batch."""
        return (model or self.forward_model)(**B.model_inputs(batch)).logits

    def _step(self, batch: dict):
        """(loss, logits) of one training step, gradients already back-propagated."""
        owner = [m for m in self.methods if "forward" in m.roles]
        if owner:
            return owner[0].training_step(self, batch)
        logits = self.forward(batch)
        loss = self.loss_fn(logits, batch)
        loss.backward()
        return loss.detach(), logits

    @torch.no_grad()
    def evaluate(self, features: list, labels: list) -> dict:
        self.model.eval()
        rows = B.eval_batches(features, self.info.rank, self.info.world_size,
                              max(64, self.local_batch))
        loss_sum = correct = count = 0.0
        for chunk in rows:
            batch = B.to_device(self.collate([features[i] for i in chunk],
                                             [labels[i] for i in chunk]), self.device)
            logits = self.model(**B.model_inputs(batch)).logits.float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(chunk)
        loss_sum, correct, count = D.all_reduce_sum(self.info, [loss_sum, correct, count],
                                                    self.device)
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1),
                "correct": int(correct), "count": int(count)}

    # -- checkpoints ------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.config
        values = {k: getattr(c, k) for k in RESUME_KEYS}
        values.update(model=self.model_path, train=self.train_path, world_size=self.info.world_size,
                      train_examples=len(self.features))
        return values

    def _save(self, batches_done: int, acc: dict) -> None:
        if self.config.no_save:
            return
        try:
            self._write_checkpoint(batches_done, acc)
        except OSError as exc:  # disk full, quota, read-only: the previous checkpoint is intact
            where = exc.filename or self.output_dir
            raise FinetuneError(f"cannot save the checkpoint ({where}): "
                                f"{exc.strerror or exc}") from None

    def _write_checkpoint(self, batches_done: int, acc: dict) -> None:
        staging = Path(self.output_dir) / ckpt.STAGING
        if self.info.is_main:
            ckpt.staging_dir(self.output_dir)
        D.barrier(self.info)
        if self.info.is_main:
            masks = {}
            method_state = {}
            for method in self.methods:
                state = method.state_dict()
                masks.update({f"{method.name}/{k}": v for k, v in state.pop("masks", {}).items()})
                method_state[method.name] = state
            state = {"fingerprint": self._fingerprint(), "epoch": self.epoch,
                     "batches_done": batches_done, "global_step": self.global_step,
                     "accumulators": acc, "history": self.history,
                     "step_history": self.step_history,
                     "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "methods": method_state}
            ckpt.write_main(staging, self.model, self.tokenizer, state, masks)
        ckpt.write_rng(staging, self.info.rank)
        D.barrier(self.info)
        if self.info.is_main:
            ckpt.commit(staging, self.output_dir)
        D.barrier(self.info)

    def _restore(self) -> dict:
        path = ckpt.find(self.output_dir)
        state = ckpt.load_state(path)
        saved, now = state["fingerprint"], self._fingerprint()
        differ = [k for k in now if saved.get(k) != now[k]]
        if differ:
            raise FinetuneError("--resume: the checkpoint in " + str(path) + " was written with "
                                + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})"
                                            for k in differ))
        ckpt.load_model_weights(self.model, path)
        masks = ckpt.load_masks(path / ckpt.MASK_FILE)
        for method in self.methods:
            method_state = dict(state["methods"].get(method.name, {}))
            prefix = method.name + "/"
            method_state["masks"] = {k[len(prefix):]: v.to(self.device) for k, v in masks.items()
                                     if k.startswith(prefix)}
            method.load_state_dict(method_state)
        state["rng"] = ckpt.load_rng(path, self.info.rank)
        return state

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        D.setup(self.info, self.device)
        try:
            return self._run()
        finally:
            D.teardown(self.info)

    def _run(self) -> dict:
        c = self.config
        started = time.perf_counter()
        if self.info.is_main:
            check_writable(self.output_dir)
        self._load_data()
        self._build()
        self.history, self.step_history = [], []
        resume_state = self._restore() if c.resume else None
        if resume_state is None:
            for method in self.methods:
                method.before_training(self)
        self._make_optimizer()
        start_epoch, skip, acc = 0, 0, None
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.scheduler.load_state_dict(resume_state["scheduler"])
            self.history = resume_state["history"]
            self.step_history = resume_state["step_history"]
            self.global_step = resume_state["global_step"]
            start_epoch, skip = resume_state["epoch"], resume_state["batches_done"]
            acc = resume_state["accumulators"]
            ckpt.set_rng_state(resume_state["rng"])
        for epoch in range(start_epoch, c.epochs):
            self._train_epoch(epoch, skip, acc)
            skip, acc = 0, None
        return self._finish(time.perf_counter() - started)

    def _train_epoch(self, epoch: int, skip: int, acc) -> None:
        from tqdm.auto import tqdm

        c = self.config
        self.epoch = epoch
        for method in self.methods:
            method.on_epoch_start(self, epoch)
        acc = dict(acc) if acc else _new_accumulators()
        epoch_batches = self.train_batches.epoch(epoch)
        bar = tqdm(total=len(epoch_batches), initial=skip, desc=f"epoch {epoch + 1}/{c.epochs}",
                   disable=not (self.progress and self.info.is_main), dynamic_ncols=True,
                   leave=False)
        for index in range(skip, len(epoch_batches)):
            tick = time.perf_counter()
            rows = epoch_batches[index]
            batch = B.to_device(self.collate([self.features[i] for i in rows],
                                             [self.train_labels[i] for i in rows]), self.device)
            self.batch_indices = torch.tensor(rows, device=self.device)
            self.model.train()
            loss, logits = self._step(batch)
            if not torch.isfinite(loss):
                raise FinetuneError(f"the training loss became {loss.item()} at step "
                                    f"{self.global_step + 1}; lower --lr")
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            for method in self.methods:
                method.after_optimizer_step(self)
            _accumulate(acc, loss.item(), len(rows), self._step_parts())
            acc["correct"] += int((logits.detach().argmax(-1) == batch["labels"]).sum())
            acc["seconds"] += time.perf_counter() - tick
            if c.logging_steps and self.global_step % c.logging_steps == 0:
                self._log_step(epoch + (index + 1) / len(epoch_batches), acc)
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss_sum'] / acc['count']:.4f}",
                            samples_s=f"{acc['count'] * self.info.world_size / acc['seconds']:.1f}")
            if c.save_steps and self.global_step % c.save_steps == 0 and index + 1 < len(epoch_batches):
                self._save(index + 1, acc)
        bar.close()
        self._end_epoch(epoch, acc)

    def _step_parts(self) -> dict:
        """The loss's parts the methods report for the last step (R-Drop: ce, kl)."""
        parts = {}
        for method in self.methods:
            parts.update(method.step_metrics())
        return parts

    def _reduced_means(self, loss_sum: float, count: int, parts: dict) -> dict:
        """train_loss and train_<part> means over the processes."""
        names = sorted(parts)
        values = D.all_reduce_sum(self.info, [loss_sum, count] + [v for n in names
                                                                  for v in parts[n]], self.device)
        row = {"train_loss": values[0] / max(values[1], 1)}
        for i, name in enumerate(names):
            row[f"train_{name}"] = values[2 + 2 * i] / max(values[3 + 2 * i], 1)
        return row

    def _log_step(self, epoch: float, acc: dict) -> None:
        row = {"step": self.global_step, "epoch": round(epoch, 4)}
        row.update(self._reduced_means(acc["window_loss_sum"], acc["window_count"],
                                       acc["window_parts"]))
        row["lr"] = self.scheduler.get_last_lr()[0]
        self.step_history.append(row)
        acc.update(window_loss_sum=0.0, window_count=0, window_parts={})

    def _end_epoch(self, epoch: int, acc: dict) -> None:
        correct, count, seconds = D.all_reduce_sum(
            self.info, [acc["correct"], acc["count"], acc["seconds"]], self.device)
        means = self._reduced_means(acc["loss_sum"], acc["count"], acc["parts"])
        seconds /= self.info.world_size
        tick = time.perf_counter()
        evaluation = self.evaluate(self.eval_features, self.eval_labels)
        row = {"epoch": epoch + 1, "step": self.global_step, **means,
               "train_accuracy": correct / max(count, 1),
               "eval_loss": evaluation["loss"], "eval_accuracy": evaluation["accuracy"],
               "lr": self.scheduler.get_last_lr()[0], "train_time_s": seconds,
               "train_samples_per_s": count / max(seconds, 1e-9)}
        if self.ood is not None:
            row.update(self.ood.evaluate(self))
        row["epoch_time_s"] = seconds + time.perf_counter() - tick
        row["peak_mem_mb"] = peak_memory(self.device)[0]
        self.history.append(row)
        self.epoch = epoch + 1
        if self.info.is_main:
            report.write_metrics(self.output_dir, self.history)
            report.write_steps(self.output_dir, self.step_history)
            print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, eval loss "
                  f"{row['eval_loss']:.4f}, eval accuracy {row['eval_accuracy']:.4f}", flush=True)
        self._save(0, None)

    def _finish(self, wall: float) -> dict:
        c = self.config
        last = self.history[-1]
        best = max(self.history, key=lambda r: r["eval_accuracy"])
        mem, kind = peak_memory(self.device)
        summary = {"method": c.method, "model": self.model_path, "train": self.train_path,
                   "eval": self.eval_path, "train_examples": len(self.features),
                   "eval_examples": len(self.eval_features), "labels": self.label_set.names,
                   "device": str(self.device), "world_size": self.info.world_size,
                   "batch_size": c.batch_size, "lr": c.lr, "max_length": c.max_length,
                   "seed": c.seed, "epochs": c.epochs, "eval_accuracy": last["eval_accuracy"],
                   "eval_loss": last["eval_loss"], "best_eval_accuracy": best["eval_accuracy"],
                   "best_epoch": best["epoch"], "ood_accuracy": last.get("ood_accuracy"),
                   "train_time_s": sum(r["epoch_time_s"] for r in self.history),
                   "wall_time_s": wall, "peak_mem_mb": mem, "peak_mem_kind": kind,
                   "methods": [m.describe() for m in self.methods],
                   "output_dir": str(self.output_dir)}
        if self.info.is_main:
            report.write_metrics(self.output_dir, self.history)
            report.write_steps(self.output_dir, self.step_history)
            report.write_summary(self.output_dir, summary, self.history)
            report.plot_curves(self.output_dir, self.history,
                               f"{c.method} on {Path(self.train_path).name}", self.step_history)
        return summary


def _new_accumulators() -> dict:
    """Sums over the epoch so far and over the current logging window (parts: name -> [sum,
    rows]); checkpointed, so a resumed run logs the same values."""
    return {"loss_sum": 0.0, "correct": 0, "count": 0, "seconds": 0.0, "parts": {},
            "window_loss_sum": 0.0, "window_count": 0, "window_parts": {}}


def _accumulate(acc: dict, loss: float, rows: int, parts: dict) -> None:
    acc["loss_sum"] += loss * rows
    acc["count"] += rows
    acc["window_loss_sum"] += loss * rows
    acc["window_count"] += rows
    for name, value in parts.items():
        for key in ("parts", "window_parts"):
            total = acc[key].setdefault(name, [0.0, 0])
            total[0] += value * rows
            total[1] += rows


def run_finetune(config: FinetuneConfig, progress: bool = True) -> dict:
    """Run one fine-tuning job (the `regdrop-fast finetune` command without the demo)."""
    return Job(config, progress=progress).run()
