"""Partial fine-tuning against a direct reference (the base model with the trained weights put in
place), block selection from the model's structure, merging the weights back, the head option."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftkit import PartialConfig, PeftModel, get_peft_model
from peftkit.methods.partial import block_list
from peftkit.methods.partial.layer import PartialLayer
from tiny_models import logits, model_inputs, tiny_bert, tiny_gpt2, tiny_llama


def replaced(model) -> nn.Module:
    """A copy of the base model with every adapted parameter replaced by theta + delta."""
    reference = copy.deepcopy(tiny_llama())
    params = dict(reference.named_parameters())
    for key, layer in model.base_model.adapter_layers():
        for pname, delta in layer.partial_delta["default"].items():
            with torch.no_grad():
                params[f"{key}.{pname}"].add_(delta)
    return reference


def test_output_equals_the_model_with_the_trained_weights_in_place():
    model, x = get_peft_model(tiny_llama(), PartialConfig(num_top_layers=1, init_partial_weights=False)), model_inputs()
    torch.testing.assert_close(logits(model, x), logits(replaced(model), x), atol=1e-6, rtol=1e-6)


def test_merge_and_unload_writes_the_trained_weights_back(tmp_path):
    model, x = get_peft_model(tiny_llama(), PartialConfig(num_top_layers=1, init_partial_weights=False)), model_inputs()
    reference = replaced(model)
    plain = model.merge_and_unload()
    for (name, p), (_, q) in zip(plain.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(logits(plain, x), logits(reference, x), atol=0, rtol=0)


@pytest.mark.parametrize("builder, blocks", [(tiny_llama, "model.layers"), (tiny_bert, "bert.encoder.layer"),
                                             (tiny_gpt2, "transformer.h")])
def test_top_blocks_are_found_from_the_structure_and_every_parameter_in_them_trains(builder, blocks):
    model = get_peft_model(builder(), PartialConfig(num_top_layers=1))
    assert block_list(model.get_base_model(), model.peft_config["default"])[0] == blocks
    base = builder()
    top = dict(base.get_submodule(blocks)[1].named_parameters(prefix=f"{blocks}.1"))
    trained = {f"{k}.{p}": d for k, layer in model.base_model.adapter_layers() if isinstance(layer, PartialLayer)
               for p, d in layer.partial_delta["default"].items()}
    assert set(trained) == set(top)
    assert all(trained[k].shape == top[k].shape and trained[k].requires_grad for k in top)


def test_layers_to_transform_picks_blocks_by_index_and_bad_indices_are_named():
    model = get_peft_model(tiny_llama(num_hidden_layers=3), PartialConfig(layers_to_transform=[0, 2]))
    keys = {k.split(".")[2] for k, l in model.base_model.adapter_layers()}
    assert keys == {"0", "2"}
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] is invalid.*3 blocks"):
        get_peft_model(tiny_llama(num_hidden_layers=3), PartialConfig(layers_to_transform=[5]))
    with pytest.raises(ValueError, match="num_top_layers=4 is invalid.*3 blocks"):
        get_peft_model(tiny_llama(num_hidden_layers=3), PartialConfig(num_top_layers=4))


def test_a_model_with_two_block_lists_asks_for_layers_pattern():
    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.decoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(ValueError, match=r"encoder \(2 x Linear\).*decoder \(3 x Linear\).*set layers_pattern"):
        get_peft_model(EncoderDecoder(), PartialConfig(num_top_layers=1))
    model = get_peft_model(EncoderDecoder(), PartialConfig(num_top_layers=1, layers_pattern="decoder"))
    assert [k for k, _ in model.base_model.adapter_layers()] == ["decoder.2"]


def test_target_modules_restrict_training_within_the_blocks():
    model = get_peft_model(tiny_llama(), PartialConfig(num_top_layers=1, target_modules=["q_proj", "post_attention_layernorm"]))
    assert sorted(k for k, _ in model.base_model.adapter_layers()) == [
        "model.layers.1.post_attention_layernorm", "model.layers.1.self_attn.q_proj"]


def test_train_head_adds_the_output_head_as_a_trained_copy(tmp_path):
    model, x = get_peft_model(tiny_llama(), PartialConfig(num_top_layers=1, train_head=True)), model_inputs()
    assert model.peft_config["default"].modules_to_save == ["lm_head"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    with torch.no_grad():  # the input embeddings, once tied to the head, did not move
        assert torch.equal(model.get_base_model().model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


@pytest.mark.parametrize("bad", [dict(num_top_layers=0), dict(layers_to_transform=[-1]), dict(layers_to_transform=[]),
                                 dict(train_head="no"), dict(target_modules=3), dict(layers_pattern=["a"])])
def test_config_is_validated_with_the_field_named(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
        PartialConfig(**bad)
