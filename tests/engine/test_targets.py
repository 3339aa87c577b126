"""Target selection: which modules a config wraps, with what rank and scaling.

Expected module sets are written out by hand for the tiny models, and checked against Hugging Face
PEFT's own selection (``targeted_module_names``) where it is installed, so configs written for it
select the same modules here.
"""
from __future__ import annotations

import warnings

import pytest

import peftkit as pk
from peftkit.engine.layer import AdapterLayer
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}
LLAMA_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_LINEAR = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"]


def llama_names(*suffixes: str, layers=(0, 1)) -> set[str]:
    return {f"model.layers.{i}.{s}" for i in layers for s in suffixes}


def peft_model(family: str, lib=pk, **kwargs):
    kwargs.setdefault("task_type", TASKS[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(BUILDERS[family](), lib.LoraConfig(r=4, lora_alpha=8, **kwargs))


def adapted(model) -> set[str]:
    """Names (relative to the user's model) of modules wrapped by a LoRA layer."""
    return {k for k, m in model.get_base_model().named_modules()
            if isinstance(m, AdapterLayer) and (hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A"))}


def hf_selection(family: str, **kwargs) -> set[str] | None:
    hf = pytest.importorskip("peft")
    return set(peft_model(family, hf, **kwargs).targeted_module_names)


CASES = [
    ("llama", dict(target_modules=["q_proj"]), llama_names("self_attn.q_proj")),
    ("llama", dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]), llama_names("self_attn.q_proj", "mlp.up_proj")),
    ("llama", dict(target_modules=["model.layers.1.mlp.down_proj"]), {"model.layers.1.mlp.down_proj"}),
    ("llama", dict(target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"),
     {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}),
    ("llama", dict(target_modules=r".*\.(k|o)_proj"), llama_names("self_attn.k_proj", "self_attn.o_proj")),
    ("llama", dict(target_modules="all-linear"), llama_names(*LLAMA_LINEAR)),
    ("bert", dict(target_modules="all-linear"),
     {f"bert.encoder.layer.{i}.{s}" for i in (0, 1) for s in BERT_LINEAR} | {"bert.pooler.dense"}),
    ("gpt2", dict(target_modules="all-linear"),
     {f"transformer.h.{i}.{s}" for i in (0, 1) for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}),
    ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
     llama_names("self_attn.q_proj", "self_attn.v_proj") - {"model.layers.0.self_attn.v_proj"}),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*mlp\..*"),
     llama_names(*LLAMA_LINEAR[:4])),
    ("llama", dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj", "down_proj"]),
     llama_names(*LLAMA_LINEAR[:4])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
     llama_names("self_attn.q_proj", "mlp.down_proj", layers=(1,))),
    ("llama", dict(target_modules=["v_proj"], layers_to_transform=0), llama_names("self_attn.v_proj", layers=(0,))),
    ("gpt2", dict(target_modules=["c_proj"], layers_to_transform=[1], layers_pattern="h"),
     {"transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"}),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=[0], layers_pattern="layer"),
     {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"}),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"]), {"model.embed_tokens"} | llama_names("self_attn.o_proj")),
]


def case_id(case) -> str:
    return case[0] + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("family,kwargs,want", CASES, ids=[case_id(c) for c in CASES])
def test_selection(family, kwargs, want):
    assert adapted(peft_model(family, **kwargs)) == want


@pytest.mark.parametrize("family,kwargs,want", CASES, ids=[case_id(c) for c in CASES])
def test_selection_matches_hf_peft(family, kwargs, want):
    assert adapted(peft_model(family, **kwargs)) == hf_selection(family, **kwargs)


def test_suffix_must_be_a_whole_name_component():
    """'proj' is not a suffix of 'q_proj' in the dotted sense; it matches nothing."""
    with pytest.raises(ValueError, match="matched no module"):
        peft_model("llama", target_modules=["proj"])


def test_regex_string_must_match_the_whole_name():
    """A plain name given as a string is a regex over the full name, so 'q_proj' alone matches nothing."""
    with pytest.raises(ValueError, match="matched no module"):
        peft_model("llama", target_modules="q_proj")


