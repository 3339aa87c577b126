"""Triton kernels. Each has a PyTorch twin that is its spec (norm.py, swiglu.py,
cross_entropy.py, rope.py); those modules decide which one runs (backend.use_triton).

This module imports without Triton: the kernels are then plain functions that nobody launches.
All arithmetic is float32; values are rounded to the storage dtype where the reference rounds.
"""

from __future__ import annotations

from .launch import Kernel

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # CPU box without Triton: keep the module importable
    HAS_TRITON = False

    class tl:  # noqa: N801 - stands in for triton.language so the annotations below evaluate
        constexpr = None

    def jit(fn=None, **options):  # also as jit(do_not_specialize=...)
        return fn if fn is not None else (lambda f: f)


def kernel(fn=None, **options):
    """``@jit`` for an entry point the host launches (``name[grid](...)``): wrapped in
    `launch.Kernel`, whose repeat launches skip Triton's per-call binding. Device functions that
    other kernels call stay plain ``@jit``."""
    if fn is None:
        return lambda f: kernel(f, **options)
    return Kernel(jit(fn, **options)) if HAS_TRITON else fn


# ----------------------------------------------------------------------------- RMSNorm
@kernel
def rms_norm_fwd(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    """Y[row] = W * round(X[row] * rstd), rstd = 1 / sqrt(mean(X[row]^2) + eps)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@kernel
def rms_norm_bwd(DY, X, W, RSTD, DX, n_cols, BLOCK: tl.constexpr):
    """DX = rstd * (g - xhat * mean(g * xhat)), g = DY * W, xhat = X * rstd."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
    tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- SwiGLU
@kernel
def silu_mul_fwd(G, U, H, n, BLOCK: tl.constexpr):
    """H = round(silu(G)) * U."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)


@kernel
def silu_mul_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    """DU = DH * silu(G);  DG = DH * U * sig(G) * (1 + G * (1 - sig(G)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(DU + offs, (dh * g * sig).to(DU.dtype.element_ty), mask=mask)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- cross-entropy
@kernel
def cross_entropy_rows(LOGITS, LABELS, LOSS, ignore_index, n_cols: tl.constexpr, BLOCK: tl.constexpr):
    """LOSS[row] = logsumexp(z) - z[label]; LOGITS[row] is overwritten with softmax(z) - onehot.

    Rows whose label is ignore_index get loss 0 and gradient 0. Two passes over the row:
    an online max / sum of exponentials, then the gradient written in place.
    """
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * n_cols
    label = tl.load(LABELS + row).to(tl.int32)
    cols = tl.arange(0, BLOCK)
    z = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
    m = tl.max(z, axis=0)
    s = tl.sum(tl.exp(z - m), axis=0)
    for block in range(1, tl.cdiv(n_cols, BLOCK)):
        cols = block * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    target = tl.load(base + safe_label).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    keep = tl.where(valid, 1.0, 0.0)
    for block in range(0, tl.cdiv(n_cols, BLOCK)):
        cols = block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(cols == safe_label, 1.0, 0.0)) * keep
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- RoPE
@kernel
def rope_token(X, COS, SIN, Y, n_heads, seq, sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, sc_b, sc_s,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    """All heads of one token. x = (x1, x2) halves of the head dim, c/s the cos/sin halves.

    Forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2      (x * cos + rotate_half(x) * sin)
    Backward: y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1      (its transpose, applied to dy)
    Each product is rounded to X's dtype before the sum, as the eager ops round.
    """
    tok = tl.program_id(0).to(tl.int64)
    b, s = tok // seq, tok % seq
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    cs = COS + b * sc_b + s * sc_s
    sn = SIN + b * sc_b + s * sc_s
    c1, c2 = tl.load(cs + d).to(tl.float32), tl.load(cs + HALF + d).to(tl.float32)
    s1, s2 = tl.load(sn + d).to(tl.float32), tl.load(sn + HALF + d).to(tl.float32)
    xp = X + b * sx_b + s * sx_s + heads * sx_h
    x1 = tl.load(xp + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF + d, mask=mask, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty
    if BACKWARD:
        y1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * s2).to(dt).to(tl.float32)
        y2 = (x2 * c2).to(dt).to(tl.float32) - (x1 * s1).to(dt).to(tl.float32)
    else:
        y1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
        y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    yp = Y + b * sy_b + s * sy_s + heads * sy_h
    tl.store(yp + d, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF + d, y2.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- LoRA rank-r expand
@jit
def expand_tile(P, Q, BIAS, n_rows, n_cols, rank, stride_p, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """(rows, cols, tile): this program's (BLOCK_M, BLOCK_N) tile of P Q (+ BIAS) in float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_R)
    row_ok, col_ok, k_ok = rows < n_rows, cols < n_cols, ks < rank
    p = tl.load(P + rows[:, None].to(tl.int64) * stride_p + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)                 # (BM, BR)
    q = tl.load(Q + ks[:, None] * n_cols + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :], other=0.0)                 # (BR, BN)
    acc = tl.dot(p, q, input_precision=PRECISION)                                # (BM, BN) fp32
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return rows, cols, acc


@kernel
def low_rank_expand(P, Q, BIAS, Y, n_rows, n_cols, rank, stride_p, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y = P Q (+ BIAS): P (M, r) with row stride stride_p, Q (r, N), Y (M, N) contiguous, r <= BLOCK_R.

    With K = r tiny the product is bound by writing Y: each program loads its rows of P and its
    columns of Q once, does one dot, adds the bias in float32 and rounds once (as addmm does).
    """
    rows, cols, acc = expand_tile(P, Q, BIAS, n_rows, n_cols, rank, stride_p, HAS_BIAS, PRECISION,
                                  BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(Y + rows[:, None].to(tl.int64) * n_cols + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


# ----------------------------------------------------------------------------- 4-bit dequantization
@kernel
def dequant_4bit(PACKED, CODE, ABSMAX, OUT, n, QBLOCK: tl.constexpr, BYTES: tl.constexpr):
    """OUT[i] = CODE[c_i] * ABSMAX[i // QBLOCK], rounded once to OUT's dtype.

    c_i is value i's 4-bit code: the high nibble of PACKED[i // 2] for even i, the low one for odd i.
    Each program reads BYTES packed bytes once (one load per byte, not per value) and writes the
    2 * BYTES values they hold, the two nibbles interleaved back into value order.
    """
    byte_at = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    in_range = byte_at < (n + 1) // 2
    byte = tl.load(PACKED + byte_at, mask=in_range, other=0).to(tl.int32)
    scale = tl.load(ABSMAX + (2 * byte_at) // QBLOCK, mask=in_range, other=0.0)  # both nibbles: one block
    hi = tl.load(CODE + (byte >> 4)) * scale  # values 2j
    lo = tl.load(CODE + (byte & 15)) * scale  # values 2j + 1
    value_at = tl.interleave(2 * byte_at, 2 * byte_at + 1)  # (2 BYTES,)
    values = tl.interleave(hi, lo)
    tl.store(OUT + value_at, values.to(OUT.dtype.element_ty), mask=value_at < n)


# ----------------------------------------------------------------------------- GEMM with a rank-r K block
@jit
def _grouped_tile(tile, n_m, n_n, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block): GROUP_M row blocks sweep the columns together, so
    the weight tiles they share are still in L2 when the next row block needs them."""
    per_group = GROUP_M * n_n
    first_m = (tile // per_group) * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@jit
def _rank_gemm_tile(x_d, w_d, p_d, q_d, y_d, Y, BIAS, M, N, om, on, K_TILES: tl.constexpr, R_CHUNKS: tl.constexpr,
                    W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_TMA: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
    """Y[om:, on:] = X W' + P Q' (+ bias) for one (BM, BN) tile; W' = W or W^T, Q' = Q or Q^T (W_KN).
    (Loading P and Q before the main loop, to hide their latency, fails Triton 3.6's TMA lowering
    inside the flattened persistent loop.)"""
    acc = tl.zeros((BM, BN), tl.float32)
    for kt in range(K_TILES):
        x = x_d.load([om, kt * BK])                                      # (BM, BK)
        if W_KN:
            acc = tl.dot(x, w_d.load([kt * BK, on]), acc)
        else:
            acc = tl.dot(x, w_d.load([on, kt * BK]).T, acc)
    for c in tl.static_range(R_CHUNKS):                                  # the rank-r K block, 16 at a time
        p = p_d.load([om, c * 16])                                       # (BM, 16)
        if W_KN:
            acc = tl.dot(p, q_d.load([c * 16, on]), acc)
        else:
            acc = tl.dot(p, q_d.load([on, c * 16]).T, acc)
    if HAS_BIAS:
        cols = on + tl.arange(0, BN)
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if STORE_TMA:
        y_d.store([om, on], acc.to(y_d.dtype))
    else:  # straight from registers: no (BM, BN) staging buffer, which leaves room for a deeper pipeline
        rows, cols = om + tl.arange(0, BM), on + tl.arange(0, BN)
        tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


@kernel(do_not_specialize=["M", "n_tiles", "programs"])  # token counts vary by batch: one compile serves all
def rank_gemm(X, W, P, Q, BIAS, Y, M, N, stride_p, stride_q, n_tiles, programs, K: tl.constexpr, RANK: tl.constexpr,
              W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              GROUP_M: tl.constexpr, STORE_TMA: tl.constexpr, PERSISTENT: tl.constexpr):
    """Y = X W^T + P Q^T (+ BIAS), or with W_KN: Y = X W + P Q. One rounding, float32 accumulators.

    X (M, K); W (N, K) or (K, N); P (M, RANK) with row stride stride_p (a column slice of a wider
    matrix is read in place); Q (N, RANK) or (RANK, N) with row stride stride_q. Every operand goes
    through a Hopper TMA descriptor. The rank block is simply more K blocks of the same GEMM, 16
    columns each (read past RANK as zeros): one small shared-memory buffer whatever the rank.
    PERSISTENT: `programs` programs walk the tiles (a run-time value, so batches of other lengths
    reuse the compiled kernel); else one tile per program (the form Triton's CPU interpreter runs).
    """
    x_d = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    p_d = tl.make_tensor_descriptor(P, shape=[M, RANK], strides=[stride_p, 1], block_shape=[BM, 16])
    y_d = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    if W_KN:
        w_d = tl.make_tensor_descriptor(W, shape=[K, N], strides=[N, 1], block_shape=[BK, BN])
        q_d = tl.make_tensor_descriptor(Q, shape=[RANK, N], strides=[stride_q, 1], block_shape=[16, BN])
    else:
        w_d = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
        q_d = tl.make_tensor_descriptor(Q, shape=[N, RANK], strides=[stride_q, 1], block_shape=[BN, 16])
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles: tl.constexpr = (K + BK - 1) // BK
    r_chunks: tl.constexpr = (RANK + 15) // 16
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), n_tiles, programs, flatten=True):
            pm, pn = _grouped_tile(tile, n_m, n_n, GROUP_M)
            _rank_gemm_tile(x_d, w_d, p_d, q_d, y_d, Y, BIAS, M, N, pm * BM, pn * BN, k_tiles, r_chunks, W_KN,
                            HAS_BIAS, STORE_TMA, BM, BN, BK)
    else:
        pm, pn = _grouped_tile(tl.program_id(0), n_m, n_n, GROUP_M)
        _rank_gemm_tile(x_d, w_d, p_d, q_d, y_d, Y, BIAS, M, N, pm * BM, pn * BN, k_tiles, r_chunks, W_KN,
                            HAS_BIAS, STORE_TMA, BM, BN, BK)


# ----------------------------------------------------------------------------- LoRA: gb and dB from one read of g
@kernel
def low_rank_grads(G, BS, XA, GB_PART, DB_PART, n_rows, n_cols, rank, stride_bs_k, stride_bs_c, stride_xa, scaling,
                   COLS_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """GB_PART[j, rows] = g[rows, split j] Bs[:, split j]^T;  DB_PART[i, cols] = s g[block i, cols]^T xa[block i].

    Program (i, j): row block i (BLOCK_M rows) x column split j. It keeps its rows' gb in registers
    across the split (partial over splits) and writes each column tile's dB (partial over row
    blocks); the caller sums both. Bs (r, out) is read with strides, so s B (out, r) serves as is.
    """
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_R)
    row_ok, k_ok = rows < n_rows, ks < rank
    xa = tl.load(XA + rows[:, None].to(tl.int64) * stride_xa + ks[None, :],
                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)                       # (BM, BR)
    gb = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for c in range(0, COLS_PER_SPLIT, BLOCK_N):  # COLS_PER_SPLIT: a multiple of BLOCK_N
        cols = pid_s * COLS_PER_SPLIT + c + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        g = tl.load(G + rows[:, None].to(tl.int64) * n_cols + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)                  # (BM, BN)
        bst = tl.load(BS + ks[None, :] * stride_bs_k + cols[:, None] * stride_bs_c,
                      mask=col_ok[:, None] & k_ok[None, :], other=0.0)                  # (BN, BR)
        gb = tl.dot(g, bst, gb)
        db = tl.dot(tl.trans(g), xa)                                                    # (BN, BR)
        tl.store(DB_PART + (pid_m * n_cols + cols[:, None]).to(tl.int64) * BLOCK_R + ks[None, :],
                 db * scaling, mask=col_ok[:, None])
    tl.store(GB_PART + (pid_s * n_rows + rows[:, None]).to(tl.int64) * BLOCK_R + ks[None, :], gb,
             mask=row_ok[:, None])
