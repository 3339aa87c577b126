"""4-bit NormalFloat (NF4) and FP4 blockwise quantization with double quantization (Dettmers et al., 2023),
byte for byte as bitsandbytes stores it.

A weight is cut into blocks of ``block_size`` values (64 by default, flat order, the last block may
be short). Each block is scaled by its absolute maximum and every value is rounded to the nearest
of 16 code points in [-1, 1]:

    absmax_b = max_{i in b} |w_i|          code_i = argmin_k |w_i * (1 / absmax_b) - q_k|
    w_i ~ q[code_i] * absmax_b

The scaled value is computed as bitsandbytes does (times the fp32 reciprocal; the short last block
divides instead), and a value exactly halfway between two code points takes the smaller one, so the
codes equal bitsandbytes' own. NF4's code points are quantiles of N(0, 1) normalised to [-1, 1],
8 positive and 7 negative with an exact zero (``nf4_code`` derives them; ``NF4`` holds the published
values). Two codes share a byte, the first value of each pair in the high nibble:
``byte_j = code_{2j} << 4 | code_{2j+1}``.

Double quantization stores the fp32 absmax constants themselves in 8 bits: subtract their mean
(the offset), cut them into groups of 256 and round each to the nearest entry of the signed 8-bit
dynamic map (``dynamic_map``) after dividing by the group's own absolute maximum s_g:

    c ~ dynamic[code_c] * s_g + offset

Memory per weight: 4 + 32/64 = 4.5 bits plainly, 4 + 8/64 + 32/(64 * 256) ~ 4.127 with double
quantization.

FP4 (``quant_type="fp4"``) is bitsandbytes' 4-bit float: a sign bit (8) over the magnitudes
{0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 in bit-pattern order, so code 3 is +1 and codes 0 and 8 are +0
and -0. Tables need not be sorted: every consumer looks codes up (``code_table(t)[code]``).

The 4-bit codes follow bitsandbytes' PyTorch reference (what it runs on CPU; tested equal). Its CUDA
kernel can differ in rare cases we cannot test here: an all-zero block (CUDA stores code 0, i.e.
-1 * 0), the short last block (CUDA multiplies by the reciprocal there too) and FP4 values within
~1e-6 of a midpoint (CUDA's FP4 thresholds are rounded decimals); its NF4 thresholds are exactly our
float32 midpoints. For the 8-bit constant codes see ``nearest_dynamic``. Reading a file is
unaffected: its bytes are used as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

QUANT_TYPES = ("nf4", "fp4")
DQ_BLOCK = 256  # absmax constants per group of the second quantization
_MIN_ABSMAX = 1e-38  # an all-zero block is scaled by 1 / 1e-38 (its values stay 0), as bitsandbytes does

# The NF4 code points as published with the paper (bitsandbytes' table), ascending: code 7 is 0.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in bit-pattern order.
_FP4_MAGNITUDES = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
FP4 = torch.cat([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]) / 12.0  # (16,): code 3 is +1, code 8 is -0


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


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers, 2016), ascending, (256,) float32.

    For each decade d = 0..6 it holds 2^d magnitudes 10^(d-6) * m, where m runs over the midpoints
    of 2^d equal steps of [0.1, 1] (float32), each with both signs; then 0 and 1:
    2 (1 + 2 + ... + 64) + 2 = 256 values, dense near 0 and coarse near +-1 (the largest negative
    value is -0.99297, the largest positive 1).
    """
    values = [torch.zeros(1), torch.ones(1)]
    for d in range(7):
        edges = torch.linspace(0.1, 1, 2**d + 1, dtype=torch.float32)
        magnitudes = (10.0 ** (d - 6)) * ((edges[:-1] + edges[1:]) / 2)  # (2^d,)
        values += [magnitudes, -magnitudes]
    return torch.cat(values).sort().values


DYNAMIC = dynamic_map()
_ON_DEVICE: dict[torch.device, torch.Tensor] = {}  # DYNAMIC already copied to a device


