"""The adapter factors in the activations' dtype, made once per forward pass instead of per call.

A LoRA node computes with A and s B in the activations' dtype (bf16) while the trained factors
stay float32. Casting them in every call costs three small ops per product (A's cast, and s B's
empty + multiply): ~370 of the ~1,100 ops an eager 1B step issues, each 10-25 us of host time on
the hosts measured (benchmarks/host_cost_gpu.py). Within one forward pass the factors do not
change, so:

  * `scope()` brackets a forward pass (the engine's forward enters it). Outside any scope, `cast`
    casts afresh on every call, exactly as before.
  * Inside, `cast(param, dtype, scale, transpose)` returns a kept copy, round(scale * param)
    (transposed, contiguous, if asked). The first call of a pass re-makes every copy that the
    previous pass read, all at once: one concatenation into a new flat buffer of the target dtype
    (plus one multi-tensor multiply where a scale is not 1), and views into it. That is three or
    four launches for every adapted linear of the model instead of three per product.
  * Every pass makes new copies, whether or not a version counter moved: edits through
    ``param.data`` (which bump none) are never missed between passes. Within a pass a copy is
    re-made if its parameter's version counter moved or its storage changed.
  * Copies are never written after they are handed out, so a node may save one for backward: two
    forward passes before one backward (DPO's chosen and rejected, say) each keep their own.

Values are bit-identical to casting per call: the same float32 product, rounded once.
The cache is bypassed while a CUDA graph is being recorded (a replay runs no Python, so a kept copy
would freeze the factors) and under torch.compile tracing. Entries die with their parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

ENABLED = True  # False: a fresh cast per call everywhere (the A/B of benchmarks/host_cost_gpu.py)
_STATE = {"depth": 0, "pass": 0}  # open scopes; the current forward pass's number
_ALIGN = 128  # bytes: where each kept copy starts in its flat buffer (rank_gemm reads them through TMA)


@dataclass
class _Entry:
    copy: torch.Tensor
    scale: float
    transpose: bool
    version: int = -1                  # the parameter's version counter when the copy was made
    made: int = -1                     # the pass that made the copy
    used: int = -1                     # the last pass that read it
    address: int = -1                  # the parameter's storage as planned (below)
    shape: torch.Size = torch.Size()
    source: torch.Tensor | None = None  # the parameter as one flat view, where it is contiguous
    pad: torch.Tensor | None = None     # what follows the copy in the flat buffer, to _ALIGN bytes

    def current(self, param: torch.Tensor) -> bool:
        return self.made == _STATE["pass"] and param._version == self.version and self.planned_for(param)

    def planned_for(self, param: torch.Tensor) -> bool:
        return param.data_ptr() == self.address and param.shape == self.shape

    def plan(self, param: torch.Tensor, dtype: torch.dtype) -> None:
        """What every refresh of this copy reuses while the parameter keeps its storage."""
        detached = param.detach()
        self.address, self.shape = param.data_ptr(), param.shape
        self.source = detached.view(-1) if detached.is_contiguous() and not self.transpose else None
        step = _ALIGN // torch.empty((), dtype=dtype).element_size()   # elements of the copy per _ALIGN
        gap = (step - param.numel() % step) % step
        self.pad = _pad(param.device, param.dtype, step)[:gap]

    def flat_source(self, param: torch.Tensor) -> torch.Tensor:
        if self.source is not None:
            return self.source
        return (param.detach().t() if self.transpose else param.detach()).reshape(-1)  # a copy


_PADS: dict[tuple, torch.Tensor] = {}


def _pad(device: torch.device, dtype: torch.dtype, size: int) -> torch.Tensor:
    key = (device, dtype, size)
    if key not in _PADS:
        _PADS[key] = torch.zeros(size, dtype=dtype, device=device)
    return _PADS[key]


_ENTRIES = WeakIdKeyDictionary()  # param -> {(dtype, scale, transpose): _Entry}, by identity


@contextmanager
def scope() -> Iterator[None]:
    """One forward pass: inside, `cast` serves kept copies, made once per pass (nested scopes belong
    to the outermost one)."""
    if _STATE["depth"] == 0:
        _STATE["pass"] += 1
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1


def fresh_cast(param: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """round(scale * param) in ``dtype`` (its transpose if asked), contiguous: one kernel. Detached:
    the nodes return the factors' gradients themselves."""
    src = param.detach().t() if transpose else param.detach()
    out = torch.empty(src.shape, dtype=dtype, device=param.device)
    return out.copy_(src) if scale == 1.0 else torch.mul(src, scale, out=out)


