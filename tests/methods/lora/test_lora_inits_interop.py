"""PiSSA and OLoRA against HF PEFT: the same factors and residual bases, the same rank-2r conversion,
and each library loading the other's files onto the original base with the same outputs."""
from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import FAMILIES, logits, model_inputs

pytest.importorskip("peft")

LIBS = {"hf": "peft", "pk": "peftkit"}


def build(lib: str, family: str, mode, **kw):
    """A fresh tiny ``family`` model (its builder seeds the RNG) with a new LoRA adapter in ``lib``."""
    library = importlib.import_module(LIBS[lib])
    builder, targets, task = FAMILIES[family]
    config = library.LoraConfig(r=4, lora_alpha=kw.pop("lora_alpha", 8), target_modules=targets, task_type=task,
                                init_lora_weights=mode, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return library.get_peft_model(builder(), config)


def lora_layers(model) -> dict[str, torch.nn.Module]:
    return {k: m for k, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def nudge(model, seed: int = 3) -> None:
    """The same 'training' in either library: seeded noise on every trainable tensor, in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# HF PEFT's OLoRA ignores fan_in_fan_out (it factors GPT-2's (in, out) Conv1D weight as stored and gives
# A the shape (r, out)), so OLoRA on GPT-2 is compared with the direct QR in test_lora_inits_math.py only.
@pytest.mark.parametrize("family, mode", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "pissa_niter_2"),
                                          ("gpt2", "pissa_niter_2"), ("llama", "olora")])
def test_same_factors_and_residual_base_as_hf(family, mode):
    built = {lib: build(lib, family, mode, use_rslora=family == "gpt2") for lib in LIBS}
    hf, pk = (lora_layers(built[lib]) for lib in ("hf", "pk"))
    assert hf.keys() == pk.keys() and hf
    for key in hf:
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(pk[key], name)["default"].weight, getattr(hf[key], name)["default"].weight,
                                       atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pk[key].base_layer.weight, hf[key].base_layer.weight, atol=1e-6, rtol=0)
    inputs = model_inputs()
    torch.testing.assert_close(logits(built["pk"], inputs), logits(built["hf"], inputs), atol=1e-5, rtol=0)


def save_converted(lib: str, family: str, mode: str, root) -> tuple:
    """``lib`` initialises, saves the initial adapter, 'trains', saves converted; (model, folder)."""
    model = build(lib, family, mode)
    initial, out = root / f"{lib}-initial", root / f"{lib}-converted"
    model.save_pretrained(str(initial))
    nudge(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial))
    return model, out


@pytest.mark.parametrize("family, mode", [("gpt2", "pissa"), ("llama", "olora")])
def test_conversion_to_rank_2r_matches_hf_and_loads_on_the_original_base(family, mode, tmp_path):
    models, folders = {}, {}
    for lib in LIBS:
        models[lib], folders[lib] = save_converted(lib, family, mode, tmp_path)
    files = {lib: load_file(str(folders[lib] / "adapter_model.safetensors")) for lib in LIBS}
    assert files["hf"].keys() == files["pk"].keys()
    for key, tensor in files["hf"].items():
        assert tensor.shape[0 if "lora_A" in key else 1] == 8  # rank 2r
        torch.testing.assert_close(files["pk"][key], tensor, atol=1e-5, rtol=1e-5)
    configs = {lib: json.loads((folders[lib] / "adapter_config.json").read_text()) for lib in LIBS}
    for field in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert configs["pk"][field] == configs["hf"][field], field
    assert (configs["pk"]["r"], configs["pk"]["lora_alpha"], configs["pk"]["init_lora_weights"]) == (8, 16, True)

    inputs = model_inputs()
    trained = logits(models["pk"], inputs)
    for loader in LIBS:  # either library, ours on the ORIGINAL base (its builder rebuilds it)
        library = importlib.import_module(LIBS[loader])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = library.PeftModel.from_pretrained(FAMILIES[family][0](), str(folders["pk"]))
        torch.testing.assert_close(logits(loaded, inputs), trained, atol=1e-4, rtol=0)
    with loaded.disable_adapter():  # the converted adapter sits on the original weights
        torch.testing.assert_close(logits(loaded, inputs), logits(FAMILIES[family][0](), inputs), atol=0, rtol=0)


@pytest.mark.parametrize("saver, loader", [("hf", "pk"), ("pk", "hf")])
def test_each_library_loads_the_others_pissa_adapter(saver, loader, tmp_path):
    """A PiSSA file (not converted) on the original base: loading redoes the residual, then reads A, B."""
    model = build(saver, "llama", "pissa")
    nudge(model)
    model.save_pretrained(str(tmp_path))
    library = importlib.import_module(LIBS[loader])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = library.PeftModel.from_pretrained(FAMILIES["llama"][0](), str(tmp_path))
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_rslora_conversion_keeps_each_layers_scaling(tmp_path):
    """rsLoRA: alpha grows by sqrt(2) (HF PEFT does the same); with patterns HF refuses, we scale them."""
    pk = build("pk", "llama", "pissa", use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 6})
    pk.save_pretrained(str(tmp_path / "initial"))
    nudge(pk)
    pk.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 4} and config["alpha_pattern"] == pytest.approx({"q_proj": 6 * 2 ** 0.5})
    assert config["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = importlib.import_module("peftkit").PeftModel.from_pretrained(FAMILIES["llama"][0](),
                                                                              str(tmp_path / "converted"))
    inputs = model_inputs()
    torch.testing.assert_close(logits(loaded, inputs), logits(pk, inputs), atol=1e-4, rtol=0)


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    pk = build("pk", "llama", "pissa")
    with pytest.raises(FileNotFoundError, match="path_initial_model_for_weight_conversion=.*before training"):
        pk.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "missing"))
    other = build("pk", "llama", "olora")
    other.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.data = torch.zeros(2, 32)
    other.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(ValueError, match="shape .*pass the folder saved from this same adapter"):
        pk.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "small"))
    loftq = importlib.import_module("peftkit").LoftQConfig()
    q = build("pk", "llama", "loftq", loftq_config=loftq)
    q.save_pretrained(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="converts PiSSA and OLoRA adapters.*'loftq'"):
        q.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "q"))
