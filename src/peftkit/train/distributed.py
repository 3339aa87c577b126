"""Data parallelism on PyTorch's own stack: torchrun's environment, DDP and FSDP2.

Launched by ``torchrun --nproc-per-node N``, every process reads RANK, WORLD_SIZE and LOCAL_RANK,
joins one process group (NCCL on CUDA, gloo on CPU) and trains a full replica (DDP) or a shard
(FSDP2 ``fully_shard``) of the model on its own shard of each epoch. Both average the gradients over
the ranks, so the trainer scales each rank's loss by the world size to get the gradient of the
global batch:

    grad = sum_r sum_i grad(loss_ri) * items_ri / sum_all items      (what one process would get)
         = mean_r [ world * sum_i grad(loss_ri) * items_ri / sum_all items ]   (what DDP averages)

Nothing here runs unless a process group exists: single-process training never imports DDP/FSDP.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)
MODES = ("auto", "ddp", "fsdp", "none")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job; ``mode`` is none, ddp or fsdp (auto resolved)."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------ environment
def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) set by torchrun, or None outside it."""
    if "WORLD_SIZE" not in os.environ:
        return None
    values = []
    for key in ENV_KEYS:
        raw = os.environ.get(key, "0")
        if not raw.isdigit():
            raise ValueError(f"environment variable {key}={raw!r} is not a non-negative integer; "
                             "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK")
        values.append(int(raw))
    return values[0], values[1], values[2]