def _cacheable(param: torch.Tensor) -> bool:
    if not ENABLED or _STATE["depth"] == 0 or param.is_inference() or torch.compiler.is_compiling():
        return False
    return not (param.is_cuda and torch.cuda.is_current_stream_capturing())


def cast(param: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """`fresh_cast(param, dtype, scale, transpose)`; inside a `scope`, a copy kept for the pass.

    The result may be shared (or be ``param`` itself when nothing is to change): read it, save it
    for backward, never write to it.
    """
    if param.dtype == dtype and scale == 1.0 and not transpose:
        return param  # already what is asked: nothing to make
    if not _cacheable(param):
        return fresh_cast(param, dtype, scale, transpose)
    entries = _ENTRIES.setdefault(param, {})
    key = (dtype, scale, transpose)
    entry = entries.get(key)
    if entry is None:
        entries[key] = entry = _Entry(fresh_cast(param, dtype, scale, transpose), scale, transpose,
                                      version=param._version, made=_STATE["pass"], used=_STATE["pass"])
        entry.plan(param, dtype)
        return entry.copy
    entry.used = _STATE["pass"]  # before refresh, which re-makes what this pass or the last read
    if not entry.current(param):
        refresh()  # the first cast of this pass: this copy and every other the last pass read
    return entry.copy


def cast_rows(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat([cast(p, dtype) for p in params])``: a view, without a copy, where the kept copies
    lie back to back in one flat buffer (the factors of a shared node, cast in order, usually do)."""
    copies = [cast(p, dtype) for p in params]
    base = copies[0]._base
    end = copies[0].storage_offset()
    for c in copies:
        if base is None or c._base is not base or c.storage_offset() != end or c.shape[1:] != copies[0].shape[1:]:
            return torch.cat(copies)
        end += c.numel()
    start = copies[0].storage_offset()
    return base[start:end].view(-1, *copies[0].shape[1:])


def refresh() -> None:
    """Re-make every copy that is not current and was read in this pass or the last (the adapters
    in use), per (device, dtype): the float32 sources (scaled where asked) concatenated into one new
    flat buffer of the target dtype, each copy a view of its part, each part on _ALIGN bytes
    (rank_gemm reads A and s B through TMA). Others wait for their next `cast`; so do copies whose
    parameter holds no values now (FSDP2 frees a layer's gathered parameters until it runs)."""
    now = _STATE["pass"]
    groups: dict[tuple, list[tuple[torch.Tensor, _Entry]]] = {}
    for param, entries in list(_ENTRIES.items()):
        for (dtype, _, _), entry in entries.items():
            if entry.used >= now - 1 and not entry.current(param) and param.untyped_storage().nbytes():
                groups.setdefault((param.device, dtype), []).append((param, entry))
    with torch.no_grad():
        for (device, dtype), pairs in groups.items():
            for p, e in pairs:
                if not e.planned_for(p):  # new storage: plan again
                    e.plan(p, dtype)
            srcs = [e.flat_source(p) for p, e in pairs]
            scales = [e.scale for _, e in pairs]
            if any(s != 1.0 for s in scales):
                srcs = torch._foreach_mul(srcs, scales)  # float32: rounded once, by the concatenation
            sizes = [n for src, (_, e) in zip(srcs, pairs) for n in (src.numel(), e.pad.numel())]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            torch.cat([t for src, (_, e) in zip(srcs, pairs) for t in (src, e.pad)], out=flat)
            for (p, e), part in zip(pairs, flat.split(sizes)[0::2]):
                e.copy = part.view(p.shape[::-1] if e.transpose else p.shape)
                e.version, e.made = p._version, now


def clear() -> None:
    """Drop every kept copy (tests; or to free them while no LoRA node runs)."""
    _ENTRIES.clear()
    _PADS.clear()
