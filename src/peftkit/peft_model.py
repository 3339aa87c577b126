"""``PeftModel`` and the task wrappers: the Hugging Face PEFT interface over our engine.

``PeftModel.base_model`` is an :class:`~peftkit.engine.model.AdapterModel` whose ``.model`` is the
user's model, so parameter names (``base_model.model....``) match HF PEFT's.
"""
from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from peftkit.config import PeftConfig, TaskType
from peftkit.engine.model import AdapterModel
from peftkit.io import hf_format

CLASSIFIER_NAMES = ["classifier", "score"]


class PeftModel(nn.Module):
    """A base model with named adapters. Attribute access falls through to the base model."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        peft_config = self._prepare_config(model, peft_config)
        self.base_model = AdapterModel(model, peft_config, adapter_name, autocast_adapter_dtype)
        self._maybe_enable_input_grads()
        self.forward = _SignedForward(self)

    # -- attribute fall-through (as HF PEFT: model.config, model.device, ...) ------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        if not isinstance(config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(config).__name__}")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return config

    # -- properties ----------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str:
        active = self.base_model.active_adapters
        return active[0] if len(active) == 1 else list(active)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- forward -------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._mixed(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._mixed(adapter_names, args, kwargs), self.base_model.generating():
            return self.base_model.model.generate(*args, **kwargs)

    def _mixed(self, names: list[str] | None, args: tuple, kwargs: dict) -> Any:
        if names is None:
            return nullcontext()
        first = kwargs.get("input_ids", args[0] if args else None)
        if first is None:
            first = kwargs.get("inputs_embeds")
        if first is not None and len(names) != first.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {first.shape[0]} rows")
        return self.base_model.batch_adapters(list(names))

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add an adapter (not activated; ``set_adapter`` activates it)."""
        self.base_model.add_adapter(adapter_name, self._prepare_config(self.get_base_model(), peft_config))
        self.base_model.set_adapter(self.base_model.active_adapters)

    def add_fusion(self, adapter_names: list[str], name: str = "fusion", **options: Any) -> None:
        """Add an AdapterFusion over the bottleneck adapters ``adapter_names`` (not activated;
        ``set_adapter(name)`` activates it and trains only its W_Q, W_K, W_V and modules_to_save).
        ``options`` are FusionConfig fields; task_type defaults to the first member's."""
        from peftkit.methods.adapter.fusion_config import FusionConfig

        first = self.peft_config.get(adapter_names[0]) if adapter_names else None
        options.setdefault("task_type", getattr(first, "task_type", None))
        self.add_adapter(name, FusionConfig(adapter_names=list(adapter_names), **options))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add LoRA adapter ``adapter_name`` combined from ``adapters`` with ``weights`` (not
        activated), as HF PEFT's method of the same name; the math is in methods/lora/weighted.py."""
        from peftkit.methods.lora.weighted import WeightedOptions, add_weighted_adapter

        options = WeightedOptions(combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver,
                                  density, majority_sign_method)
        add_weighted_adapter(self.base_model, list(adapters), list(weights), adapter_name, options)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # -- training helpers ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) counted like HF PEFT: adapter copies count, frozen base counts once."""
        trainable = total = 0
        for param in self.parameters():
            packed = param.__class__.__name__ == "Params4bit" or param.dtype == torch.uint8  # two 4-bit codes a byte
            count = param.numel() * (2 if packed else 1)
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def get_layer_status(self) -> list:
        """One ``TunerLayerStatus`` per adapter layer (peftkit.status), as HF PEFT's method."""
        from peftkit.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """A ``TunerModelStatus``: the adapters' state over all layers, "irregular" where they disagree."""
        from peftkit.status import get_model_status

        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def adapter_loss(self) -> torch.Tensor | None:
        return self.base_model.adapter_loss()

    def after_optimizer_step(self, global_step: int) -> None:
        self.base_model.after_optimizer_step(global_step)

    def adapters_with_step_hooks(self) -> list[str]:
        return self.base_model.adapters_with_step_hooks()

    def training_state(self) -> dict:
        return self.base_model.training_state()

    def load_training_state(self, state: dict) -> None:
        self.base_model.load_training_state(state)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Enable checkpointing on the base model and make sure gradients reach the adapters."""
        self.get_base_model().gradient_checkpointing_enable(**kwargs)
        self._maybe_enable_input_grads(force=True)

    def _maybe_enable_input_grads(self, force: bool = False) -> None:
        # With a frozen base, reentrant checkpointing sees inputs that need no grad and drops the
        # adapters' gradients; making the embedding output require grad fixes it at no real cost.
        base = self.get_base_model()
        on = getattr(base, "is_activation_checkpointing", None)
        on = getattr(base, "is_gradient_checkpointing", False) if on is None else on
        if (force or on) and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    # -- saving and loading --------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **_: Any) -> None:
        """Write each adapter in the HF PEFT layout ("default" at the top, others in subfolders).

        ``path_initial_model_for_weight_conversion``: the folder of this adapter saved right after a
        PiSSA/OLoRA initialisation; the adapter is then written as a plain LoRA adapter (rank 2r) for
        the original base weights (methods/lora/convert.py)."""
        if Path(save_directory).is_file():
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder path")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"cannot save unknown adapters {unknown}; existing: {sorted(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            folder.mkdir(parents=True, exist_ok=True)
            state, config = hf_format.to_hf_state_dict(self.base_model, name), self.peft_config[name].copy()
            if path_initial_model_for_weight_conversion is not None:
                state, config = _for_initial_base(self.base_model, name, state, config,
                                                  path_initial_model_for_weight_conversion)
            hf_format.save_weights(state, folder)
            config.inference_mode = True
            config.save_pretrained(folder)
            hf_format.write_model_card(folder, config)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, **kwargs: Any) -> "PeftModel":
        """Load a saved adapter (ours or HF PEFT's) onto ``model``.

        Both files are read before ``model`` is touched; if the adapter then does not fit, ``model``
        is left as it was (no wrapper, every parameter's ``requires_grad`` and the input-grad hook
        of gradient checkpointing as before).
        """
        config = config or PeftConfig.from_pretrained(model_id)
        state = hf_format.read_weights(model_id)
        config.inference_mode = not is_trainable
        wrapper = TASK_CLASSES.get(config.task_type, PeftModel) if cls is PeftModel else cls
        grads = [(p, p.requires_grad) for p in model.parameters()]
        hooks = _input_grad_hooks(model)
        peft_model = None
        try:
            peft_model = wrapper(model, config, adapter_name, autocast_adapter_dtype)
            peft_model._load_state(state, adapter_name, kwargs.get("strict", True))
        except Exception:
            if peft_model is not None:
                peft_model.base_model.unload()
            for param, flag in grads:
                param.requires_grad_(flag)
            _restore_input_grad_hooks(model, hooks)
            raise
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     strict: bool = True, **_: Any) -> None:
        """Load another saved adapter under ``adapter_name`` (not activated); on failure the model
        keeps its adapters, active adapter and trainable parameters as they were."""
        config = self._prepare_config(self.get_base_model(), PeftConfig.from_pretrained(model_id))
        state = hf_format.read_weights(model_id)
        config.inference_mode = not is_trainable
        self.base_model.add_adapter(adapter_name, config)
        try:
            self._load_state(state, adapter_name, strict)
        except Exception:
            self.base_model._remove_traces(adapter_name)
            self.base_model.refresh_trainable()
            raise
        self.base_model.set_adapter(self.base_model.active_adapters)

    def _load_state(self, state: dict[str, torch.Tensor], adapter_name: str, strict: bool) -> None:
        for note in hf_format.load_state(self.base_model, adapter_name, state, strict=strict):
            warnings.warn(note)


def _for_initial_base(adapter_model: AdapterModel, name: str, state: dict, config: PeftConfig,
                      initial: str | os.PathLike) -> tuple[dict, PeftConfig]:
    """The method's ``convert_initial`` (file tensors, config) for the base before its initialisation."""
    from peftkit.registry import method_for_config

    spec = method_for_config(config)
    if spec.convert_initial is None:
        raise ValueError(f"path_initial_model_for_weight_conversion converts LoRA adapters initialised with PiSSA or "
                         f"OLoRA; adapter {name!r} is a {spec.name} adapter: save it without that argument")
    return spec.convert_initial(adapter_model, name, state, config, initial)


# Where transformers' enable_input_require_grads keeps its hook handles (the list, and its first one).
_HOOK_ATTRS = ("_require_grads_hooks", "_require_grads_hook")


def _input_grad_hooks(model: nn.Module) -> dict[str, Any]:
    """The model's input-grad hook handles as they are now (absent attributes left out)."""
    return {attr: getattr(model, attr) for attr in _HOOK_ATTRS if hasattr(model, attr)}


def _restore_input_grad_hooks(model: nn.Module, before: dict[str, Any]) -> None:
    """Remove the input-grad hooks added since ``before`` and put the attributes back as they were."""
    kept = [*before.get("_require_grads_hooks", []), before.get("_require_grads_hook")]
    for handle in [*getattr(model, "_require_grads_hooks", []), getattr(model, "_require_grads_hook", None)]:
        if handle is not None and not any(handle is k for k in kept):
            handle.remove()
    for attr in _HOOK_ATTRS:
        if attr in before:
            setattr(model, attr, before[attr])
        elif hasattr(model, attr):
            delattr(model, attr)


class _SignedForward:
    """``PeftModel.forward`` bound to one model, showing the base model's signature.

    transformers.Trainer reads ``inspect.signature(model.forward)`` to decide which dataset columns
    to keep; a bare ``(*args, **kwargs)`` would make it drop them all.
    """

    def __init__(self, owner: PeftModel) -> None:
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.owner.get_base_model().forward)
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
        tail = [p for p in base.parameters.values() if p.kind is p.VAR_KEYWORD]
        if not any(p.name == "adapter_names" for p in params):
            params.append(extra)
        return base.replace(parameters=sorted(params, key=lambda p: p.kind) + tail)


