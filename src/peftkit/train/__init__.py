"""Training: a small, resumable loop for PEFT models (and any module returning a loss)."""

from .args import TrainingArguments
from .trainer import Trainer, TrainResult, seed_everything

__all__ = ["Trainer", "TrainingArguments", "TrainResult", "seed_everything"]