def world_size() -> int:
    """Processes in the job: the process group's size, else 1."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 of the process group (or of torchrun's environment before the group starts)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    env = torchrun_env()
    return env is None or env[0] == 0


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for auto/cuda on a GPU machine, else cpu."""
    if name.startswith("cuda:"):
        raise ValueError(f"device={name!r} under torchrun: each rank uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device(name if name != "auto" else "cpu")


@contextlib.contextmanager
def distributed_session(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[torch.device | None]:
    """Join torchrun's process group for the block and leave it afterwards, also on errors.

    Yields this rank's device, or None when not launched by torchrun (then nothing happens). The
    device is pinned before the group starts so that NCCL binds each rank to its own GPU.
    """
    env = torchrun_env()
    if env is None or dist.is_initialized():
        yield None
        return
    rank, size, local_rank = env
    target = rank_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=target if target.type == "cuda" else None)
    try:
        yield target
        # Leave together: a rank that tears gloo down while its peer is still finishing a collective
        # aborts that peer ("terminate called without an active exception"; seen in CI). Only on the
        # normal path: after an error the peer may be gone, and a barrier would wait for it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_without_finalizing(code: int = 0) -> None:
    """End this torchrun rank now, with output flushed but without interpreter finalization.

    Why: objects that still hold c10d state after ``distributed_session`` (FSDP2 modules, DTensors,
    the Trainer) are otherwise destroyed while Python tears itself down, and a gloo rank can abort
    there: SIGABRT, "terminate called without an active exception", with no Python frame left on the
    main thread (seen in CI after an FSDP2 bf16 run had finished and saved everything). Checkpoints,
    adapters and metrics are written and closed before this point, so nothing is lost by skipping
    finalization.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resolve(mode: str) -> Dist:
    """Check ``TrainingArguments.distributed`` against how the process was launched."""
    if mode not in MODES:
        raise ValueError(f"TrainingArguments.distributed must be one of {', '.join(MODES)}; got {mode!r}")
    env = torchrun_env()
    if not dist.is_initialized():
        if env is not None and env[1] > 1:
            raise ValueError(f"launched by torchrun with WORLD_SIZE={env[1]} but no process group exists: run "
                             "`peftkit train`, or wrap the training in peftkit.train.distributed.distributed_session()")
        if mode in ("ddp", "fsdp"):
            raise ValueError(f"distributed={mode!r} needs a process group: launch with "
                             f"`torchrun --nproc-per-node N -m peftkit.cli.main train ...` (or use distributed='auto')")
        return Dist()
    rank, size = dist.get_rank(), dist.get_world_size()
    if mode == "none":
        if size > 1:
            raise ValueError(f"distributed='none' with {size} processes: each would train the same copy and race "
                             "on the output folder; use auto, ddp or fsdp, or launch a single process")
        return Dist()
    local_rank = env[2] if env is not None else rank
    return Dist("ddp" if mode == "auto" else mode, rank, size, local_rank)


# ----------------------------------------------------------------------------------- wrapping
def wrap(model: nn.Module, d: Dist, device: torch.device, precision: str, find_unused: bool) -> nn.Module:
    """The module the training step calls: DDP around ``model``, or ``model`` itself sharded by FSDP2."""
    if d.mode == "fsdp":
        shard_fsdp(model, precision)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters=False: every adapter tensor takes part in every forward (adapter layers
    # sit on the path of each input), so DDP can skip its per-step search of the autograd graph.
    # A method with trainable tensors that some steps do not use needs ddp_find_unused_parameters.
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers declares unsplittable (``_no_split_modules``), in order."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp(model: nn.Module, precision: str) -> None:
    """``fully_shard`` each transformer block, then the root (embeddings, head, what is left).

    Frozen base weights are sharded too; FSDP2 keeps ``requires_grad`` per parameter, so only the
    adapters get gradients (reduce-scattered in fp32 when the parameters compute in bf16).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ValueError("distributed='fsdp' does not support precision='fp16' (its GradScaler is not "
                         "shard-aware); use --precision bf16")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    if not blocks:
        logger.warning("FSDP: no transformer blocks found (_no_split_modules); sharding the model as one unit")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


@contextlib.contextmanager
def grad_sync(engine: nn.Module, d: Dist, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on non-final micro-batches of a step."""
    if d.mode == "ddp" and not enabled:
        with engine.no_sync():
            yield
    elif d.mode == "fsdp":
        engine.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


# --------------------------------------------------------------------------------- collectives
def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def as_float(value) -> float:
    """A scalar tensor (a DTensor under FSDP2) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


# ------------------------------------------------------------------------------------ data shards
def shard(order: list[int], rank: int, size: int) -> list[int]:
    """This rank's share of an epoch order, as ``DistributedSampler(shuffle=True, drop_last=False)``.

    The order is padded with its own first entries to a multiple of ``size``, then rank r takes
    entries r, r+size, ...; so micro-batch j of all ranks together is entries [j*B*size, (j+1)*B*size)
    of the global order, the batch one process with batch size B*size would take.
    """
    padded = order + order[: (-len(order)) % size]
    return padded[rank::size]


# ------------------------------------------------------------------------------- state & weights
def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state.

    FSDP2 keeps the root unit unsharded after a forward without backward (an evaluation), and then
    its parameters are plain (bf16, under mixed precision) tensors: state-dict reads and writes and
    ``gathered`` must see the fp32 shards instead.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def root_unsharded(model: nn.Module, d: Dist) -> Iterator[None]:
    """Gather the FSDP2 root unit's own parameters (embeddings, head) for the block (a collective).

    ``generate`` calls the wrapped transformers model, not the root's ``forward``, so the root's
    pre-forward hook that would gather them never runs; the transformer blocks gather themselves.
    """
    if d.mode != "fsdp":
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) trainable state into the model; each rank slices its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reshard(model)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, unsharded on CPU and keyed by parameter name (world-size independent)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    reshard(model)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    reshard(model)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def named_optimizer_state(model: nn.Module, state: dict) -> dict:
    """A single-process ``optimizer.state_dict()`` (keyed by index) re-keyed by parameter name."""
    names = _trainable_names(model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def indexed_optimizer_state(model: nn.Module, state: dict) -> dict:
    """The inverse of ``named_optimizer_state``: for ``optimizer.load_state_dict`` in one process."""
    index = {n: i for i, n in enumerate(_trainable_names(model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _sharded_params(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Parameters FSDP2 sharded that saving reads: the trainable ones and every adapter tensor."""
    from torch.distributed.tensor import DTensor

    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(model, "peft_config"):
        from peftkit.io.hf_format import adapter_tensor_map

        for name in model.peft_config:
            wanted.update(id(t) for t in adapter_tensor_map(base, name).values())
    found = []
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in wanted and isinstance(param, DTensor):
                found.append((module, pname, param))
    return found


@contextlib.contextmanager
def gathered(model: nn.Module, d: Dist) -> Iterator[None]:
    """Within the block the model holds full adapter tensors on every rank (FSDP2; a no-op else).

    ``DTensor.full_tensor()`` all-gathers each sharded adapter parameter; the full copy is set on the
    module in place of the shard and the shard is put back on exit. So ``save_pretrained`` and
    ``trainable_state`` run unchanged and write exactly the single-process files. Every rank must
    enter the block (it is a collective); only the adapters are gathered, never the frozen base.
    """
    if d.mode != "fsdp":
        yield
        return
    reshard(model)
    sharded = _sharded_params(model)
    with torch.no_grad():
        full = [nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad) for _, _, p in sharded]
    for (module, pname, _), tensor in zip(sharded, full):
        module._parameters[pname] = tensor  # the same slot FSDP2 swaps between sharded/unsharded
    try:
        yield
    finally:
        for module, pname, param in sharded:
            module._parameters[pname] = param
