"""LoRA layers (Hu et al., 2021).

    h = W0 x + b + s * B A dropout(x),    s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

W0 (out x in) and b stay frozen; A (r x in) and B (out x r) train. Initialisation: A is
kaiming-uniform (a = sqrt 5), or N(0, 1/r^2) with "gaussian"; B = 0, so a fresh adapter changes
nothing. Merging adds s * B A to W0, transposed where the base stores its weight as (in, out)
(GPT-2's Conv1D, ``fan_in_fan_out``).

PiSSA, OLoRA and LoftQ (``init_lora_weights`` "pissa", "pissa_niter_K", "olora", "loftq"; Linear and
Conv1D only) compute A and B from W0 and replace W0 by what the adapter leaves out (W0 - s B A, or
LoftQ's dequantized NF4 codes): the math is in methods/lora/inits.py. The factors are set when the
layer gets the adapter; the base is rewritten once every target has them (``rewrite_base``). Other
adapters, ``disable_adapter`` and "__base__" rows then see the rewritten base, so a mixed batch beside
such an adapter is refused (``check_batch``); deleting it leaves the rewritten base, as in HF PEFT.

Embeddings: h = W0[x] + s * A^T[x] B^T with A (r x vocab) = 0 and B (dim x r) ~ N(0, 1) at init.
Convolutions: A is a convolution with the base's kernel, stride and padding into r channels and B
a 1x1 convolution back out, so the merged kernel is B A contracted over r.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.engine.layer import (AdapterLayer, additive_forward, additive_merge, additive_unmerge,
                                  linear_layout, sync_fan_in_fan_out)
from peftkit.kernels.lora_linear import lora_linear
from peftkit.methods.lora import inits
from peftkit.methods.lora.config import LoraConfig, is_weight_init
from peftkit.methods.lora.mixed import Stack, stacked_delta


class LoraLayer(AdapterLayer):
    """Bookkeeping shared by the LoRA wrappers; subclasses supply the factors and the delta."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.last_merge_error = 0.0
        self.pending_base: dict[str, tuple[str, Any]] = {}  # adapter -> (init mode, inits.factors' base form)
        self.base_rewritten: dict[str, str] = {}  # adapter -> the init mode that rewrote the base weight

    def add_adapter(self, name: str, config: LoraConfig, key: str) -> None:
        self.r[name], self.lora_alpha[name] = config.rank_for(key), config.alpha_for(key)
        self.scaling[name] = config.scaling_for(key)
        p = self.dropout_p[name] = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.make_factors(name, self.r[name])
        if is_weight_init(config.init_lora_weights):
            self.init_from_weight(name, config, key)
        else:
            self.init_factors(name, config.init_lora_weights)
        device = self.base_weight().device
        for tensor in self.adapter_tensors(name).values():
            tensor.data = tensor.data.to(device=device, dtype=torch.float32)

    def delete_adapter(self, name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.dropout_p):
            table.pop(name)
        self.pending_base.pop(name, None)
        self.base_rewritten.pop(name, None)
        del self.lora_dropout[name]
        self.drop_factors(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def merge(self, names: list[str], safe: bool = False) -> float:
        """Fold each named adapter into the base weight; return the largest rounding error."""
        return additive_merge(self, names, safe)

    def unmerge(self) -> None:
        additive_unmerge(self)

    def check_batch(self, names: list[str]) -> None:
        """Refuse a mixed batch whose other rows would run on a base another adapter rewrote."""
        for owner, mode in self.base_rewritten.items():
            others = sorted({n for n in names if n != owner})
            if others:
                raise ValueError(f"adapter {owner!r} was initialised with init_lora_weights={mode!r}, which rewrote "
                                 f"the base weights, so rows for {others} cannot share a batch with it (they would "
                                 "run on the rewritten base); save it converted to plain LoRA "
                                 "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that "
                                 "on the original base to mix adapters")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return additive_forward(self, x, *args, **kwargs)

    # -- per layer type ------------------------------------------------------------------------
    def make_factors(self, name: str, r: int) -> None:
        raise NotImplementedError

    def drop_factors(self, name: str) -> None:
        raise NotImplementedError

    def init_factors(self, name: str, mode: bool | str) -> None:
        raise NotImplementedError

    def init_from_weight(self, name: str, config: LoraConfig, key: str) -> None:
        """PiSSA / OLoRA / LoftQ factors from the base weight (layers that can take them override this)."""
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} works on Linear and GPT-2 Conv1D layers; "
                         f"{key!r} is a {type(self.base_layer).__name__}: leave it out of target_modules "
                         "(or exclude_modules), or use init_lora_weights=True")

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change to the base weight, in float32 and the base weight's layout."""
        raise NotImplementedError


