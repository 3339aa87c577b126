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
    previous pass read (the last one that cast anything: a pass of the base alone does not
    count), all at once: one concatenation into a flat buffer of the target dtype (plus
    one multi-tensor multiply where a scale is not 1), and views into it. That is one or two
    launches for every adapted linear of the model instead of three per product. The buffer is
    the previous pass's own when nothing holds any of its copies any more (the usual training
    step: its backward has freed them), else a new one; then the views are kept too, and a cast
    within the pass is one dictionary lookup.
  * Every pass makes new copies, whether or not a version counter moved: edits through
    ``param.data`` (which bump none) are never missed between passes. Within a pass a copy is
    re-made if its parameter's version counter moved or its storage changed.
  * Copies are never written while anyone holds them (a saved tensor for backward, a Python
    variable): two forward passes before one backward (DPO's chosen and rejected, say) each keep
    their own. Each cast hands out its own alias of the copy, so torch's count of the tensors
    sharing the buffer's storage tells whether anyone still does.

Values are bit-identical to casting per call: the same float32 product, rounded once.
The cache is bypassed while a CUDA graph is being recorded (a replay runs no Python, so a kept copy
would freeze the factors) and under torch.compile tracing. Entries die with their parameters.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

ENABLED = True  # False: a fresh cast per call everywhere (the A/B of benchmarks/host_cost_gpu.py)
# open scopes; the current forward pass's number; the last two passes that cast anything (a pass of
# the base alone, a DPO reference pass say, casts nothing and does not count)
_STATE = {"depth": 0, "pass": 0, "casting": 0, "cast_before": 0}
_ALIGN = 128  # bytes: where each kept copy starts in its flat buffer (rank_gemm reads them through TMA)


@dataclass(eq=False)
class _Entry:
    copy: torch.Tensor
    scale: float
    transpose: bool
    param: weakref.ref                 # the parameter it is a copy of
    dtype: torch.dtype
    key: tuple                         # its key in _SERVED
    version: int = -1                  # the parameter's version counter when the copy was made
    made: int = -1                     # the pass that made the copy
    used: int = -1                     # the last pass that read it
    address: int = -1                  # the parameter's storage as planned (below)
    shape: torch.Size = torch.Size()
    source: torch.Tensor | None = None  # the parameter as one flat view, where it is contiguous
    pad: torch.Tensor | None = None     # what follows the copy in the flat buffer, to _ALIGN bytes
    group: "_Group | None" = None       # the flat buffer the copy lies in, once it lies in one
    offset: int = 0                     # where, in elements

    def current(self, param: torch.Tensor) -> bool:
        return self.made == _STATE["pass"] and param._version == self.version and self.planned_for(param)

    def planned_for(self, param: torch.Tensor) -> bool:
        return param.data_ptr() == self.address and param.shape == self.shape

    def plan(self, param: torch.Tensor) -> None:
        """What every refresh of this copy reuses while the parameter keeps its storage."""
        detached = param.detach()
        self.address, self.shape = param.data_ptr(), param.shape
        self.source = detached.view(-1) if detached.is_contiguous() and not self.transpose else None
        step = _ALIGN // torch.empty((), dtype=self.dtype).element_size()   # elements of the copy per _ALIGN
        gap = (step - param.numel() % step) % step
        self.pad = _pad(param.device, param.dtype, step)[:gap]

    def flat_source(self, param: torch.Tensor) -> torch.Tensor:
        if self.source is not None:
            return self.source
        return (param.detach().t() if self.transpose else param.detach()).reshape(-1)  # a copy


class _Group:
    """One flat buffer of copies (one device and dtype) and the entries that lie in it, in order.

    A later pass writes its copies into the same buffer, instead of a new one, when it re-makes
    exactly these entries from the same storage and nothing outside holds any part of the buffer:
    every copy is handed out as its own alias (`cast`), so the storage's use count tells."""

    def __init__(self, pairs: list, device: torch.device, dtype: torch.dtype):
        self.entries = [e for _, e in pairs]
        self.sizes = [n for p, e in pairs for n in (p.numel(), e.pad.numel())]
        self.flat = torch.empty(sum(self.sizes), dtype=dtype, device=device)
        self.write(pairs)
        self._place(pairs)
        self.unshared = self.uses()   # the flat buffer and the entries' own views, no one else

    def _place(self, pairs: list) -> None:
        """Each entry's copy: its view of the flat buffer (a function of its own, so that no loop
        variable outlives it holding a part of the buffer when `uses` is first counted)."""
        offset = 0
        for (p, e), part in zip(pairs, self.flat.split(self.sizes)[0::2]):
            e.copy, e.group, e.offset = part.view(p.shape[::-1] if e.transpose else p.shape), self, offset
            offset += part.numel() + e.pad.numel()

    def uses(self) -> int:
        return _storage_uses(self.flat) if _storage_uses else -1

    def reusable(self, pairs: list) -> bool:
        return (len(pairs) == len(self.entries) and all(e is f for (_, e), f in zip(pairs, self.entries))
                and self.unshared >= 0 and self.uses() == self.unshared)

    def write(self, pairs: list) -> None:
        """The copies of `pairs` (planned), rounded once from float32, into the flat buffer."""
        srcs = [e.flat_source(p) for p, e in pairs]
        scales = [e.scale for _, e in pairs]
        if any(s != 1.0 for s in scales):
            srcs = torch._foreach_mul(srcs, scales)  # float32: rounded once, by the concatenation
        torch.cat([t for src, (_, e) in zip(srcs, pairs) for t in (src, e.pad)], out=self.flat)


def _storage_uses_of(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# tensors sharing a storage, counted by torch; without it (another torch) every pass takes a new buffer
_storage_uses = _storage_uses_of if hasattr(torch._C, "_storage_Use_Count") else None

_PADS: dict[tuple, torch.Tensor] = {}


def _pad(device: torch.device, dtype: torch.dtype, size: int) -> torch.Tensor:
    key = (device, dtype, size)
    if key not in _PADS:
        _PADS[key] = torch.zeros(size, dtype=dtype, device=device)
    return _PADS[key]


_LIVE: list[_Entry] = []           # every entry; those of dead parameters are dropped by `refresh`
_SERVED: dict[tuple, _Entry] = {}  # (id(param), dtype, scale, transpose) -> its entry: one lookup per cast
_GROUPS: dict[tuple, _Group] = {}  # (device, dtype) -> the flat buffer made last


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
    for backward, never write to it. A kept copy comes as its own alias, so that whoever still
    holds it when the next pass begins keeps the buffer it lies in from being reused.
    """
    if param.dtype == dtype and scale == 1.0 and not transpose:
        return param  # already what is asked: nothing to make
    if not _cacheable(param):
        return fresh_cast(param, dtype, scale, transpose)
    return _kept(param, dtype, scale, transpose).copy.detach()


def _kept(param: torch.Tensor, dtype: torch.dtype, scale: float, transpose: bool) -> _Entry:
    """The entry of this copy, current for this pass (made now if it is new)."""
    now = _STATE["pass"]
    key = (id(param), dtype, scale, transpose)
    entry = _SERVED.get(key)
    if entry is None or entry.param() is not param:  # new, or a dead parameter's id taken again
        entry = _Entry(fresh_cast(param, dtype, scale, transpose), scale, transpose, weakref.ref(param), dtype, key,
                       version=param._version, made=now)
        entry.plan(param)
        _SERVED[key] = entry
        _LIVE.append(entry)
    entry.used = now  # before refresh, which re-makes what this pass or the last casting one read
    if _STATE["casting"] != now:
        _STATE["cast_before"], _STATE["casting"] = _STATE["casting"], now
    if not entry.current(param):
        refresh()  # the first cast of this pass: this copy and every other the last pass read
    return entry


def cast_rows(params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat([cast(p, dtype) for p in params])``: a view, without a copy, where the kept copies
    lie back to back in one flat buffer (the factors of a shared node, cast in order, usually do)."""
    if not all(p.dtype != dtype and _cacheable(p) for p in params):
        return torch.cat([cast(p, dtype) for p in params])
    entries = [_kept(p, dtype, 1.0, False) for p in params]
    group, start, cols = entries[0].group, entries[0].offset, entries[0].copy.shape[1:]
    end = start
    for e in entries:
        if group is None or e.group is not group or e.offset != end or e.copy.shape[1:] != cols:
            return torch.cat([e.copy for e in entries])
        end += e.copy.numel()
    return group.flat[start:end].view(-1, *cols)


def refresh() -> None:
    """Re-make every copy that is not current and was read in this pass or the last that cast any
    (the adapters in use), per (device, dtype): the float32 sources (scaled where asked) concatenated into one
    flat buffer of the target dtype, each copy a view of its part, each part on _ALIGN bytes
    (rank_gemm reads A and s B through TMA). The buffer is the last pass's where that pass made the
    same copies and no one holds any of them now (`_Group.reusable`), else a new one. Others wait
    for their next `cast`; so do copies whose parameter holds no values now (FSDP2 frees a layer's
    gathered parameters until it runs)."""
    now, since = _STATE["pass"], _STATE["cast_before"]
    groups: dict[tuple, list[tuple[torch.Tensor, _Entry]]] = {}
    live = []
    for entry in _LIVE:
        param = entry.param()
        if param is None:  # dead: forget it
            if _SERVED.get(entry.key) is entry:
                del _SERVED[entry.key]
            continue
        live.append(entry)
        if entry.used >= since and not entry.current(param) and param.untyped_storage().nbytes():
            groups.setdefault((param.device, entry.dtype), []).append((param, entry))
    _LIVE[:] = live
    with torch.no_grad():
        for (device, dtype), pairs in groups.items():
            moved = False
            for p, e in pairs:
                if not e.planned_for(p):  # new storage: plan again
                    e.plan(p)
                    moved = True
            group = _GROUPS.get((device, dtype))
            if group is not None and not moved and group.reusable(pairs):
                group.write(pairs)
            else:
                _GROUPS[(device, dtype)] = _Group(pairs, device, dtype)
            for p, e in pairs:
                e.version, e.made = p._version, now


def clear() -> None:
    """Drop every kept copy (tests; or to free them while no LoRA node runs)."""
    _LIVE.clear()
    _SERVED.clear()
    _GROUPS.clear()
    _PADS.clear()
