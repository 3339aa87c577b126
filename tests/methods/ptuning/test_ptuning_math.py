"""P-tuning against a direct computation: the MLP and LSTM encoders by hand, the forward as the base
model on [f(V) ; E[x]], folding on save, generate, training and errors.

The contract suite (tests/test_contract.py, row in case.py) covers switching, save/load, names,
disabling, requires_grad, deleting, config round trips and checkpointing.
"""
from __future__ import annotations

import pytest
import torch

from methods.prompt.helpers import direct
from peftkit import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tiny_models import FAMILIES, lm_losses, logits, model_inputs, tiny_llama

P = 4


def build(family: str = "llama", **overrides):
    builder, _, task = FAMILIES[family]
    torch.manual_seed(100)
    return get_peft_model(builder(0), PromptEncoderConfig(**{"num_virtual_tokens": P, "task_type": task, **overrides}))


def encoder(model, name: str = "default"):
    layer = next(l for _, l in model.base_model.adapter_layers() if name in getattr(l, "prompt_encoder", {}))
    return layer.prompt_encoder[name]


def lstm_by_hand(lstm: torch.nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """Bidirectional multi-layer LSTM over x (n, d) -> (n, 2h), the gate equations written out."""
    for layer in range(lstm.num_layers):
        outs = []
        for suffix, order in (("", range(x.shape[0])), ("_reverse", reversed(range(x.shape[0])))):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}{suffix}"), getattr(lstm, f"weight_hh_l{layer}{suffix}")
            b = getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            h = c = torch.zeros(lstm.hidden_size)
            seq = [None] * x.shape[0]
            for t in order:
                i, f, g, o = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                seq[t] = h
            outs.append(torch.stack(seq))
        x = torch.cat(outs, dim=-1)  # (n, 2h)
    return x


def test_mlp_encoder_is_three_linears_with_relu_by_hand():
    enc = encoder(build(encoder_hidden_size=12))
    v = enc.embedding.weight.detach()
    l1, l2, l3 = enc.mlp_head[0], enc.mlp_head[2], enc.mlp_head[4]
    want = (torch.relu(torch.relu(v @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias) @ l3.weight.T + l3.bias)
    torch.testing.assert_close(enc()[0].detach(), want, atol=1e-6, rtol=0)


def test_lstm_encoder_is_a_bidirectional_lstm_then_an_mlp_by_hand():
    enc = encoder(build(encoder_reparameterization_type="LSTM", encoder_hidden_size=6, encoder_num_layers=2))
    with torch.no_grad():
        hidden = lstm_by_hand(enc.lstm_head, enc.embedding.weight)  # (p, 12)
        l1, l2 = enc.mlp_head[0], enc.mlp_head[2]
        want = torch.relu(hidden @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
        torch.testing.assert_close(enc()[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_equals_base_on_encoder_output_then_embeddings(family):
    model, x = build(family), model_inputs()
    x["attention_mask"][1, :3] = 0
    want = direct(FAMILIES[family][0](0), encoder(model)()[0].detach(), x).logits
    torch.testing.assert_close(logits(model, x), want, atol=0, rtol=0)


def test_saving_folds_the_encoder_and_a_trainable_load_gives_the_fix_which_works(tmp_path):
    model = build(encoder_reparameterization_type="LSTM", encoder_hidden_size=6)
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    torch.testing.assert_close(logits(frozen, model_inputs()), logits(model, model_inputs()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="encoder is folded away") as err:
        PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert "PromptTuningConfig" in str(err.value)
    resumed = PeftModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True,
                                        config=PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"))
    torch.testing.assert_close(logits(resumed, model_inputs()), logits(frozen, model_inputs()), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_by_hand(family):
    model, x = build(family), model_inputs(batch=2, length=5)
    out = model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = x["input_ids"]
    for _ in range(4):
        step = logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
        ids = torch.cat([ids, step[:, None]], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_only_the_encoder_trains_and_the_loss_falls(kind):
    model = get_peft_model(tiny_llama(0, initializer_range=0.2), PromptEncoderConfig(
        num_virtual_tokens=P, task_type="CAUSAL_LM", encoder_reparameterization_type=kind))
    x = model_inputs(batch=4, length=8)
    assert all(".prompt_encoder.default." in n for n, p in model.named_parameters() if p.requires_grad)
    losses = lm_losses(model, x, lr=0.01)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_virtual_tokens=-1), "num_virtual_tokens"),
    (dict(encoder_reparameterization_type="GRU"), "encoder_reparameterization_type"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size"),
    (dict(encoder_num_layers=0), "encoder_num_layers"),
    (dict(encoder_dropout=1.5), "encoder_dropout"),
    (dict(task_type="SEQ_2_SEQ_LM"), "task_type"),
])
def test_config_errors_name_field_value_and_what_is_allowed(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: expected "):
        PromptEncoderConfig(**kwargs)


def test_mlp_depth_is_fixed_and_setting_it_warns_as_hf_does():
    with pytest.warns(UserWarning, match="ignored by the MLP"):
        PromptEncoderConfig(encoder_num_layers=3)
    config = build("gpt2").peft_config["default"]
    assert (config.token_dim, config.encoder_hidden_size, config.num_layers) == (32, 32, 2)
