"""The Trainer's optimizer steps replayed from CUDA graphs (``TrainingArguments.cuda_graphs``).

Why: an eager LoRA step of a 1B Llama issues a few thousand kernels from Python, and on a busy or
slow host the GPU waits for them (benchmarks/NOTES.md, runs 12-13). A replayed graph issues the
whole step (forward, backward, clipping, AdamW) with one call.

How a step runs, per shape of its micro-batches (tensor shapes and dtypes, non-tensor values):
  * the first time: eagerly, as a real step (it updates the adapter; it also compiles the Triton
    kernels and creates the optimizer state, which recording needs done);
  * the second time: recorded, then replayed once (recording runs no kernel, so this is the step);
  * after that: the batch is copied into the recorded inputs and the graph replayed.
All graphs share one memory pool: steps run one at a time, so each may reuse what the others use
between their replays. Past ``MAX_SHAPES`` shapes, new shapes stay eager (pad batches to a multiple
to keep the count small: the collators' ``pad_to_multiple_of``).

Inside the step nothing waits for the host: the loss weights are a tensor input, AdamW is
``capturable`` with its learning rate a tensor that the schedule fills between steps, and the loss
and gradient norm come back as a ``Pending`` read: copied to pinned host memory behind the replay,
so the Trainer can issue the next step before it waits for this one's numbers (the GPU then never
idles while the host logs and collates). Gradients live only inside the graphs (None between steps).
``check_supported`` refuses what cannot be recorded, before any training.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)
MAX_SHAPES = 16


def check_supported(device: torch.device, distributed_active: bool, model: torch.nn.Module) -> None:
    """Raise ValueError, naming the reason and the fix, where a step cannot be a CUDA graph."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; this run's device is {device}. "
                         "Set cuda_graphs=False (or device='cuda')")
    if distributed_active:
        raise ValueError("cuda_graphs=True runs in one process; under torchrun DDP/FSDP2 synchronise inside "
                         "the step. Set cuda_graphs=False")
    hooked = getattr(model, "adapters_with_step_hooks", None)
    if hooked is None and callable(getattr(model, "after_optimizer_step", None)):
        raise ValueError(f"cuda_graphs=True cannot call {type(model).__name__}.after_optimizer_step (host code "
                         "between steps that may read the gradients). Set cuda_graphs=False")
    names = hooked() if hooked is not None else []
    if names:
        raise ValueError(f"cuda_graphs=True cannot run the after-step hooks of adapter(s) {names} (they read each "
                         "step's gradients on the host: AdaLoRA, AdapterFusion annealing, diff pruning). "
                         "Set cuda_graphs=False for these methods")


def prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """AdamW as a recorded step needs it: capturable (step counters on the GPU; the Trainer's fused
    AdamW keeps them there already, also when resumed), the learning rate a GPU tensor filled in place
    by the schedule (a float would be frozen into the graph)."""
    from peftkit.kernels.graphs import make_capturable  # here: the Trainer imports this module at start-up

    make_capturable(optimizer)
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor) or group["lr"].device != device:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def plain_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Undo `prepare_optimizer`'s tensor rates (a checkpoint loaded into an eager run)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])


