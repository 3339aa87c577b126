"""Diff pruning against its equations written out with plain tensors: the hard-concrete gate and
its probabilities, the relaxed-L0 penalty, the projection onto the top-k magnitudes, the sparse
file, and the schedule and mask state under the trainer (a killed run resumes exactly).

    W' = W + z * w,   z = min(1, max(0, s (zeta - gamma) + gamma))
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from peftkit import DiffPruningConfig, PeftModel, get_peft_model
from peftkit.methods.diff_pruning import hooks
from peftkit.methods.diff_pruning.layer import hard_concrete
from peftkit.train import Trainer, TrainingArguments
from tiny_models import LinearConv1DNet

NAMES = ("lin", "gpt")



def make(seed: int = 0, **kw) -> PeftModel:
    kwargs = dict(target_modules=list(NAMES), total_step=20, init_diff_weights=False) | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is corrected per layer type
        model = get_peft_model(LinearConv1DNet(seed), DiffPruningConfig(**kwargs))
    model.eval()
    with torch.no_grad():  # gates spread over their range, some shut, some open, some between
        for layer in layers(model).values():
            layer.diff_log_alpha["default"].normal_(0, 3)
    return model


def layers(model, name="default"):
    return hooks.diff_layers(model.base_model, name)


def data(n=64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def gate_formula(log_alpha, config):
    """z without sampling, written out: sigmoid, stretch, clamp."""
    s = 1 / (1 + torch.exp(-log_alpha))
    return torch.clamp(s * (config.stretch_high - config.stretch_low) + config.stretch_low, 0, 1)


def direct(model, x):
    """W + z * w layer by layer with plain tensors (Conv1D computes x W + b)."""
    config = model.peft_config["default"]
    lin, gpt = (model.base_model.model.get_submodule(k) for k in NAMES)

    def weight(layer):
        return layer.base_layer.weight + gate_formula(layer.diff_log_alpha["default"], config) * layer.diff_w["default"]

    h = torch.relu(x @ weight(lin).T + lin.base_layer.bias)
    return h @ weight(gpt) + gpt.base_layer.bias


def test_forward_and_merge_follow_the_equation():
    model, (x, _) = make(), data()
    with torch.no_grad():
        expected = direct(model, x)
        torch.testing.assert_close(model(x=x)["logits"], expected, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(x=x)["logits"], expected, atol=1e-5, rtol=1e-5)


def test_sampled_gate_follows_the_formula_for_a_given_u():
    config = DiffPruningConfig(total_step=1)
    log_alpha = torch.randn(1000) * 3
    torch.manual_seed(0)
    z = hard_concrete(log_alpha, config, sample=True)
    torch.manual_seed(0)
    u = torch.rand(1000).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / config.temperature)
    torch.testing.assert_close(z, torch.clamp(s * 1.2 - 0.1, 0, 1))


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_gate_probabilities_of_zero_and_one_match_the_closed_forms(log_alpha):
    """P(z != 0) = sigmoid(log a - beta log(-gamma/zeta)) (the L0 term) and
    P(z == 1) = sigmoid(log a - beta logit((1 - gamma)/(zeta - gamma))), by Monte Carlo."""
    config = DiffPruningConfig(total_step=1)
    beta, gamma, zeta = config.temperature, config.stretch_low, config.stretch_high
    torch.manual_seed(0)
    z = hard_concrete(torch.full((400_000,), log_alpha), config, sample=True)
    nonzero = torch.sigmoid(torch.tensor(log_alpha - beta * math.log(-gamma / zeta)))
    t = (1 - gamma) / (zeta - gamma)
    one = torch.sigmoid(torch.tensor(log_alpha - beta * math.log(t / (1 - t))))
    assert abs((z > 0).float().mean() - nonzero) < 4e-3
    assert abs((z == 1).float().mean() - one) < 4e-3


def test_l0_penalty_is_the_weighted_expected_number_of_open_gates():
    model = make(l0_penalty=1e-3)
    config = model.peft_config["default"]
    shift = config.temperature * math.log(-config.stretch_low / config.stretch_high)
    expected = sum(torch.sigmoid(l.diff_log_alpha["default"] - shift).sum() for l in layers(model).values())
    torch.testing.assert_close(model.adapter_loss(), 1e-3 * expected)
    assert make(l0_penalty=0.0).adapter_loss() is None


def test_projection_keeps_exactly_the_top_k_magnitudes_over_all_layers():
    model, (x, _) = make(target_density=0.1), data()
    deltas = {k: l.delta_weight("default").clone() for k, l in layers(model).items()}
    flat = torch.cat([d.flatten() for d in deltas.values()])
    k = round(0.1 * flat.numel())
    kept = hooks.project(model.base_model, "default")
    assert kept == k
    masks = torch.cat([l.mask["default"].flatten() for l in layers(model).values()])
    assert int(masks.sum()) == k
    threshold = flat.abs().topk(k).values.min()
    assert (flat.abs()[masks] >= threshold).all() and (flat.abs()[~masks] <= threshold).all()
    for key, layer in layers(model).items():  # w now holds delta on the mask and 0 elsewhere
        assert torch.equal(layer.diff_w["default"], deltas[key] * layer.mask["default"])
    lin, gpt = (model.base_model.model.get_submodule(n) for n in NAMES)
    h = torch.relu(x @ (lin.base_layer.weight + lin.diff_w["default"]).T + lin.base_layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x=x)["logits"], h @ (gpt.base_layer.weight + gpt.diff_w["default"]) + gpt.base_layer.bias)


def test_projected_adapter_saves_indices_and_values_and_reloads_exactly(tmp_path):
    model, (x, _) = make(target_density=0.05), data()
    hooks.project(model.base_model, "default")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in saved} == {"diff_indices", "diff_values"}
    assert sum(t.numel() for k, t in saved.items() if k.endswith("diff_values")) == round(0.05 * (8 * 16 + 16 * 4))
    loaded = PeftModel.from_pretrained(LinearConv1DNet(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x=x)["logits"], model(x=x)["logits"], atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    for key, layer in layers(loaded).items():
        assert torch.equal(layer.mask["default"], layers(model)[key].mask["default"])


def test_a_file_whose_indices_do_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = make(target_density=0.05)
    hooks.project(model.base_model, "default")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved["base_model.model.lin.diff_indices"][0] = 10_000
    save_file(saved, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="reach outside the weight's 128 entries"):
        PeftModel.from_pretrained(LinearConv1DNet(0), tmp_path)


def test_schedule_projects_at_total_step_minus_fixed_mask_steps_and_keeps_the_mask():
    model, (x, y) = make(total_step=6, fixed_mask_steps=2, target_density=0.2), data()
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 7):
        extra = model.adapter_loss()
        assert (extra is None) == (step > 4)  # the penalty ends with the gates, once projected
        (F.cross_entropy(model(x=x)["logits"], y) + (0 if extra is None else extra)).backward()
        opt.step()
        model.after_optimizer_step(step)
        opt.zero_grad()
        projected = [("default" in l.mask) for l in layers(model).values()]
        assert all(projected) == (step >= 4) and any(projected) == (step >= 4)
        if step >= 4:  # Adam's momentum would move entries off the mask; they stay exactly 0
            for layer in layers(model).values():
                assert not layer.diff_w["default"][~layer.mask["default"]].any()


def test_trainer_projects_without_being_asked():
    model, (x, y) = make(total_step=8, fixed_mask_steps=3, target_density=0.1), data()
    args = TrainingArguments(progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                             batch_size=16, max_steps=8)
    Trainer(model, args, [{"x": x[i], "labels": y[i]} for i in range(64)]).train()
    assert sum(int(l.mask["default"].sum()) for l in layers(model).values()) == round(0.1 * 192)


@pytest.mark.parametrize("crash_at", [4, 7])  # before the projection (after step 5); after it
def test_a_killed_and_resumed_trainer_run_ends_exactly_as_one_that_never_stopped(tmp_path, crash_at):
    x, y = data()
    batches = [{"x": x[i], "labels": y[i]} for i in range(64)]

    def run(out, crash_at=None, resume=False):
        model = make(total_step=8, fixed_mask_steps=3, target_density=0.1, l0_penalty=1e-2)
        if crash_at is not None:  # dies inside step crash_at, after the checkpoint of the step before
            hook = model.after_optimizer_step
            model.after_optimizer_step = lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == crash_at else hook(step)
        args = TrainingArguments(progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                                 batch_size=16, max_steps=8, output_dir=str(out), save_steps=1)
        Trainer(model, args, batches).train(resume_from=resume)
        return model
    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=crash_at)
    resumed = run(tmp_path / "b", resume=True)
    for key, layer in layers(straight).items():
        assert torch.equal(layer.mask["default"], layers(resumed)[key].mask["default"])
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_training_state_round_trips_the_masks():
    model, (x, _) = make(target_density=0.1), data()
    hooks.project(model.base_model, "default")
    state = model.training_state()
    other = make()
    other.load_state_dict(model.state_dict())
    other.load_training_state(state)
    with torch.no_grad():
        torch.testing.assert_close(other(x=x)["logits"], model(x=x)["logits"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="names layers this model lacks"):
        make(target_modules=["lin"]).load_training_state(state)


def test_total_step_is_required_to_wrap_a_model():
    DiffPruningConfig()  # may come later (`peftkit train` fills it)
    with pytest.raises(ValueError, match="total_step=None is invalid"):
        get_peft_model(LinearConv1DNet(0), DiffPruningConfig(target_modules=["lin"]))


@pytest.mark.parametrize("bad", [dict(target_density=0), dict(target_density=1.5), dict(fixed_mask_steps=5, total_step=5),
                                 dict(l0_penalty=-1), dict(temperature=0), dict(stretch_low=0.1), dict(stretch_high=1.0),
                                 dict(fixed_mask_steps=-1)])
def test_config_is_validated_with_the_field_named(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
        DiffPruningConfig(**bad)
