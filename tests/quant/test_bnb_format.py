"""bitsandbytes' 4-bit format without bitsandbytes: codes and double quantization equal to its output
(checked-in fixtures written by bitsandbytes, and bitsandbytes itself where installed), checkpoints
it saved load bit for bit, ours round-trip and load in bitsandbytes, corrupt files are named."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit import LoraConfig, get_peft_model
from peftkit.quant import Linear4bit, QuantConfig, load_quantized_model, nf4, quantize_model, save_quantized_model
from peftkit.quant import bnb_format
from peftkit.quant.bnb_format import QuantizedFileError

DATA = Path(__file__).resolve().parents[1] / "data" / "bnb4bit"
CASES = ("random_fp32", "random_bf16", "random_fp16", "mid_nf4", "mid_fp4")
LUT_STEP = 2 / 65535  # bitsandbytes' CPU library picks 8-bit codes from a table of this resolution


@pytest.fixture(scope="module")
def cases():
    return load_file(str(DATA / "quantize_cases.safetensors"))


def near_dynamic_midpoint(normed: torch.Tensor) -> torch.Tensor:
    ascending = nf4.DYNAMIC
    mids = (ascending[1:] + ascending[:-1]) / 2
    return (normed[:, None] - mids[None, :]).abs().min(dim=1).values < LUT_STEP


def assert_nested_codes_match(ours: nf4.QuantState, bnb_codes: torch.Tensor) -> None:
    """Equal, except where bitsandbytes' CPU table lookup decides within LUT_STEP of a midpoint."""
    differ = ours.absmax != bnb_codes
    if differ.any():
        plain = nf4.absmax_of(ours)  # close enough to recover which constants sit near a midpoint
        centred = plain - ours.nested.offset
        normed = centred / ours.nested.absmax.repeat_interleave(ours.nested.block_size)[: centred.numel()]
        assert near_dynamic_midpoint(normed[differ]).all()
        assert differ.float().mean() < 0.05


# ------------------------------------------------------------------------ tables and quantization
def test_dynamic_map_is_bitsandbytes_table_built_from_its_definition(cases):
    table = nf4.dynamic_map()
    assert torch.equal(table, cases["dynamic_map"])
    assert table.numel() == 256 and (table.diff() > 0).all() and table[-1] == 1 and (table == 0).sum() == 1
    assert table[0] == pytest.approx(-0.99297, abs=1e-5) and table[128] == pytest.approx(5.5e-7, rel=1e-5)


def test_fp4_table_is_bitsandbytes_in_bit_pattern_order(cases):
    assert torch.equal(nf4.FP4, cases["fp4_map"])
    assert nf4.FP4[3] == 1 and nf4.FP4[11] == -1 and torch.equal(nf4.FP4[8:], -nf4.FP4[:8])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", CASES)
def test_quantize_4bit_gives_bitsandbytes_bytes(cases, case, quant_type):
    w = cases[f"{case}.input"]
    packed, state = nf4.quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(packed, cases[f"{case}.{quant_type}.packed"])
    assert torch.equal(state.nested.absmax, cases[f"{case}.{quant_type}.nested_absmax"])
    assert torch.equal(state.nested.offset.reshape(1), cases[f"{case}.{quant_type}.offset"])
    assert_nested_codes_match(state, cases[f"{case}.{quant_type}.absmax"])
    with_bnb_codes = nf4.QuantState(state.shape, state.dtype, quant_type, 64, cases[f"{case}.{quant_type}.absmax"],
                                    state.nested)
    back = nf4.dequantize_4bit(packed, with_bnb_codes)
    assert back.dtype == w.dtype and torch.equal(back, cases[f"{case}.{quant_type}.dequantized"].view(w.shape))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_exactly_between_two_code_points_take_the_smaller(quant_type):
    table = nf4.code_table(quant_type)
    ascending = table.sort().values
    mids = (ascending[1:] + ascending[:-1]) / 2  # float32 midpoints
    w = torch.cat([torch.ones(1), mids, torch.zeros(64 - 1 - mids.numel())])  # absmax 1: scaling is exact
    codes = nf4.unpack_4bit(nf4.quantize_4bit(w, quant_type)[0], 64)[1: 1 + mids.numel()]
    assert torch.equal(table[codes], ascending[:-1])  # each midpoint went down
    above = torch.nextafter(mids, torch.tensor(2.0))
    w[1: 1 + mids.numel()] = above
    codes = nf4.unpack_4bit(nf4.quantize_4bit(w, quant_type)[0], 64)[1: 1 + mids.numel()]
    assert torch.equal(table[codes], ascending[1:])  # one ulp above goes up


