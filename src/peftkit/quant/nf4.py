"""4-bit NormalFloat (NF4) and FP4 blockwise quantization with double quantization (Dettmers et al., 2023).

A weight is cut into blocks of ``block_size`` values (64 by default, flat order, the last block
padded with zeros). Each block is scaled by its absolute maximum and every value is rounded to the
nearest of 16 code points in [-1, 1]:

    absmax_b = max_{i in b} |w_i|          code_i = argmin_k |w_i / absmax_b - q_k|
    w_i ~ q[code_i] * absmax_b

NF4's code points are quantiles of N(0, 1) normalised to [-1, 1], 8 positive and 7 negative with an
exact zero (``nf4_code`` derives them; ``NF4`` holds the published values). Two codes share a byte,
the first value of each pair in the high nibble: ``byte_j = code_{2j} << 4 | code_{2j+1}``.

Double quantization stores the fp32 absmax constants themselves in 8 bits: subtract their mean,
cut them into blocks of 256 and round each to ``round(127 * (c - mean) / s_g)`` with one fp32
``s_g = max |c - mean|`` per block g, so |c_dequant - c| <= s_g / 254. Memory per weight: 4 + 32/64
= 4.5 bits plainly, 4 + 8/64 + 32/(64 * 256) ~ 4.127 bits with double quantization.
(bitsandbytes rounds these constants with its dynamic 8-bit float map; we use a linear int8 code,
whose error bound is the one above. The NF4 codes, block layout and nibble order are as in the paper.)

FP4 (``quant_type="fp4"``) uses the 16 E2M1 floating-point values (a sign bit, then
{0, 0.5, 1, 1.5, 2, 3, 4, 6}) divided by 6, sorted, so -0 and +0 are codes 7 and 8. Its codes are
our own numbering, not bitsandbytes' FP4 codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

QUANT_TYPES = ("nf4", "fp4")
DQ_BLOCK = 256  # absmax constants per block of the second quantization

# The NF4 code points as published with the paper (bitsandbytes' table), ascending: code 7 is 0.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4 = torch.cat([-_E2M1.flip(0), _E2M1]) / 6.0  # (16,) ascending, -0 then +0 in the middle


def nf4_code(offset: float = 0.9677083) -> torch.Tensor:
    """Derive NF4: 8 positive quantiles of N(0,1) over probabilities linspace(offset, 1/2, 9)[:-1],
    7 negative ones over linspace(offset, 1/2, 8)[:-1], and 0; divided by the largest (so +-1).

    ``offset`` = 1 - (1/2)(1/32 + 1/30) ~ 0.9677 keeps the outermost quantile finite (the choice
    behind the published table); the result equals ``NF4`` to one float32 ulp.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


def code_table(quant_type: str) -> torch.Tensor:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return NF4 if quant_type == "nf4" else FP4


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization of the absmax constants: c ~ q * step[g] + offset, g = block of 256."""

    step: torch.Tensor  # (n_groups,) fp32: s_g / 127
    offset: torch.Tensor  # () fp32: the mean of the constants
    count: int  # how many constants (the last group may be short)


@dataclass(frozen=True)
class QuantState:
    """Everything needed besides the packed codes to rebuild a weight."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # of the original weight (what ``dequantize_4bit`` returns by default)
    quant_type: str
    block_size: int
    absmax: torch.Tensor  # (n_blocks,) fp32, or int8 codes when ``nested`` is set
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "QuantState":
        nested = self.nested and replace(self.nested, step=self.nested.step.to(device),
                                         offset=self.nested.offset.to(device))
        return replace(self, absmax=self.absmax.to(device), nested=nested)


# ------------------------------------------------------------------------------------ bit packing
def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes in [0, 16) -> (ceil(n / 2),) uint8, the first of each pair in the high nibble."""
    codes = codes.to(torch.uint8).flatten()
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)  # (n/2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def byte_values(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(256, 2): the code values of a byte's high and low nibble, so one gather unpacks and decodes."""
    byte = torch.arange(256)
    return code_table(quant_type)[torch.stack([byte >> 4, byte & 0xF], dim=1)].to(device)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n / 2),) uint8 -> (n,) int64 codes; the inverse of ``pack_4bit``."""
    packed = packed.flatten()
    pairs = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (n/2, 2)
    return pairs.flatten()[:n].long()


# ------------------------------------------------------------------------------- blockwise absmax
def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten to float32 and zero-pad to (n_blocks, block_size)."""
    flat = x.detach().flatten().float()
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def nearest_code(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending ``table``; ties go to the lower entry."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(values, mids.to(values.device))


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """``weight`` -> (packed uint8 codes, state). See the module docstring for the format."""
    table = code_table(quant_type)
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even integer >= 2, got {block_size!r}")
    if weight.numel() == 0 or not weight.is_floating_point():
        raise ValueError(f"quantize_4bit needs a non-empty floating-point tensor, got {weight.dtype} "
                         f"of shape {tuple(weight.shape)}")
    blocks = _blocks(weight, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    codes = nearest_code(scaled, table).flatten()[: weight.numel()]
    state = QuantState(tuple(weight.shape), weight.dtype, quant_type, block_size, absmax)
    if double_quant:
        state = replace(state, **dict(zip(("absmax", "nested"), quantize_absmax(absmax))))
    return pack_4bit(codes), state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild the weight: q[code] * absmax in float32, then rounded once to ``dtype``.

    ``absmax``: ``absmax_of(state)`` when the caller has already decoded it."""
    values = byte_values(state.quant_type, packed.device)[packed.flatten().long()].flatten()  # (2 ceil(n/2),)
    pad = (-values.numel()) % state.block_size
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    blocks = values.view(-1, state.block_size)  # (n_blocks, block_size)
    flat = (blocks * (absmax_of(state) if absmax is None else absmax)[:, None]).flatten()[: state.numel]
    return flat.view(state.shape).to(dtype or state.dtype)


# --------------------------------------------------------------------------- double quantization
def quantize_absmax(absmax: torch.Tensor, block_size: int = DQ_BLOCK) -> tuple[torch.Tensor, NestedAbsmax]:
    """fp32 constants -> (int8 codes, NestedAbsmax): q = round(127 (c - mean) / s_g)."""
    offset = absmax.mean()  # ()
    blocks = _blocks(absmax - offset, block_size)  # (n_groups, 256)
    scale = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (n_groups,)
    q = torch.round(blocks * (127.0 / scale[:, None])).clamp(-127, 127)
    codes = q.to(torch.int8).flatten()[: absmax.numel()]
    return codes, NestedAbsmax(scale / 127.0, offset, absmax.numel())


def absmax_of(state: QuantState) -> torch.Tensor:
    """The per-block fp32 absmax, undoing double quantization when there is one."""
    if state.nested is None:
        return state.absmax.float()
    nested = state.nested
    codes = state.absmax.float()  # (n_blocks,)
    pad = (-codes.numel()) % DQ_BLOCK
    groups = torch.nn.functional.pad(codes, (0, pad)).view(-1, DQ_BLOCK) if pad else codes.view(-1, DQ_BLOCK)
    groups = groups.mul_(nested.step[:, None]).add_(nested.offset).clamp_min_(0)  # an absmax is never < 0
    return groups.flatten()[: nested.count]


def bits_per_value(state: QuantState) -> float:
    """Storage of the codes and constants, in bits per original value (4.5 for NF4/64, ~4.127 nested)."""
    constants = state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested is not None:
        constants += state.nested.step.numel() * 32 + 32
    return (math.ceil(state.numel / 2) * 8 + constants) / state.numel
