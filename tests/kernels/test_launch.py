"""launch.Kernel: repeat launches skip Triton's binding, and never share a compiled kernel that
Triton would have compiled separately.

On a GPU, benchmarks/check_kernels_gpu.py (row fast_launch) checks the real launcher against
Triton's own path bit for bit. Here: the key, and the control flow with a stand-in kernel.
"""

from types import SimpleNamespace

import pytest
import torch

from peftkit.kernels import launch
from peftkit.kernels import triton_kernels as tk

CONST = (False, False, True)  # (X, n, BLOCK: constexpr)


def key(x, n, block=64, options=(("num_warps", 4),)):
    return launch.specialization_key((x, n, block), CONST, options)


def test_key_splits_what_triton_compiles_apart():
    x = torch.zeros(64, dtype=torch.bfloat16)
    base = key(x, 32)
    assert key(x, 32, block=128) != base                          # constexpr value
    assert key(x.float(), 32) != base                             # pointer dtype
    assert key(x[1:], 32) != base                                 # address off 16 bytes
    assert key(x, 1) != key(x, 2)                                 # Triton folds n == 1
    assert key(x, 31) != base                                     # n % 16 attribute
    assert key(x, 48) != key(x, 2**32 + 48)                       # i32 against i64
    assert key(x, 2**64 - 16) != key(x, 2**32)                    # u64 against i64
    assert key(x, 32, options=(("num_warps", 8),)) != base        # launch options
    assert launch.specialization_key((x, 0.5, 64), CONST, ()) != launch.specialization_key((x, 1, 64), CONST, ())


def test_key_shares_what_triton_shares():
    x, other = torch.zeros(64, dtype=torch.bfloat16), torch.ones(32, dtype=torch.bfloat16)
    assert key(x, 32) == key(other, 48)                           # another aligned tensor, n % 16 == 0
    assert key(x, 2) == key(x, 3)                                 # plain ints: not specialised
    assert key(x, 2**31) == key(x, 2**32)                         # both i64, both % 16
    assert launch.specialization_key((x, 0.5, 64), CONST, ()) == launch.specialization_key((x, 2.0, 64), CONST, ())


class _Compiled:
    """A CompiledKernel whose `run` is its own recorder, or a given launcher (a real one's is a CudaLauncher)."""

    def __init__(self, launcher=None):
        self.function, self.packed_metadata, self.calls = "fn-handle", "meta", []
        self.run = launcher if launcher is not None else lambda *args: self.calls.append(args)


class _Jit:
    """Stands in for a JITFunction: records Triton-path launches, returns one compiled kernel per call."""

    def __init__(self, launcher=None):
        self.params = [SimpleNamespace(name=n, is_constexpr=c) for n, c in zip(("X", "n", "BLOCK"), CONST)]
        self.triton_calls, self.made, self.launcher = [], [], launcher

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_calls.append((grid, args, kwargs))
            self.made.append(_Compiled(self.launcher))
            return self.made[-1]
        return run


@pytest.fixture
def fast(monkeypatch):
    """The fast path on CPU tensors: a stand-in driver and the release check passed."""
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(launch.Kernel, "fast_path_allowed", staticmethod(lambda grid, args: True))


def test_repeat_launch_calls_the_compiled_launcher(fast):
    jit = _Jit()
    k = launch.Kernel(jit)
    x = torch.zeros(64)
    k[(4,)](x, 32, BLOCK=64, num_warps=4)
    assert len(jit.triton_calls) == 1 and k.fast_launches == 0
    y = torch.ones(16)
    k[(2, 3)](y, 48, BLOCK=64, num_warps=4)                        # same specialisation
    assert len(jit.triton_calls) == 1 and k.fast_launches == 1
    assert jit.made[0].calls == [(2, 3, 1, 1234, "fn-handle", "meta", None, None, None, y, 48, 64)]
    k[(2,)](y, 48, BLOCK=128, num_warps=4)                         # new constexpr: Triton's path again
    k[(2,)](y, 48, BLOCK=64, num_warps=8)                          # new launch option: likewise
    assert len(jit.triton_calls) == 3 and k.fast_launches == 1


class _Launcher:
    """Stands in for Triton 3.6's CudaLauncher: the parts launcher_parts reads, launch recording."""

    def __init__(self, scratch_size):
        self.launch_cooperative_grid, self.launch_pdl, self.num_ctas = False, True, 2
        self.global_scratch_size, self.global_scratch_align, self.profile_scratch_size = scratch_size, 128, 0
        self.calls = []
        self.launch = lambda *args: self.calls.append(args)


def test_repeat_launch_calls_the_launchers_entry_point_with_its_scratch(fast, monkeypatch):
    """Triton's launcher wrapper skipped: its C entry point gets the grid, stream, flags, a global
    scratch of grid x CTAs x bytes per program from the context's allocator, and the arguments."""
    asked = []
    monkeypatch.setattr(launch, "_scratch_allocator", lambda: lambda size, align, stream: asked.append(
        (size, align, stream)) or "scratch")
    for scratch_size, want in ((64, "scratch"), (0, None)):
        launcher = _Launcher(scratch_size)
        jit = _Jit(launcher)
        k = launch.Kernel(jit)
        x = torch.zeros(64)
        k[(4,)](x, 32, BLOCK=64)                                   # Triton's path: compiles
        k[(3, 2)](x, 48, BLOCK=64)
        assert k.fast_launches == 1 and jit.made[0].calls == []
        assert launcher.calls == [(3, 2, 1, 1234, "fn-handle", False, True, want, None, "meta", None, None, None,
                                   x, 48, 64)]
    assert asked == [(3 * 2 * 1 * 2 * 64, 128, 1234)]


def test_a_launcher_that_wants_profiler_scratch_keeps_its_wrapper():
    launcher = _Launcher(0)
    launcher.profile_scratch_size = 8
    assert launch.launcher_parts(SimpleNamespace(run=launcher)) is None
    assert launch.launcher_parts(SimpleNamespace(run=lambda *args: None)) is None


def test_missing_argument_goes_through_triton(fast):
    jit = _Jit()
    k = launch.Kernel(jit)
    x = torch.zeros(64)
    for _ in range(2):
        k[(1,)](x, 32)                                             # BLOCK left out: Triton binds (or refuses)
    assert len(jit.triton_calls) == 2 and k.fast_launches == 0


def test_cpu_tensors_always_take_triton_path():
    jit = _Jit()
    k = launch.Kernel(jit)
    x = torch.zeros(64)
    for _ in range(3):
        k[(1,)](x, 32, BLOCK=64)
    assert len(jit.triton_calls) == 3 and k.fast_launches == 0 and not k.compiled
    assert not launch.Kernel.fast_path_allowed((1,), (x, 32))


@pytest.mark.skipif(not tk.HAS_TRITON, reason="Triton not installed")
def test_entry_points_are_wrapped_with_their_constexpr_flags():
    assert isinstance(tk.rank_gemm, launch.Kernel) and isinstance(tk.rms_norm_fwd, launch.Kernel)
    flags = dict(zip(tk.rank_gemm.names, tk.rank_gemm.constexpr))
    assert flags["K"] and flags["RANK"] and flags["PERSISTENT"] and not flags["M"] and not flags["X"]
    assert not isinstance(tk.expand_tile, launch.Kernel)          # device functions stay plain @jit
