"""The fine-tuning job on the Hugging Face Trainer: one `Job` per run, single process or one per
process of a `torchrun` / `accelerate launch` run.

Order of a run: read data -> load model -> tokenize -> TrainingArguments from FinetuneConfig ->
the Trainer of `hf_trainer.trainer_class` (the methods' mixins, the same composition as
`make_trainer`) with the job's mixin and callbacks (callbacks.py) -> `trainer.train()`, resumed
from the newest sealed checkpoint with --resume -> summary.md/.json and curves.png. The
Trainer seeds everything (set_seed, its seedable sampler) and its checkpoints hold the
optimizer, schedule, per-process RNG states and position, so --resume continues bit-identically.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PrinterCallback, TrainingArguments, set_seed

from . import batches as B
from . import checkpoint as ckpt
from . import debias
from . import report
from .callbacks import CheckpointCallback, MetricsCallback, OODCallback, RecordingMixin, RunMetrics
from .config import FinetuneConfig
from .data import LabelSet, default_split, load_table
from .distributed import launched_env
from .errors import FinetuneError
from .hf_trainer import check_backend, trainer_class
from .methods import describe
from .model import check_model_folder, default_model_path, load_model, position_limit

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
    debias.check(config)


def _device(name: str, info) -> str:
    """'cpu' or 'cuda' for TrainingArguments (a cuda:N index becomes the current device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FinetuneError(f"--device {name}: not a torch device (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and not info.enabled:
            torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise FinetuneError(f"--device {name}: only cpu and cuda are supported")
    return device.type


def _check_sharding(config: FinetuneConfig, device_type: str) -> None:
    """The --fsdp / --deepspeed flags: combinations, files, package, the method, the device."""
    if config.fsdp_config and not config.fsdp:
        raise FinetuneError("--fsdp-config needs --fsdp")
    if config.fsdp and config.deepspeed:
        raise FinetuneError("--fsdp and --deepspeed cannot be combined: choose one")
    if config.deepspeed:
        import importlib.util
        if importlib.util.find_spec("deepspeed") is None:
            raise FinetuneError("--deepspeed needs the deepspeed package (pip install deepspeed)")
    for flag, path in (("--fsdp-config", config.fsdp_config), ("--deepspeed", config.deepspeed)):
        if path and not Path(path).is_file():
            raise FinetuneError(f"{flag} {path}: no such file")
    deepspeed = None  # the parsed config: check_backend reads it as it is
    if config.deepspeed:
        try:
            deepspeed = json.loads(Path(config.deepspeed).read_text())
        except ValueError as exc:
            raise FinetuneError(f"--deepspeed {config.deepspeed}: not a JSON file "
                                f"({exc})") from None
    check_backend(config.method, SimpleNamespace(fsdp=config.fsdp, deepspeed=deepspeed))
    if (config.fsdp or config.deepspeed) and device_type == "cpu":
        flag, fallback = ("--fsdp", "DDP") if config.fsdp else ("--deepspeed", "one process")
        raise FinetuneError(f"{flag} would silently run as {fallback} on CPU: accelerate enables "
                            "FSDP/DeepSpeed only for GPU processes")


def sharding_arguments(config: FinetuneConfig, model) -> dict:
    """The TrainingArguments keywords of --fsdp / --fsdp-config / --deepspeed."""
    if config.deepspeed:
        return {"deepspeed": config.deepspeed}
    if not config.fsdp:
        return {}
    if config.fsdp_config:
        return {"fsdp": True, "fsdp_config": config.fsdp_config}
    # accelerate's default wrapping takes all of _no_split_modules, and sharding BERT's
    # embeddings module shards word_embeddings twice (crash in prepare)
    layers = [n for n in getattr(model, "_no_split_modules", None) or []
              if not n.endswith("Embeddings")]
    fsdp_config = {"version": 2}
    if layers:
        fsdp_config["transformer_layer_cls_to_wrap"] = layers
    return {"fsdp": True, "fsdp_config": fsdp_config}


def _report_to(value: str) -> list:
    """The integration names of --report-to, checked against the Trainer's list."""
    from transformers.integrations import (get_available_reporting_integrations,
                                           get_reporting_integration_callbacks)
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return get_available_reporting_integrations()
    try:
        get_reporting_integration_callbacks(names)
    except ValueError as exc:
        raise FinetuneError(f"--report-to {value}: {exc}") from None
    return names


def _accuracy(prediction) -> dict:
    predicted = prediction.predictions.argmax(-1)
    return {"accuracy": float((predicted == prediction.label_ids).mean())}


class Job:
    """One fine-tuning run; `run()` returns the summary dict (also written as summary.json)."""

    def __init__(self, config: FinetuneConfig, progress: bool = True):
        _validate(config)
        self.config = config
        self.progress = progress
        self.info = launched_env()
        self.device_type = _device(config.device, self.info)
        _check_sharding(config, self.device_type)
        self.output_dir = Path(config.output_dir)
        # the methods' mixins (MethodUnavailable when a package cannot be imported) and their
        # settings, checked before any data is read
        self.trainer_cls, self.method_kwargs = trainer_class(config.method, config,
                                                             outer=(RecordingMixin,))
        self.report_to = _report_to(config.report_to)
        if config.batch_size % self.info.world_size:
            raise FinetuneError(f"--batch-size {config.batch_size} (global) must be divisible by "
                                f"the {self.info.world_size} processes")
        self.local_batch = config.batch_size // self.info.world_size

    # -- data and model ----------------------------------------------------------------------------
    def _load_data(self) -> None:
        c = self.config
        if c.train is None:
            train_path, eval_path = default_split()
        else:
            train_path, eval_path = c.train, c.eval
        self.train_path, self.eval_path = str(train_path), str(eval_path)
        train = load_table(train_path, c.text_cols, c.label_col, c.max_train_samples,
                           "training file")
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
        self.extra_columns = debias.columns(c, train.texts, self.train_labels,
                                            self.label_set.names)

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
        self.train_rows = self._rows(self.train_table.texts, self.train_labels, self.extra_columns)
        self.eval_rows = self._rows(self.eval_table.texts, self.eval_labels)
        if self.ood is not None:
            self.ood.dataset = self._rows(self.ood.texts, self.ood.labels)

    def _rows(self, texts: list, labels: list, extra: dict = None) -> list:
        rows = B.tokenize(self.tokenizer, texts, self.config.max_length)
        for i, (row, label) in enumerate(zip(rows, labels)):
            row["labels"] = label
            for name, values in (extra or {}).items():
                row[name] = values[i].tolist()
        return rows

    def _arguments(self) -> TrainingArguments:
        c = self.config
        save = "no" if c.no_save else "epoch"
        return TrainingArguments(
            output_dir=str(self.output_dir), num_train_epochs=c.epochs,
            per_device_train_batch_size=self.local_batch,
            per_device_eval_batch_size=max(64, self.local_batch),
            learning_rate=c.lr, weight_decay=c.weight_decay, lr_scheduler_type="linear",
            warmup_steps=c.warmup_ratio, max_grad_norm=c.max_grad_norm, seed=c.seed,
            data_seed=c.seed, logging_strategy="steps" if c.logging_steps else "no",
            logging_steps=c.logging_steps or 500, eval_strategy="epoch", save_strategy=save,
            save_total_limit=None, report_to=self.report_to, use_cpu=self.device_type == "cpu",
            disable_tqdm=not (self.progress and sys.stderr.isatty()),
            # the job's collator takes the debiasing columns; classification losses are batch
            # means, not sums over items to be averaged across processes
            remove_unused_columns=False, average_tokens_across_devices=False,
            label_names=["labels"], ddp_find_unused_parameters=False,
            dataloader_pin_memory=self.device_type == "cuda",
            **sharding_arguments(c, self.model))

    def _fingerprint(self) -> dict:
        c = self.config
        values = {k: getattr(c, k) for k in RESUME_KEYS}
        values.update(model=self.model_path, train=self.train_path,
                      world_size=self.info.world_size, train_examples=len(self.train_rows))
        return values

    def _resume_point(self) -> tuple:
        """(checkpoint folder, its job state), checked against this run's settings."""
        path = ckpt.find(self.output_dir)
        state = ckpt.load_state(path)
        saved, now = state["fingerprint"], self._fingerprint()
        differ = [k for k in now if saved.get(k) != now[k]]
        if differ:
            raise FinetuneError("--resume: the checkpoint in " + str(path) + " was written with "
                                + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})"
                                            for k in differ))
        if self.info.is_main:
            ckpt.discard_unsealed(self.output_dir)
        return path, state

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        started = time.perf_counter()
        if self.info.is_main:
            check_writable(self.output_dir)
        self._load_data()
        self._build()
        args = self._arguments()
        device = args.device
        metrics = RunMetrics(device)
        resume_from = None
        if c.resume:
            resume_from, state = self._resume_point()
            metrics.load_state_dict(state["metrics"])
        try:
            trainer = self.trainer_cls(
                model=self.model, args=args, train_dataset=self.train_rows,
                eval_dataset=self.eval_rows, processing_class=self.tokenizer,
                data_collator=B.Collator(self.tokenizer), compute_metrics=_accuracy,
                **self.method_kwargs)
        except ValueError as exc:  # a method's setting the package refuses
            raise FinetuneError(f"--method {c.method}: {exc}") from None
        trainer.run_metrics = metrics
        trainer.remove_callback(PrinterCallback)  # the job prints one line per epoch
        if self.ood is not None:
            trainer.add_callback(OODCallback(trainer, self.ood))
        trainer.add_callback(MetricsCallback(metrics, self.output_dir,
                                             lambda: peak_memory(device)[0]))
        if not c.no_save:
            trainer.add_callback(CheckpointCallback(
                c.save_steps, lambda: {"fingerprint": self._fingerprint(),
                                       "metrics": metrics.state_dict()},
                getattr(trainer, "packed_masks", dict)))
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a "writing model shards" bar per save
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            hf_logging.enable_progress_bar()
        return self._finish(metrics.history, metrics.steps, device,
                            time.perf_counter() - started, trainer.is_world_process_zero())

    def _finish(self, history: list, steps: list, device, wall: float, is_main: bool) -> dict:
        c = self.config
        last = history[-1]
        best = max(history, key=lambda r: r["eval_accuracy"])
        mem, kind = peak_memory(device)
        summary = {"method": c.method, "model": self.model_path, "train": self.train_path,
                   "eval": self.eval_path, "train_examples": len(self.train_rows),
                   "eval_examples": len(self.eval_rows), "labels": self.label_set.names,
                   "device": str(device), "world_size": self.info.world_size,
                   "batch_size": c.batch_size, "lr": c.lr, "max_length": c.max_length,
                   "seed": c.seed, "epochs": c.epochs, "eval_accuracy": last["eval_accuracy"],
                   "eval_loss": last["eval_loss"], "best_eval_accuracy": best["eval_accuracy"],
                   "best_epoch": best["epoch"], "ood_accuracy": last.get("ood_accuracy"),
                   "train_time_s": sum(r["epoch_time_s"] for r in history),
                   "wall_time_s": wall, "peak_mem_mb": mem, "peak_mem_kind": kind,
                   "methods": describe(c.method, c), "output_dir": str(self.output_dir)}
        if is_main:
            report.write_metrics(self.output_dir, history)
            report.write_steps(self.output_dir, steps)
            report.write_summary(self.output_dir, summary, history)
            report.plot_curves(self.output_dir, history,
                               f"{c.method} on {Path(self.train_path).name}", steps)
        return summary


def run_finetune(config: FinetuneConfig, progress: bool = True) -> dict:
    """Run one fine-tuning job (the `regdrop-fast finetune` command without the demo)."""
    return Job(config, progress=progress).run()
