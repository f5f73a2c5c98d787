"""What `regdrop-fast finetune` adds to the Trainer, as a mixin and callbacks.

`RecordingMixin` (in front of the method mixins) records each training step's loss, correct
predictions and loss parts (R-Drop's ce, kl) in a `RunMetrics`, refuses a non-finite loss,
and puts the exact window means into the Trainer's own log calls, so `report_to` and
steps.jsonl see the same numbers. `MetricsCallback` times the steps and, after each epoch's
evaluation, writes the epoch row (metrics.jsonl) and the step rows (steps.jsonl).
`CheckpointCallback` adds the --save-steps saves and seals each checkpoint the Trainer wrote
(checkpoint.py). `OODCallback` evaluates the out-of-distribution set after each evaluation.
The sums are kept per process and reduced over the processes when a row is written; they
travel in the checkpoint, so a resumed run writes the rows an uninterrupted run writes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import checkpoint as ckpt
from . import report
from .errors import FinetuneError


def _reduce(values: list, device) -> list:
    """Sums of a list of floats over the processes (float64 so counts stay exact)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class RunMetrics:
    """Sums over the epoch so far and over the current logging window (parts: name -> [sum,
    rows]), and the rows written so far."""

    def __init__(self, device):
        self.device = device
        self.history, self.steps = [], []
        self.sums = self._new()

    @staticmethod
    def _new() -> dict:
        return {"loss_sum": 0.0, "correct": 0, "count": 0, "seconds": 0.0, "parts": {},
                "window_loss_sum": 0.0, "window_count": 0, "window_parts": {}}

    def state_dict(self) -> dict:
        return {"history": self.history, "steps": self.steps, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.steps, self.sums = state["history"], state["steps"], state["sums"]

    def record(self, loss: float, rows: int, correct: int, parts: dict) -> None:
        s = self.sums
        s["correct"] += correct
        for prefix in ("", "window_"):
            s[prefix + "loss_sum"] += loss * rows
            s[prefix + "count"] += rows
            for name, value in parts.items():
                total = s[prefix + "parts"].setdefault(name, [0.0, 0])
                total[0] += value * rows
                total[1] += rows

    def _means(self, prefix: str) -> dict:
        """train_loss and train_<part> means over the processes."""
        s = self.sums
        names = sorted(s[prefix + "parts"])
        values = _reduce([s[prefix + "loss_sum"], s[prefix + "count"]]
                         + [v for n in names for v in s[prefix + "parts"][n]], self.device)
        row = {"train_loss": values[0] / max(values[1], 1)}
        for i, name in enumerate(names):
            row[f"train_{name}"] = values[2 + 2 * i] / max(values[3 + 2 * i], 1)
        return row

    def close_window(self, state, lr) -> dict:
        row = {"step": state.global_step, "epoch": round(state.epoch, 4),
               **self._means("window_"), "lr": lr}
        self.steps.append(row)
        self.sums.update(window_loss_sum=0.0, window_count=0, window_parts={})
        return row

    def close_epoch(self, state, evaluation: dict, lr) -> dict:
        correct, count, seconds = _reduce([self.sums["correct"], self.sums["count"],
                                           self.sums["seconds"]], self.device)
        dist = torch.distributed
        seconds /= dist.get_world_size() if dist.is_initialized() else 1
        row = {"epoch": round(state.epoch), "step": state.global_step, **self._means(""),
               "train_accuracy": correct / max(count, 1),
               "eval_loss": evaluation["eval_loss"], "eval_accuracy": evaluation["eval_accuracy"],
               "lr": lr, "train_time_s": seconds,
               "train_samples_per_s": count / max(seconds, 1e-9)}
        if "ood_accuracy" in evaluation:
            row["ood_accuracy"] = evaluation["ood_accuracy"]
        row["epoch_time_s"] = seconds + evaluation.get("eval_runtime", 0.0) + evaluation.get(
            "ood_runtime", 0.0)
        self.history.append(row)
        window = {k: v for k, v in self.sums.items() if k.startswith("window_")}
        self.sums = {**self._new(), **window}
        return row


class RecordingMixin:
    """The job's Trainer front: exact per-step records (see the module docstring)."""
    run_metrics: RunMetrics = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        self.loss_parts = {}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise FinetuneError(f"the training loss became {value} at step "
                                f"{self.state.global_step + 1}; lower --lr")
        labels = inputs["labels"]
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        correct = int((logits.detach()[: len(labels)].argmax(-1) == labels).sum())
        parts = {k: float(v) for k, v in self.loss_parts.items()}
        self.run_metrics.record(value, len(labels), correct, parts)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            row = self.run_metrics.close_window(self.state, logs.get("learning_rate"))
            logs.update(loss=row["train_loss"],
                        **{k: v for k, v in row.items() if k.startswith("train_")
                           and k != "train_loss"})
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:  # disk full, quota, read-only: the previous checkpoint is intact
            where = exc.filename or self.args.output_dir
            raise FinetuneError(f"cannot save the checkpoint ({where}): "
                                f"{exc.strerror or exc}") from None


class MetricsCallback(TrainerCallback):
    def __init__(self, run_metrics: RunMetrics, output_dir, peak_memory):
        self.metrics, self.output_dir, self.peak_memory = run_metrics, output_dir, peak_memory
        self.tick = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.metrics.sums["seconds"] += time.perf_counter() - self.tick

    def on_evaluate(self, args, state, control, metrics=None, lr_scheduler=None, **kwargs):
        if "eval_loss" not in metrics:  # the OOD set's own evaluation
            return
        row = self.metrics.close_epoch(state, metrics, lr_scheduler.get_last_lr()[0])
        row["peak_mem_mb"] = self.peak_memory()
        if state.is_world_process_zero:
            report.write_metrics(self.output_dir, self.metrics.history)
            report.write_steps(self.output_dir, self.metrics.steps)
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, eval loss "
                  f"{row['eval_loss']:.4f}, eval accuracy {row['eval_accuracy']:.4f}", flush=True)


