"""Prefix tuning configuration (field names as in HF PEFT's ``PrefixTuningConfig``), and the
P-tuning v2 preset: the same method with ``prefix_projection`` fixed to False."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from peftkit.config import PeftConfig, check_field
from peftkit.methods.prompt.config import check_virtual_tokens, model_config, positive

INITS = (None, "zero")
CREATION_ONLY = ("prefix_init_text", "tokenizer_name_or_path")  # used when the adapter is made, never saved


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Trained key/value prefixes for the attention of every layer (Li & Liang, 2021)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix length p: keys/values prepended in every layer (HF has no default; peftkit uses 20)."})
    token_dim: int | None = field(default=None, metadata={"help": "Width of one layer's keys (heads x head_dim); unset: from the model (the key/value width under grouped-query attention)."})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1 for decoder-only and encoder models (the only case peftkit supports); unset: 1."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Key/value heads per layer; unset: from the model (num_key_value_heads under grouped-query attention)."})
    num_layers: int | None = field(default=None, metadata={"help": "Attention layers that get a prefix; unset: the model's number of layers."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a classifier head)."})
    init_weights: str | None = field(default=None, metadata={"help": "None: N(0, 1) prefixes (PyTorch's init); 'zero': zero prefixes (the projection's last layer zero)."})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "Hidden width of the reparameterization MLP (prefix_projection); unset: token_dim."})
    prefix_projection: bool = field(default=False, metadata={"help": "Train the prefixes through an MLP (Li & Liang's reparameterization), folded away on saving."})
    # peftkit's own, used once when the adapter is created and not written to adapter_config.json
    # (the file holds the trained prefix; HF PEFT would warn on keys it does not know).
    prefix_init_text: str | None = field(default=None, metadata={"help": "Start the prefix as the frozen model's own keys/values for this text (Li & Liang's init from real words), repeated or cut to num_virtual_tokens tokens; decoder models, prefix_projection off."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer folder for prefix_init_text; unset: the model's own folder."})

    def __post_init__(self) -> None:
        self.peft_type = "PREFIX_TUNING"
        super().__post_init__()
        check_virtual_tokens(self)
        check_field(self.init_weights in INITS, "init_weights", self.init_weights, f"one of {INITS}")
        text = self.prefix_init_text
        check_field(text is None or (isinstance(text, str) and text.strip() != ""), "prefix_init_text", text,
                    "a non-empty text, or None")
        check_field(text is None or not self.prefix_projection, "prefix_init_text", text,
                    "None with prefix_projection=True (the text sets the prefix itself, not the MLP's input)")
        check_field(text is None or self.init_weights is None, "prefix_init_text", text,
                    f"None with init_weights={self.init_weights!r} (pick one initialisation)")
        check_field(isinstance(self.prefix_projection, bool), "prefix_projection", self.prefix_projection, "true or false")
        for name in ("encoder_hidden_size", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            check_field(value is None or positive(value), name, value, "a positive int, or None to take it from the model")
        self.check_heads()

    def to_dict(self) -> dict:
        data = super().to_dict()
        for key in CREATION_ONLY:
            data.pop(key)
        return data

    def check_heads(self) -> None:
        heads, dim = self.num_attention_heads, self.token_dim
        check_field(heads is None or dim is None or dim % heads == 0, "token_dim", dim,
                    f"a multiple of num_attention_heads={heads} (token_dim = heads x head_dim)")

    def fill_from_model(self, model: nn.Module) -> None:
        """Fill the unset sizes from the model as HF PEFT does, so the saved file matches HF's.

        Under grouped-query attention a layer caches ``num_key_value_heads`` heads, so the prefix has
        that many heads: ``token_dim = head_dim * num_key_value_heads``.
        """
        cfg = model_config(model)
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1
        if self.num_layers is None:
            self.num_layers = first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"), "num_layers")
        if self.token_dim is None and self.num_attention_heads is None:
            self.token_dim, self.num_attention_heads = key_value_shape(cfg)
        if self.token_dim is None:
            self.token_dim = first_attr(cfg, ("hidden_size", "n_embd", "d_model"), "token_dim")
        if self.num_attention_heads is None:
            self.num_attention_heads = first_attr(cfg, ("num_attention_heads", "n_head", "num_heads"), "num_attention_heads")
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        self.check_heads()


def first_attr(cfg: object, names: tuple[str, ...], field_name: str) -> int:
    found = next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), None)
    if found is None:
        raise ValueError(f"cannot read {field_name} from the model's config (looked for {', '.join(names)}); "
                         f"set {field_name} in the PrefixTuningConfig")
    return found


def key_value_shape(cfg: object) -> tuple[int, int]:
    """(token_dim, heads) of one layer's cached keys: all heads, or the key/value heads under GQA."""
    width = first_attr(cfg, ("hidden_size", "n_embd", "d_model"), "token_dim")
    heads = first_attr(cfg, ("num_attention_heads", "n_head", "num_heads"), "num_attention_heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    if not kv_heads:
        return width, heads
    head_dim = getattr(cfg, "head_dim", None) or width // heads
    return head_dim * kv_heads, kv_heads


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2 / deep prompt tuning (Liu et al., 2022): prefix tuning of every layer, the prefixes
    trained directly (no reparameterization). Saved as HF saves it: ``PREFIX_TUNING`` with
    ``prefix_projection`` false, so it loads back as a ``PrefixTuningConfig``."""

    prefix_projection: bool = field(default=False, metadata={"help": "Always False for P-tuning v2 (use --method prefix for the MLP)."})

    def __post_init__(self) -> None:
        check_field(self.prefix_projection is False, "prefix_projection", self.prefix_projection,
                    "False for PTuningV2Config (use PrefixTuningConfig for the reparameterization MLP)")
        super().__post_init__()
