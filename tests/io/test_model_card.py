"""The model card saved beside an adapter says how to load it, and only promises HF PEFT where HF
PEFT can read the files."""
from __future__ import annotations

import pytest

from peftkit import BottleneckConfig, LoraConfig, get_peft_model
from peftkit.io.hf_format import load_line
from peftkit.registry import get_method
from tiny_models import tiny_bert

HF_TYPES = {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"}  # what HF PEFT 0.21 loads


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adalora", "prompt", "prefix", "ptuning", "adapter",
                                    "bitfit", "partial", "diff_pruning", "fusion"])
def test_the_load_line_follows_the_format(method):
    spec, line = get_method(method), load_line(get_method(method))
    if method == "fusion":
        assert "member adapters" in line and "load_adapter" in line
    elif spec.peft_type in HF_TYPES:
        assert "Hugging Face PEFT's `PeftModel.from_pretrained`" in line
    else:
        assert f"Hugging Face PEFT has no {spec.peft_type} adapters" in line


@pytest.mark.parametrize("config, says", [
    (LoraConfig(r=2, target_modules=["query"]), "or Hugging Face PEFT's"),
    (BottleneckConfig(target_modules=["output.dense"]), "peftkit's own format"),
])
def test_saved_card_holds_it(config, says, tmp_path):
    get_peft_model(tiny_bert(0), config).save_pretrained(tmp_path)
    assert says in (tmp_path / "README.md").read_text()
