"""Checkpoints: adapter, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint is a folder ``step-00000042/`` holding ``trainer_state.pt`` (the trainable tensors,
optimizer, scheduler, grad scaler, RNG states, data position and early-stopping state) and, for
PEFT models, ``adapter/`` written by ``save_pretrained``. It is written into a hidden temporary
folder beside its final name and renamed into place, so a process killed at any moment leaves either
the whole checkpoint or none of it; leftovers of killed writes start with ``.`` and are ignored.
``trainer_state.pt`` is read with ``weights_only=True`` (numpy's RNG state allowed), and one that
cannot be read or lacks part of the state raises ``CheckpointDamaged``, so that resuming can fall
back to an earlier checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
PREFIX = "step-"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` once the block finishes without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes: every parameter with ``requires_grad``, copied to CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def check_trainable_keys(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name, after checking ``state`` has exactly those names
    and shapes (a different rank keeps the names but not the shapes)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    shapes = [f"{n}: checkpoint {tuple(state[n].shape)}, model {tuple(p.shape)}" for n, p in params.items()
              if n in state and tuple(state[n].shape) != tuple(p.shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:3]}; resume with the same model, method and options the run started with"
        )
    return params


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = check_trainable_keys(model, state)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically; ``state`` is the trainer's resumable state."""
    return write_checkpoint(Path(root) / f"{PREFIX}{step:08d}", model, state)


def write_checkpoint(final: Path, model: torch.nn.Module, state: dict) -> Path:
    """Write one checkpoint folder atomically (used for ``step-*`` and for ``best/``)."""
    with atomic_dir(final) as tmp:
        torch.save({**state, "trainable": trainable_state(model), "rng": rng_state()}, tmp / STATE_FILE)
        if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
            model.save_pretrained(str(tmp / "adapter"))
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).glob(".*.tmp-*"):  # leftovers of writes killed half-way
        shutil.rmtree(path, ignore_errors=True)


# Trainer checkpoints hold tensors, numbers, strings and numpy's RNG state; nothing else is unpickled.
REQUIRED = ("state", "trainable", "scheduler", "scaler", "rng")


class CheckpointDamaged(ValueError):
    """A checkpoint that cannot be read or lacks part of its state (as opposed to one that is whole
    but does not fit the model): resuming may fall back to an earlier one."""


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path) -> dict:
    """``trainer_state.pt`` of a checkpoint folder, read without running pickled code."""
    file = Path(path) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated, garbled or foreign files
        raise CheckpointDamaged(f"{file} cannot be read ({' '.join(str(err).split())[:200]}); the checkpoint "
                                "is damaged or was not written by peftkit") from err
    if not isinstance(saved, dict) or "trainable" not in saved:
        raise CheckpointDamaged(f"{file} is not a peftkit trainer state (no 'trainable' tensors)")
    return saved


def check_resumable(saved: dict, path: Path) -> None:
    """Raise CheckpointDamaged unless ``saved`` holds everything a resume restores."""
    lacking = [k for k in REQUIRED if k not in saved]
    if "optimizer" not in saved and "optimizer_by_name" not in saved:
        lacking.append("optimizer")
    if not lacking and "global_step" not in (saved["state"] if isinstance(saved["state"], dict) else {}):
        lacking.append("state.global_step")
    if lacking:
        raise CheckpointDamaged(f"{Path(path) / STATE_FILE} lacks {', '.join(lacking)}: the checkpoint is incomplete")
