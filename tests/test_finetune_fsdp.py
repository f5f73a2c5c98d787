"""FSDP2 and DeepSpeed ZeRO-1/2 through `make_trainer` on 2 CPU processes (gloo), tiny random
BERT, global batch 8, with the example configs of examples/distributed/.

accelerate 1.15 switches to FSDP only for GPU-type launches: on CPU, `fsdp=True` (or an accelerate
FSDP config) silently gives DDP. The worker (this file run under torchrun) therefore sets
accelerate's state to FSDP with the plugin the TrainingArguments built; from there on it is the
Trainer's own FSDP2 path: `fully_shard` per BertLayer, the optimizer's parameters swapped for
their DTensors, the full weights gathered at the end. Likewise a DeepSpeed launch without a GPU
is one process to accelerate (no backend: every rank would train on the same batches); the
worker gives it the gloo backend, so the data is split as on GPUs.
With dropout off a 2-process run equals a 1-process run (float summation order only); AD-DROP
and R-Drop with dropout draw per rank, so they are compared with a 2-process DDP run, which sees
the same per-rank batches and RNG. ChildTuning-D's Fisher pass runs over global batches in a
fixed order, so its mask is the 1-process one. make_trainer refuses mask-train and imp under
FSDP (their thresholds need whole score tensors) and the methods with their own optimizer under
DeepSpeed ZeRO >= 1 or with a DeepSpeed optimizer section (tested below; DeepSpeed without ZeRO
is trained). The DeepSpeed tests skip when deepspeed is not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples" / "distributed"
GLOBAL_BATCH, STEPS = 8, 3
# (method, mode, dropout): mode "fsdp2" forces FSDP on CPU, "fsdp2-unforced" does not, "ddp"
JOBS = [("none", "fsdp2", 0.0), ("childtuning-f", "fsdp2", 0.0), ("childtuning-d", "fsdp2", 0.0),
        ("rdrop", "fsdp2", 0.1),
        ("rdrop", "ddp", 0.1), ("addrop", "fsdp2", 0.0), ("addrop", "ddp", 0.0),
        ("none", "fsdp2-unforced", 0.0)]
DEEPSPEED_JOBS = [("none", "zero1", 0.0), ("none", "zero2", 0.0),
                  ("mask-train", "zero0-client", 0.0), ("addrop", "zero1", 0.0),
                  ("rdrop", "zero1", 0.1), ("childtuning-f", "zero0-client", 0.0)]


def _config():
    from regdrop_fast.finetune.config import FinetuneConfig
    return FinetuneConfig(reserve_p=0.5, rdrop_alpha=1.0, addrop_p=0.5,
                          addrop_cross_tuning=False)


def _data(folder):
    from transformers import AutoTokenizer, DataCollatorWithPadding
    from utils.finetune import review_rows
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = review_rows(32, 4)
    encoded = tokenizer([r["review"] for r in rows])
    data = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "labels": int(r["sentiment"] == "pos")} for i, r in enumerate(rows)]
    return data, DataCollatorWithPadding(tokenizer)


def _force_fsdp_on_cpu():
    """Make accelerate's state FSDP when a plugin is given on a CPU launch (MULTI_CPU)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__

    def forced(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = forced
    return lambda: setattr(AcceleratorState, "__init__", init)


def _gloo_for_deepspeed_on_cpu():
    """Give a DeepSpeed launch without a GPU the gloo backend (accelerate leaves it none)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    prepare = PartialState._prepare_backend

    def with_gloo(self, *args, **kwargs):
        backend, kind = prepare(self, *args, **kwargs)
        if backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            return "gloo", DistributedType.MULTI_CPU
        return backend, kind

    PartialState._prepare_backend = with_gloo
    return lambda: setattr(PartialState, "_prepare_backend", prepare)


def _train(folder, out, method, mode, dropout):
    """(full state dict, wrapper class name) after STEPS steps of `method` under `mode`."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForSequenceClassification, TrainingArguments
    from regdrop_fast.finetune.hf_trainer import make_trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra, restore = dict(use_cpu=True), (lambda: None)
    if mode.startswith("fsdp2"):
        extra.update(fsdp=True, fsdp_config=str(EXAMPLES / "fsdp2_config.json"))
        if mode == "fsdp2":
            restore = _force_fsdp_on_cpu()
    elif mode == "accelerate-fsdp2":  # the FSDP settings come from `accelerate launch`
        restore = _force_fsdp_on_cpu()
    elif mode.startswith("zero"):
        # "zeroN-client": without the optimizer section DeepSpeed takes the Trainer's optimizer
        stage = int(mode[4])
        config = str(EXAMPLES / f"zero{max(stage, 1)}.json")
        if stage == 0 or mode.endswith("-client"):
            config = json.loads(Path(config).read_text())
            config["zero_optimization"]["stage"] = stage
            del config["optimizer"]
        # use_cpu=True would turn DeepSpeed off; CUDA_VISIBLE_DEVICES="" keeps it on the CPU
        extra = dict(use_cpu=False, deepspeed=config)
        restore = _gloo_for_deepspeed_on_cpu()
    try:
        # average_tokens_across_devices=False: BERT's loss is a per-batch mean, and the default
        # would scale it (and the gradients) by the number of processes
        args = TrainingArguments(
            output_dir=str(out), ddp_backend="gloo" if world > 1 else None,
            max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
            learning_rate=1e-2, weight_decay=0.0, warmup_steps=0, lr_scheduler_type="constant",
            average_tokens_across_devices=False, seed=1, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, **extra)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=2, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout)
        data, collator = _data(folder)
        trainer = make_trainer(method, _config(), model=model, args=args, train_dataset=data,
                               data_collator=collator)
        trainer.train()
    finally:
        restore()
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in trainer.model.state_dict().items()}
    return state, type(trainer.model_wrapped).__name__


