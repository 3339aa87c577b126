"""LoRA initialisations computed from the base weight, which they then rewrite.

W is the base weight as (out, in) in float32 (transposed first where the base stores (in, out)),
s = lora_alpha / r (or / sqrt(r)) the layer's scaling, r its rank.

PiSSA (Meng et al., 2024): the principal singular triplets train, the rest stays frozen.

    W = U S V^T,   B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   W <- W_res = W - s B A

so s B A is the best rank-r approximation of W and W_res + s B A = W: the output is unchanged at
start. ``pissa_niter_K`` takes U_r, S_r, V_r from ``torch.svd_lowrank(W, r, niter=K)`` (a random start
and K subspace iterations) instead of a full SVD: faster, close to the top triplets.

OLoRA (Büyükakyüz, 2024): an orthonormal basis of W's column space trains.

    W = Q R,   B = Q[:, :r],   A = R[:r],   W <- W - s B A

LoftQ (Li et al., 2023): the base becomes its 4-bit NF4 quantization and the adapter the best rank-r
correction of what the quantization loses, alternated T = ``loftq_iter`` times:

    s B A = 0;  repeat T times:  Q = nf4(W - s B A),  s B A = SVD_r(W - deq(Q));    W <- deq(Q)

||W - deq(Q) - s B A|| falls with T. HF PEFT leaves s out of the split (B A = SVD_r(...)), which is
the same at s = 1; with s != 1 its start is deq(Q) + s SVD_r(W - deq(Q)). The base rewrite keeps
the dequantized codes exactly, so quantizing the rewritten base to NF4 (block 64) again gives Q.

The factors are computed when a layer gets its adapter (``factors``); the engine rewrites the base
weights once every target has its factors (``rewrite_bases``, the method's ``after_inject`` hook),
so a target that cannot take the initialisation fails before any weight has changed.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from peftkit.methods.lora.config import PISSA_NITER, LoraConfig, is_weight_init
from peftkit.quant import nf4

LOFTQ_BLOCK = 64  # NF4 block size of LoftQ's quantization (bitsandbytes' and QuantConfig's default)


def svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s B A = U diag(S) V^T, the singular values split evenly: (r, in), (out, r)."""
    root = torch.sqrt(s / scaling)  # (r,)
    return root[:, None] * vh, u * root[None, :]


def pissa(w: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the top-r singular triplets of ``w`` (full SVD, or svd_lowrank with ``niter``)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        return svd_factors(u[:, :r], s[:r], vh[:r], scaling)
    u, s, v = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r)
    return svd_factors(u, s, v.T, scaling)


def olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of the reduced QR of ``w``."""
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq(w: torch.Tensor, r: int, scaling: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(A, B, (packed codes, QuantState)) after ``iters`` alternations; see the module docstring."""
    residual = w
    for step in range(iters):
        packed, state = nf4.quantize_4bit(residual, "nf4", LOFTQ_BLOCK)
        error = w - nf4.dequantize_4bit(packed, state, torch.float32)  # (out, in)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        a, b = svd_factors(u[:, :r], s[:r], vh[:r], scaling)
        residual = w - (scaling * b) @ a
    return a, b, (packed, state)


def factors(config: LoraConfig, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(A, B, what the base becomes: None for W - s B A, or LoftQ's (packed, state)) for ``w`` (out, in)."""
    mode = config.init_lora_weights
    if mode == "olora":
        return (*olora(w, r), None)
    if mode == "loftq":
        return loftq(w, r, scaling, config.loftq_config["loftq_iter"])
    niter = PISSA_NITER.match(mode)
    return (*pissa(w, r, scaling, int(niter.group(1)) if niter else None), None)


def check_weight(key: str, weight: torch.Tensor, r: int, mode: str) -> None:
    """Refuse weights the decomposition cannot take, naming the module and the fix."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"init_lora_weights={mode!r} needs a floating-point base weight, but {key!r} stores "
                         f"{weight.dtype}: initialise on the full-precision model")
    if r > min(weight.shape):
        raise ValueError(f"init_lora_weights={mode!r} needs r <= min(out, in) features, but {key!r} has a "
                         f"{tuple(weight.shape)} weight and r={r}: lower r (or rank_pattern) for this module")


def dequantized(base_form: tuple) -> torch.Tensor:
    """LoftQ's rewritten base: the (packed codes, QuantState) from ``loftq`` as float32 (out, in)."""
    return nf4.dequantize_4bit(*base_form, torch.float32)


def residual(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - s B A (out, in), in float32."""
    return w - (scaling * b.float()) @ a.float()


def rewrite_bases(adapter_model: Any, name: str) -> None:
    """The ``after_inject`` hook: every layer of adapter ``name`` with a weight initialisation
    rewrites its base weight now that all of them have their factors."""
    config = adapter_model.peft_config[name]
    if not is_weight_init(config.init_lora_weights):
        return
    others = [n for n in adapter_model.peft_config if n != name]
    if others:
        warnings.warn(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights, which adapters "
                      f"{others} also see; convert adapter {name!r} to a plain LoRA adapter "
                      "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) to use it beside others")
    from peftkit.methods.lora.layer import LoraLinear

    for _, layer in adapter_model.adapter_layers():
        if isinstance(layer, LoraLinear) and name in layer.pending_base:
            layer.rewrite_base(name)
