"""Loading refuses broken or mismatched adapters with a clear message and leaves no trace behind;
saving is atomic and writes exactly the adapter, its config and a model card."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit as pk
from peftkit.engine.layer import AdapterLayer
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                  init_lora_weights=False)
    kwargs.update(overrides)
    return pk.LoraConfig(**kwargs)


@pytest.fixture
def saved(tmp_path):
    """A folder holding an adapter (non-identity, so a wrong load would change outputs)."""
    pk.get_peft_model(tiny_llama(), config()).save_pretrained(tmp_path)
    return tmp_path


def edit_weights(folder, change) -> None:
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, str(folder / WEIGHTS))


def edit_config(folder, change) -> None:
    data = json.loads((folder / CONFIG).read_text())
    change(data)
    (folder / CONFIG).write_text(json.dumps(data))


def assert_plain(model) -> None:
    """No adapter wrapper anywhere: a failed load left the base model as it was."""
    assert not [k for k, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert not [k for k, _ in model.named_parameters() if "lora_" in k]


def load_fails(folder, match: str, model=None, **kwargs):
    model = model if model is not None else tiny_llama()
    before = logits(model, model_inputs())
    with pytest.raises(ValueError, match=match) as err:
        pk.PeftModel.from_pretrained(model, folder, **kwargs)
    assert_plain(model)
    torch.testing.assert_close(logits(model, model_inputs()), before, atol=0, rtol=0)
    return str(err.value)


# -- weights that do not fit -------------------------------------------------------------------
def test_missing_key_raises_naming_it(saved):
    edit_weights(saved, lambda s: s.pop(Q_A))
    message = load_fails(saved, "missing")
    assert Q_A in message


def test_missing_key_with_strict_false_warns(saved):
    edit_weights(saved, lambda s: s.pop(Q_A))
    with pytest.warns(UserWarning, match="missing"):
        pk.PeftModel.from_pretrained(tiny_llama(), saved, strict=False)


def test_unexpected_key_raises_naming_it(saved):
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
    edit_weights(saved, lambda s: s.__setitem__(extra, torch.zeros(2, 2)))
    message = load_fails(saved, "not in the model")
    assert extra in message


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    edit_weights(saved, lambda s: s.__setitem__(Q_A, torch.zeros(4, 31)))
    message = load_fails(saved, "shape")
    assert Q_A in message and "(4, 31)" in message and "(4, 32)" in message


def test_adapter_from_a_different_sized_model_is_refused(saved):
    message = load_fails(saved, "shape", model=tiny_llama(hidden_size=48, intermediate_size=64))
    assert "(4, 32)" in message and "(4, 48)" in message


# -- files that cannot be read -----------------------------------------------------------------
def test_truncated_safetensors_names_the_file(saved):
    path = saved / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = load_fails(saved, "corrupt|truncated")
    assert str(path) in message


def test_garbage_safetensors_names_the_file(saved):
    (saved / WEIGHTS).write_bytes(b"\x00not a safetensors file at all" * 8)
    assert str(saved / WEIGHTS) in load_fails(saved, "corrupt|truncated")


def test_missing_weights_file(saved):
    (saved / WEIGHTS).unlink()
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        pk.PeftModel.from_pretrained(model, saved)
    assert_plain(model)


def test_invalid_json_config_names_the_file(saved):
    (saved / CONFIG).write_text('{"r": 4, "peft_type": "LORA",')
    with pytest.raises(ValueError, match="not valid JSON") as err:
        pk.PeftModel.from_pretrained(tiny_llama(), saved)
    assert str(saved / CONFIG) in str(err.value)


def test_unknown_peft_type_is_named(saved):
    edit_config(saved, lambda d: d.__setitem__("peft_type", "FANCY_NEW_METHOD"))
    with pytest.raises(ValueError, match="FANCY_NEW_METHOD"):
        pk.PeftModel.from_pretrained(tiny_llama(), saved)


def test_unknown_config_keys_from_a_newer_version_warn_and_load(saved):
    edit_config(saved, lambda d: d.update(shiny_future_option=3, another_new_field={"a": 1}))
    want = logits(pk.PeftModel.from_pretrained(tiny_llama(), saved), model_inputs())
    with pytest.warns(UserWarning, match="shiny_future_option"):
        model = pk.PeftModel.from_pretrained(tiny_llama(), saved)
    torch.testing.assert_close(logits(model, model_inputs()), want, atol=0, rtol=0)


# -- a failed load_adapter leaves the existing model untouched ----------------------------------
@pytest.mark.parametrize("breakage", ["truncate", "shape", "unexpected"])
def test_failed_load_adapter_leaves_no_half_added_adapter(saved, tmp_path, breakage):
    other = tmp_path / "other"
    pk.get_peft_model(tiny_llama(), config(target_modules=["q_proj", "k_proj"])).save_pretrained(other)
    if breakage == "truncate":
        (other / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes()[:100])
    elif breakage == "shape":
        edit_weights(other, lambda s: s.__setitem__(Q_A, torch.zeros(4, 5)))
    else:
        edit_weights(other, lambda s: s.__setitem__("base_model.model.nothing.lora_A.weight", torch.zeros(1)))
    model = pk.PeftModel.from_pretrained(tiny_llama(), saved)
    modules_before = [(k, type(m)) for k, m in model.named_modules()]
    params_before = {k: p.clone() for k, p in model.state_dict().items()}
    out_before = logits(model, model_inputs())
    with pytest.raises(ValueError):
        model.load_adapter(other, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert [(k, type(m)) for k, m in model.named_modules()] == modules_before
    assert not [k for k in model.state_dict() if ".second" in k]
    state = model.state_dict()
    assert state.keys() == params_before.keys()
    assert all(torch.equal(state[k], v) for k, v in params_before.items())
    torch.testing.assert_close(logits(model, model_inputs()), out_before, atol=0, rtol=0)


# -- saving ------------------------------------------------------------------------------------
def test_saved_folder_holds_exactly_adapter_config_and_card(tmp_path):
    model = pk.get_peft_model(tiny_bert(), pk.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG, "README.md"])
    keys = load_file(str(tmp_path / WEIGHTS)).keys()
    adapter = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    head = [k for k in keys if k.startswith("base_model.model.classifier.")]
    assert sorted(adapter + head) == sorted(keys), "base weights were saved with the adapter"
    assert sorted(head) == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]


def test_embedding_target_does_not_save_the_base_table(tmp_path):
    model = pk.get_peft_model(tiny_llama(), config(target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS)).keys()
    assert not [k for k in keys if "lora_" not in k]


def test_second_adapter_is_saved_in_its_own_subfolder(tmp_path):
    model = pk.get_peft_model(tiny_llama(), config())
    model.add_adapter("extra", config(target_modules=["k_proj"]))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG, "README.md", "extra"])
    assert sorted(p.name for p in (tmp_path / "extra").iterdir()) == sorted([WEIGHTS, CONFIG, "README.md"])
    assert all(".k_proj." in k for k in load_file(str(tmp_path / "extra" / WEIGHTS)))


def test_crash_while_writing_weights_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    model = pk.get_peft_model(tiny_llama(), config())
    model.save_pretrained(tmp_path)
    old_weights, old_config = (tmp_path / WEIGHTS).read_bytes(), (tmp_path / CONFIG).read_bytes()
    real_save = safetensors.torch.save_file

    def crash_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(len(open(filename, "rb").read()) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == old_weights
    assert (tmp_path / CONFIG).read_bytes() == old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG, "README.md"])
    monkeypatch.undo()
    reloaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the old file still loads
    assert reloaded.peft_config["default"].r == 4


def test_crash_while_writing_config_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    from pathlib import Path

    model = pk.get_peft_model(tiny_llama(), config())
    model.save_pretrained(tmp_path)
    old_config = (tmp_path / CONFIG).read_bytes()
    real_write = Path.write_text

    def crash_half_way(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("killed (simulated)")

    monkeypatch.setattr(Path, "write_text", crash_half_way)
    model.peft_config["default"].lora_alpha = 99
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / CONFIG).read_bytes() == old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS, CONFIG, "README.md"])


def test_save_then_load_has_no_warnings_and_is_exact(tmp_path):
    model = pk.get_peft_model(tiny_llama(), config())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=0, rtol=0)