def mask_is_optional(model: torch.nn.Module) -> bool:
    """Whether the model (or a PEFT model's base) takes ``attention_mask=None`` to mean all ones, as
    transformers models do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the class's forward: patch_model replaces the instance's with a (*args, **kwargs) wrapper
    param = inspect.signature(type(base).forward).parameters.get("attention_mask")
    return param is not None and param.default is None


def without_full_mask(batch: dict) -> dict:
    """The batch without its ``attention_mask`` where that is all ones on the host. Why: transformers
    skips an all-ones mask (flash attention) only after reading it on the GPU, which a recording
    cannot do, so a recorded step would build and apply the full mask (measured: attention 2.5x
    slower, ~12 ms per 1B step); checked here on the host copy, for free."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def shape_key(batches: list[dict]) -> tuple:
    """What a recorded step is specific to: each micro-batch's keys, tensor shapes and dtypes, and
    its other values (fixed into the graph)."""
    return tuple(tuple((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                       for k, v in batch.items()) for batch in batches)


class Pending:
    """A step's (loss, grad norm), copied to the host behind the step; ``read`` waits for that copy only."""

    def __init__(self, values: torch.Tensor, event=None):
        self.values, self.event = values, event

    def read(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()
        return float(self.values[0]), float(self.values[1])


class HostReads:
    """Copies a step's (loss, grad norm) tensor to pinned host memory behind the step, for a later
    ``Pending.read`` that waits for that copy only; two buffers, so two steps may be unread at once.
    On a CPU device the tensor itself is the result."""

    def __init__(self, device: torch.device):
        self.device, self.count = device, 0
        pinned = device.type == "cuda"
        self.host = [torch.empty(2, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]

    def later(self, values: torch.Tensor) -> Pending:
        if self.device.type != "cuda":
            return Pending(values)
        self.count += 1
        host = self.host[self.count % 2]
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(host, event)


class _Recorded:
    def __init__(self, graph: torch.cuda.CUDAGraph, batches: list[dict], weights: torch.Tensor, out: torch.Tensor):
        self.graph, self.batches, self.weights, self.out = graph, batches, weights, out

    def replay(self, batches: list[dict], weights: torch.Tensor) -> torch.Tensor:
        for static, batch in zip(self.batches, batches):
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    static[key].copy_(value, non_blocking=True)
        self.weights.copy_(weights, non_blocking=True)
        self.graph.replay()
        return self.out


class GraphedSteps:
    """Runs ``step(batches, weights) -> (loss, grad_norm)`` (scalar GPU tensors) eagerly, recorded
    or replayed, as the module docstring says; ``run`` returns the two as a ``Pending`` read."""

    def __init__(self, step: Callable[[list[dict], torch.Tensor], tuple], device: torch.device):
        self.step, self.device = step, device
        self.reads = HostReads(device)
        self.stream = torch.cuda.Stream(device)
        self.seen: set[tuple] = set()
        self.recorded: dict[tuple, _Recorded] = {}
        self.pool = None
        self.warned = False
        self.replays = 0

    def run(self, batches: list[dict], weights: list[float]) -> Pending:
        """One optimizer step on ``batches`` (host or device tensors) with these loss weights; its
        (loss, grad norm) to read when needed. At most two steps may be unread at a time."""
        key = shape_key(batches)
        weight_tensor = torch.tensor(weights, dtype=torch.float32)
        recorded = self.recorded.get(key)
        if recorded is None and key in self.seen and len(self.recorded) < MAX_SHAPES:
            recorded = self.recorded[key] = self._record(batches, weight_tensor)
        if recorded is not None:
            values = recorded.replay(batches, weight_tensor)
            self.replays += 1
        else:
            self._note_shape(key)
            values = self._eager(batches, weight_tensor)
        return self.reads.later(values)

    def _values(self, batches: list[dict], weights: torch.Tensor) -> torch.Tensor:
        """The step, its (loss, grad norm) as one float32 tensor of 2: one copy to the host."""
        return torch.stack([t.float() for t in self.step(batches, weights)])

    def _note_shape(self, key: tuple) -> None:
        if key in self.seen or len(self.seen) < MAX_SHAPES:
            self.seen.add(key)
        elif not self.warned:
            self.warned = True
            logger.warning("cuda_graphs: batches came in more than %d shapes; steps of new shapes run eagerly. "
                           "Pad batches to a multiple of their length (pad_to_multiple_of) to reuse graphs", MAX_SHAPES)

    def _on_device(self, batches: list[dict], weights: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
        moved = [{k: v.to(self.device, non_blocking=True).clone() if isinstance(v, torch.Tensor) else v
                  for k, v in batch.items()} for batch in batches]
        return moved, weights.to(self.device).clone()

    def _eager(self, batches: list[dict], weights: torch.Tensor) -> torch.Tensor:
        """A real step on the recording stream: what a later recording will find (kernels compiled,
        optimizer state made, per-stream cuBLAS workspaces) is made on the stream it records on."""
        batches, weights = self._on_device(batches, weights)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = self._values(batches, weights)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def _record(self, batches: list[dict], weights: torch.Tensor) -> _Recorded:
        static, static_weights = self._on_device(batches, weights)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs' pool takes their place
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = self._values(static, static_weights)
        except RuntimeError as err:
            raise RuntimeError(f"cuda_graphs: the training step could not be recorded as a CUDA graph ({err}). "
                               "Something in the model's forward or the method waits for the host (e.g. "
                               ".item(), a boolean mask index); train it with cuda_graphs=False") from err
        if self.pool is None:
            self.pool = graph.pool()
        logger.info("cuda_graphs: recorded the step for batch shape %s", _describe(batches))
        return _Recorded(graph, static, static_weights, out)


def _describe(batches: list[dict[str, Any]]) -> str:
    first = batches[0]
    shapes = {k: tuple(v.shape) for k, v in first.items() if isinstance(v, torch.Tensor)}
    return f"{shapes} x {len(batches)} micro-batch(es)"
