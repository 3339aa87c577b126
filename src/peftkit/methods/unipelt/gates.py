"""UniPELT's gated parts (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient
Language Model Tuning"). Each part is its plain method scaled by a learned gate in (0, 1):

    LoRA      h  = W0 x + G_L(x) * s B A x,                   G_L(x) = sigmoid(W_L x + b_L)   per token
    adapter   h' = h + G_A(h) * s up(act(down(h))),           G_A(h) = sigmoid(W_A h + b_A)   per token
    prefix    attn_l = softmax(q [Pk_l ; K]^T / sqrt(hd)) [G_P Pv_l ; V],
              G_P = sigmoid(W_P mean_t(x_t) + b_P)            per example and layer, t over real tokens

W_L (1 x in), W_A (1 x d), W_P (1 x d) and the biases train with the parts (nn.Linear's init); the
base stays frozen. With a gate at 1 each part is exactly its plain method (methods/lora, adapter,
prefix). Gates depend on the input, so nothing here can be merged.

The prefix gate. The prefix reaches the model as a key/value cache filled before the forward
(methods/prefix/inputs.py), but G_P depends on each layer's own input x (batch, n, d), known only
when that layer runs. So :class:`PrefixGateLayer` wraps every attention module (found by structure:
a module with an int ``layer_idx`` whose forward takes ``past_key_values``, as transformers' Llama,
GPT-2 and BERT attentions are) and, at call time, before the attention runs, rescales the prefix
values its layer holds in the cache: ``values <- G_P * Pv_l``. The cache's layer holds exactly the
p prefix positions then; a cache that holds more (generate's later steps, or a cache an earlier call
returned) was gated when it was filled, so the gate reads the tokens of the call that fills the
cache (the prompt, when generating).

The mean runs over the real tokens only: padding is read from the attention mask the model hands
the attention module (transformers 5 builds it from the 2D padding mask, widened by the prefix):
a (b, 1 or H, n, p + n) mask, boolean (True: attend) or additive (0: attend, a large negative:
masked), or the 2D (b, p + n) mask itself under flash attention. Key position j is a real token
when some query attends to it (each real token attends to itself); the last n key positions are
this call's tokens. No mask (BERT without padding) means every position is real; a mask of another
kind (flex attention's BlockMask) cannot be read, and then every position counts, padding included.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers import EncoderDecoderCache

from peftkit.engine.layer import AdapterLayer, linear_layout
from peftkit.engine.targets import is_linear
from peftkit.methods.adapter.layer import BottleneckLayer
from peftkit.methods.lora.layer import LoraLinear


def new_gate(width: int, device: torch.device) -> nn.Linear:
    """W_g (1 x width), b_g: nn.Linear's init, float32."""
    return nn.Linear(width, 1, device=device, dtype=torch.float32)


