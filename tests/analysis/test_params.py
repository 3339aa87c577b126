"""Parameter counts from a meta-device skeleton equal what the real model reports, for every method."""
import copy
import re

import pytest

from method_cases import CASES
from peftkit import LoraConfig, get_peft_model
from peftkit.analysis.params import count
from peftkit.analysis.shapes import ModelSource, build_meta, source
from peftkit.registry import get_method, list_methods
from tiny_models import FAMILIES

TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}


def reported(model, config) -> tuple[int, int]:
    """(trainable, all) parsed from print_trainable_parameters() on the real model."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        get_peft_model(model, config).print_trainable_parameters()
    found = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", out.getvalue())
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def test_every_registered_method_has_a_case():
    """A row each, or a preset of a row's method (its config class derives from the row's: P-tuning v2)."""
    rows = {c.name: type(c.config(["q"], "CAUSAL_LM", False)) for c in CASES}
    missing = [m for m in list_methods() if m not in rows
               and not any(issubclass(get_method(m).config_cls, cls) for cls in rows.values())]
    assert not missing, f"add a row to tests/method_cases.py for {missing}"


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_meta_count_equals_print_trainable_parameters(case, family):
    build, targets, task = FAMILIES[family]
    config = case.config(targets, task)
    real = build()
    skeleton = build_meta(ModelSource("tiny", real.config, TASKS[task], real.config.num_labels))
    counted, wrapped = count(skeleton, copy.deepcopy(config))
    assert next(wrapped.parameters()).is_meta
    assert (counted.trainable, counted.total) == reported(real, config)
    assert counted.base == sum(p.numel() for p in build().parameters())
    assert sum(counted.by_module.values()) == counted.trainable == sum(counted.by_layer_type.values())


def test_lora_on_an_8b_llama_shape_follows_r_times_in_plus_out():
    src = source("llama-3-8b", "causal-lm")
    counted, _ = count(build_meta(src), LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    c = src.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = 16 * (c.hidden_size + c.hidden_size) + 16 * (c.hidden_size + kv)
    assert counted.trainable == c.num_hidden_layers * per_layer
    assert counted.by_module == {"q_proj": 32 * 16 * 2 * 4096, "v_proj": 32 * 16 * (4096 + kv)}
    assert 7.9e9 < counted.base < 8.1e9 and counted.percent_of_base == pytest.approx(100 * counted.trainable / counted.base)


def test_bundled_minilm_counts_the_classifier_head_as_trainable():
    counted, _ = count(build_meta(source("minilm", "classification")),
                       LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert counted.by_module["classifier"] == 384 * 2 + 2
    assert counted.by_module["query"] == counted.by_module["value"] == 6 * 8 * (384 + 384)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-3-8b"):
        source("llama-8", "causal-lm")