def init_pair(a: torch.Tensor, b: torch.Tensor, mode: bool | str, r: int) -> None:
    """A random and B zero (identity start); with mode False both stay random (a real change)."""
    if mode is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)
    if mode == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out))."""

    file_tensors = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.fan_in_fan_out, self.in_features, self.out_features = self.layout(base_layer)
        self.plain_linear = type(base_layer) is nn.Linear  # subclasses may hook forward: no fusion
        self.mixed_stack: Stack | None = None  # a mixed batch's stacked adapters, reused within one call

    layout = staticmethod(linear_layout)  # (fan_in_fan_out, in, out) of the base; 4-bit bases override
    keeps_input_dtype = True  # the fused node and `delta` cast A and B to the activations' dtype

    def add_adapter(self, name: str, config: LoraConfig, key: str) -> None:
        sync_fan_in_fan_out(config, self, key)
        super().add_adapter(name, config, key)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.stacked_mixed_batch():
            result = self.base_layer(x, *args, **kwargs)
            return result + stacked_delta(self, x).to(result.dtype)
        fused = self.fused_layer(x.dtype)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return lora_linear(x, *fused)

    def stacked_mixed_batch(self) -> bool:
        """A mixed batch that the stacked path (mixed.py) computes exactly: unmerged, no dropout."""
        names = self.batch_adapter_names
        if names is None or self.disabled or self.merged_adapters:
            return False  # disabled: base only; merged: the general path raises with the fix
        own = [n for n in set(names) if n in self.r]
        return bool(own) and not (self.training and any(self.dropout_p[n] > 0 for n in own))

    def fused_adapter(self) -> str | None:
        """The one adapter to run as a single fused node, or None when the general path is needed.

        Called on every forward of every adapted linear, so it only reads plain attributes.
        """
        if self.disabled or self.batch_adapter_names is not None or self.merged_adapters or not self.plain_linear:
            return None
        active = self.active_adapters
        if len(active) != 1 or active[0] not in self.r:
            return None
        name = active[0]
        return name if not (self.training and self.dropout_p[name] > 0) else None

    def fused_layer(self, dtype: torch.dtype) -> tuple | None:
        """lora_linear's arguments after x, (weight, bias, A, B, scaling, quant), when this layer runs
        as one fused node on activations of ``dtype``; None when it needs the general path."""
        name = self.fused_adapter()
        frozen = None if name is None else self.fused_weight(dtype)
        if frozen is None:
            return None
        weight, quant = frozen
        return (weight, self.base_layer.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name], quant)

    def fused_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, Any] | None:
        """(base weight, its 4-bit QuantState or None) for the fused node at activations of ``dtype``,
        or None where the base computes differently (4-bit layers override this)."""
        return self.base_layer.weight, None

    def make_factors(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def drop_factors(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def init_factors(self, name: str, mode: bool | str) -> None:
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, mode, self.r[name])

    def init_from_weight(self, name: str, config: LoraConfig, key: str) -> None:
        """Set A, B from W (inits.factors) and keep what the base becomes for ``rewrite_base``."""
        weight, mode = self.base_weight(), config.init_lora_weights
        inits.check_weight(key, weight, self.r[name], mode)
        if weight.device.type == "meta":  # shapes only (the params/memory tools): nothing to decompose
            return self.init_factors(name, True)
        w = weight.detach().float()
        a, b, base_form = inits.factors(config, w.T if self.fan_in_fan_out else w, self.r[name], self.scaling[name])
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)  # (r, in)
            self.lora_B[name].weight.copy_(b)  # (out, r)
        self.pending_base[name] = (mode, base_form)

    def rewrite_base(self, name: str) -> None:
        """Replace W by W - s B A (or LoftQ's dequantized codes), from the factors as they are now."""
        mode, base_form = self.pending_base.pop(name)
        weight = self.base_weight()
        if base_form is None:
            w = weight.detach().float()
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            new = inits.residual(w.T if self.fan_in_fan_out else w, a, b, self.scaling[name])  # (out, in)
        else:
            new = inits.dequantized(base_form)  # (out, in)
        with torch.no_grad():
            weight.copy_((new.T if self.fan_in_fan_out else new).to(weight.dtype))
        self.base_rewritten[name] = mode

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        h = self.lora_dropout[name](x)
        # Cast the small factors to the activations' dtype, never the activations up to fp32.
        return F.linear(F.linear(h, a.to(h.dtype)), b.to(h.dtype)) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: a low-rank table looked up beside the base table."""

    file_tensors = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def adapter_names(self) -> list[str]:
        return list(self.lora_embedding_A.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def make_factors(self, name: str, r: int) -> None:
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, vocab))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r))

    def drop_factors(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def init_factors(self, name: str, mode: bool | str) -> None:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        nn.init.normal_(b)
        if mode is False:
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        rows = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)  # (..., r)
        dtype = base.weight.dtype if base.weight.is_floating_point() else rows.dtype
        return (rows @ b.T).to(dtype) * self.scaling[name]  # (..., dim)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (b @ a).T * self.scaling[name]  # (vocab, dim)


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (groups must be 1)."""

    file_tensors = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported; "
                             "exclude this module with exclude_modules")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def make_factors(self, name: str, r: int) -> None:
        base, conv = self.base_layer, type(self.base_layer)
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                 base.dilation, bias=False, padding_mode=base.padding_mode)
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, bias=False)

    def drop_factors(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def init_factors(self, name: str, mode: bool | str) -> None:
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, mode, self.r[name])

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        h = self.lora_dropout[name](x)
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(h.to(a.weight.dtype))) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, *kernel)
        b = self.lora_B[name].weight.float().flatten(1)  # (out, r)
        return torch.einsum("or,ri...->oi...", b, a) * self.scaling[name]  # (out, in, *kernel)