def gate(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(W_g x + b_g) in x's dtype: (..., width) -> (..., 1)."""
    return torch.sigmoid(linear(x.to(linear.weight.dtype))).to(x.dtype)


class GatedLoraLinear(LoraLinear):
    """LoRA whose update is scaled per token by G_L(x) (the math above)."""

    can_merge = False
    file_tensors = ("lora_A", "lora_B", "lora_gate")
    keeps_input_dtype = False  # not checked for its gate's path: the Trainer keeps autocast on

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_gate = nn.ModuleDict()

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        self.lora_gate[name] = new_gate(self.in_features, self.base_weight().device)  # first: LoRA lists it
        super().add_adapter(name, config, key)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.lora_gate[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        gate_linear = self.lora_gate[name]
        return {**super().adapter_tensors(name), "lora_gate.weight": gate_linear.weight, "lora_gate.bias": gate_linear.bias}

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return gate(self.lora_gate[name], x) * super().delta(x, name)  # (..., 1) * (..., out)

    def fused_adapter(self) -> None:
        return None  # the fused kernel has no gate: always the general path (additive_forward)

    def stacked_mixed_batch(self) -> bool:
        return False

    def merge(self, names: list[str], safe: bool = False) -> float:
        raise ValueError("gated LoRA (UniPELT) scales its update by a gate that depends on the input, so it "
                         "cannot be merged into the weights; keep the adapter model, or unload() it")


class GatedBottleneckLayer(BottleneckLayer):
    """A sequential bottleneck adapter whose output is scaled per token by G_A(h) (the math above)."""

    file_tensors = ("adapter_down", "adapter_up", "adapter_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_gate = nn.ModuleDict()

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        super().add_adapter(name, config, key)
        self.adapter_gate[name] = new_gate(self.out_features, self.base_weight().device)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.adapter_gate[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        gate_linear = self.adapter_gate[name]
        return {**super().adapter_tensors(name), "adapter_gate.weight": gate_linear.weight,
                "adapter_gate.bias": gate_linear.bias}

    def adapter_output(self, h: torch.Tensor, name: str) -> torch.Tensor:
        return gate(self.adapter_gate[name], h) * super().adapter_output(h, name)  # (..., 1) * (..., d)


def is_attention(module: nn.Module) -> bool:
    """An attention module that reads the key/value cache itself (transformers' Llama, GPT-2, BERT)."""
    return isinstance(getattr(module, "layer_idx", None), int) and \
        "past_key_values" in inspect.signature(module.forward).parameters


def attention_keys(model: nn.Module, config: Any) -> list[str]:
    """``find_targets`` of the prefix gates: the attention modules of the layers the prefix reaches
    (an attention already gated for another adapter is found as its PrefixGateLayer)."""
    gated = {id(m.base_layer): k for k, m in model.named_modules() if isinstance(m, PrefixGateLayer)}
    keys = [gated.get(id(m), k) for k, m in model.named_modules()
            if is_attention(m) and m.layer_idx < config.num_layers]
    if not keys:
        raise ValueError(f"UniPELT's prefix gate found no attention module in {type(model).__name__} (a module with "
                         "an int layer_idx whose forward takes past_key_values); use gates=False for this model")
    return keys


@functools.cache
def forward_signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.forward`` without ``self``: finds an argument however it was passed."""
    signature = inspect.signature(cls.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def real_tokens(mask: Any, n: int) -> torch.Tensor | None:
    """(b, n) bool, True at the real tokens of the n this attention call runs over, read from the
    mask the model passes the attention module (the forms are in the module docstring); None: all."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4) or mask.shape[-1] < n:
        return None
    if mask.dim() == 2:  # flash attention: the 2D padding mask, (b, p + n)
        return mask[:, -n:].bool()
    if mask.is_floating_point():
        seen = mask > torch.finfo(mask.dtype).min / 2  # additive: 0 attend, min or -inf masked
    else:
        seen = mask.bool()  # (b, 1 or H, n, p + n), True: attend
    return seen.any(dim=2).any(dim=1)[:, -n:]  # key j is real when some query attends to it


def token_mean(hidden: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """(b, n, d) -> (b, d): the mean over each row's real tokens (all n when ``real`` is None)."""
    if real is None:
        return hidden.mean(dim=1)
    weight = real.to(hidden.dtype).expand(hidden.shape[0], -1)[..., None]  # (b, n, 1)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1)


class PrefixGateLayer(AdapterLayer):
    """G_P around one attention module: gates the prefix values of its layer in the cache (above)."""

    can_merge = False
    file_tensors = ("prefix_gate",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.width = linear_layout(next(m for m in base_layer.modules() if is_linear(m)))[1]
        self.prefix_gate = nn.ModuleDict()
        self.virtual_tokens: dict[str, int] = {}

    def add_adapter(self, name: str, config: Any, key: str) -> None:
        self.prefix_gate[name] = new_gate(self.width, self.base_weight().device)
        self.virtual_tokens[name] = config.num_virtual_tokens

    def delete_adapter(self, name: str) -> None:
        del self.prefix_gate[name]
        self.virtual_tokens.pop(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_names(self) -> list[str]:
        return list(self.prefix_gate.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"prefix_gate.weight": self.prefix_gate[name].weight, "prefix_gate.bias": self.prefix_gate[name].bias}

    def merge(self, names: list[str], safe: bool = False) -> float:
        raise ValueError("UniPELT's prefix gate is not a weight update and cannot be merged")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        own = [] if self.disabled else self.unmerged_active()  # at most one: prefixes cannot stack
        cache = kwargs.get("past_key_values")
        if own and cache is not None:
            given = forward_signature(type(self.base_layer)).bind_partial(*args, **kwargs).arguments
            hidden = given["hidden_states"] if "hidden_states" in given else args[0]  # (b, n, d)
            self.gate_prefix(cache, hidden, own[0], real_tokens(given.get("attention_mask"), hidden.shape[1]))
        return self.base_layer(*args, **kwargs)

    def gate_prefix(self, cache: Any, hidden: torch.Tensor, name: str, real: torch.Tensor | None = None) -> None:
        """values <- G_P * values for this layer's cache when it holds just the p prefix positions;
        ``real`` (b, n) marks the tokens the mean runs over (None: all)."""
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        if self.base_layer.layer_idx >= len(cache.layers):
            return
        layer = cache.layers[self.base_layer.layer_idx]
        values = getattr(layer, "values", None)  # (b, H, p, hd) when just filled with the prefix
        if values is None or values.dim() != 4 or values.shape[-2] != self.virtual_tokens[name]:
            return
        g = gate(self.prefix_gate[name], token_mean(hidden, real))  # (b, 1)
        layer.values = values * g[:, :, None, None].to(values.dtype)  # (b, 1, 1, 1) * (b, H, p, hd)