@pytest.mark.parametrize("family,head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("bert", "classifier")])
def test_all_linear_skips_the_output_head(family, head):
    model = peft_model(family, target_modules="all-linear")
    assert head not in adapted(model)
    assert not hasattr(model.get_base_model().get_submodule(head), "lora_A")


def test_all_linear_skips_classifier_without_seq_cls_task():
    """Even as a plain feature extractor, the classifier head is never a LoRA target."""
    model = peft_model("bert", target_modules="all-linear", task_type=None)
    assert "classifier" not in adapted(model)


def test_no_match_lists_existing_names_and_types():
    with pytest.raises(ValueError) as err:
        peft_model("llama", target_modules=["query", "value"])
    message = str(err.value)
    assert "['query', 'value']" in message
    for name, kind in [("q_proj", "Linear"), ("down_proj", "Linear"), ("embed_tokens", "Embedding")]:
        assert name in message and kind in message


def test_no_match_after_layer_filter_raises():
    with pytest.raises(ValueError, match="matched no module"):
        peft_model("llama", target_modules=["q_proj"], layers_to_transform=[7], layers_pattern="layers")


def test_misspelled_entry_next_to_a_good_one_warns():
    with pytest.warns(UserWarning, match="v_prj"):
        model = pk.get_peft_model(tiny_llama(), pk.LoraConfig(target_modules=["q_proj", "v_prj"]))
    assert adapted(model) == llama_names("self_attn.q_proj")


def test_correct_entries_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.get_peft_model(tiny_llama(), pk.LoraConfig(target_modules=["q_proj", "self_attn.v_proj"]))


# -- rank and alpha patterns --------------------------------------------------------------------
def layer_values(model) -> dict[str, tuple[int, float, float]]:
    return {k: (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
            for k, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)}


def test_rank_and_alpha_pattern_per_module():
    model = peft_model("llama", target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
                       alpha_pattern={"v_proj": 2, r"layers\.0\.mlp\.down_proj": 32})
    values = layer_values(model)
    want = {}
    for i in (0, 1):
        want[f"model.layers.{i}.self_attn.q_proj"] = (2, 8, 8 / 2)
        want[f"model.layers.{i}.self_attn.v_proj"] = (4, 2, 2 / 4)
    want["model.layers.0.mlp.down_proj"] = (4, 32, 32 / 4)
    want["model.layers.1.mlp.down_proj"] = (8, 8, 8 / 8)
    assert values.keys() == want.keys()
    for key, (r, alpha, scaling) in want.items():
        assert values[key][:2] == (r, alpha), key
        assert values[key][2] == pytest.approx(scaling), key
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert tuple(q.lora_A["default"].weight.shape) == (2, 32)
    assert tuple(q.lora_B["default"].weight.shape) == (32, 2)


def test_rslora_scaling_with_patterns():
    model = peft_model("llama", target_modules=["q_proj", "v_proj"], use_rslora=True,
                       rank_pattern={"q_proj": 16}, alpha_pattern={"v_proj": 3})
    values = layer_values(model)
    assert values["model.layers.0.self_attn.q_proj"][2] == pytest.approx(8 / 16 ** 0.5)
    assert values["model.layers.1.self_attn.v_proj"][2] == pytest.approx(3 / 4 ** 0.5)


def test_pattern_is_not_a_bare_substring():
    """'proj' as a pattern key names no module (it must match a whole dotted suffix)."""
    model = peft_model("llama", target_modules=["q_proj"], rank_pattern={"proj": 2})
    assert {v[0] for v in layer_values(model).values()} == {4}


def test_patterns_match_hf_peft():
    hf = pytest.importorskip("peft")
    kwargs = dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 8},
                  alpha_pattern={"v_proj": 2, r"layers\.0\.mlp\.down_proj": 32})
    ours = layer_values(peft_model("llama", **kwargs))
    theirs = {k: (m.r["default"], m.lora_alpha["default"], m.scaling["default"])
              for k, m in peft_model("llama", hf, **kwargs).get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key]), key


# -- a second adapter never wraps the first one's internals -------------------------------------
def nested_wrappers(model) -> list[str]:
    """Adapter layers inside another adapter layer (its base layer, factors or head copies)."""
    found = []
    for key, module in model.get_base_model().named_modules():
        if isinstance(module, AdapterLayer):
            found += [f"{key}.{k}" for k, m in module.named_modules() if k and isinstance(m, AdapterLayer)]
    return found


@pytest.mark.parametrize("family,first", [("llama", ["q_proj", "v_proj"]), ("bert", ["query"]),
                                          ("gpt2", ["c_attn"])])
def test_second_all_linear_adapter_does_not_wrap_first_adapter(family, first):
    model = peft_model(family, target_modules=first)
    model.add_adapter("second", pk.LoraConfig(r=2, target_modules="all-linear", task_type=TASKS[family]))
    assert nested_wrappers(model) == []
    fresh = adapted(peft_model(family, target_modules="all-linear"))
    assert adapted(model) == fresh
    for key, layer in model.get_base_model().named_modules():
        if isinstance(layer, AdapterLayer) and hasattr(layer, "lora_A"):
            want = {"second", "default"} if any(key.endswith("." + t) for t in first) else {"second"}
            assert set(layer.adapter_names()) == want, key


def test_all_linear_over_all_linear_shares_every_layer():
    model = peft_model("llama", target_modules="all-linear")
    model.add_adapter("second", pk.LoraConfig(r=2, target_modules="all-linear"))
    assert nested_wrappers(model) == []
    layers = [m for _, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 14 and all(set(m.adapter_names()) == {"default", "second"} for m in layers)


def test_unset_targets_take_the_architecture_default_or_say_what_to_set():
    from torch import nn

    from peftkit import LoraConfig, get_peft_model
    from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

    for builder, expected in ((tiny_llama, ["q_proj", "v_proj"]), (tiny_bert, ["query", "value"]),
                              (tiny_gpt2, ["c_attn"])):
        model = get_peft_model(builder(), LoraConfig())
        assert model.peft_config["default"].target_modules == expected
        wrapped = {k.split(".")[-1] for k, _ in model.base_model.adapter_layers()}
        assert set(expected) <= wrapped
    with pytest.raises(ValueError, match="target_modules is not set.*model type None"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig())