class OODCallback(TrainerCallback):
    """After each evaluation, the out-of-distribution set's accuracy (ood.OODSet)."""

    def __init__(self, trainer, ood):
        self.trainer, self.ood = trainer, ood
        self.running = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.running or "eval_loss" not in metrics:
            return
        self.running = True
        own = self.trainer.compute_metrics
        self.trainer.compute_metrics = self.ood.accuracy
        try:
            metrics.update(self.trainer.evaluate(self.ood.dataset, metric_key_prefix="ood"))
        finally:
            self.trainer.compute_metrics = own
            self.running = False


class CheckpointCallback(TrainerCallback):
    """--save-steps saves, and the sealing of every checkpoint (see checkpoint.py)."""

    def __init__(self, save_steps: int, job_state, masks):
        self.save_steps, self.job_state, self.masks = save_steps, job_state, masks

    def on_step_end(self, args, state, control, **kwargs):
        # the epoch's last step is saved by the epoch's end, after the evaluation
        if (self.save_steps and state.global_step % self.save_steps == 0
                and state.epoch != int(state.epoch)):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{ckpt.PREFIX}{state.global_step}"
        dist = torch.distributed
        if dist.is_initialized():
            dist.barrier()  # every process's RNG state is written
        if state.is_world_process_zero:
            try:
                torch.save(self.job_state(), folder / ckpt.STATE_FILE)
                ckpt.save_masks(folder / ckpt.MASK_FILE, self.masks())
                ckpt.seal(folder)
                ckpt.retire(args.output_dir, folder)
            except OSError as exc:
                raise FinetuneError(f"cannot save the checkpoint ({exc.filename or folder}): "
                                    f"{exc.strerror or exc}") from None
        if dist.is_initialized():
            dist.barrier()
