"""NF4/FP4 blockwise quantization, packing and double quantization against direct computations."""
import pytest
import torch

from peftkit.quant import nf4


def test_derived_nf4_code_is_the_published_table_with_an_exact_zero():
    torch.testing.assert_close(nf4.nf4_code(), nf4.NF4, atol=2e-7, rtol=0)
    assert nf4.NF4[7] == 0 and nf4.NF4[0] == -1 and nf4.NF4[15] == 1
    assert (nf4.NF4.diff() > 0).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 32), (7, 13), (1, 1), (129,)])  # odd sizes: numel % 64 != 0
def test_round_trip_error_is_at_most_half_a_code_gap_times_the_block_absmax(quant_type, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    packed, state = nf4.quantize_4bit(w, quant_type, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == (w.numel() + 1) // 2
    back = nf4.dequantize_4bit(packed, state)
    assert back.shape == w.shape and back.dtype == w.dtype
    flat = w.flatten()
    absmax = torch.stack([b.abs().max() for b in flat.split(64)])  # direct, block by block
    torch.testing.assert_close(state.absmax, absmax, atol=0, rtol=0)
    gap = nf4.code_table(quant_type).sort().values.diff().max()  # FP4's table is in bit-pattern order
    bound = (absmax * gap / 2).repeat_interleave(64)[: flat.numel()]
    assert ((back.flatten() - flat).abs() <= bound * (1 + 1e-6)).all()


def test_each_value_goes_to_its_nearest_code_point():
    w = torch.randn(256, generator=torch.Generator().manual_seed(1))
    packed, state = nf4.quantize_4bit(w)
    codes = nf4.unpack_4bit(packed, w.numel())
    scaled = w / state.absmax.repeat_interleave(64)
    nearest = (scaled[:, None] - nf4.NF4[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes, nearest)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_points_times_absmax_reconstruct_exactly(quant_type):
    table = nf4.code_table(quant_type)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 16, (5, 64), generator=g)
    idx[:, 0] = int(table.argmax())  # each block holds +1, so its absmax is exactly its scale
    scale = torch.rand(5, 1, generator=g) * 4 + 0.1
    w = (table[idx] * scale).flatten()
    packed, state = nf4.quantize_4bit(w, quant_type)
    assert torch.equal(nf4.dequantize_4bit(packed, state), w)


def test_packing_puts_the_first_value_of_a_pair_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7])
    packed = nf4.pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert nf4.unpack_4bit(packed, 5).tolist() == codes.tolist()
    w = nf4.NF4[torch.tensor([15, 0])]  # +1 then -1 in one block
    assert nf4.quantize_4bit(w)[0].tolist() == [0xF0]


def test_double_quant_rounds_centred_constants_to_the_nearest_dynamic_code_and_saves_memory():
    w = torch.randn(1000, 333, generator=torch.Generator().manual_seed(3))  # 5204 blocks: 21 groups, last short
    packed, plain = nf4.quantize_4bit(w)
    packed2, nested = nf4.quantize_4bit(w, double_quant=True)
    assert torch.equal(packed, packed2) and nested.absmax.dtype == torch.uint8
    c = plain.absmax
    offset = c.mean()
    groups = (c - offset).split(nf4.DQ_BLOCK)
    scale = torch.stack([g.abs().max() for g in groups])  # direct, group by group
    assert torch.equal(nested.nested.offset, offset) and torch.equal(nested.nested.absmax, scale)
    normed = torch.cat([g * (1 / s) if len(g) == nf4.DQ_BLOCK else g / s for g, s in zip(groups, scale)])
    brute = (normed[:, None] - nf4.DYNAMIC[None, :]).abs().argmin(dim=1)  # first (smaller) of equals
    assert torch.equal(nested.absmax.long(), brute)
    decoded = nf4.DYNAMIC[nested.absmax.long()] * scale.repeat_interleave(nf4.DQ_BLOCK)[: c.numel()] + offset
    assert torch.equal(nf4.absmax_of(nested), decoded)
    half_gap = nf4.DYNAMIC.diff().max() / 2
    assert ((decoded - c).abs() <= scale.max() * half_gap * (1 + 1e-5)).all()
    err_plain = (nf4.dequantize_4bit(packed, plain) - w).abs().mean()
    err_nested = (nf4.dequantize_4bit(packed2, nested) - w).abs().mean()
    assert err_nested < err_plain * 1.01
    assert nf4.bits_per_value(plain) == pytest.approx(4.5, abs=1e-3)
    assert nf4.bits_per_value(nested) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)


def test_zero_blocks_half_precision_and_device_copy():
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-2, 2, 64)
    packed, state = nf4.quantize_4bit(w.bfloat16(), double_quant=True)
    back = nf4.dequantize_4bit(packed, state)
    assert back.dtype == torch.bfloat16 and torch.isfinite(back).all()
    assert (back[0] == 0).all() and (back[2] == 0).all()
    assert torch.equal(nf4.dequantize_4bit(packed, state.to("cpu")), back)


def test_bad_input_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize_4bit(torch.randn(4), "int4")
    with pytest.raises(ValueError, match="block_size"):
        nf4.quantize_4bit(torch.randn(4), block_size=63)
    with pytest.raises(ValueError, match="floating-point"):
        nf4.quantize_4bit(torch.arange(4))
