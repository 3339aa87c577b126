"""peftkit: parameter-efficient fine-tuning for PyTorch, compatible with Hugging Face PEFT."""
__version__ = "0.1.0"

from peftkit.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peftkit.config import PeftConfig, TaskType
from peftkit.inject import inject_adapter_in_model
from peftkit.io.hf_format import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapter import BottleneckConfig, FusionConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.dora import DoraConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoftQConfig, LoraConfig
from peftkit.methods.mam import MamConfig
from peftkit.methods.partial import PartialConfig
from peftkit.methods.prefix import PrefixTuningConfig, PTuningV2Config
from peftkit.methods.prompt import PromptTuningConfig
from peftkit.methods.ptuning import PromptEncoderConfig
from peftkit.methods.unipelt import UniPeltConfig
from peftkit.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftkit.registry import get_method, list_methods
from peftkit.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = [
    # wrapping, loading, saving (HF PEFT's names)
    "PeftConfig", "TaskType", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "get_peft_model", "inject_adapter_in_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "get_layer_status", "get_model_status",
    "TunerLayerStatus", "TunerModelStatus",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    # one config per method
    "LoraConfig", "LoftQConfig", "DoraConfig", "AdaLoraConfig", "IA3Config", "BottleneckConfig", "FusionConfig",
    "PromptTuningConfig", "PrefixTuningConfig", "PTuningV2Config", "PromptEncoderConfig", "BitFitConfig",
    "PartialConfig", "DiffPruningConfig", "MamConfig", "UniPeltConfig",
    # the registry
    "get_method", "list_methods",
]
