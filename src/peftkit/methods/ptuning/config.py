"""P-tuning configuration (field names as in HF PEFT's ``PromptEncoderConfig``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from peftkit.config import PeftConfig, check_field
from peftkit.methods.prompt.config import check_virtual_tokens, fill_model_sizes, positive

ENCODERS = ("MLP", "LSTM")
MLP_LAYERS = 2  # HF's MLP always has two hidden layers; encoder_num_layers only shapes the LSTM


@dataclass
class PromptEncoderConfig(PeftConfig):
    """Virtual tokens made by a trained prompt encoder and prepended to the input (Liu et al., 2021)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of virtual tokens prepended to the input (HF has no default; peftkit uses 20)."})
    token_dim: int | None = field(default=None, metadata={"help": "Width of the virtual tokens; unset: the input embedding width of the model."})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1 for decoder-only and encoder models (the only case peftkit supports); unset: 1."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Filled from the model's config; written to the file for HF, unused by P-tuning."})
    num_layers: int | None = field(default=None, metadata={"help": "Filled from the model's config; written to the file for HF, unused by P-tuning."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier head)."})
    encoder_reparameterization_type: str = field(default="MLP", metadata={"help": "The prompt encoder: MLP (3 linears, ReLU between) or LSTM (bidirectional LSTM, then a 2-linear MLP)."})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "Hidden width of the prompt encoder; unset: token_dim."})
    encoder_num_layers: int = field(default=MLP_LAYERS, metadata={"help": "LSTM layers of the LSTM encoder (the MLP encoder ignores it, as in HF)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between the LSTM layers (LSTM encoder only, as in HF)."})

    def __post_init__(self) -> None:
        self.peft_type = "P_TUNING"
        super().__post_init__()
        kind = self.encoder_reparameterization_type
        self.encoder_reparameterization_type = getattr(kind, "value", kind)
        check_virtual_tokens(self)
        check_field(self.encoder_reparameterization_type in ENCODERS, "encoder_reparameterization_type",
                    self.encoder_reparameterization_type, f"one of {ENCODERS}")
        check_field(self.encoder_hidden_size is None or positive(self.encoder_hidden_size), "encoder_hidden_size",
                    self.encoder_hidden_size, "a positive int, or None to use token_dim")
        check_field(positive(self.encoder_num_layers), "encoder_num_layers", self.encoder_num_layers, "a positive int")
        check_field(isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1,
                    "encoder_dropout", self.encoder_dropout, "a float in [0, 1)")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            warnings.warn(f"encoder_num_layers={self.encoder_num_layers} is ignored by the MLP prompt encoder, "
                          f"which always has {MLP_LAYERS} hidden layers (as in HF PEFT); use LSTM to set the depth")

    def fill_from_model(self, model: nn.Module) -> None:
        """Fill the unset sizes from the model, as HF PEFT does, so the saved file matches HF's."""
        fill_model_sizes(self, model)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
