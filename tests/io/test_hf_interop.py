"""Interop with Hugging Face PEFT (a test-only dependency), both directions, on three tiny families.

An adapter trained a few steps (so B != 0) and saved by one library loads in the other with the same
outputs; identical configs give the same trainable-parameter counts, saved keys, tensor shapes and
config fields; rank/alpha patterns, rsLoRA, embeddings and named adapters in subfolders survive
the trip; ``merge_and_unload`` gives the same plain model.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk
from hf_interop import assert_same_outputs_and_adapter_matters, load
from tiny_models import FAMILIES, logits, model_inputs

hf = pytest.importorskip("peft")

ATOL = 1e-6
LIBS = {"hf": hf, "pk": pk}
DIRECTIONS = [("hf", "pk"), ("pk", "hf")]


def make(lib: str, family: str, adapter_name: str = "default", **overrides):
    """A fresh PEFT model of ``family`` built by library ``lib`` from the same config kwargs."""
    builder, target_modules, task_type = FAMILIES[family]
    kwargs = dict(r=4, lora_alpha=8, target_modules=target_modules, task_type=task_type)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].get_peft_model(builder(), LIBS[lib].LoraConfig(**kwargs), adapter_name=adapter_name)


def train(model, steps: int = 3) -> None:
    """A few SGD steps on a made-up loss so every factor (B included) moves away from its init."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(steps):
        loss = model(**model_inputs(seed=10 + step)).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def trained(lib: str, family: str, **overrides):
    model = make(lib, family, **overrides)
    train(model)
    b_factors = [p for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_A" in n]
    assert b_factors and all(p.abs().sum() > 0 for p in b_factors), "training left a zero-initialised factor at zero"
    return model


def saved_keys(folder) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


def saved_config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def lora_layers(model) -> dict[str, object]:
    """Module name (relative to the user's model) -> LoRA wrapper, for either library."""
    base = model.get_base_model()
    return {k: m for k, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}


# -- outputs after a save in one library and a load in the other --------------------------------
@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_adapter_loads_with_identical_outputs(family, src, dst, tmp_path):
    model = trained(src, family)
    model.save_pretrained(tmp_path)
    loaded = load(dst, family, tmp_path)
    assert_same_outputs_and_adapter_matters(model, loaded, model_inputs(), ATOL)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
@pytest.mark.parametrize("family,targets", [("llama", ["embed_tokens", "q_proj"]), ("gpt2", ["wte", "c_attn"])])
def test_embedding_targets_round_trip(family, targets, src, dst, tmp_path):
    """HF also saves the base embedding table here (save_embedding_layers="auto"); both files load."""
    model = trained(src, family, target_modules=targets)
    model.save_pretrained(tmp_path)
    loaded = load(dst, family, tmp_path)
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


PATTERNS = dict(rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                alpha_pattern={"v_proj": 32}, use_rslora=True)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
def test_rank_alpha_patterns_and_rslora_survive(src, dst, tmp_path):
    model = trained(src, "llama", **PATTERNS)
    model.save_pretrained(tmp_path)
    config = saved_config(tmp_path)
    assert config["rank_pattern"] == PATTERNS["rank_pattern"]
    assert config["alpha_pattern"] == PATTERNS["alpha_pattern"]
    assert config["use_rslora"] is True
    loaded = load(dst, "llama", tmp_path)
    want = {k: (m.r["default"], m.scaling["default"]) for k, m in lora_layers(model).items()}
    got = {k: (m.r["default"], m.scaling["default"]) for k, m in lora_layers(loaded).items()}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    # Independent of either library: rsLoRA scaling is alpha / sqrt(r).
    assert got["model.layers.0.self_attn.q_proj"] == pytest.approx((2, 8 / 2 ** 0.5))
    assert got["model.layers.0.self_attn.v_proj"] == pytest.approx((4, 32 / 4 ** 0.5))
    assert got["model.layers.1.mlp.down_proj"] == pytest.approx((6, 8 / 6 ** 0.5))
    assert got["model.layers.0.mlp.down_proj"] == pytest.approx((4, 8 / 4 ** 0.5))
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
def test_named_adapter_in_subfolder_loads(src, dst, tmp_path):
    """HF layout: "default" at the top of the folder, any other adapter in a subfolder of its name."""
    model = trained(src, "bert", adapter_name="other")
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter_config.json").exists()
    assert saved_keys(tmp_path / "other") and saved_config(tmp_path / "other")["r"] == 4
    loaded = load(dst, "bert", tmp_path / "other", adapter_name="other")
    assert list(loaded.peft_config) == ["other"]
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("src,dst", DIRECTIONS)
def test_second_adapter_loaded_with_load_adapter(src, dst, tmp_path):
    first, second = trained(src, "llama"), trained(src, "llama", r=2, target_modules=["k_proj"])
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    loaded = load(dst, "llama", tmp_path / "first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_adapter(str(tmp_path / "second"), adapter_name="extra")
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(first, inputs), atol=ATOL, rtol=0)
    loaded.set_adapter("extra")
    torch.testing.assert_close(logits(loaded, inputs), logits(second, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unload_agrees(family, tmp_path):
    model = trained("hf", family)
    model.save_pretrained(tmp_path)
    merged = {lib: load(lib, family, tmp_path).merge_and_unload() for lib in LIBS}
    for lib, plain in merged.items():
        assert not any(hasattr(m, "lora_A") or hasattr(m, "base_layer") for m in plain.modules()), lib
    want, got = merged["hf"].state_dict(), merged["pk"].state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)
    inputs = model_inputs()
    torch.testing.assert_close(logits(merged["pk"], inputs), logits(model, inputs), atol=1e-5, rtol=0)


# -- identical configs: same counts, same keys and shapes, same config fields ---------------------
COUNT_CASES = [
    ("llama", {}), ("bert", {}), ("gpt2", {}),
    ("llama", {"bias": "all"}), ("bert", {"bias": "all"}), ("gpt2", {"bias": "lora_only"}),
    ("bert", {"bias": "lora_only"}),
    ("llama", {"target_modules": ["embed_tokens", "o_proj"]}),
    ("llama", PATTERNS),
    ("llama", {"target_modules": "all-linear"}), ("bert", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("gpt2", {"target_modules": ["c_attn"], "layers_to_transform": 0, "layers_pattern": "h"}),
    ("llama", {"exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
]


def case_id(case) -> str:
    family, overrides = case
    return family + "-" + ("-".join(f"{k}={v}" for k, v in overrides.items()) or "defaults")


def save(lib: str, model, folder) -> None:
    """HF PEFT copies the base embedding table when embed_tokens is a target; we never save base
    weights (resized vocabularies aside), so compare with that copy turned off."""
    extra = {"save_embedding_layers": False} if lib == "hf" else {}
    model.save_pretrained(folder, **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> {lib: (model, saved folder)}, each built and saved once for the tests below."""
    cache: dict[str, dict] = {}

    def get(family: str, overrides: dict) -> dict:
        key = case_id((family, overrides))
        if key not in cache:
            cache[key] = {}
            for lib in LIBS:
                model = make(lib, family, **overrides)
                folder = tmp_path_factory.mktemp(lib)
                save(lib, model, folder)
                cache[key][lib] = (model, folder)
        return cache[key]

    return get


@pytest.mark.parametrize("family,overrides", COUNT_CASES, ids=[case_id(c) for c in COUNT_CASES])
def test_trainable_parameter_counts_match(family, overrides, built):
    counts = {lib: model.get_nb_trainable_parameters() for lib, (model, _) in built(family, overrides).items()}
    assert counts["pk"] == counts["hf"]


# HF PEFT with bias="all" and modules_to_save writes keys that name no module of any model
# ("classifier.modules_to_save.bias", "classifier.original_module.bias"); we do not copy that.
KEY_CASES = [c for c in COUNT_CASES if c != ("bert", {"bias": "all"})]


@pytest.mark.parametrize("family,overrides", KEY_CASES, ids=[case_id(c) for c in KEY_CASES])
def test_saved_keys_and_shapes_match(family, overrides, built):
    keys = {lib: saved_keys(folder) for lib, (_, folder) in built(family, overrides).items()}
    assert sorted(keys["pk"]) == sorted(keys["hf"])
    assert keys["pk"] == keys["hf"]


def comparable(config: dict, model) -> dict:
    """Normalise what legitimately differs: list order, and modules_to_save entries naming nothing.

    HF PEFT lists every known classifier name ("classifier", "score") whether or not the model has
    it; only the entries that name a module of the model carry meaning.
    """
    names = {k.split(".")[-1] for k, _ in model.get_base_model().named_modules()}
    out = dict(config)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    if out.get("modules_to_save"):
        out["modules_to_save"] = sorted(n for n in out["modules_to_save"] if n in names) or None
    return out


@pytest.mark.parametrize("family,overrides", [c for c in COUNT_CASES if c[1].get("target_modules") != "all-linear"],
                         ids=[case_id(c) for c in COUNT_CASES if c[1].get("target_modules") != "all-linear"])
def test_saved_config_fields_match(family, overrides, built):
    configs = {lib: comparable(saved_config(folder), model) for lib, (model, folder) in built(family, overrides).items()}
    shared = sorted(configs["pk"].keys() & configs["hf"].keys())
    assert {k: configs["pk"][k] for k in shared} == {k: configs["hf"][k] for k in shared}
    # Every field we write must be one HF PEFT knows, or HF would warn on load.
    assert set(configs["pk"]) - set(configs["hf"]) == set()


def test_hf_config_with_absent_classifier_name_loads(tmp_path):
    """HF writes modules_to_save=["classifier", "score"] for BERT, which has no "score" module."""
    model = trained("hf", "bert")
    model.save_pretrained(tmp_path)
    assert "score" in saved_config(tmp_path)["modules_to_save"]
    loaded = load("pk", "bert", tmp_path)
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=ATOL, rtol=0)


def test_inspect_accepts_hf_classifier_names_but_not_a_missing_head(tmp_path):
    """One of HF's two head names having weights is enough; a listed head with none is a problem."""
    from peftkit.cli.inspect import inspect

    model = trained("hf", "bert")
    model.save_pretrained(tmp_path)
    assert inspect(tmp_path).problems == []
    config = saved_config(tmp_path)
    config["modules_to_save"] = ["pooler"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert any("'pooler'" in p for p in inspect(tmp_path).problems)
