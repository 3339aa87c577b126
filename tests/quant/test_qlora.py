"""LoRA on a quantized base (QLoRA): the engine's properties, the HF file format, 4-bit merging."""
import warnings

import pytest
import torch

from hf_interop import saved
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.quant import Linear4bit, QuantConfig, prepare_model_for_kbit_training, quantize_model
from tiny_models import logits, model_inputs, tiny_bert, tiny_llama

warnings.filterwarnings("ignore", message="merging into a 4-bit weight")


def qlora(identity=True, seed=0, **quant):
    base = quantize_model(tiny_llama(seed), QuantConfig(bnb_4bit_use_double_quant=True, **quant))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=identity)
    return base, get_peft_model(base, config)


def test_quantize_model_skips_the_head_and_all_linear_wraps_every_4bit_layer():
    base = quantize_model(tiny_llama())
    quantized = [k for k, m in base.named_modules() if isinstance(m, Linear4bit)]
    model = get_peft_model(base, LoraConfig(target_modules="all-linear"))
    assert len(quantized) == 14 and not isinstance(base.lm_head, Linear4bit)  # 7 linears x 2 layers
    wrapped = [k for k, _ in model.base_model.adapter_layers()]
    assert sorted(wrapped) == sorted(quantized)


def test_identity_init_leaves_output_unchanged_and_random_init_changes_it():
    inputs = model_inputs()
    base = quantize_model(tiny_llama())
    before = logits(base, inputs)
    assert torch.equal(logits(get_peft_model(base, LoraConfig(target_modules="all-linear")), inputs), before)
    _, changed = qlora(identity=False)
    assert (logits(changed, inputs) - before).abs().max() > 1e-3


def test_training_changes_only_adapters_and_loss_falls():
    base, model = qlora()
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    inputs = model_inputs(batch=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    after = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    assert set(after) == set(frozen) and all(torch.equal(after[k], frozen[k]) for k in frozen)
    for _, layer in model.base_model.adapter_layers():
        assert (layer.lora_B["default"].weight != 0).any()


def test_checkpointing_after_prepare_reaches_the_adapters():
    base = quantize_model(tiny_llama())
    prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    inputs = model_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prepare_upcasts_only_norms_by_default_and_everything_with_upcast_all():
    model = tiny_llama().bfloat16()
    quantize_model(model)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, upcast="all")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="upcast"):
        prepare_model_for_kbit_training(model, upcast="some")


def test_save_load_round_trip_and_hf_peft_loads_it_onto_the_full_precision_model(tmp_path):
    peft = pytest.importorskip("peft")
    _, model = qlora(identity=False)
    inputs = model_inputs()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(quantize_model(tiny_llama(), QuantConfig(bnb_4bit_use_double_quant=True)),
                                         str(tmp_path))
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    keys, config = saved(tmp_path)
    full = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    full.save_pretrained(tmp_path / "full")
    assert keys == saved(tmp_path / "full")[0]  # the same file keys and shapes as LoRA on the fp32 model
    assert config["peft_type"] == "LORA" and config["r"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    ours = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(hf, inputs), logits(ours, inputs), atol=1e-5, rtol=0)
    # on the fp32 base the adapter gives the quantized model's output up to quantization error
    assert (logits(ours, inputs) - logits(model, inputs)).abs().max() < 0.2


def test_merge_requantizes_reports_the_error_and_unmerge_restores_exactly():
    base, model = qlora(identity=False)
    inputs = model_inputs()
    unmerged = logits(model, inputs)
    codes = {k: v.clone() for k, v in base.state_dict().items() if "lora_" not in k}
    model.merge_adapter()
    error = model.base_model.last_merge_error
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.premerge  # codes before the merge
    assert exact is not None and 0 < error < 0.1
    assert error == max(l.last_merge_error for _, l in model.base_model.adapter_layers())
    # requantization error only (bitsandbytes' dynamic 8-bit absmax codes: 0.105 on this model)
    assert (logits(model, inputs) - unmerged).abs().max() < 0.15
    with model.disable_adapter():
        with torch.no_grad():
            disabled = logits(model, inputs)
    assert torch.equal(disabled, logits(quantize_model(tiny_llama(), QuantConfig(bnb_4bit_use_double_quant=True)),
                                        inputs))
    model.unmerge_adapter()
    assert torch.equal(logits(model, inputs), unmerged)
    assert all(torch.equal(v, codes[k]) for k, v in base.state_dict().items() if "lora_" not in k)
    plain = model.merge_and_unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, Linear4bit)
    assert (logits(plain, inputs) - unmerged).abs().max() < 0.15  # the requantization, as above


def test_merge_of_one_layer_equals_requantizing_the_exact_sum():
    base, model = qlora(identity=False)
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    exact = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
    error = layer.merge(["default"])
    reference = Linear4bit.from_linear(torch.nn.Linear(32, 48, bias=False), torch.float32, "nf4", True)
    reference.requantize(exact)
    assert torch.equal(layer.base_layer.weight, reference.weight)
    assert error == (reference.dequantize(torch.float32) - exact).abs().max().item()


def test_mixed_batch_rows_equal_running_each_adapter_alone():
    _, model = qlora(identity=False)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    inputs = model_inputs(batch=3)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "other", "__base__"]).logits
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        alone = logits(model, {k: v[row:row + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=0)


def test_other_methods_refuse_a_4bit_layer_by_name():
    from peftkit import IA3Config

    base = quantize_model(tiny_llama())
    with pytest.raises(ValueError, match="Linear4bit"):
        get_peft_model(base, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_quant_config_checks_fields_and_quantize_refuses_wrapped_models():
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        QuantConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        QuantConfig(bnb_4bit_compute_dtype="float64")
    with pytest.raises(ValueError, match="load_in_4bit"):
        QuantConfig(load_in_4bit=False)
    assert QuantConfig(bnb_4bit_compute_dtype=torch.bfloat16).compute_dtype == torch.bfloat16
    _, model = qlora()
    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize_model(model)
    bert = quantize_model(tiny_bert(), QuantConfig(llm_int8_skip_modules=["classifier", "pooler.dense"]))
    assert not isinstance(bert.bert.pooler.dense, Linear4bit) and not isinstance(bert.classifier, Linear4bit)
    assert isinstance(bert.bert.encoder.layer[0].attention.self.query, Linear4bit)


def test_trainable_parameter_count_counts_two_weights_per_packed_byte():
    full = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    _, model = qlora()
    assert model.get_nb_trainable_parameters() == full.get_nb_trainable_parameters()[:1] + (
        full.get_nb_trainable_parameters()[1],)
