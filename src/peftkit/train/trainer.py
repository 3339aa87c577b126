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

With ``cuda_graphs`` (one CUDA process) each step is recorded as a CUDA graph per batch shape and
replayed (``graphed.py``): the same step, issued with one call instead of thousands of launches.

Resuming restores the trainable tensors, the methods' training state (``training_state()``, e.g.
AdaLoRA's importance scores), optimizer, scheduler, grad scaler, RNG states and the data
position (epoch, next batch), and truncates ``metrics.jsonl`` to the checkpoint's step, so a run that
was killed and resumed logs the same per-step losses as one that never stopped. A damaged newest
checkpoint is skipped (with a warning naming it) for the newest one that reads whole. The best
checkpoint (``best/``) holds the same parameters and method state, and ``load_best_at_end`` restores
both, so the model after training is the one a resume from the best step would give.

Under torchrun (``distributed.py``) each rank trains on its shard of every epoch through DDP or
FSDP2, the loss weights count the items of all ranks, and only rank 0 logs and writes files; a
checkpoint holds the full adapter and an optimizer state keyed by parameter name, so it resumes at
any world size. The data position counts examples of the epoch's global order, so a resume may split
the global batch (per-device batch x world size x accumulation) differently; an epoch-based run must
keep the global batch itself, or its epochs would no longer end where its step count does.
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
from . import distributed, graphed
from .args import TrainingArguments
from .loader import ResumableBatches, eval_batch_count, eval_batches, eval_shard_batches
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
        self.dist = distributed.resolve(args.distributed)
        self.is_main = self.dist.is_main
        self.device = distributed.rank_device(args.device, self.dist.local_rank) if self.dist.active \
            else resolve_device(args.device)
        self.output_dir = Path(args.output_dir) if args.output_dir else None
        self.log = MetricsLog(self.output_dir if self.is_main else None, args.tensorboard and self.is_main)
        self.model.to(self.device)
        self.patched = self._fuse_kernels()
        self.autocast_redundant = self._autocast_is_redundant()
        self._check_packing()
        if args.cuda_graphs:
            graphed.check_supported(self.device, self.dist.active, self.model)
        self._checkpointing = False
        self.graphs = None
        self.drop_full_masks = args.cuda_graphs and graphed.mask_is_optional(self.model)
        self.engine = self._wrap() if self.dist.active else self.model  # what the training step calls

    def _wrap(self) -> torch.nn.Module:
        """DDP or FSDP2 around the model, after gradient checkpointing (it changes the modules)."""
        if self.args.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        a = self.args
        return distributed.wrap(self.model, self.dist, self.device, a.precision, a.ddp_find_unused_parameters)

    # ----------------------------------------------------------------------------------------- setup
    def _fuse_kernels(self):
        """patch_model where ``fused_kernels`` asks for it; the PatchReport, or None.

        When patch_model recognises the model (Llama, Mistral, Qwen) and precision is bf16/fp16, the
        frozen base's floating-point parameters are then cast to that dtype: the fused LoRA node
        needs activations and frozen weight in one dtype, autocast would compute every matmul in it
        anyway, and the frozen weights take half the memory. Trainable tensors (adapters, trained
        biases) stay as they are. "auto" does this on CUDA devices. Under torchrun this runs before
        DDP or FSDP2 wraps the model: the patched forwards read each parameter when called, so they
        see FSDP2's gathered weights, and the adapters' gradients reach DDP's and FSDP2's hooks as usual.
        """
        a = self.args
        auto = self.device.type == "cuda" and a.precision != "fp32"
        if a.fused_kernels == "off" or (a.fused_kernels == "auto" and not auto):
            return None
        from peftkit.kernels import patch_model

        report = patch_model(self.model)
        if not any(vars(report).values()):
            return None  # not a family the kernels know: the model runs as it is
        dtype = DTYPES[a.precision]
        if dtype != torch.float32:
            for param in self.model.parameters():
                if not param.requires_grad and param.is_floating_point():
                    param.data = param.data.to(dtype)
        logger.info("fused kernels: %s", report)
        return report

    def _check_packing(self) -> None:
        """Refuse packed training rows the model would let attend across their sequences (before
        DDP/FSDP2 wrap it, after patch_model, in the run's autocast: the model as it will train)."""
        from peftkit.data.packing import check_packing_support, is_packed

        if is_packed(self.train_dataset):
            with self._autocast():
                check_packing_support(self.model, self.train_dataset)

    def _autocast_is_redundant(self) -> bool:
        """True when autocast would change no result: fused kernels put the frozen base in the
        precision's dtype, and every trainable tensor sits in a layer that casts it to its input's
        dtype itself (LoRA on linears: ``keeps_input_dtype``). Autocast then only costs host time on
        every op of an eager step (measured: ``benchmarks/NOTES.md``, run 14)."""
        if self.patched is None:
            return False
        dtype = DTYPES[self.args.precision]
        owned = {id(p) for m in self.model.modules() if getattr(m, "keeps_input_dtype", False)
                 for name, p in m.named_parameters() if not name.startswith("base_layer.")}
        return all(id(p) in owned if p.requires_grad else not p.is_floating_point() or p.dtype == dtype
                   for p in self.model.parameters())

    def _autocast(self):
        dtype = DTYPES[self.args.precision]
        enabled = dtype != torch.float32 and not self.autocast_redundant
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

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
        self._checkpointing = True

    def _setup(self) -> None:
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        a, d = self.args, self.dist
        self.batches = ResumableBatches(self.train_dataset, a.batch_size, self.collate_fn, a.seed, d.rank, d.world_size)
        self.steps_per_epoch = a.steps_per_epoch(len(self.train_dataset), d.world_size)
        self.total_steps = a.planned_steps(len(self.train_dataset), d.world_size)
        if d.active and self.is_main:
            logger.info("%s over %d processes: global batch %d = %d per device x %d x %d accumulation", d.mode,
                        d.world_size, a.global_batch_size(d.world_size), a.batch_size, d.world_size,
                        a.gradient_accumulation_steps)
        if a.gradient_checkpointing and not self._checkpointing:
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
        """The resumable state; under torchrun a collective (the optimizer state is gathered)."""
        if self.dist.active:  # keyed by name and unsharded, so it loads at any world size
            optimizer = {"optimizer_by_name": distributed.optimizer_state(self.model, self.optimizer),
                         "rng_per_rank": distributed.gather_objects(ckpt.rng_state())}
        else:
            optimizer = {"optimizer": self.optimizer.state_dict()}
        return {"state": dict(self.state), **optimizer,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "args": self.args.to_dict(), "method": self._method_state(),
                "layout": {"world_size": self.dist.world_size, "batch_size": self.args.batch_size,
                           "accumulation": self.args.gradient_accumulation_steps}}

    def _method_state(self) -> dict:
        """The methods' state beyond the parameters (AdaLoRA's masks and scores), {} for plain models."""
        hook = getattr(self.model, "training_state", None)
        return hook() if hook is not None else {}

    def _load_state(self, trainable: dict[str, torch.Tensor], method: dict | None) -> None:
        """Parameters and method state together, so the model is the one that was saved."""
        self._load_trainable(trainable)
        if method:
            self.model.load_training_state(method)

    def _restore(self, path: Path, saved: dict) -> None:
        batch = self.resumed_batch(saved)  # first: a layout that cannot continue changes nothing
        self._load_state(saved["trainable"], saved.get("method"))
        self._load_optimizer(saved)
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        per_rank = saved.get("rng_per_rank") or []
        ckpt.set_rng_state(per_rank[self.dist.rank] if len(per_rank) == self.dist.world_size else saved["rng"])
        self.state = saved["state"]
        self.state["batch"] = batch
        self.log.truncate_after(self.state["global_step"])
        best = self._best_dir()
        if best is not None and (best / ckpt.STATE_FILE).is_file():
            try:
                saved_best = ckpt.load_checkpoint(best)
            except ckpt.CheckpointDamaged as err:
                logger.warning("the best weights cannot be restored (%s); load_best_at_end will keep the last", err)
            else:
                self.best_weights, self.best_method = saved_best["trainable"], saved_best.get("method")
                if self.best_method is None and self._method_state():
                    logger.warning("%s predates saving method state; load_best_at_end restores its parameters "
                                   "only", best)
        logger.info("resumed from %s at step %d", path, self.state["global_step"])

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        if self.dist.mode == "fsdp":
            ckpt.check_trainable_keys(self.model, state)
            distributed.load_full_state(self.model, state)
        else:
            ckpt.load_trainable_state(self.model, state)

    def _load_optimizer(self, saved: dict) -> None:
        """Either checkpoint form into either kind of run (index-keyed: one process; by name: torchrun)."""
        if self.dist.active:
            named = saved.get("optimizer_by_name") or distributed.named_optimizer_state(self.model, saved["optimizer"])
            distributed.load_optimizer_state(self.model, self.optimizer, named)
        elif "optimizer" in saved:
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            self.optimizer.load_state_dict(distributed.indexed_optimizer_state(self.model, saved["optimizer_by_name"]))
        graphed.plain_learning_rates(self.optimizer)  # saved by a cuda_graphs run: train() makes them tensors again

    def resumed_batch(self, saved: dict) -> int:
        """The checkpoint's next micro-batch of its epoch, re-expressed for this run's per-device batch
        x world size; raise if this run's layout cannot continue it. Positions count examples of the
        epoch's global order, so any split of the same global batch continues exactly."""
        batch, layout = saved["state"]["batch"], saved.get("layout")
        if layout is None:
            return batch
        a, world = self.args, self.dist.world_size
        accumulation = layout.get("accumulation", saved.get("args", {}).get("gradient_accumulation_steps", 1))
        old, new = layout["batch_size"] * layout["world_size"], a.batch_size * world
        if old * accumulation != new * a.gradient_accumulation_steps and not a.max_steps:
            raise ValueError(self._global_batch_message(layout, accumulation))
        if old == new:
            return batch
        consumed = batch * old  # examples of this epoch's global order already used
        if consumed % new:
            raise ValueError(f"cannot resume: the checkpoint is {consumed} examples into its epoch, which is not a "
                             f"whole number of batches of {new} (batch_size x world size); resume with "
                             f"batch_size x world size = {old} as when it was saved")
        logger.warning("resuming with %d examples per micro-batch over all ranks instead of %d", new, old)
        return consumed // new

    def _global_batch_message(self, layout: dict, accumulation: int) -> str:
        """Why an epoch-based run cannot change its global batch, and the settings that keep it."""
        a, world = self.args, self.dist.world_size
        old = layout["batch_size"] * layout["world_size"] * accumulation
        fixes = [f"batch_size={old // (world * a.gradient_accumulation_steps)} (--batch-size)"
                 if old % (world * a.gradient_accumulation_steps) == 0 else None,
                 f"gradient_accumulation_steps={old // (world * a.batch_size)} (--gradient-accumulation-steps)"
                 if old % (world * a.batch_size) == 0 else None]
        fix = " or ".join(f for f in fixes if f) or f"batch_size x world size x gradient_accumulation_steps = {old}"
        return (f"cannot resume: the checkpoint's run takes {old} examples per optimizer step ({layout['batch_size']} "
                f"per device x {layout['world_size']} processes x {accumulation} accumulation), this one "
                f"{a.global_batch_size(world)} ({a.batch_size} x {world} x {a.gradient_accumulation_steps}), so its "
                f"epochs would no longer end where its step count and schedule do; keep the global batch with {fix}")

    def check_resume(self, resume_from: str | Path | bool) -> None:
        """Raise, changing nothing, if ``train(resume_from=...)`` would refuse this run's batch layout."""
        candidates = self._resume_candidates(resume_from)
        if candidates:
            self.resumed_batch(self._readable_checkpoint(candidates)[1])

    def _resume_candidates(self, resume_from: str | Path | bool | None) -> list[Path]:
        """Checkpoints to resume from, newest first; empty: start at step 0 (no resume_from). Asked to
        resume, finding none is an error (as in transformers' Trainer): a silent restart would redo
        the run and overwrite its log."""
        if not resume_from:
            return []
        if resume_from is True:
            if self.output_dir is None:
                raise ValueError("resume_from=True needs TrainingArguments.output_dir")
            found = ckpt.list_checkpoints(self.output_dir / "checkpoints")
            if not found:
                raise ValueError(f"resume_from=True, but the output directory {str(self.output_dir)!r} holds no complete "
                                 f"checkpoint (no checkpoints/{ckpt.PREFIX}* folder with {ckpt.STATE_FILE}); drop "
                                 "resume_from to train from step 0, or pass resume_from=<a checkpoint folder>")
            return found[::-1]
        path = Path(resume_from)
        if (path / ckpt.STATE_FILE).is_file():
            return [path]
        found = ckpt.list_checkpoints(path) or ckpt.list_checkpoints(path / "checkpoints")
        if not found:
            raise ValueError(f"resume_from={str(path)!r} holds no complete checkpoint (a folder with {ckpt.STATE_FILE}, "
                             "or step-* folders holding one); pass a checkpoint folder or the output_dir of a run "
                             "that saved one")
        return found[::-1]

    @staticmethod
    def _readable_checkpoint(candidates: list[Path]) -> tuple[Path, dict]:
        """The newest candidate that reads whole; each damaged one skipped is named in a warning."""
        errors = []
        for path in candidates:
            try:
                saved = ckpt.load_checkpoint(path)
                ckpt.check_resumable(saved, path)
                return path, saved
            except ckpt.CheckpointDamaged as err:
                errors.append(str(err))
                logger.warning("skipping damaged checkpoint %s: %s", path, err)
        raise ValueError("cannot resume, no checkpoint is readable: " + "; ".join(errors) +
                         "; delete the damaged checkpoint folders to start again from step 0")

    def _save(self) -> None:
        """Rank 0 writes the checkpoint (full adapter, named optimizer state); the others wait."""
        if self.output_dir is None:
            return
        root, state = self.output_dir / "checkpoints", self._state_dict()
        with distributed.gathered(self.model, self.dist):
            if self.is_main:
                ckpt.save_checkpoint(root, self.state["global_step"], self.model, state)
                ckpt.prune_checkpoints(root, self.args.save_total_limit)
        if self.dist.active:
            distributed.barrier()

    def gathered_weights(self):
        """Context in which the model holds its full adapter on every rank (for saving under FSDP2)."""
        return distributed.gathered(self.model, self.dist)

    def _best_dir(self) -> Path | None:
        return self.output_dir / "best" if self.output_dir is not None else None

    # ------------------------------------------------------------------------------------- training
    def train(self, resume_from: str | Path | bool | None = None) -> TrainResult:
        """Run to ``max_steps`` / ``epochs``; ``resume_from`` = True (latest in output_dir) or a path."""
        self._setup()
        self.state, self.best_weights, self.best_method = self._fresh_state(), None, None
        candidates = self._resume_candidates(resume_from)
        if candidates:
            self._restore(*self._readable_checkpoint(candidates))
        else:
            seed_everything(self.args.seed)
            if self.output_dir is not None:
                self.log.truncate_after(0)
        if self.args.cuda_graphs:
            graphed.prepare_optimizer(self.optimizer, self.device)
            self.graphs = graphed.GraphedSteps(self._step_on_device, self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._loop()
        return self._finish()

    def _loop(self) -> None:
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc="train",
                   dynamic_ncols=True, disable=not (self.args.progress_bar and self.is_main))
        started = time.perf_counter() - self.state["elapsed"]
        unread = None  # cuda_graphs: a step issued but not read back yet, finished after the next is issued
        while not self.state["finished"] and self.state["global_step"] < self.total_steps:
            t0 = time.perf_counter()
            loss, tokens, grad_norm = self._optimizer_step(self._next_step_batches())
            step = (loss, tokens, grad_norm, t0, self.state["global_step"], self.state["lr"])
            if unread is not None:
                self._finish_step(bar, started, *unread)
                unread = None
            if isinstance(loss, graphed.Pending) and not self._must_finish_now():
                unread = step
            else:
                self._finish_step(bar, started, *step)
                self._maybe_evaluate_and_save()
        bar.close()  # no step is left unread: the last one is always finished at once (_must_finish_now)

    def _must_finish_now(self) -> bool:
        """Whether this step's numbers are needed before the next step: evaluation, a checkpoint
        (it holds the running loss) or the end are due."""
        a, step = self.args, self.state["global_step"]
        return step >= self.total_steps or self._due(a.save_steps or a.eval_steps) or (
            self.eval_dataset is not None and self._due(a.eval_steps))

    def _finish_step(self, bar, started: float, loss, tokens: int, grad_norm, t0: float, step: int, lr: float) -> None:
        """Log step ``step`` (its loss read back now if still pending) and advance the bar."""
        if isinstance(loss, graphed.Pending):
            loss, grad_norm = loss.read()
        record = self._after_step(loss, grad_norm, tokens / max(time.perf_counter() - t0, 1e-9), step, lr)
        self.state["elapsed"] = time.perf_counter() - started
        bar.update(1)
        if record is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}")

    def _next_step_batches(self) -> list[dict]:
        """The micro-batches of the next optimizer step, and advance the data position past them."""
        epoch, start = self.state["epoch"], self.state["batch"]
        stop = min(start + self.args.gradient_accumulation_steps, len(self.batches))
        batches = [batch for _, batch in islice(self.batches.epoch(epoch, start), stop - start)]
        self.state["epoch"], self.state["batch"] = (epoch, stop) if stop < len(self.batches) else (epoch + 1, 0)
        return batches

    def _optimizer_step(self, batches: list[dict]) -> tuple:
        """One optimizer step: (loss, tokens, grad norm); with cuda_graphs (a Pending of loss and grad
        norm, tokens, None), read when the loop needs the numbers."""
        self.state["lr"] = self._learning_rate()  # the rate this step uses
        items = [count_items(b, self.args.task) for b in batches]
        total, tokens = max(sum(items), 1), sum(count_tokens(b) for b in batches)
        if self.drop_full_masks:
            batches = [graphed.without_full_mask(b) for b in batches]
        if self.graphs is not None and all(items):  # a micro-batch without labels would put NaN in a graph
            pending = self.graphs.run(batches, [n / total for n in items])
            self.scheduler.step()
            self.state["global_step"] += 1
            return pending, tokens, None
        if self.dist.active:  # weights count the items of every rank's micro-batches
            total, tokens = (int(v) for v in distributed.sum_over_ranks([sum(items), tokens], self.device))
            total = max(total, 1)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, (batch, n) in enumerate(zip(batches, items)):
            with distributed.grad_sync(self.engine, self.dist, i == len(batches) - 1):
                if n > 0:
                    loss = loss + self._backward_tensor(self._to_device(batch), n / total)
                elif self.dist.active:
                    self._backward_without_items(self._to_device(batch))
        loss_value = float(loss)
        if self.dist.active:
            loss_value = distributed.sum_over_ranks([loss_value], self.device)[0]
        grad_norm = self._clip_and_update()
        self.scheduler.step()
        self.state["global_step"] += 1
        hook = getattr(self.model, "after_optimizer_step", None)
        if hook is not None:  # before zero_grad: AdaLoRA's allocator reads the step's gradients
            hook(self.state["global_step"])
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, tokens, distributed.as_float(grad_norm)

    def _learning_rate(self) -> float:
        """The rate of the next step, read on the host: a cuda_graphs rate is a GPU tensor, whose read
        would wait for the step in flight, so it is recomputed from the schedule as LambdaLR sets it."""
        lr = self.optimizer.param_groups[0]["lr"]
        if not isinstance(lr, torch.Tensor):
            return float(lr)
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def _step_on_device(self, batches: list[dict], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole step with no host read (what `graphed` records): (weighted loss, grad norm) tensors."""
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, batch in enumerate(batches):
            loss = loss + self._backward_tensor(batch, weights[i])
        grad_norm = self._clip_and_update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _backward_tensor(self, batch: dict, weight: float | torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; its loss x weight, detached, as a float32 tensor."""
        with self._autocast():
            out = self.engine(**batch)
            loss = _output(out, "loss")
            if loss is None:
                raise ValueError("the model returned no loss; give the batches a 'labels' entry")
            extra = self._adapter_loss()
            total = loss if extra is None else loss + extra
        # DDP / FSDP2 average gradients over ranks; x world turns the average into the global sum
        self.scaler.scale(total.float() * (weight * self.dist.world_size)).backward()
        return loss.detach().float() * weight

    def _backward_without_items(self, batch: dict) -> None:
        """A zero gradient for a micro-batch with no label tokens: every rank must join the sync."""
        with self._autocast():
            logits = _output(self.engine(**batch), "logits")
        if logits is None:
            raise ValueError("a micro-batch has no label tokens and the model returned no logits to "
                             "back-propagate a zero through; drop examples whose labels are all -100")
        self.scaler.scale(logits.float().sum() * 0.0).backward()

    def _adapter_loss(self):
        hook = getattr(self.model, "adapter_loss", None)
        return hook() if hook is not None else None

    def _clip_and_update(self) -> torch.Tensor:
        """Clip the global grad norm, step the optimizer; the norm before clipping, as a tensor."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.args.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _after_step(self, loss: float, grad_norm: float, tokens_per_s: float, step: int, lr: float) -> dict | None:
        window = self.state["window"]
        window[0], window[1] = window[0] + loss, window[1] + 1
        if step % self.args.logging_steps and step != self.total_steps:
            return None
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": window[0] / window[1],
                  "lr": lr, "grad_norm": grad_norm,
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
        best = self._best_dir()
        with distributed.gathered(self.model, self.dist):
            self.best_weights, self.best_method = ckpt.trainable_state(self.model), self._method_state()
            if best is not None and self.is_main:
                state = {"state": {"global_step": self.state["global_step"], "metric": self.args.best_metric,
                                   "value": self.state["best_value"]}, "method": self.best_method}
                ckpt.write_checkpoint(best, self.model, state)
        if self.dist.active:
            distributed.barrier()

    @torch.no_grad()
    def evaluate(self, dataset: Sequence | None = None) -> dict[str, float]:
        """Task metrics on ``dataset`` (default: the eval dataset): loss, plus accuracy/F1 or perplexity."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval dataset")
        was_training, acc = self.model.training, EvalAccumulator(self.args.task)
        self.model.eval()
        for batch, counted in self._eval_batches(dataset):
            batch = self._to_device(batch)
            with self._autocast():
                out = self.model(**batch)
            if counted:
                acc.add(_output(out, "loss"), count_items(batch, self.args.task), _output(out, "logits"),
                        batch.get("labels"))
        self.model.train(was_training)
        if self.dist.active:
            self._sum_over_ranks(acc)
        return acc.result()

    def _eval_batches(self, dataset: Sequence):
        """``(batch, counted)``: all batches in one process, this rank's shard under torchrun."""
        bs, d = self.args.eval_batch_size, self.dist
        if not d.active:
            return ((batch, True) for batch in eval_batches(dataset, bs, self.collate_fn))
        n_batches = eval_batch_count(len(dataset), bs, 0, d.world_size)  # rank 0 has the most
        return eval_shard_batches(dataset, bs, self.collate_fn, d.rank, d.world_size, n_batches)

    def _sum_over_ranks(self, acc: EvalAccumulator) -> None:
        """Add up the ranks' loss sums, item counts and confusion counts (not their averages)."""
        mine = acc.confusion.shape[0] if acc.confusion is not None else 0
        classes = distributed.max_over_ranks(mine, self.device)
        acc.merge_counts(distributed.sum_over_ranks(acc.counts(classes), self.device), classes)

    # ------------------------------------------------------------------------------------ finishing
    def _finish(self) -> TrainResult:
        if self.args.load_best_at_end and self.best_weights is not None:
            self._load_state(self.best_weights, self.best_method)
        if self.output_dir is not None and self.is_main and self.log.path.exists():
            plot_curves(read_metrics(self.log.path), self.output_dir / PLOT_FILE)
        self.log.close()
        s = self.state
        return TrainResult(
            global_step=s["global_step"], train_loss=s.get("last_train_loss"), eval_metrics=s["last_eval"],
            best_metric=s["best_value"], best_step=s["best_step"], stopped_early=s["stopped_early"],
            train_seconds=s["elapsed"], peak_memory_bytes=peak_memory_bytes(self.device),
        )
