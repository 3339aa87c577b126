"""peftkit: parameter-efficient fine-tuning for PyTorch, compatible with Hugging Face PEFT."""
__version__ = "0.1.0"

from peftkit.config import PeftConfig, TaskType  # noqa: E402
from peftkit.io.hf_format import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from peftkit.methods.adalora import AdaLoraConfig  # noqa: E402
from peftkit.methods.adapter import BottleneckConfig  # noqa: E402
from peftkit.methods.ia3 import IA3Config  # noqa: E402
from peftkit.methods.dora import DoraConfig  # noqa: E402
from peftkit.methods.lora import LoraConfig  # noqa: E402
from peftkit.methods.prompt import PromptTuningConfig  # noqa: E402
from peftkit.methods.prefix import PrefixTuningConfig, PTuningV2Config  # noqa: E402
from peftkit.methods.ptuning import PromptEncoderConfig  # noqa: E402
from peftkit.peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftkit.registry import get_method, list_methods  # noqa: E402
from peftkit.methods.bitfit import BitFitConfig  # noqa: E402
from peftkit.methods.partial import PartialConfig  # noqa: E402
from peftkit.methods.diff_pruning import DiffPruningConfig  # noqa: E402

__all__ = [
    "PeftConfig", "TaskType", "AdaLoraConfig", "BottleneckConfig", "DoraConfig", "IA3Config", "LoraConfig", "PromptTuningConfig", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "get_peft_model",
    "get_method", "list_methods", "get_peft_model_state_dict", "set_peft_model_state_dict",
]
__all__ += ["PrefixTuningConfig", "PTuningV2Config", "PromptEncoderConfig"]
__all__ += ["BitFitConfig", "PartialConfig", "DiffPruningConfig"]
from peftkit.methods.adapter import FusionConfig  # noqa: E402

__all__ += ["FusionConfig"]
from peftkit.methods.mam import MamConfig  # noqa: E402

__all__ += ["MamConfig"]
from peftkit.methods.unipelt import UniPeltConfig  # noqa: E402

__all__ += ["UniPeltConfig"]
from peftkit.methods.lora import LoftQConfig  # noqa: E402

__all__ += ["LoftQConfig"]