def test_odd_count_pads_with_the_code_of_zero_and_short_block_divides():
    w = torch.randn(7, 13, generator=torch.Generator().manual_seed(5))  # 91 values: odd, short last block
    packed, state = nf4.quantize_4bit(w, "nf4")
    assert packed.numel() == 46 and packed[-1] & 0xF == 7  # NF4 code 7 is 0
    last = w.flatten()[64:]
    scaled = last / state.absmax[1]
    assert torch.equal(nf4.unpack_4bit(packed, 91)[64:], nf4.nearest_code(scaled, nf4.NF4))


def test_all_equal_constants_give_code_zero_and_decode_exactly():
    w = torch.ones(4, 64)  # every block's absmax is 1: centred constants are all 0
    packed, state = nf4.quantize_4bit(w, double_quant=True)
    assert state.absmax.tolist() == [0, 0, 0, 0] and state.nested.absmax.tolist() == [0.0]
    assert torch.equal(nf4.dequantize_4bit(packed, state), w)


# --------------------------------------------------------------------- checkpoints written by bnb
def test_checkpoint_saved_by_bitsandbytes_loads_bit_for_bit_and_takes_qlora():
    model = load_quantized_model(DATA / "tiny_llama_nf4")
    reference = load_file(str(DATA / "tiny_llama_nf4_reference.safetensors"))
    layers = {k: m for k, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(layers) == sorted(reference) and len(layers) == 7
    for name, layer in layers.items():
        assert layer.compute_dtype == torch.float16 and layer.double_quant and layer.weight_dtype == torch.float16
        assert torch.equal(layer.dequantize(torch.float16), reference[name])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as saved
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert len(grads) == 14 and all(g is not None and torch.isfinite(g).all() for g in grads)


# -------------------------------------------------------------------------- our checkpoints
def tiny_quantized(quant_type="nf4", double_quant=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return quantize_model(LlamaForCausalLM(config), QuantConfig(bnb_4bit_quant_type=quant_type,
                                                                bnb_4bit_use_double_quant=double_quant))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_save_then_load_is_bit_exact_in_bitsandbytes_layout(tmp_path, quant_type, double_quant):
    model = tiny_quantized(quant_type, double_quant)
    save_quantized_model(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    expected = {q, f"{q}.absmax", f"{q}.quant_map", f"{q}.quant_state.bitsandbytes__{quant_type}"}
    expected |= {f"{q}.nested_absmax", f"{q}.nested_quant_map"} if double_quant else set()
    assert {k for k in tensors if k.startswith(q)} == expected
    assert tensors[q].shape == (128, 1) and tensors[q].dtype == torch.uint8
    assert "lm_head.weight" in tensors  # untied here: the head is stored in full precision
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == quant_type
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    loaded = load_quantized_model(tmp_path / "a")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, 16, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    save_quantized_model(loaded, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_save_refuses_a_model_without_4bit_layers_and_a_non_bnb_block_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="quantize_model first"):
        save_quantized_model(plain, tmp_path)
    quantize_model(plain, QuantConfig(block_size=32))
    with pytest.raises(ValueError, match="block_size 64"):
        save_quantized_model(plain, tmp_path)
    with pytest.raises(ValueError, match="holds adapters"):
        save_quantized_model(get_peft_model(tiny_quantized(), LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- corrupt files
def layer_tensors():
    layer = Linear4bit.from_linear(torch.nn.Linear(70, 33), double_quant=True)
    return bnb_format.layer_tensors("fc", layer)


STATE = "fc.weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("fc.weight.absmax"), "'fc.weight.absmax' is missing"),
    (lambda t: t.update({"fc.weight.absmax": t["fc.weight.absmax"].float()}), "'fc.weight.absmax' has dtype"),
    (lambda t: t.update({"fc.weight": t["fc.weight"][:-1]}), "'fc.weight' has shape"),
    (lambda t: t.update({STATE: torch.tensor(list(b"{not json"), dtype=torch.uint8)}), "does not hold UTF-8 JSON"),
    (lambda t: t.update({STATE: torch.tensor(list(json.dumps({"quant_type": "nf4"}).encode()), dtype=torch.uint8)}),
     "blocksize"),
    (lambda t: t.update({"fc.weight.quant_map": -t["fc.weight.quant_map"]}), "'fc.weight.quant_map' is not nf4"),
    (lambda t: t.pop("fc.weight.nested_absmax"), "nested_absmax is not stored"),
])
def test_corrupt_layer_tensors_are_named(change, message):
    tensors = layer_tensors()
    change(tensors)
    with pytest.raises(QuantizedFileError, match=message):
        bnb_format.read_layer("fc", tensors)


def test_unknown_quant_type_and_quant_config_are_refused():
    with pytest.raises(QuantizedFileError, match="'int4' is unknown"):
        bnb_format.quantized_prefixes(["fc.weight", "fc.weight.quant_state.bitsandbytes__int4"])
    with pytest.raises(QuantizedFileError, match="not a 4-bit checkpoint"):
        bnb_format.quant_config_from({"quant_method": "bitsandbytes", "load_in_8bit": True}, "config.json")
    with pytest.raises(QuantizedFileError, match="bnb_4bit_quant_type"):
        bnb_format.quant_config_from({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "int4"}, "config.json")


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DATA / "tiny_llama_nf4", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key.replace("up_proj", "nope")] = tensors[key].clone()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(QuantizedFileError, match="'model.layers.0.mlp.nope'"):
        load_quantized_model(folder)
    del tensors[key.replace("up_proj", "nope")], tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(QuantizedFileError, match="missing from the checkpoint: \\['model.norm.weight'\\]"):
        load_quantized_model(folder)


# --------------------------------------------------------------- against bitsandbytes itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_4bit_equals_installed_bitsandbytes(dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    for shape in [(33, 70), (1, 1), (5, 129), (64, 48)]:
        w = torch.randn(shape, generator=g).to(dtype)
        for quant_type in ("nf4", "fp4"):
            bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
            packed, state = nf4.quantize_4bit(w, quant_type, 64, True)
            assert torch.equal(packed, bnb_packed.flatten())
            assert torch.equal(state.nested.absmax, bnb_state.state2.absmax)
            assert torch.equal(state.nested.offset, bnb_state.offset)
            assert_nested_codes_match(state, bnb_state.absmax)
            ours = nf4.QuantState(state.shape, dtype, quant_type, 64, bnb_state.absmax, state.nested)
            assert torch.equal(nf4.dequantize_4bit(packed, ours), F.dequantize_4bit(bnb_packed, bnb_state))


def test_bitsandbytes_reads_our_tensors_and_transformers_loads_our_folder(tmp_path):
    F = pytest.importorskip("bitsandbytes.functional")
    model = tiny_quantized()
    save_quantized_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, layer in ((k, m) for k, m in model.named_modules() if isinstance(m, Linear4bit)):
        state = F.QuantState.from_dict({k[len(name) + 8:]: v for k, v in tensors.items()
                                        if k.startswith(name + ".weight.")}, device="cpu")
        assert torch.equal(F.dequantize_4bit(tensors[name + ".weight"], state), layer.dequantize(torch.float32))
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    except Exception as err:  # noqa: BLE001  (this transformers / bitsandbytes cannot load 4-bit on CPU)
        pytest.skip(f"transformers cannot load a 4-bit checkpoint here: {err}")
    for name, module in hf.named_modules():
        if type(module).__name__ == "Linear4bit":
            ours = model.get_submodule(name).dequantize(torch.float32)
            assert torch.equal(F.dequantize_4bit(module.weight.data, module.weight.quant_state).float(), ours)
