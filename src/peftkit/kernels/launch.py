"""Launching our Triton kernels with less host work per call than ``kernel[grid](...)``.

Every eager step issues a few hundred Triton launches (norms, RoPE, SwiGLU, and per LoRA linear
the one-GEMM products and the rank-r reductions). Triton's own path binds and specialises every
argument, builds a cache key string and checks globals on each call. On the hosts measured
(benchmarks/host_cost_gpu.py) a launch took 17-29 us for a trivial kernel and 54-61 us for
rank_gemm; this path takes ~4-5 us less per launch.

`Kernel` wraps one ``@triton.jit`` entry point. Its first launch for a given specialisation goes
through Triton as usual (compiling if needed) and keeps the CompiledKernel Triton returns; later
launches with the same specialisation call that kernel's launcher directly. The specialisation
key is our own and errs on the fine side, so it can only split what Triton would share, never
share what Triton would split:

  * constexpr parameters: their value
  * tensors: dtype, and whether the address is 16-byte aligned (Triton's pointer attribute)
  * ints: == 1, divisible by 16, and which of i32 / i64 / u64 holds it (Triton's int attributes)
  * floats and bools: their type; anything else (None, dtypes, strings): itself
  * launch options (num_warps, num_stages, ...), and the current device

Triton's path is kept where this one would not be exact or cannot run: CPU tensors (the
interpreter), a launch hook installed (profilers read per-launch metadata), torch.compile tracing
(dynamo knows ``jit_fn[grid](...)``), or another Triton release than the one whose launcher
signature this calls (FAST_VERSIONS).
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton import knobs
    from triton.runtime import _allocation

    FAST_VERSIONS = ("3.6.",)  # launcher signature checked against these releases
    FAST = triton.__version__.startswith(FAST_VERSIONS)
except ImportError:  # no Triton: nothing is launched anyway
    FAST = False

_I32 = (-(2**31), 2**31)
_I64 = (-(2**63), 2**63)


def _int_key(v: int) -> object:
    """Triton's int attributes of v (== 1, divisible by 16, the narrowest of i32 / i64 / u64), as a
    small value: the common case, an i32, costs one comparison chain."""
    if _I32[0] <= v < _I32[1]:
        return 1 if v == 1 else 16 if v % 16 == 0 else 0
    return (v % 16 == 0, _I64[0] <= v < _I64[1])


def specialization_key(values: tuple, constexpr: tuple[bool, ...], options: tuple) -> tuple:
    """Our key for one launch: ``values`` in signature order, ``constexpr`` per position. Runs on
    every launch, so types are told apart by ``type(v) is`` first (exact types: a bool is not an int
    here) and only unusual arguments take the isinstance chain."""
    key = []
    for v, const in zip(values, constexpr):
        kind = type(v)
        if const:
            key.append(v)
        elif kind is int:
            key.append(_int_key(v))
        elif kind is torch.Tensor or kind is torch.nn.Parameter:
            key.append((v.dtype, v.data_ptr() % 16 == 0))
        elif kind is bool or kind is float:
            key.append(kind)
        elif isinstance(v, torch.Tensor):
            key.append((v.dtype, v.data_ptr() % 16 == 0))
        elif isinstance(v, bool):
            key.append(bool)
        elif isinstance(v, int):
            key.append(_int_key(v))
        elif isinstance(v, float):
            key.append(float)
        else:
            key.append(v)
    return (*key, *options)


class Kernel:
    """A Triton entry point launched as ``kernel[grid](*args, **kwargs)``, like the JITFunction it
    wraps (``fn``), with the fast path above after the first launch of each specialisation."""

    def __init__(self, fn):
        self.fn = fn
        params = getattr(fn, "params", None) or []
        self.names = tuple(p.name for p in params)
        self.name_set = frozenset(self.names)
        self.constexpr = tuple(bool(p.is_constexpr) for p in params)
        self.compiled: dict[tuple, tuple] = {}  # key -> (CompiledKernel, its launcher's parts or None)
        self.fast_launches = 0  # counted for the checks (benchmarks/check_kernels_gpu.py)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    @staticmethod
    def fast_path_allowed(grid, args: tuple) -> bool:
        """CUDA tensors (the first argument tells), a plain grid, no launch hook, a checked release."""
        if not FAST:  # no Triton (then nothing here is launched), or an unchecked release
            return False
        first = args[0] if args else None
        on_cuda = isinstance(first, torch.Tensor) and first.is_cuda
        hook = knobs.runtime.launch_enter_hook  # None, or a HookChain (3.6: always one; empty unless set)
        plain = not callable(grid) and not getattr(hook, "calls", hook)
        return on_cuda and plain and not torch.compiler.is_compiling()  # dynamo traces fn[grid]

    def launch(self, grid, args: tuple, kwargs: dict):
        if not self.fast_path_allowed(grid, args):
            return self.fn[grid](*args, **kwargs)
        try:
            values = args + tuple(kwargs[name] for name in self.names[len(args):])
        except KeyError:  # a parameter left to its default: Triton binds it
            return self.fn[grid](*args, **kwargs)
        device = _current_device()
        options = tuple((k, v) for k, v in kwargs.items() if k not in self.name_set) + (device,)
        key = specialization_key(values, self.constexpr, options)
        kept = self.compiled.get(key)
        if kept is None:  # Triton's path: compiles (or finds) the kernel for this specialisation
            compiled = self.fn[grid](*args, **kwargs)
            if compiled is not None and not hasattr(compiled, "result"):  # not an async compile
                self.compiled[key] = (compiled, launcher_parts(compiled))
            return compiled
        compiled, parts = kept
        grid = tuple(grid) + (1, 1)
        stream = _current_stream(device)
        if parts is None:
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                         None, *values)
        else:
            launch, coop, pdl, scratch_size, scratch_align, ctas = parts
            scratch = None  # device-side TMA descriptors' global scratch, as Triton's launcher allocates it
            if scratch_size:
                scratch = _scratch_allocator()(grid[0] * grid[1] * grid[2] * ctas * scratch_size, scratch_align, stream)
            launch(grid[0], grid[1], grid[2], stream, compiled.function, coop, pdl, scratch, None,
                   compiled.packed_metadata, None, None, None, *values)
        self.fast_launches += 1
        return compiled


def launcher_parts(compiled) -> tuple | None:
    """What a launch needs from the compiled kernel's launcher (Triton 3.6's CudaLauncher), so that
    repeat launches call its C entry point directly: (launch, cooperative grid, PDL, global scratch
    bytes per program, their alignment, CTAs per program). None where its Python wrapper must run:
    a launcher of another shape, or one that wants profiler scratch."""
    launcher = compiled.run
    names = ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "global_scratch_align",
             "num_ctas", "profile_scratch_size")
    if not all(hasattr(launcher, n) for n in names) or launcher.profile_scratch_size:
        return None
    return (launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl, launcher.global_scratch_size,
            launcher.global_scratch_align, launcher.num_ctas)


def _current_device() -> int:
    return torch.cuda.current_device()  # what Triton's CUDA driver asks (through a proxy and a property)


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)  # likewise


def _scratch_allocator():
    """The allocator Triton would ask for global scratch in this context (a ContextVar)."""
    return _allocation._allocator.get()
