"""AutoPeftModel*: base and adapter loaded from local folders, outputs identical to the model that
was saved; HF-written adapters load the same way; clear errors for what cannot load."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama

hf_peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def saved_base(tmp_path, builder, name="base"):
    """``builder()`` saved with save_pretrained; (folder, the model reloaded from it)."""
    import transformers

    folder = tmp_path / name
    builder().save_pretrained(folder)
    architecture = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    return folder, getattr(transformers, architecture).from_pretrained(folder).eval()


def save_adapter(lib, base, folder, **config):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) | config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        model = lib.get_peft_model(base, lib.LoraConfig(**config))
    model.eval().save_pretrained(folder)
    return model


@pytest.mark.parametrize("lib", [peftkit, hf_peft], ids=["peftkit", "hf"])
def test_causal_lm_round_trip(tmp_path, lib):
    base_dir, base = saved_base(tmp_path, tiny_llama)
    model = save_adapter(lib, base, tmp_path / "adapter", task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, peftkit.PeftModelForCausalLM)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=1e-6, rtol=0)
    with loaded.disable_adapter():
        assert (logits(loaded, model_inputs()) - logits(model, model_inputs())).abs().max() > 1e-4


def test_sequence_classification_round_trip_and_hf_loads_ours(tmp_path):
    base_dir, base = saved_base(tmp_path, tiny_bert)
    model = save_adapter(peftkit, base, tmp_path / "adapter", task_type="SEQ_CLS", target_modules=["query", "value"])
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # a trained head
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model, model_inputs())
    loaded = peftkit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert isinstance(loaded, peftkit.PeftModelForSequenceClassification)
    assert any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded.eval(), model_inputs()), expected, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(theirs, model_inputs()), expected, atol=1e-6, rtol=0)


def test_auto_peft_model_without_task_type_uses_the_base_architecture(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    model = save_adapter(peftkit, base, tmp_path / "adapter")
    loaded = peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is peftkit.PeftModel and type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=1e-6, rtol=0)


def test_base_kwargs_reach_the_base(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    save_adapter(peftkit, base, tmp_path / "adapter", task_type="CAUSAL_LM")
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16)
    layer = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert logits(loaded, model_inputs()).dtype == torch.bfloat16


def tiny_tokenizer(size: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]")


def test_tokenizer_with_more_tokens_resizes_the_embeddings(tmp_path):
    """As HF: the adapter was trained on a base resized to its tokenizer (70 > 64 rows) and carries the
    resized tables; loading resizes the fresh base first, so the tables fit and outputs match."""
    _, base = saved_base(tmp_path, tiny_llama)
    base.resize_token_embeddings(70)
    model = save_adapter(peftkit, base, tmp_path / "adapter", task_type="CAUSAL_LM",
                         modules_to_save=["embed_tokens", "lm_head"])
    tiny_tokenizer(70).save_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_base_model().get_input_embeddings().base_layer.weight.shape[0] == 70
    torch.testing.assert_close(logits(loaded, model_inputs()), logits(model, model_inputs()), atol=1e-6, rtol=0)


def test_smaller_tokenizer_leaves_the_base_alone(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    save_adapter(peftkit, base, tmp_path / "adapter", task_type="CAUSAL_LM")
    tiny_tokenizer(40).save_pretrained(tmp_path / "adapter")
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert loaded.get_base_model().get_input_embeddings().weight.shape[0] == 64


def rewrite_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def test_non_local_base_is_refused_with_the_fix(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    save_adapter(peftkit, base, tmp_path / "adapter", task_type="CAUSAL_LM")
    rewrite_config(tmp_path / "adapter", base_model_name_or_path="some-org/some-model")
    with pytest.raises(ValueError, match=r"base_model_name_or_path='some-org/some-model' in .*adapter_config.json "
                                         r"is not a local folder.*PeftModel.from_pretrained\(base_model, adapter_dir\)"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    rewrite_config(tmp_path / "adapter", base_model_name_or_path=None)
    with pytest.raises(ValueError, match="has no base_model_name_or_path"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_task_type_must_fit_the_class(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    save_adapter(peftkit, base, tmp_path / "adapter", task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM', but AutoPeftModelForSequenceClassification loads "
                                         "SEQ_CLS adapters: use AutoPeftModelForCausalLM"):
        peftkit.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="load it with AutoPeftModelForCausalLM.from_pretrained"):
        peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(TypeError, match="from_pretrained"):
        peftkit.AutoPeftModelForCausalLM()


def test_auto_mapping_imports_only_allowed_libraries(tmp_path):
    _, base = saved_base(tmp_path, tiny_llama)
    save_adapter(peftkit, base, tmp_path / "adapter")
    rewrite_config(tmp_path / "adapter", auto_mapping={"base_model_class": "Evil", "parent_library": "evil_lib"})
    with pytest.raises(ValueError, match=r"import 'evil_lib'.*import_allowlist=\['evil_lib'\]"):
        peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    rewrite_config(tmp_path / "adapter", auto_mapping={"base_model_class": "LlamaForCausalLM",
                                                       "parent_library": "transformers.models.llama"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peftkit.AutoPeftModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"


def test_adapter_on_a_4bit_bitsandbytes_base_loads_onto_it_as_stored(tmp_path):
    from peftkit.quant import QuantConfig, load_quantized_model, quantize_model, save_quantized_model

    save_quantized_model(quantize_model(tiny_llama(), QuantConfig(bnb_4bit_use_double_quant=True)), tmp_path / "base")
    model = save_adapter(peftkit, load_quantized_model(tmp_path / "base"), tmp_path / "adapter",
                         base_model_name_or_path=str(tmp_path / "base"), task_type="CAUSAL_LM")
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    inputs = model_inputs()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    with pytest.raises(ValueError, match="takes dtype only; drop \\['num_labels'\\]"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", num_labels=3)
