"""Quantized base models for QLoRA: NF4/FP4 blockwise 4-bit storage (``nf4``), a frozen 4-bit
linear layer (``Linear4bit``), the model-level API (``quantize_model``, ``QuantConfig``,
``prepare_model_for_kbit_training``) and bitsandbytes' checkpoint format (``load_quantized_model``,
``save_quantized_model``)."""
from peftkit.quant import nf4  # noqa: F401  (first: the kernels import it)
from peftkit.quant.nf4 import NF4, QuantState, dequantize_4bit, quantize_4bit
from peftkit.quant.linear4bit import Linear4bit
from peftkit.quant.config import QuantConfig
from peftkit.quant.model import dequantize_model, is_quantized, prepare_model_for_kbit_training, quantize_model
from peftkit.quant.checkpoint import load_quantized_model, save_quantized_model

__all__ = ["NF4", "QuantState", "quantize_4bit", "dequantize_4bit", "Linear4bit", "QuantConfig", "quantize_model",
           "dequantize_model", "is_quantized", "prepare_model_for_kbit_training", "load_quantized_model",
           "save_quantized_model"]
