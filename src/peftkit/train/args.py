"""TrainingArguments: every knob of the training loop, documented once and checked on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")
TASKS = ("classification", "causal-lm")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")


@dataclass
class TrainingArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "folder for checkpoints, metrics.jsonl and the plot (None: keep nothing)"}
    )
    task: Literal["classification", "causal-lm"] | None = field(
        default=None, metadata={"help": "which metrics eval reports: accuracy+F1 or loss+perplexity (None: loss only)"}
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    batch_size: int = field(default=16, metadata={"help": "examples per micro-batch"})
    eval_batch_size: int = field(default=32, metadata={"help": "examples per evaluation batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data (unless max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps to run; overrides epochs"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps (wins over warmup_ratio)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warm-up as a fraction of all steps"})
    lr_scheduler: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata={"help": "decay after warm-up: linear, cosine or constant"}
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the global grad norm (None/0: off)"})
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata={"help": "autocast dtype: fp32, bf16 or fp16 (fp16 uses a GradScaler)"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    seed: int = field(default=42, metadata={"help": "seed for python, numpy, torch and the data order"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "evaluate every N optimizer steps (None: at the end of each epoch)"}
    )
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps (None: = eval_steps)"})
    save_total_limit: int = field(default=1, metadata={"help": "how many latest checkpoints to keep"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after N evaluations without improvement (None: never)"}
    )
    metric_for_best: str | None = field(
        default=None, metadata={"help": "eval metric that picks the best checkpoint (default: accuracy or loss)"}
    )
    load_best_at_end: bool = field(default=False, metadata={"help": "restore the best weights when training ends"})
    logging_steps: int = field(default=1, metadata={"help": "write a train record every N steps"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    tensorboard: bool = field(default=True, metadata={"help": "also log to TensorBoard when it is installed"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one), cpu, cuda, cuda:1, ..."})
    fused_kernels: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "peftkit's fused kernels (patch_model: fused LoRA nodes, RMSNorm, SwiGLU, "
                                          "RoPE, linear+cross-entropy) for Llama/Mistral/Qwen models, whose frozen base "
                                          "then runs in the precision's dtype (bf16/fp16); other models run as they "
                                          "are. auto: on CUDA at bf16/fp16 (also under torchrun); on: always; off: never"}
    )
    optim: Literal["adamw_torch", "paged_adamw_32bit"] = field(
        default="adamw_torch", metadata={"help": "adamw_torch, or paged_adamw_32bit (AdamW state kept in host memory)"}
    )
    distributed: Literal["auto", "ddp", "fsdp", "none"] = field(
        default="auto", metadata={"help": "under torchrun: auto (= ddp when launched with >1 process), ddp, fsdp "
                                          "(FSDP2, shards the frozen base too), none"}
    )
    cuda_graphs: bool = field(
        default=False, metadata={"help": "record each optimizer step as a CUDA graph (one per batch shape) and replay "
                                         "it: the GPU no longer waits for Python to issue kernels. One CUDA process, "
                                         "bf16/fp32, adamw_torch; batches of few shapes (pad to a multiple)"}
    )
    ddp_find_unused_parameters: bool = field(
        default=False, metadata={"help": "DDP: search for trainable tensors a step did not use (slower; only "
                                         "for methods whose adapters sit off some inputs' path)"}
    )

    def __post_init__(self) -> None:
        _positive(self, "learning_rate", "batch_size", "eval_batch_size", "gradient_accumulation_steps")
        _positive(self, "epochs", "logging_steps", "save_total_limit")
        _positive_or_none(self, "max_steps", "eval_steps", "save_steps", "early_stopping_patience")
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "lr_scheduler", SCHEDULES)
        _one_of(self, "optim", OPTIMIZERS)
        _one_of(self, "distributed", DISTRIBUTED)
        if self.distributed == "fsdp" and self.precision == "fp16":
            raise ValueError("TrainingArguments.distributed='fsdp' does not support precision='fp16' (the "
                             "GradScaler is not shard-aware); use precision='bf16'")
        if self.cuda_graphs and self.precision == "fp16":
            raise ValueError("TrainingArguments.cuda_graphs does not support precision='fp16' (its GradScaler reads "
                             "the gradients' inf check on the host every step); use precision='bf16'")
        if self.cuda_graphs and self.optim != "adamw_torch":
            raise ValueError(f"TrainingArguments.cuda_graphs needs optim='adamw_torch' ({self.optim} moves its state "
                             "between host and GPU memory inside the step)")
        if self.task is not None:
            _one_of(self, "task", TASKS)
        for name in ("weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainingArguments.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainingArguments.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"TrainingArguments.max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")

    @property
    def best_metric(self) -> str:
        """Name of the eval metric that decides 'best' (without the eval_ prefix)."""
        return self.metric_for_best or ("accuracy" if self.task == "classification" else "loss")

    @property
    def greater_is_better(self) -> bool:
        return self.best_metric not in ("loss", "perplexity")

    def steps_per_epoch(self, n_examples: int, world_size: int = 1) -> int:
        """Optimizer steps in one pass over ``n_examples`` split over ``world_size`` ranks."""
        batches = math.ceil(math.ceil(n_examples / world_size) / self.batch_size)
        return math.ceil(batches / self.gradient_accumulation_steps)

    def planned_steps(self, n_examples: int, world_size: int = 1) -> int:
        """Optimizer steps the run will take: ``max_steps``, else ``epochs`` passes."""
        return self.max_steps or self.epochs * self.steps_per_epoch(n_examples, world_size)

    def global_batch_size(self, world_size: int = 1) -> int:
        """Examples per optimizer step: per-device batch x world size x accumulation."""
        return self.batch_size * world_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(args: TrainingArguments, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if not value > 0:
            raise ValueError(f"TrainingArguments.{name} must be > 0, got {value!r}")


def _positive_or_none(args: TrainingArguments, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"TrainingArguments.{name} must be > 0 or None, got {value!r}")


def _one_of(args: TrainingArguments, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in allowed:
        raise ValueError(f"TrainingArguments.{name} must be one of {', '.join(allowed)}; got {value!r}")