class PeftModelForCausalLM(PeftModel):
    """Causal language models; ``generate`` works as on the base model."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models; ``generate`` works as on the base model."""


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for their hidden states."""


class _HeadTrainedModel(PeftModel):
    """Task wrappers whose freshly initialised head trains in full with the adapter."""

    head_names: list[str] = CLASSIFIER_NAMES

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        config = super()._prepare_config(model, config)
        if hasattr(config, "modules_to_save"):
            # HF PEFT lists every usual head name ("classifier", "score"); keep those that exist.
            present = {k.split(".")[-1] for k, _ in model.named_modules()}
            wanted = (config.modules_to_save or []) + self.head_names
            kept = [n for n in wanted if n not in self.head_names or n in present]
            config.modules_to_save = list(dict.fromkeys(kept)) or None
        return config


class PeftModelForSequenceClassification(_HeadTrainedModel):
    """Sequence classifiers; the ``classifier``/``score`` head is added to modules_to_save."""


class PeftModelForTokenClassification(_HeadTrainedModel):
    """Token classifiers; the ``classifier``/``score`` head is added to modules_to_save."""


class PeftModelForQuestionAnswering(_HeadTrainedModel):
    """Extractive QA; the ``qa_outputs`` head is added to modules_to_save."""

    head_names = ["qa_outputs"]


TASK_CLASSES: dict[str | None, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **_: Any) -> PeftModel:
    """Wrap ``model`` with a new adapter, picking the task wrapper from ``peft_config.task_type``."""
    return TASK_CLASSES.get(peft_config.task_type, PeftModel)(model, peft_config, adapter_name, autocast_adapter_dtype)
