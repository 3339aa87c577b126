"""The task wrappers behave as in HF PEFT: right class per task_type, heads trained, generate."""
from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
from tiny_models import model_inputs, tiny_bert, tiny_llama


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bert_for(kind):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_labels=2 if kind == "QuestionAnswering" else 3)
    return getattr(transformers, f"BertFor{kind}")(cfg).eval()


@pytest.mark.parametrize("task, kind, head", [
    ("SEQ_CLS", "SequenceClassification", "classifier"),
    ("TOKEN_CLS", "TokenClassification", "classifier"),
    ("QUESTION_ANS", "QuestionAnswering", "qa_outputs"),
])
def test_heads_train_in_full_with_the_adapter(task, kind, head, tmp_path):
    model = get_peft_model(tiny_bert_for(kind), LoraConfig(task_type=task, target_modules=["query", "value"]))
    assert type(model).__name__ == f"PeftModelFor{'QuestionAnswering' if task == 'QUESTION_ANS' else kind}"
    assert head in model.peft_config["default"].modules_to_save
    assert any(f"{head}.modules_to_save.default" in n and p.requires_grad for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_for(kind), tmp_path)
    assert type(loaded) is type(model)
    x = model_inputs()
    with torch.no_grad():
        first = model(**x)
        second = loaded(**x)
    for key in first.keys():
        torch.testing.assert_close(first[key], second[key])


def test_seq2seq_generate_uses_the_adapter():
    x = model_inputs(batch=2, length=5)
    base_out = tiny_t5().generate(**x, max_new_tokens=5, do_sample=False)
    model = get_peft_model(tiny_t5(), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, target_modules=["q", "v"],
                                                 init_lora_weights=False, lora_alpha=64))
    assert isinstance(model, peftkit.PeftModelForSeq2SeqLM)
    with model.disable_adapter():
        assert torch.equal(model.generate(**x, max_new_tokens=5, do_sample=False), base_out)
    labels = torch.randint(1, 64, (2, 4))
    assert torch.isfinite(model(**x, labels=labels).loss)


def test_feature_extraction_and_causal_lm_wrappers():
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = BertModel(tiny_bert().config)
    fe = get_peft_model(encoder, LoraConfig(task_type="FEATURE_EXTRACTION", target_modules=["query"]))
    assert isinstance(fe, peftkit.PeftModelForFeatureExtraction)
    assert fe(**model_inputs()).last_hidden_state.shape == (3, 7, 32)
    lm = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    assert isinstance(lm, peftkit.PeftModelForCausalLM)
    assert "lm_head" not in {k for k, _ in lm.base_model.adapter_layers()}
    out = lm.generate(**model_inputs(batch=1, length=3), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    assert lm.config is lm.get_base_model().config  # attribute access falls through


def test_state_dict_helpers_and_layer_switches_match_hf_names():
    import peft as hf

    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    ours = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    torch.manual_seed(4)
    theirs = hf.get_peft_model(tiny_llama(), hf.LoraConfig(**cfg))
    state = hf.get_peft_model_state_dict(theirs)
    assert set(get_peft_model_state_dict(ours)) == set(state)
    set_peft_model_state_dict(ours, state)
    x = model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, atol=1e-6, rtol=1e-6)
        ours.base_model.disable_adapter_layers()
        torch.testing.assert_close(ours(**x).logits, tiny_llama()(**x).logits, atol=0, rtol=0)
        ours.base_model.enable_adapter_layers()
        torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, atol=1e-6, rtol=1e-6)


def test_a_second_adapter_from_hf_peft_loads_with_its_usual_head_names(tmp_path):
    """HF PEFT writes modules_to_save = ["classifier", "score"] for SEQ_CLS; load_adapter keeps the
    head names that exist, as from_pretrained does, instead of failing on "score"."""
    model = get_peft_model(tiny_bert_for("SequenceClassification"),
                           LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    model.peft_config["default"].modules_to_save = ["classifier", "score"]  # as HF PEFT saves it
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_for("SequenceClassification"), tmp_path)
    loaded.load_adapter(tmp_path, "second")
    assert loaded.peft_config["second"].modules_to_save == ["classifier"]
    assert any("classifier.modules_to_save.second" in n for n, _ in loaded.named_parameters())
