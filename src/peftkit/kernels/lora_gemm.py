"""A frozen linear and its LoRA term as one GEMM: the rank-r product is one more K block.

    forward:   y  = x W^T + xa (s B)^T (+ b)      x (N, in), W (out, in), xa = x A^T (N, r), s B (out, r)
    backward:  dx = g W   + gb A                  g (N, out), gb = s g B (N, r), A (r, in)

Both are [x | xa] [W | s B]^T: a GEMM whose K runs over the `in` columns of x and then r more.
`rank_gemm` (triton_kernels) loads that last K block from xa and s B through their own TMA
descriptors, so the low-rank term is neither written out (low_rank_expand) nor read back (addmm_
with beta=1), and y is rounded once (which keeps LoRA terms below half a bf16 step of the base
output that a rounded base would drop). Measured on an H100 (benchmarks/NOTES.md, run 11): the
plain persistent TMA GEMM runs at 0.89-1.03x of cuBLAS on the 1B shapes, and with the rank block
1.01-1.11x faster than expand + addmm_ where `out` and `in` are >= 2048; at out = 512 it is
slower, so narrower products keep the two-kernel path (`fits`).
"""

from __future__ import annotations

import functools

import torch

from . import triton_kernels as tk
from .backend import cdiv, use_triton

if tk.HAS_TRITON:
    import triton
    from triton.runtime import _allocation

TILE = dict(BM=128, BN=256, BK=64, GROUP_M=8, STORE_TMA=True, num_stages=3, num_warps=8)  # run 11's best on the 1B shapes
MIN_SIDE = 2048  # out and in at least this: where run 11 measured a gain


def rank_gemm_reference(x, w, p, q, bias=None, w_kn: bool = False) -> torch.Tensor:
    """x W^T + p q^T (+ bias); with w_kn, x W + p q. The spec of `rank_gemm`."""
    y = x @ w + p @ q if w_kn else x @ w.t() + p @ q.t()
    return y if bias is None else y + bias


def _aligned(t: torch.Tensor) -> bool:
    """TMA: the base address and every row stride on 16 bytes, unit stride along rows."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


@functools.lru_cache(maxsize=None)
def _hopper_sms(device_index: int) -> int:
    """Multiprocessor count of a compute-capability-9 GPU, 0 for any other (cached: asked per call)."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count if props.major == 9 else 0


def fits(x: torch.Tensor, w: torch.Tensor, rank: int, w_kn: bool = False) -> bool:
    """True where `rank_gemm` runs the Triton kernel and is expected to pay: a Hopper GPU (TMA; or
    Triton's CPU interpreter), 16-bit x and w of one dtype, both sides of w >= MIN_SIDE, a rank <= 64
    that keeps column slices of xa on 16 bytes (a multiple of 8), contiguous TMA-aligned x and w.
    Cheap checks first: the LoRA nodes ask this for every product, in eager mode on the host's clock."""
    n = w.shape[1] if w_kn else w.shape[0]
    if min(n, x.shape[1]) < MIN_SIDE or rank > 64 or rank % 8 or n % 8 or w.dtype != x.dtype:
        return False
    if x.is_cuda and (x.dtype not in (torch.bfloat16, torch.float16) or not _hopper_sms(x.get_device())):
        return False
    return use_triton(x, w) and x.is_contiguous() and w.is_contiguous() and _aligned(x) and _aligned(w)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-side TMA descriptors need a little global scratch per launch. Triton asks the allocator
    of the current context (a ContextVar: autograd's backward thread has its own), so give each
    context that has none torch's caching allocator; one set by the user is left alone."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def rank_gemm(x, w, p, q, bias=None, w_kn: bool = False) -> torch.Tensor:
    """`rank_gemm_reference(x, w, p, q, bias, w_kn)` as one Triton GEMM where `fits`, else the reference.

    x (M, K); w (N, K), or (K, N) with w_kn; p (M, r), a column slice of a wider matrix allowed;
    q (N, r), or (r, N) with w_kn; bias (N,) or None. Returns (M, N) in x's dtype. Under Triton's
    CPU interpreter (TRITON_INTERPRET=1, CPU tensors) the kernel runs one tile per program.
    """
    if fits(x, w, p.shape[1], w_kn) and p.dtype == x.dtype and q.dtype == x.dtype and _aligned(p) and _aligned(q):
        return launch(x, w, p, q, bias, w_kn)
    return rank_gemm_reference(x, w, p, q, bias, w_kn)


def launch(x, w, p, q, bias=None, w_kn: bool = False) -> torch.Tensor:
    """The kernel itself, for callers that checked `fits` and made p and q (16-bit, TMA-aligned)."""
    (m, k), r = x.shape, p.shape[1]
    n = w.shape[1] if w_kn else w.shape[0]
    y = x.new_empty(m, n)
    n_tiles = cdiv(m, TILE["BM"]) * cdiv(n, TILE["BN"])
    if x.is_cuda:
        _ensure_allocator()
        programs = min(_hopper_sms(x.get_device()), n_tiles)
    else:  # Triton's CPU interpreter: one tile per program
        programs = n_tiles
    tk.rank_gemm[(programs,)](x, w, p, q, bias if bias is not None else y, y, m, n, p.stride(0), q.stride(0), n_tiles,
                              programs, K=k, RANK=r, W_KN=w_kn, HAS_BIAS=bias is not None,
                              PERSISTENT=x.is_cuda, **TILE)
    return y