def dynamic_table(device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = DYNAMIC.to(device)
    return _ON_DEVICE[device]


def code_table(quant_type: str) -> torch.Tensor:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return NF4 if quant_type == "nf4" else FP4


@dataclass(frozen=True)
class NestedAbsmax:
    """Double quantization of the absmax constants: c ~ DYNAMIC[code] * absmax[g] + offset, g = group."""

    absmax: torch.Tensor  # (n_groups,) fp32: max |c - offset| over each group
    offset: torch.Tensor  # () fp32: the mean of the constants
    count: int  # how many constants (the last group may be short)
    block_size: int = DQ_BLOCK  # constants per group


@dataclass(frozen=True)
class QuantState:
    """Everything needed besides the packed codes to rebuild a weight."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # of the original weight (what ``dequantize_4bit`` returns by default)
    quant_type: str
    block_size: int
    absmax: torch.Tensor  # (n_blocks,) fp32, or uint8 codes into DYNAMIC when ``nested`` is set
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "QuantState":
        nested = self.nested and replace(self.nested, absmax=self.nested.absmax.to(device),
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
    """Index of the nearest entry of ``table`` (any order); a value exactly halfway between two
    entries takes the smaller one, and of two equal entries (+0, -0) the first in a stable sort."""
    order = torch.argsort(table, stable=True)
    ascending = table[order]
    mids = (ascending[1:] + ascending[:-1]) / 2  # float32, as bitsandbytes' thresholds
    return order.to(values.device)[torch.bucketize(values, mids.to(values.device))]


def scale_blocks(blocks: torch.Tensor, absmax: torch.Tensor, numel: int) -> torch.Tensor:
    """w / absmax_b per block, rounded as bitsandbytes rounds it: times the float32 reciprocal,
    except the short last block (numel % block_size values), which its reference divides."""
    safe = absmax.clamp_min(_MIN_ABSMAX)  # (n_blocks,)
    scaled = blocks * (1.0 / safe)[:, None]  # (n_blocks, block_size)
    if numel % blocks.shape[1]:
        scaled[-1] = blocks[-1] / safe[-1]
    return scaled


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
    # an odd count keeps one padding code: the code of 0, as bitsandbytes packs it
    codes = nearest_code(scale_blocks(blocks, absmax, weight.numel()), table).flatten()
    codes = codes[: weight.numel() + weight.numel() % 2]
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
def nearest_dynamic(normed: torch.Tensor) -> torch.Tensor:
    """Nearest DYNAMIC entry (ties to the smaller), as bitsandbytes' CUDA kernel and its PyTorch
    reference pick it; NaN (0 / 0: a group whose constants all equal the offset) gets code 0.

    bitsandbytes' CPU library (0.50) looks codes up in a 65536-entry table instead, so within
    ~1.5e-5 of a midpoint between two entries it may pick the farther one; we keep the exact rule.
    """
    codes = nearest_code(normed, dynamic_table(normed.device))
    return torch.where(normed.isnan(), 0, codes)


def quantize_absmax(absmax: torch.Tensor, block_size: int = DQ_BLOCK) -> tuple[torch.Tensor, NestedAbsmax]:
    """fp32 constants -> (uint8 codes, NestedAbsmax): code = nearest DYNAMIC entry to (c - mean) / s_g,
    the division rounded as in ``scale_blocks``."""
    offset = absmax.mean()  # ()
    groups = _blocks(absmax - offset, block_size)  # (n_groups, block_size), zero padding
    scale = groups.abs().amax(dim=1)  # (n_groups,)
    normed = scale_blocks(groups, scale, absmax.numel())
    normed[scale == 0] = float("nan")  # 0 / 0 as in bitsandbytes, not 0 / 1e-38
    codes = nearest_dynamic(normed).flatten()[: absmax.numel()]
    return codes.to(torch.uint8), NestedAbsmax(scale, offset, absmax.numel(), block_size)


def absmax_of(state: QuantState) -> torch.Tensor:
    """The per-block fp32 absmax, undoing double quantization when there is one: one gather, one
    product and one sum (in that order, as bitsandbytes rounds them)."""
    if state.nested is None:
        return state.absmax.float()
    nested = state.nested
    values = dynamic_table(state.absmax.device)[state.absmax.long()]  # (n_blocks,)
    pad = (-values.numel()) % nested.block_size
    groups = torch.nn.functional.pad(values, (0, pad)) if pad else values
    groups = groups.view(-1, nested.block_size).mul_(nested.absmax[:, None]).add_(nested.offset)
    return groups.flatten()[: nested.count]


def bits_per_value(state: QuantState) -> float:
    """Storage of the codes and constants, in bits per original value (4.5 for NF4/64, ~4.127 nested)."""
    constants = state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested is not None:
        constants += state.nested.absmax.numel() * 32 + 32
    return (math.ceil(state.numel / 2) * 8 + constants) / state.numel
