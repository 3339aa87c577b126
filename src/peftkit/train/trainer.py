"""The training loop: AdamW, warm-up schedules, accumulation, clipping, autocast, eval, checkpoints.

One optimizer step consumes ``gradient_accumulation_steps`` micro-batches of one epoch (the last step
of an epoch may take fewer). Each micro-batch loss is weighted by its share of the step's items
(examples, or label tokens for causal LM), so accumulating k batches of n gives the same gradient as
one batch of k*n:

    loss_step = sum_i loss_i * items_i / sum_j items_j      (loss_i = mean over micro-batch i)

The model is any module whose ``forward(**batch)`` returns an object or dict with ``loss`` (and
``logits`` for classification metrics), e.g. a transformers model or a peftkit ``PeftModel``. Method
hooks are called when the model has them: ``adapter_loss()`` is added to every micro-batch loss
(scaled by the same weights, so once per step in total) and ``after_optimizer_step(global_step)`` runs
after each optimizer step, before the gradients are cleared.

Resuming restores the trainable tensors, the methods' training state (``training_state()``, e.g.
AdaLoRA's importance scores), optimizer, scheduler, grad scaler, RNG states and the data
position (epoch, next batch), and truncates ``metrics.jsonl`` to the checkpoint's step, so a run that
was killed and resumed logs the same per-step losses as one that never stopped.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from itertools import islice
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .args import TrainingArguments
from .loader import ResumableBatches, eval_batches
from .paged_adamw import PagedAdamW
from .metrics import PLOT_FILE, EvalAccumulator, MetricsLog, plot_curves, read_metrics
from .schedule import make_scheduler, warmup_steps_for

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE_INDEX = -100


@dataclass
class TrainResult:
    global_step: int
    train_loss: float | None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated bytes on a GPU run; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def count_items(batch: dict, task: str | None) -> int:
    """Examples in a batch, or label tokens that count towards the loss (after the causal shift)."""
    labels = batch.get("labels")
    if labels is None:
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
    if task == "causal-lm":
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum()) if labels.dim() > 1 else int(labels.shape[0])


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else count_items(batch, None)


def _output(out: Any, key: str):
    return out.get(key) if isinstance(out, dict) else getattr(out, key, None)


class Trainer:
    """Train ``model`` on ``train_dataset`` (a sequence of examples) batched by ``collate_fn``."""

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        train_dataset: Sequence | None = None,
        eval_dataset: Sequence | None = None,
        collate_fn: Callable[[list], dict] | None = None,
    ):
        self.model, self.args = model, args
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.device = resolve_device(args.device)
        self.output_dir = Path(args.output_dir) if args.output_dir else None
        self.log = MetricsLog(self.output_dir, args.tensorboard)
        self.model.to(self.device)

    # ----------------------------------------------------------------------------------------- setup
    def _autocast(self):
        dtype = DTYPES[self.args.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _trainable(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; wrap it with get_peft_model first")
        return params

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        a = self.args
        if a.optim == "paged_adamw_32bit":
            return PagedAdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                              weight_decay=a.weight_decay)
        fused = self.device.type == "cuda" and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
            weight_decay=a.weight_decay, fused=fused or None,
        )

    def _enable_gradient_checkpointing(self) -> None:
        enable = getattr(self.model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError("gradient_checkpointing=True needs a model with gradient_checkpointing_enable()")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _setup(self) -> None:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        a = self.args
        self.batches = ResumableBatches(self.train_dataset, a.batch_size, self.collate_fn, a.seed)
        self.steps_per_epoch = a.steps_per_epoch(len(self.train_dataset))
        self.total_steps = a.planned_steps(len(self.train_dataset))
        if a.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self.params = self._trainable()
        self.optimizer = self._make_optimizer(self.params)
        warmup = warmup_steps_for(self.total_steps, a.warmup_steps, a.warmup_ratio)
        self.scheduler = make_scheduler(self.optimizer, a.lr_scheduler, self.total_steps, warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=a.precision == "fp16")

    # ------------------------------------------------------------------------------ resumable state
    def _fresh_state(self) -> dict:
        return {"global_step": 0, "epoch": 0, "batch": 0, "best_value": None, "best_step": None,
                "bad_evals": 0, "elapsed": 0.0, "window": [0.0, 0], "finished": False,
                "stopped_early": False, "last_eval": {}}

    def _state_dict(self) -> dict:
        method_state = getattr(self.model, "training_state", None)
        return {"state": dict(self.state), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "args": self.args.to_dict(), "method": method_state() if method_state else {}}

    def _restore(self, path: Path) -> None:
        saved = ckpt.load_checkpoint(path)
        ckpt.load_trainable_state(self.model, saved["trainable"])
        if saved.get("method"):
            self.model.load_training_state(saved["method"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        ckpt.set_rng_state(saved["rng"])
        self.state = saved["state"]
        self.log.truncate_after(self.state["global_step"])
        best = self._best_dir()
        if best is not None and (best / ckpt.STATE_FILE).is_file():
            self.best_weights = ckpt.load_checkpoint(best)["trainable"]
        logger.info("resumed from %s at step %d", path, self.state["global_step"])

    def _resume_path(self, resume_from: str | Path | bool | None) -> Path | None:
        if not resume_from:
            return None
        if resume_from is True:
            if self.output_dir is None:
                raise ValueError("resume_from=True needs TrainingArguments.output_dir")
            return ckpt.latest_checkpoint(self.output_dir / "checkpoints")
        path = Path(resume_from)
        found = ckpt.latest_checkpoint(path) or ckpt.latest_checkpoint(path / "checkpoints")
        return path if (path / ckpt.STATE_FILE).is_file() else found

    def _save(self) -> None:
        if self.output_dir is None:
            return
        root = self.output_dir / "checkpoints"
        ckpt.save_checkpoint(root, self.state["global_step"], self.model, self._state_dict())
        ckpt.prune_checkpoints(root, self.args.save_total_limit)

    def _best_dir(self) -> Path | None:
        return self.output_dir / "best" if self.output_dir is not None else None

    # ------------------------------------------------------------------------------------- training
    def train(self, resume_from: str | Path | bool | None = None) -> TrainResult:
        """Run to ``max_steps`` / ``epochs``; ``resume_from`` = True (latest in output_dir) or a path."""
        self._setup()
        self.state, self.best_weights = self._fresh_state(), None
        path = self._resume_path(resume_from)
        if path is not None:
            self._restore(path)
        else:
            seed_everything(self.args.seed)
            if self.output_dir is not None:
                self.log.truncate_after(0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._loop()
        return self._finish()

    def _loop(self) -> None:
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc="train",
                   dynamic_ncols=True, disable=not self.args.progress_bar)
        started = time.perf_counter() - self.state["elapsed"]
        while not self.state["finished"] and self.state["global_step"] < self.total_steps:
            t0 = time.perf_counter()
            loss, tokens, grad_norm = self._optimizer_step(self._next_step_batches())
            record = self._after_step(loss, grad_norm, tokens / max(time.perf_counter() - t0, 1e-9))
            self.state["elapsed"] = time.perf_counter() - started
            self._maybe_evaluate_and_save()
            bar.update(1)
            if record is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
        bar.close()

    def _next_step_batches(self) -> list[dict]:
        """The micro-batches of the next optimizer step, and advance the data position past them."""
        epoch, start = self.state["epoch"], self.state["batch"]
        stop = min(start + self.args.gradient_accumulation_steps, len(self.batches))
        batches = [batch for _, batch in islice(self.batches.epoch(epoch, start), stop - start)]
        self.state["epoch"], self.state["batch"] = (epoch, stop) if stop < len(self.batches) else (epoch + 1, 0)
        return batches

    def _optimizer_step(self, batches: list[dict]) -> tuple[float, int, float]:
        self.state["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        items = [count_items(b, self.args.task) for b in batches]
        total, loss_value, tokens = max(sum(items), 1), 0.0, 0
        for batch, n in zip(batches, items):
            tokens += count_tokens(batch)
            if n > 0:
                loss_value += self._backward(self._to_device(batch), n / total)
        grad_norm = self._clip_and_step()
        self.state["global_step"] += 1
        hook = getattr(self.model, "after_optimizer_step", None)
        if hook is not None:  # before zero_grad: AdaLoRA's allocator reads the step's gradients
            hook(self.state["global_step"])
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, grad_norm

    def _backward(self, batch: dict, weight: float) -> float:
        with self._autocast():
            out = self.model(**batch)
            loss = _output(out, "loss")
            if loss is None:
                raise ValueError("the model returned no loss; give the batches a 'labels' entry")
            extra = self._adapter_loss()
            total = loss if extra is None else loss + extra
        self.scaler.scale(total.float() * weight).backward()
        return float(loss.detach()) * weight

    def _adapter_loss(self):
        hook = getattr(self.model, "adapter_loss", None)
        return hook() if hook is not None else None

    def _clip_and_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _after_step(self, loss: float, grad_norm: float, tokens_per_s: float) -> dict | None:
        window = self.state["window"]
        window[0], window[1] = window[0] + loss, window[1] + 1
        step = self.state["global_step"]
        if step % self.args.logging_steps and step != self.total_steps:
            return None
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": window[0] / window[1],
                  "lr": self.state["lr"], "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "elapsed_s": round(self.state["elapsed"], 3)}
        self.state["window"] = [0.0, 0]
        self.state["last_train_loss"] = record["loss"]
        self.log.write(record)
        return record

    # ------------------------------------------------------------------------ evaluation & stopping
    def _due(self, every: int | None) -> bool:
        step = self.state["global_step"]
        if step == self.total_steps:
            return True
        return step % every == 0 if every else step % self.steps_per_epoch == 0

    def _maybe_evaluate_and_save(self) -> None:
        if self.eval_dataset is not None and self._due(self.args.eval_steps):
            metrics = self.evaluate()
            self.state["last_eval"] = metrics
            self.log.write({"step": self.state["global_step"], **{f"eval_{k}": v for k, v in metrics.items()}})
            self._track_best(metrics)
        if self.state["global_step"] >= self.total_steps:
            self.state["finished"] = True
        if self._due(self.args.save_steps or self.args.eval_steps) or self.state["finished"]:
            self._save()

    def _track_best(self, metrics: dict[str, float]) -> None:
        name = self.args.best_metric
        if name not in metrics:
            raise ValueError(f"metric_for_best={name!r} is not among the eval metrics {sorted(metrics)}")
        value, best = metrics[name], self.state["best_value"]
        better = best is None or (value > best if self.args.greater_is_better else value < best)
        if better:
            self.state.update(best_value=value, best_step=self.state["global_step"], bad_evals=0)
            self._save_best()
            return
        self.state["bad_evals"] += 1
        patience = self.args.early_stopping_patience
        if patience is not None and self.state["bad_evals"] >= patience:
            self.state.update(finished=True, stopped_early=True)
            logger.info("early stopping at step %d: no better %s for %d evaluations",
                        self.state["global_step"], name, patience)

    def _save_best(self) -> None:
        self.best_weights = ckpt.trainable_state(self.model)
        best = self._best_dir()
        if best is not None:
            state = {"state": {"global_step": self.state["global_step"], "metric": self.args.best_metric,
                               "value": self.state["best_value"]}}
            ckpt.write_checkpoint(best, self.model, state)

    @torch.no_grad()
    def evaluate(self, dataset: Sequence | None = None) -> dict[str, float]:
        """Task metrics on ``dataset`` (default: the eval dataset): loss, plus accuracy/F1 or perplexity."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval dataset")
        was_training, acc = self.model.training, EvalAccumulator(self.args.task)
        self.model.eval()
        for batch in eval_batches(dataset, self.args.eval_batch_size, self.collate_fn):
            batch = self._to_device(batch)
            with self._autocast():
                out = self.model(**batch)
            acc.add(_output(out, "loss"), count_items(batch, self.args.task), _output(out, "logits"),
                    batch.get("labels"))
        self.model.train(was_training)
        return acc.result()

    # ------------------------------------------------------------------------------------ finishing
    def _finish(self) -> TrainResult:
        if self.args.load_best_at_end and self.best_weights is not None:
            ckpt.load_trainable_state(self.model, self.best_weights)
        if self.output_dir is not None and self.log.path.exists():
            plot_curves(read_metrics(self.log.path), self.output_dir / PLOT_FILE)
        self.log.close()
        s = self.state
        return TrainResult(
            global_step=s["global_step"], train_loss=s.get("last_train_loss"), eval_metrics=s["last_eval"],
            best_metric=s["best_value"], best_step=s["best_step"], stopped_early=s["stopped_early"],
            train_seconds=s["elapsed"], peak_memory_bytes=peak_memory_bytes(self.device),
        )
