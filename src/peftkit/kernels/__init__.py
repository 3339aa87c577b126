"""Fast paths for training: fused autograd functions, Triton kernels with PyTorch twins.

Each fused op has a `*_reference` twin in plain PyTorch that is its spec and its CPU path;
`backend.use_triton` picks the backend at call time. The LoRA hot path lives in the
`lora_linear` module: `peftkit.kernels.lora_linear.lora_linear(x, weight, bias, A, B, s)`.
`graph_train_step` (opt-in) records a whole training step as one CUDA graph and replays it.
"""

from . import lora_linear
from .cross_entropy import causal_lm_loss_reference, fused_causal_lm_loss
from .graphs import graph_train_step
from .norm import rms_norm, rms_norm_reference
from .patch import PatchReport, patch_model, unpatch_model
from .rope import apply_rope, rope_reference
from .swiglu import silu_mul, silu_mul_reference

__all__ = [
    "PatchReport", "apply_rope", "causal_lm_loss_reference", "fused_causal_lm_loss", "graph_train_step",
    "lora_linear",
    "patch_model", "rms_norm", "rms_norm_reference", "rope_reference", "silu_mul", "silu_mul_reference",
    "unpatch_model",
]
