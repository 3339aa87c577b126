"""Write the bitsandbytes fixtures of tests/quant/test_bnb_format.py (needs bitsandbytes; CI does not run this).

    PYTHONPATH=src:/path/to/bitsandbytes python tests/data/bnb4bit/make_fixtures.py

quantize_cases.safetensors: inputs and bitsandbytes' quantize_4bit outputs (NF4/FP4, double quantized,
odd sizes, values placed exactly on midpoints between code points).
tiny_llama_nf4/: a one-layer Llama saved by transformers + bitsandbytes in 4 bits, and
reference.safetensors beside it: bitsandbytes' dequantized weight of each quantized layer.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

import bitsandbytes.functional as F
from peftkit.quant import nf4

HERE = Path(__file__).parent


def midpoint_weights(quant_type: str) -> torch.Tensor:
    """Blocks of 64 holding +1 (so absmax = 1, scale exact) and every midpoint between code points."""
    ascending = nf4.code_table(quant_type).sort().values
    mids = (ascending[1:] + ascending[:-1]) / 2
    block = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 - 1 - 2 * mids.numel())])
    return torch.stack([block, block * 0.5])  # (2, 64): absmax 1 and 0.5 (both exact)


def quantize_cases() -> None:
    g = torch.Generator().manual_seed(0)
    inputs = {"random_fp32": torch.randn(7, 13, generator=g), "random_bf16": torch.randn(9, 70, generator=g).bfloat16(),
              "random_fp16": (torch.randn(10, 45, generator=g) * 0.02).half(),
              "mid_nf4": midpoint_weights("nf4"), "mid_fp4": midpoint_weights("fp4")}
    out = {}
    for name, w in inputs.items():
        out[f"{name}.input"] = w
        for quant_type in ("nf4", "fp4"):
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
            out |= {f"{name}.{quant_type}.packed": packed.flatten(), f"{name}.{quant_type}.absmax": state.absmax,
                    f"{name}.{quant_type}.nested_absmax": state.state2.absmax,
                    f"{name}.{quant_type}.offset": state.offset.reshape(1),
                    f"{name}.{quant_type}.dequantized": F.dequantize_4bit(packed, state)}
    out["dynamic_map"] = F.create_dynamic_map()
    out["fp4_map"] = F.get_4bit_type("fp4", device="cpu")
    save_file(out, str(HERE / "quantize_cases.safetensors"))


def tiny_llama() -> None:
    import tempfile

    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as src:
        LlamaForCausalLM(config).half().save_pretrained(src)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16)
        model = LlamaForCausalLM.from_pretrained(src, quantization_config=quant, device_map="cpu", dtype=torch.float16)
    model.save_pretrained(HERE / "tiny_llama_nf4")
    (HERE / "tiny_llama_nf4" / "generation_config.json").unlink(missing_ok=True)
    reference = {name: F.dequantize_4bit(m.weight.data, m.weight.quant_state)
                 for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    save_file(reference, str(HERE / "tiny_llama_nf4_reference.safetensors"))


if __name__ == "__main__":
    quantize_cases()
    tiny_llama()
