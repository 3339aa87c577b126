"""Prompt tuning configuration (field names as in HF PEFT's ``PromptTuningConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftkit.config import PeftConfig, check_field

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


def positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PromptTuningConfig(PeftConfig):
    """``num_virtual_tokens`` trainable embeddings prepended to the input (Lester et al., 2021)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Length of the soft prompt, in tokens (HF has no default; peftkit uses 20)."})
    token_dim: int | None = field(default=None, metadata={"help": "Width of the prompt vectors; unset: the input embedding width of the model."})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1 for decoder-only and encoder models (the only case peftkit supports); unset: 1."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Filled from the model's config; written to the file for HF, unused by prompt tuning."})
    num_layers: int | None = field(default=None, metadata={"help": "Filled from the model's config; written to the file for HF, unused by prompt tuning."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier head)."})
    prompt_tuning_init: str = field(default="RANDOM", metadata={"help": "RANDOM: N(0, 1); TEXT: embeddings of prompt_tuning_init_text; SAMPLE_VOCAB: embeddings of random vocabulary tokens."})
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "Text whose token embeddings start the prompt (TEXT init), repeated or cut to num_virtual_tokens."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Local tokenizer folder used to tokenise prompt_tuning_init_text (TEXT init)."})
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Extra arguments to AutoTokenizer.from_pretrained (TEXT init); trust_remote_code is dropped."})

    def __post_init__(self) -> None:
        self.peft_type = "PROMPT_TUNING"
        super().__post_init__()
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        check_virtual_tokens(self)
        check_field(self.prompt_tuning_init in INITS, "prompt_tuning_init", self.prompt_tuning_init, f"one of {INITS}")
        self._check_text_init()

    def _check_text_init(self) -> None:
        text = self.prompt_tuning_init == "TEXT"
        check_field(not text or bool(self.tokenizer_name_or_path), "tokenizer_name_or_path",
                    self.tokenizer_name_or_path, "a tokenizer folder when prompt_tuning_init='TEXT'")
        check_field(not text or bool(self.prompt_tuning_init_text), "prompt_tuning_init_text",
                    self.prompt_tuning_init_text, "a non-empty text when prompt_tuning_init='TEXT'")
        check_field(text or not self.tokenizer_kwargs, "tokenizer_kwargs", self.tokenizer_kwargs,
                    "None unless prompt_tuning_init='TEXT' (nothing else uses a tokenizer)")

    def fill_from_model(self, model: nn.Module) -> None:
        """Fill the unset sizes from the model, as HF PEFT does, so the saved file matches HF's."""
        fill_model_sizes(self, model)


def check_virtual_tokens(config: PeftConfig) -> None:
    """The fields every virtual-token method shares (prompt tuning, P-tuning, prefix tuning)."""
    check_field(positive(config.num_virtual_tokens), "num_virtual_tokens", config.num_virtual_tokens, "a positive int")
    check_field(config.token_dim is None or positive(config.token_dim), "token_dim", config.token_dim,
                "a positive int, or None to use the model's width")
    check_field(config.num_transformer_submodules in (None, 1), "num_transformer_submodules",
                config.num_transformer_submodules, "1 or None: peftkit's virtual-token methods support "
                "decoder-only and encoder models, not encoder-decoder ones (use LoRA there)")
    check_field(config.task_type != "SEQ_2_SEQ_LM", "task_type", config.task_type,
                "a decoder-only or encoder task; encoder-decoder models are not supported here (use LoRA)")


def model_config(model: nn.Module) -> object:
    """The (text) config of a transformers model, or None."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def fill_model_sizes(config: PeftConfig, model: nn.Module) -> None:
    """Fill unset ``token_dim`` (the input embedding width), ``num_transformer_submodules`` (1),
    ``num_attention_heads`` and ``num_layers`` from the model's config, as HF PEFT does."""
    cfg = model_config(model)
    if config.token_dim is None:
        config.token_dim = model.get_input_embeddings().embedding_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    for ours, theirs in (("num_attention_heads", ("num_attention_heads", "n_head")),
                         ("num_layers", ("num_hidden_layers", "n_layer", "num_layers"))):
        if getattr(config, ours) is None:
            setattr(config, ours, next((getattr(cfg, n) for n in theirs if getattr(cfg, n, None)), None))
