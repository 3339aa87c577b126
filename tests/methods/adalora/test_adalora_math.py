"""AdaLoRA against its equations written out with plain tensors: the forward and merge, the
orthogonality penalty, the budget schedule, the importance EMAs and the masking, and a short
training run in which the hooks (never called by hand under the trainer) prune to target_r.

    h = W0 x + b + s * B diag(E) A x,    s = lora_alpha / (init_r + 1e-5)
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.methods.adalora import allocator
from peftkit.train import Trainer, TrainingArguments
from tiny_models import LinearConv1DNet

NAMES = ("lin", "gpt")



def make(seed: int = 0, **kw) -> PeftModel:
    kwargs = dict(target_modules=list(NAMES), init_r=6, target_r=2, total_step=20, lora_alpha=4) | kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is corrected per layer type
        return get_peft_model(LinearConv1DNet(seed), AdaLoraConfig(**kwargs))


def layers(model, name="default"):
    return allocator.adalora_layers(model.base_model, name)


def direct(model, x):
    """The equation layer by layer with plain tensors (Conv1D computes x W + b)."""
    lin, gpt = (model.base_model.model.get_submodule(k) for k in NAMES)
    s = 4 / (6 + 1e-5)

    def low_rank(layer, h):
        a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
        return s * ((h @ a.T) * e.T) @ b.T  # (batch, r) scaled column-wise by E, then (batch, out)

    h = x @ lin.base_layer.weight.T + lin.base_layer.bias + low_rank(lin, x)
    h = torch.relu(h)
    return h @ gpt.base_layer.weight + gpt.base_layer.bias + low_rank(gpt, h)


def test_forward_and_merge_follow_the_equation():
    model, x = make(init_lora_weights=False), torch.randn(5, 8)
    with torch.no_grad():
        want = direct(model, x)
        torch.testing.assert_close(model(x=x)["logits"], want, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(x=x)["logits"], want, atol=1e-4, rtol=1e-4)


def test_fresh_adapter_changes_nothing_and_starts_as_hf_does():
    model, x = make(), torch.randn(5, 8)
    with torch.no_grad(), model.disable_adapter():
        base = model(x=x)["logits"]
    assert torch.equal(model(x=x)["logits"], base)
    for layer in layers(model).values():
        assert torch.equal(layer.lora_E["default"], torch.zeros(6, 1))
        assert 0.005 < layer.lora_A["default"].std() < 0.05 and 0.005 < layer.lora_B["default"].std() < 0.05


def test_rank_pattern_builds_pruned_layers_with_the_initial_scale():
    pattern = {"lin.lora_E": [True, False, True, False, False, False], "gpt.lora_E": [False] * 6}
    found = layers(make(rank_pattern=pattern))
    assert found["lin"].lora_A["default"].shape == (2, 8) and found["lin"].lora_B["default"].shape == (16, 2)
    assert found["gpt"].lora_E["default"].shape == (0, 1)
    assert all(layer.scaling["default"] == pytest.approx(4 / 6, rel=1e-5) for layer in found.values())


def test_orth_penalty_is_the_mean_frobenius_distance_to_identity():
    model = make(init_lora_weights=False, orth_reg_weight=0.3)
    norms = []
    for layer in layers(model).values():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        norms += [((a @ a.T - torch.eye(6)) ** 2).sum().sqrt(), ((b.T @ b - torch.eye(6)) ** 2).sum().sqrt()]
    torch.testing.assert_close(model.adapter_loss(), 0.3 * sum(norms) / 4)
    assert make(orth_reg_weight=0.0).adapter_loss() is None


def test_budget_schedule_is_cubic_between_tinit_and_total_step_minus_tfinal():
    config = AdaLoraConfig(target_modules=["lin"], tinit=2, tfinal=3, total_step=12, deltaT=2)
    got = {t: allocator.budget_schedule(config, t, 24, 8) for t in (1, 2, 3, 4, 6, 8, 9, 10, 12)}
    # b(t) = int(8 + 16 (1 - (t - 2) / 7)^3) between t = 3 and t = 9; masks every deltaT = 2 steps
    assert got == {1: (24, False), 2: (24, False), 3: (int(8 + 16 * (6 / 7) ** 3), False),
                   4: (int(8 + 16 * (5 / 7) ** 3), True), 6: (int(8 + 16 * (3 / 7) ** 3), True),
                   8: (int(8 + 16 * (1 / 7) ** 3), True), 9: (8, False), 10: (8, True), 12: (8, True)}
    assert [got[t][0] for t in (3, 4, 6, 8)] == [18, 13, 9, 8]


def test_importance_is_an_ema_of_sensitivity_and_its_deviation():
    model = make(init_lora_weights=False)
    layer = layers(model)["lin"]
    e = layer.lora_E["default"]
    grads = [torch.randn_like(e) for _ in range(2)]
    avg = unc = torch.zeros_like(e)
    for g in grads:
        e.grad = g
        for other in (layer.lora_A["default"], layer.lora_B["default"]):
            other.grad = torch.zeros_like(other)
        allocator.update_importance(layer, "default", 0.85, 0.7)
        sens = (e * g).abs().detach()
        avg = 0.85 * avg + 0.15 * sens
        unc = 0.7 * unc + 0.3 * (sens - avg).abs()
    got_avg, got_unc = layer.importance["default"]["lora_E"]
    torch.testing.assert_close(got_avg, avg)
    torch.testing.assert_close(got_unc, unc)
    torch.testing.assert_close(allocator.triplet_scores(layer, "default"), (avg * unc).view(-1))


def test_masking_prunes_the_lowest_scoring_triplets_over_all_layers():
    model = make(init_lora_weights=False)
    found = layers(model)
    scores = {"lin": torch.tensor([5., 1., 7., 3., 11., 2.]), "gpt": torch.tensor([4., 10., 0.5, 9., 6., 8.])}
    for key, layer in found.items():  # E's score is the triplet score; A and B score 0
        ones = {f: torch.zeros_like(p) for f, p in layer.adapter_tensors("default").items()}
        ones["lora_E"] = scores[key].view(-1, 1)
        layer.importance["default"] = {f: (v, torch.ones_like(v)) for f, v in ones.items()}
    pattern = allocator.mask_to_budget(found, "default", budget=7)
    # the 5 lowest of all 12 scores: 0.5, 1, 2, 3, 4
    assert pattern == {"lin.lora_E": [True, False, True, False, True, False],
                       "gpt.lora_E": [False, True, False, True, True, True]}
    for key, layer in found.items():
        kept = torch.tensor(pattern[f"{key}.lora_E"])
        assert (layer.lora_E["default"][~kept] == 0).all() and (layer.lora_E["default"][kept] != 0).all()


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :4].argmax(-1))


def test_plain_loop_with_hooks_learns_prunes_to_target_and_saves_pruned(tmp_path):
    model, (x, y) = make(tinit=3, tfinal=4, total_step=20, deltaT=2), data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    losses = []
    for step in range(1, 21):
        loss = model(x=x, labels=y)["loss"]
        losses.append(loss.item())
        (loss + model.adapter_loss()).backward()
        opt.step()
        model.after_optimizer_step(step)
        opt.zero_grad()
    assert losses[-1] < 0.8 * losses[0]
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in pattern.values()) == 2 * 2  # target_r per layer
    for key, layer in layers(model).items():
        assert (layer.lora_E["default"][~torch.tensor(pattern[f"{key}.lora_E"])] == 0).all()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(saved[f"base_model.model.{k}.lora_E"].shape[0] for k in NAMES) == 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern
    loaded = PeftModel.from_pretrained(LinearConv1DNet(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x=x)["logits"], model(x=x)["logits"], atol=1e-6, rtol=0)


def test_trainer_runs_the_allocator_without_being_asked():
    model, (x, y) = make(total_step=8, tfinal=2), data()
    args = TrainingArguments(progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                             batch_size=16, max_steps=8)
    Trainer(model, args, [{"x": x[i], "labels": y[i]} for i in range(64)]).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(kept) for kept in pattern.values()) == 4


@pytest.mark.parametrize("crash_at", [7, 11])  # while scores are smoothed; after the ranks are fixed (step 9)
def test_a_killed_and_resumed_trainer_run_prunes_exactly_as_one_that_never_stopped(tmp_path, crash_at):
    x, y = data()
    batches = [{"x": x[i], "labels": y[i]} for i in range(64)]

    def run(out, crash_at=None, resume=False):
        model = make(total_step=12, tinit=2, tfinal=3, deltaT=2)
        if crash_at is not None:  # dies inside step crash_at, after the checkpoint of the step before
            hook = model.after_optimizer_step
            model.after_optimizer_step = lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == crash_at else hook(step)
        args = TrainingArguments(progress_bar=False, tensorboard=False, learning_rate=1e-2, device="cpu",
                                 batch_size=16, max_steps=12, output_dir=str(out), save_steps=1)
        Trainer(model, args, batches).train(resume_from=resume)
        return model
    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=crash_at)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.peft_config["default"].rank_pattern == straight.peft_config["default"].rank_pattern
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_training_state_round_trips_the_scores_masks_and_pattern():
    model, (x, y) = make(tinit=1, deltaT=1), data()
    for step in range(1, 5):
        model(x=x, labels=y)["loss"].backward()
        model.after_optimizer_step(step)
        model.zero_grad()
    state = model.training_state()
    assert state["default"]["importance"] and state["default"]["kept"]
    other = make(tinit=1, deltaT=1)
    other.load_training_state(state)
    again = other.training_state()["default"]
    assert again["rank_pattern"] == state["default"]["rank_pattern"]
    for key, kept in state["default"]["kept"].items():
        assert torch.equal(again["kept"][key], kept)
    for key, scores in state["default"]["importance"].items():
        for factor, pair in scores.items():
            assert all(torch.equal(a, b) for a, b in zip(again["importance"][key][factor], pair))
    with pytest.raises(ValueError, match="lacks"):
        other.load_training_state({"nope": state["default"]})


def test_allocator_without_gradients_says_when_to_call_it():
    model = make()
    with pytest.raises(ValueError, match="before optimizer.zero_grad"):
        model.after_optimizer_step(1)


def test_total_step_may_come_later_but_is_required_to_wrap_a_model():
    config = AdaLoraConfig(target_modules=["lin"])  # peftkit train fills it from the run's length
    with pytest.raises(ValueError, match="total_step=None"):
        get_peft_model(LinearConv1DNet(0), config)


@pytest.mark.parametrize("bad", [dict(total_step=0), dict(init_r=0), dict(beta1=1.0), dict(tinit=20),
                                 dict(orth_reg_weight=-1), dict(deltaT=0), dict(rank_pattern={"lin.lora_E": [1, 0]})])
def test_config_is_validated_with_the_field_named(bad):
    kwargs = dict(target_modules=["lin"], total_step=20) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        AdaLoraConfig(**kwargs)


def test_target_r_above_init_r_fails_at_the_first_allocation():
    model, (x, y) = make(init_r=2, target_r=3), data()
    model(x=x, labels=y)["loss"].backward()
    with pytest.raises(ValueError, match="target_r=3"):
        model.after_optimizer_step(1)


def test_hf_lora_fields_in_a_file_are_dropped_quietly_at_their_defaults():
    data_ = AdaLoraConfig(target_modules=["lin"], total_step=5).to_dict() | {"r": 8, "use_rslora": False, "alpha_pattern": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig.from_dict(data_)
    with pytest.warns(UserWarning, match="init_r"):
        AdaLoraConfig.from_dict(data_ | {"r": 4})


def test_loading_an_earlier_state_drops_masks_and_scores_it_did_not_have():
    """Restoring the state of a step before the first allocation (load_best_at_end) leaves no mask."""
    model, (x, y) = make(tinit=2, deltaT=1), data()
    early = model.training_state()
    for step in range(1, 5):
        model(x=x, labels=y)["loss"].backward()
        model.after_optimizer_step(step)
        model.zero_grad()
    assert all(layer.kept and layer.importance for layer in layers(model).values())
    model.load_training_state(early)
    assert not any(layer.kept or layer.importance for layer in layers(model).values())
    assert model.peft_config["default"].rank_pattern == early["default"]["rank_pattern"]


def test_a_second_trainable_adapter_is_refused_and_one_in_inference_mode_is_not():
    """As HF PEFT: one trainable AdaLoRA adapter per model; a refused add leaves the model as it was."""
    model = make()
    second = dict(target_modules=["lin"], init_r=6, target_r=2, total_step=20)
    with pytest.raises(ValueError, match="already has a trainable AdaLoRA adapter .'default'.*inference_mode=True"):
        model.add_adapter("other", AdaLoraConfig(**second))
    assert list(model.peft_config) == ["default"] and not any(".other" in n for n, _ in model.named_parameters())
    model.add_adapter("other", AdaLoraConfig(**second, inference_mode=True))
    model.set_adapter(["default", "other"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n and n.endswith(".default")}
    model.delete_adapter("default")
    model.add_adapter("third", AdaLoraConfig(**second))  # the only trainable one now