def _worker(folder, out, jobs):
    import torch.distributed as dist
    runs = {}
    for method, mode, dropout in jobs:
        runs[f"{method}:{mode}"] = _train(folder, Path(out).parent / "trainer", method, mode,
                                          dropout)
    if dist.get_rank() == 0:
        torch.save(runs, out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from utils.finetune import make_tiny_bert
    return make_tiny_bert(tmp_path_factory.mktemp("fsdp") / "model", dropout=0.0)


def _launch(tiny, jobs, name, launcher=None):
    out = tiny.parent / f"{name}.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = launcher or ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [sys.executable, *launcher, __file__, str(tiny), str(out), json.dumps(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def two_process_runs(tiny):
    return _launch(tiny, JOBS, "fsdp")


@pytest.fixture(scope="module")
def deepspeed_runs(tiny):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    return _launch(tiny, DEEPSPEED_JOBS, "deepspeed")


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    runs = {}

    def run(method):
        if method not in runs:
            out = tmp_path_factory.mktemp("single")
            runs[method] = _train(tiny, out, method, "single", 0.0)[0]
        return runs[method]
    return run


def _initial(folder, method):
    """The untrained state dict the runs start from (mask training adds its scores)."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    if method == "mask-train":
        from regdrop_fast.sparse import MaskTrainer
        config = _config()
        MaskTrainer(model, config.sparsity, init=config.mask_init)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_close(two, one, folder, method):
    pre = _initial(folder, method)
    moved = max((one[k].float() - pre[k].float()).abs().max().item() for k in pre)
    assert moved > 1e-3  # training really changed the weights (the scores of mask training)
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["none", "childtuning-f", "childtuning-d"])
def test_fsdp2_two_processes_match_one_process(tiny, two_process_runs, one_process, method):
    two, wrapper = two_process_runs[f"{method}:fsdp2"]
    assert wrapper.startswith("FSDP")  # the model really was sharded
    _assert_close(two, one_process(method), tiny, method)


@pytest.mark.parametrize("method", ["rdrop", "addrop"])
def test_fsdp2_matches_ddp(tiny, two_process_runs, method):
    fsdp, wrapper = two_process_runs[f"{method}:fsdp2"]
    ddp, ddp_wrapper = two_process_runs[f"{method}:ddp"]
    assert wrapper.startswith("FSDP") and ddp_wrapper == "DistributedDataParallel"
    _assert_close(fsdp, ddp, tiny, method)


@pytest.mark.slow  # a second 2-process launch, about 40 s
@pytest.mark.parametrize("method, stage", [("none", "zero1"), ("none", "zero2"),
                                           ("mask-train", "zero0-client"),
                                           ("childtuning-f", "zero0-client")])
def test_deepspeed_two_processes_match_one_process(tiny, deepspeed_runs, one_process, method,
                                                   stage):
    two, wrapper = deepspeed_runs[f"{method}:{stage}"]
    assert wrapper == "DeepSpeedEngine"
    _assert_close(two, one_process(method), tiny, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rdrop", "addrop"])
def test_deepspeed_matches_ddp(tiny, deepspeed_runs, two_process_runs, method):
    zero, _ = deepspeed_runs[f"{method}:zero1"]
    ddp, _ = two_process_runs[f"{method}:ddp"]
    _assert_close(zero, ddp, tiny, method)


@pytest.mark.slow  # a second 2-process launch
def test_accelerate_launch_with_the_example_fsdp2_config(tiny, one_process):
    launcher = ["-m", "accelerate.commands.launch", "--config_file",
                str(EXAMPLES / "fsdp2.yaml"), "--main_process_port", "0"]
    runs = _launch(tiny, [("none", "accelerate-fsdp2", 0.0)], "accelerate", launcher)
    two, wrapper = runs["none:accelerate-fsdp2"]
    assert wrapper.startswith("FSDP")
    _assert_close(two, one_process("none"), tiny, "none")


def test_fsdp_on_cpu_is_ddp_without_the_forced_state(two_process_runs):
    # why the worker forces the state: accelerate 1.15 ignores the FSDP plugin on CPU launches
    _, wrapper = two_process_runs["none:fsdp2-unforced"]
    assert wrapper == "DistributedDataParallel"


def test_example_fsdp2_config_reaches_the_plugin(tmp_path):
    from transformers import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], fsdp=True,
                             fsdp_config=str(EXAMPLES / "fsdp2_config.json"))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["transformer_cls_names_to_wrap"] == "BertLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [1, 2])
def test_example_deepspeed_configs(stage):
    config = json.loads((EXAMPLES / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # "auto" lets the Trainer fill in its own values, so the TrainingArguments stay the truth
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"


def test_example_accelerate_config_is_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(EXAMPLES / "fsdp2.yaml"))
    assert str(config.distributed_type).endswith("FSDP")
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "BertLayer"


def _make(folder, tmp_path, method, **extra):
    from transformers import AutoModelForSequenceClassification, TrainingArguments
    from regdrop_fast.finetune.hf_trainer import make_trainer
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **extra)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    data, collator = _data(folder)
    return make_trainer(method, _config(), model=model, args=args, train_dataset=data,
                        data_collator=collator)


@pytest.mark.parametrize("method", ["mask-train", "imp", "rdrop,imp"])
def test_fsdp_refuses_the_whole_tensor_methods(tiny, tmp_path, method):
    from regdrop_fast.finetune.errors import FinetuneError
    name = method.split(",")[-1]
    with pytest.raises(FinetuneError, match=f"^{name} is not available with FSDP: it ranks whole "
                       r"weight/score tensors \(top-k thresholds\), which FSDP shards across "
                       "processes; use DDP$"):
        _make(tiny, tmp_path, method, use_cpu=True, fsdp=True,
              fsdp_config=str(EXAMPLES / "fsdp2_config.json"))


def _refusal(method, deepspeed):
    from types import SimpleNamespace
    from regdrop_fast.finetune.errors import FinetuneError
    from regdrop_fast.finetune.hf_trainer import check_backend
    try:
        check_backend(method, SimpleNamespace(fsdp=None, deepspeed=deepspeed))
    except FinetuneError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("method", ["childtuning-f", "childtuning-d", "mask-train", "imp"])
def test_deepspeed_refusals_of_the_own_optimizer_methods(method):
    zero1 = json.loads((EXAMPLES / "zero1.json").read_text())  # with an optimizer section
    client = {"zero_optimization": {"stage": 2}}
    stage0 = {"zero_optimization": {"stage": 0}}
    instead = "DDP or FSDP" if method.startswith("childtuning") else "DDP"
    err = _refusal(method, zero1)
    assert err.startswith(f"{method} is not available with this DeepSpeed config: ")
    assert "\"optimizer\" section" in err and f"use {instead}, or a DeepSpeed config with " \
        "stage 0 and no \"optimizer\" section" in err
    assert "ZeRO stage 2 flattens" in _refusal(method, client)
    assert _refusal(method, stage0) is None
    assert _refusal("rdrop", zero1) is None and _refusal("none", client) is None


@pytest.mark.parametrize("method", ["childtuning-f", "mask-train"])
def test_deepspeed_refusal_through_make_trainer(tiny, tmp_path, method):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    from regdrop_fast.finetune.errors import FinetuneError
    with pytest.raises(FinetuneError, match=f"^{method} is not available with this DeepSpeed "
                       "config: DeepSpeed ZeRO stage 1"):
        _make(tiny, tmp_path, method, use_cpu=False,
              deepspeed={"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu":
                         "auto", "gradient_accumulation_steps": "auto"})


if __name__ == "__main__":  # one torchrun rank: python -m torch.distributed.run ... this file
    _worker(sys.argv[1], sys.argv[2], [tuple(job) for job in json.loads(sys.argv[3])])
